"""What a run of a language model (``model.kind = "hf"``) adds to the runner's rounds.

- The base check: the server hashes the frozen base weights (:func:`confide.models.hf.base_sha256`) at start
  and every site must hold the same base. The local backend checks each simulated site; a deployed site gets
  the hash in the config the server sends (``model.base_sha256``) and checks its own model at join.
- Bytes: what one site's update costs under LoRA (the adapter vector) against full fine-tuning (every weight).
- Peak memory of the sites' training (CUDA's peak allocation, else the process's peak resident size).
- ROUGE-L (Lin 2004, with Google's ``rouge-score``) of greedy answers against the references, on a seeded
  sample of held-out instruction examples. It needs the examples, so it runs where the data is: in a
  simulation (the local backend); a deployment's server, which holds no data, reports loss and perplexity.
- A run that trains every weight (no adapter) writes its final model to ``RUN_DIR/base`` as save_pretrained
  does, so that a later run can name the run directory as its ``model.path``: a base pretrained federatedly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from confide.config import Config
from confide.core import Layout, Vector
from confide.data.dataset import FederatedDataset
from confide.data.llm import is_instruction_rows, prompts_and_references
from confide.models.hf import HFCausalLM, base_sha256, save_base
from confide.randomness import Stream, public_rng


def rouge_l(model: HFCausalLM, pairs: Sequence[tuple[str, str]], max_new_tokens: int) -> list[float]:
    """ROUGE-L F1 of the model's greedy answer to each prompt against its reference."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    answers = model.complete([p for p, _ in pairs], max_new_tokens, temperature=0.0)
    return [
        scorer.score(reference, answer)["rougeL"].fmeasure
        for (_, reference), answer in zip(pairs, answers, strict=True)
    ]


class LanguageModelRun:
    """The language-model parts of one run: base hash, bytes, memory, ROUGE-L and the saved base."""

    def __init__(self, config: Config, model: HFCausalLM, layout: Layout) -> None:
        self.config = config
        self.model = model
        self.layout = layout
        self.base_sha256 = config.model.get("base_sha256") or base_sha256(model)
        self.full_model_bytes = model.full_model_bytes()

    def sample(self, dataset: FederatedDataset | None, sites: Sequence[str]) -> list[tuple[str, str]]:
        """The seeded sample of held-out (prompt, reference) pairs ROUGE-L is computed on (empty for text)."""
        count = self.config.eval.rouge_samples
        if dataset is None or count == 0:
            return []
        rows = [dataset.by_name(name).test for name in sites]
        rows = [r for r in rows if is_instruction_rows(r)]
        if not rows:
            return []
        pooled = np.concatenate(rows)
        rng = public_rng(self.config.run.seed, 0, Stream.EVAL)
        chosen = np.sort(rng.choice(len(pooled), min(count, len(pooled)), replace=False))
        return prompts_and_references(pooled[chosen], self.model.tokenizer)

    def metrics(
        self, weights: Vector, pairs: Sequence[tuple[str, str]], peaks: Mapping[str, int]
    ) -> dict[str, float]:
        update_bytes = 4 * self.layout.size
        out = {
            "update_bytes": float(update_bytes),
            "full_model_bytes": float(self.full_model_bytes),
            "update_fraction": update_bytes / max(self.full_model_bytes, 1),
        }
        if peaks:
            out["site_peak_memory_max"] = float(max(peaks.values()))
            out["site_peak_memory_mean"] = float(np.mean(list(peaks.values())))
        if pairs:
            self.layout.write(self.model, weights)
            out["rouge_l"] = float(np.mean(rouge_l(self.model, pairs, self.config.eval.max_new_tokens)))
        return out

    def finish(self, run_dir: Path, weights: Vector) -> None:
        """After the last round of a run without adapters: the model as a base for later runs."""
        if self.config.adapter.kind == "none":
            save_base(self.model, weights, run_dir / "base")
