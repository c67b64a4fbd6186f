"""Evaluating language models: ROUGE-L of greedy answers with rouge-score, and `confide run`, `generate`,
`report` and `export` on an 'hf' run, as a user types them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import tomli_w

from confide.cli import main
from confide.config import AdapterConfig
from confide.models.configs import HFConfig
from confide.models.hf import build_hf
from confide.runtime.llm import rouge_l


def test_rouge_l_scores_the_models_greedy_answers_against_references(llama_dir: Path) -> None:
    model = build_hf(HFConfig(path=str(llama_dir)), AdapterConfig(kind="lora"))
    prompts = ["Now is the winter", "To be, or not"]
    answers = model.complete(prompts, 6, temperature=0.0)
    assert model.complete(prompts, 6, temperature=0.0) == answers  # greedy: the same every time
    # Scored against its own answer a model gets 1; against a reference it never wrote, less.
    assert rouge_l(model, list(zip(prompts, answers, strict=True)), 6) == [1.0, 1.0]
    unrelated = rouge_l(model, [(p, "zebra quantum xylophone") for p in prompts], 6)
    assert all(0.0 <= score < 1.0 for score in unrelated)


def confide(*args: str | Path) -> subprocess.CompletedProcess[str]:
    # One thread: the model is tiny, and two threads that wait on each other crawl on a busy machine.
    return subprocess.run(
        [sys.executable, "-m", "confide.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_run_generate_and_report_on_an_hf_run(tmp_path: Path, llama_dir: Path, instructions: Path) -> None:
    config = {
        "run": {"name": "lora", "output": str(tmp_path / "runs"), "rounds": 2, "checkpoint_every": 1},
        "data": {"dataset": "text", "path": str(instructions)},
        "model": {"kind": "hf", "path": str(llama_dir), "max_length": 32},
        "adapter": {"kind": "lora", "r": 4},
        "client": {"max_steps": 2, "batch_size": 4, "optimizer": "adam", "learning_rate": 0.01},
        "server": {"sites_per_round": 3},
        "eval": {"rouge_samples": 2, "max_new_tokens": 4, "samples": 1, "sample_length": 8, "prompt": "To"},
        "privacy": {
            "dp": "distributed",
            "secure_aggregation": True,
            "clip_norm": 0.1,
            "noise_multiplier": 0.5,
        },
    }
    path = tmp_path / "lora.toml"
    path.write_text(tomli_w.dumps(config))
    result = confide("run", path)
    assert result.returncode == 0, result.stderr
    assert "language model: update" in result.stdout and "ROUGE-L" in result.stdout
    run_dir = tmp_path / "runs" / "lora"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["update_fraction"] < 0.05 and 0 <= rows[-1]["rouge_l"] <= 1
    assert "adapters against every weight" in (run_dir / "report.html").read_text()

    args = ("generate", run_dir, "--prompt", "Now is", "--length", "6", "--temperature", "0.9")
    sampled = confide(*args, "--top-k", "20", "--top-p", "0.9", "--seed", "4")
    assert sampled.returncode == 0, sampled.stderr
    assert sampled.stdout.startswith("Now is")
    assert confide(*args, "--top-k", "20", "--top-p", "0.9", "--seed", "4").stdout == sampled.stdout
    assert main([str(a) for a in args] + ["--top-p", "1.5"]) != 0

    # The export: the adapter in PEFT's format, and merged into its base, loaded by plain peft and
    # transformers, give the logits of the run's final model as confide computes them.
    assert confide("export", run_dir, "--out", tmp_path / "adapter").returncode == 0
    merged = confide("export", run_dir, "--out", tmp_path / "merged", "--merged")
    assert merged.returncode == 0, merged.stderr
    assert_exports_match_the_run(run_dir, llama_dir, tmp_path / "adapter", tmp_path / "merged")


def assert_exports_match_the_run(run_dir: Path, base_dir: Path, adapter_dir: Path, merged_dir: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from confide.core import Layout
    from confide.runtime.store import Store

    store = Store.open(run_dir)
    try:
        checkpoint = store.latest_checkpoint()
    finally:
        store.close()
    assert checkpoint is not None
    model = build_hf(HFConfig(path=str(base_dir), max_length=32), AdapterConfig(kind="lora", r=4))
    layout = Layout.of_module(model)
    before = layout.read(model).copy()
    final = checkpoint.weights
    assert not np.allclose(final, before)  # the adapter has learned something, so a wrong load would show
    layout.write(model, final)
    ids = torch.tensor([[5, 9, 13, 2, 7, 11]])
    with torch.no_grad():
        ours = model.lm(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(str(base_dir))
        adapted = PeftModel.from_pretrained(base, str(adapter_dir))(input_ids=ids).logits
        whole = AutoModelForCausalLM.from_pretrained(str(merged_dir))(input_ids=ids).logits
    torch.testing.assert_close(adapted, ours)
    torch.testing.assert_close(whole, ours, rtol=1e-4, atol=1e-5)
