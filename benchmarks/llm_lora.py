"""Does federated LoRA under DP and secure aggregation beat the base model and each site fine-tuning alone?

The recipe of ``examples/llm-lora.toml`` (instruction data, one site per role, LoRA on the attention, every
site clipping, noising and masking its adapter update) on the pretrained model at ``--model PATH`` (a
directory written by save_pretrained, or a finished confide run such as ``runs/llm-base``), with a GPU when
there is one. Three models are scored on every site's held-out examples:

- base: the model as loaded, no adapter;
- local-only: each site trains its own adapter on its own examples alone, with the same optimizer for as many
  steps as it takes in the whole federated run (rounds x local steps), no DP (nothing leaves the site);
- federated: the adapter of the federated run.

Reported: held-out loss and perplexity on the answer tokens (pooled, and the mean over sites), ROUGE-L of
greedy answers (rouge-score) on the first held-out example of every site, training tokens/s per site, s/round,
adapter bytes per site and round (each way) against the full model's, and the peak memory of a site's
training. FlowerTune's and OpenFedLLM's published settings are printed beside ours for scale.

    python benchmarks/llm_lora.py --model runs/llm-base               # the CPU demo's base (~3 min, 2 cores)
    python benchmarks/llm_lora.py --model PATH --rounds 5 --markdown  # any local causal LM

Run directories go to a temporary folder unless ``--output`` names one.
"""

from __future__ import annotations

import argparse
import time
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import Recorder, build_config, console, machine, merge, output_folder, show
from confide.core import Plan, SiteEvaluation
from confide.data.llm import prompts_and_references
from confide.report import human_bytes
from confide.runtime.federation import summarize
from confide.runtime.llm import rouge_l
from confide.runtime.runner import Runner

RECIPE = Path(__file__).resolve().parent.parent / "examples" / "llm-lora.toml"

PEERS = [
    # (setting, FlowerTune LLM leaderboard, OpenFedLLM (Ye et al. 2024))
    ("base model", "Mistral-7B-v0.3, 4-bit (QLoRA)", "Llama-2-7B"),
    ("adapter", "LoRA r=32, alpha=64", "LoRA r=32, alpha=64"),
    ("clients", "20 per challenge, 10% a round", "20, 2 a round"),
    ("rounds", "200", "200"),
    ("communication budget", "200 GB in all", "not bounded"),
    ("privacy", "none", "none in the main results"),
]


def scores(evaluations: list[SiteEvaluation]) -> dict[str, float]:
    pooled, _ = summarize(evaluations)
    return {
        "loss": pooled["loss"],
        "perplexity": pooled["perplexity"],
        "site": pooled["site_perplexity_mean"],
    }


def local_only(
    runner: Runner, start: np.ndarray, pairs: list[tuple[str, str, str]], steps: int
) -> dict[str, Any]:
    """Each site's own adapter, trained alone from the initial one: its evaluation, ROUGE-L and speed."""
    assert runner.dataset is not None and runner.lm is not None
    trainer = runner.backend.kit.trainer  # type: ignore[attr-defined]
    model = runner.lm.model
    c = runner.config.client
    evaluations, rouge, speed = [], [], []
    by_site = {site: (prompt, reference) for site, prompt, reference in pairs}
    for k, name in enumerate(runner.eval_sites):
        site = runner.dataset.by_name(name)
        plan = Plan(
            round=1,
            epochs=10**6,
            max_steps=steps,
            batch_size=c.batch_size,
            learning_rate=c.learning_rate,
            seed=k,
        )
        fit = trainer.fit(start, site.train, plan)
        weights = start + fit.delta
        loss_sum, correct, targets = trainer.evaluate(weights, site.test).sum(0)
        evaluations.append(SiteEvaluation(name, float(loss_sum), int(correct), int(targets)))
        tokens = float((site.train[:, 0] >= 0).sum(1).mean()) * c.batch_size * fit.steps
        speed.append(tokens / max(fit.seconds, 1e-9))
        if name in by_site:
            runner.layout.write(model, weights)
            rouge += rouge_l(model, [by_site[name]], runner.config.eval.max_new_tokens)
    return {
        **scores(evaluations),
        "rouge_l": float(np.mean(rouge)),
        "tokens_per_second": float(np.mean(speed)),
    }


def evaluate(runner: Runner, weights: np.ndarray, pairs: list[tuple[str, str, str]]) -> dict[str, Any]:
    assert runner.lm is not None and runner.dataset is not None
    # Measured by the benchmark in clear, site by site (the run itself shows its server only the sum of the
    # sites' evaluations under secure aggregation, which has no per-site spread).
    trainer = runner.backend.kit.trainer  # type: ignore[attr-defined]
    evaluations = []
    for name in runner.eval_sites:
        loss_sum, correct, targets = trainer.evaluate(weights, runner.dataset.by_name(name).test).sum(0)
        evaluations.append(SiteEvaluation(name, float(loss_sum), int(correct), int(targets)))
    out = scores(evaluations)
    runner.layout.write(runner.lm.model, weights)
    answers = rouge_l(runner.lm.model, [(p, r) for _, p, r in pairs], runner.config.eval.max_new_tokens)
    return {**out, "rouge_l": float(np.mean(answers))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", required=True, help="a save_pretrained directory or a finished confide run"
    )
    parser.add_argument(
        "--config", type=Path, default=RECIPE, help="the recipe (default examples/llm-lora.toml)"
    )
    parser.add_argument("--data", help="instruction .jsonl (default: the recipe's)")
    parser.add_argument("--rounds", type=int, help="rounds (default: the recipe's)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default")
    parser.add_argument("--output", help="keep the run directories here")
    parser.add_argument("--markdown", action="store_true", help="also print the tables as markdown")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    raw = tomllib.loads(args.config.read_text(encoding="utf-8"))
    overrides: dict[str, Any] = {"model": {"path": args.model}, "eval": {"every": 10**6}}
    if args.rounds:
        overrides["run"] = {"rounds": args.rounds, "checkpoint_every": args.rounds}
    if args.data:
        overrides["data"] = {"path": args.data}
    console.print(f"[bold]Federated LoRA against base and local-only[/] on {machine()}")
    with output_folder(args.output, "llm") as output:
        config = build_config(merge(raw, overrides), output, "federated")
        config = replace(config, eval=replace(config.eval, rouge_samples=0))  # ROUGE-L below, per site
        started = time.perf_counter()
        runner = Runner.start(config)
        assert runner.lm is not None and runner.dataset is not None
        start = runner.state.weights.copy()
        pairs = []
        for name in runner.eval_sites:
            prompt, reference = prompts_and_references(
                runner.dataset.by_name(name).test[:1], runner.lm.model.tokenizer
            )[0]
            pairs.append((name, prompt, reference))
        base = evaluate(runner, start, pairs)
        console.print(f"base evaluated ({time.perf_counter() - started:.0f} s)")
        recorder = Recorder()
        runner.run(recorder)
        federated = evaluate(runner, runner.state.weights, pairs)
        console.print(f"federated run done ({time.perf_counter() - started:.0f} s)")
        steps = config.run.rounds * (config.client.max_steps or 10**6)
        alone = local_only(runner, start, pairs, steps)
        console.print(f"local-only adapters done ({time.perf_counter() - started:.0f} s)")
        metrics = runner.lm.metrics(runner.state.weights, [], runner.backend.peak_memory)  # type: ignore[attr-defined]
        runner.store.close()
    rounds = recorder.rounds
    seconds = float(np.mean([r.seconds for r in rounds]))
    per_site_steps = np.mean([r.compute_seconds / max(len(r.participants), 1) for r in rounds])
    rows = [
        (label, f"{m['loss']:.3f}", f"{m['perplexity']:.2f}", f"{m['site']:.2f}", f"{m['rouge_l']:.3f}")
        for label, m in (
            ("base", base),
            ("local-only adapters (mean site)", alone),
            ("federated adapter", federated),
        )
    ]
    show(
        f"Held-out answers of {len(runner.eval_sites)} sites, {config.run.rounds} rounds "
        f"(DP {config.privacy.dp}, z = {config.privacy.noise_multiplier}, secure aggregation "
        f"{config.privacy.secure_aggregation})",
        ["model", "loss", "perplexity (pooled)", "perplexity (site mean)", "ROUGE-L"],
        rows,
        args.markdown,
    )
    epsilon = runner.dp.spent().worst_site if runner.dp is not None else float("nan")
    cost = [
        ("training tokens/s per site", f"{alone['tokens_per_second']:.0f}"),
        (
            "seconds per round (all sites, one process)",
            f"{seconds:.2f} (a site's share {per_site_steps:.2f})",
        ),
        ("adapter bytes per site and round, each way", human_bytes(metrics["update_bytes"])),
        ("full model bytes (what full fine-tuning sends)", human_bytes(metrics["full_model_bytes"])),
        ("adapter / full", f"{100 * metrics['update_fraction']:.2f}%"),
        ("peak memory of a site's training", human_bytes(metrics.get("site_peak_memory_max", 0))),
        ("site-level epsilon (worst site, delta 1/(10 sites))", f"{epsilon:.2f}"),
    ]
    show("Cost", ["measure", "value"], cost, args.markdown)
    ours = (
        f"{args.model}, {runner.lm.full_model_bytes // 4:,} parameters",
        f"LoRA r={config.adapter.r}, alpha={config.adapter.alpha}",
        f"{len(runner.sites)}, {len(rounds[-1].participants)} a round",
        str(config.run.rounds),
        human_bytes(sum(r.bytes_sent + r.bytes_received for r in rounds)) + " in all",
        f"distributed DP (z = {config.privacy.noise_multiplier}) + SecAgg+",
    )
    show(
        "Settings beside FlowerTune's and OpenFedLLM's",
        ["setting", "this run", "FlowerTune", "OpenFedLLM"],
        [(s, o, f, p) for (s, f, p), o in zip(PEERS, ours, strict=True)],
        args.markdown,
    )


if __name__ == "__main__":
    main()
