"""Sites in parallel: confide's local backend with 1, 2 and 4 worker processes beside a plain loop (issue 21).

The same federated training as benchmarks/vs_flower.py, with its pieces (the workloads, the config, the plain
PyTorch loop, the launcher that runs each contender in a fresh process with one torch thread, the evaluation
and the agreement check), imported from it:

    plain          a plain PyTorch loop in one process, sites one after another: the floor, no framework
    confide-1      confide's Runner on the local backend with backend.workers = 1: every site in its process
    confide-2      ... with 2 worker processes
    confide-4      ... with 4 worker processes

and, with one CPU-bound process beside it (a busy loop in another Python process, started before the
contender and stopped after it), the plain loop and confide with as many workers as the machine has cores
(the default): ``plain+busy`` and ``confide-N+busy``.

Two workloads: compute-bound (10 sites a round, 20 local steps each) and overhead-bound (200 sites a round,
one step each), on the demo's LSTM and Shakespeare's roles. Columns: s/round (the mean of the rounds after the
first, over the repeats, which run the contenders in turn, every other time backwards) and its ratio to the
plain loop's in the same run; start-up (to the end of the first round, less a round); the final training loss;
and the largest difference of the final weights from confide-1's, which must be 0: the workers change where
the sites train, not what they compute.

Goals, for confide with one worker per core (the default): compute-bound at most 0.60x the plain loop,
overhead-bound at most 1.10x; beside one busy process a round at most 2x as long as without it.

Run from the repository root:

    .venv/bin/python benchmarks/parallel.py                 # the full run, about 15 minutes on 2 cores
    .venv/bin/python benchmarks/parallel.py --quick         # 2 rounds of smaller workloads, a few minutes
    .venv/bin/python benchmarks/parallel.py --workloads compute --repeats 2 --markdown

The ratios are measured in the same run, so a change in the machine's load moves them less than the seconds;
on a shared machine they still move: say so beside the numbers.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from common import console, machine, merge, show
from confide.client.trainer import Trainer
from confide.config import from_dict
from confide.data import DEFAULT_TOKENIZER
from confide.runtime.pool import cores
from confide.runtime.runner import build_model_for, load_dataset
from vs_flower import (
    Outcome,
    Workload,
    agreement,
    evaluation_windows,
    launch,
    raw_config,
    workload_arguments,
    workloads,
)

WORKERS = (1, 2, 4)
COMPUTE_GOAL = 0.60
"""confide, a worker per core: s/round at most this times the plain loop's on the compute-bound workload."""
OVERHEAD_GOAL = 1.10
"""... and at most this on the overhead-bound workload."""
BUSY_GOAL = 2.0
"""Beside one busy process, a round of confide (a worker per core) at most this many times as long."""
BUSY = "while True: pass"


def contenders() -> list[tuple[str, int, bool]]:
    """(name, workers (0: the plain loop), beside a busy process)."""
    default = cores()
    every = [("plain", 0, False), *((f"confide-{w}", w, False) for w in WORKERS)]
    return [*every, ("plain+busy", 0, True), (f"confide-{default}+busy", default, True)]


@contextmanager
def busy(on: bool) -> Iterator[None]:
    """One CPU-bound process beside whatever runs inside, when ``on``."""
    if not on:
        yield
        return
    process = subprocess.Popen([sys.executable, "-c", BUSY])
    try:
        time.sleep(0.5)  # it is running before the contender starts
        yield
    finally:
        process.kill()
        process.wait()


def compare(workload: Workload, args: argparse.Namespace, scratch: Path, log: Path) -> dict[str, Outcome]:
    raw = raw_config(workload, args)
    console.print(
        f"[bold]{workload.label}[/bold]: {workload.sites} sites a round, {workload.steps} local steps each, "
        f"{workload.rounds} rounds"
    )
    outcomes: dict[str, Outcome] = {}
    order = contenders()
    for repeat in range(args.repeats):
        for name, workers, beside in order[:: -1 if repeat % 2 else 1]:
            time.sleep(args.settle)
            began, load = time.perf_counter(), os.getloadavg()[0]
            kind = "plain" if workers == 0 else "confide"
            run = merge(raw, {"backend": {"workers": workers}}) if workers else raw
            with busy(beside):
                outcome = launch(kind, run, scratch / workload.key / f"{name}-{repeat}", log)
            outcome.contender = name
            if name in outcomes:
                outcomes[name].add(outcome)
            else:
                outcomes[name] = outcome
            console.print(
                f"   {name}: {time.perf_counter() - began:.0f} s (load average {load:.1f} before, "
                f"{os.getloadavg()[0]:.1f} after) {outcome.note}"
            )

    config = from_dict(raw)
    windows = evaluation_windows(config, load_dataset(config))
    trainer = Trainer(build_model_for(config, DEFAULT_TOKENIZER.vocab_size))
    for outcome in outcomes.values():
        if outcome.weights is not None:
            scores = trainer.evaluate(outcome.weights, windows).sum(0)
            outcome.eval_loss = float(scores[0] / scores[2])

    plain, one = outcomes["plain"], outcomes.get("confide-1")
    rows = []
    for outcome in outcomes.values():
        if outcome.weights is None:
            rows.append([outcome.contender, *["—"] * 6, outcome.note])
            continue
        base = outcomes["plain+busy"] if outcome.contender.endswith("+busy") else plain
        ratio = outcome.per_round / base.per_round if base.weights is not None else math.nan
        same = (
            f"{np.abs(outcome.weights - one.weights).max():.1e}"
            if one is not None and one.weights is not None and outcome.contender.startswith("confide")
            else "—"
        )
        gap, _ = agreement(outcome, plain)
        rows.append(
            [
                outcome.contender,
                f"{outcome.startup:.1f}",
                f"{outcome.per_round:.2f}",
                f"{ratio:.2f}x",
                f"{outcome.train_loss:.5f}",
                f"{outcome.eval_loss:.5f}",
                same,
                gap,
            ]
        )
    columns = [
        "contender",
        "start-up s",
        "s/round",
        "vs plain",
        "train loss",
        "eval loss",
        "max |w - confide-1|",
        "loss gap to plain",
    ]
    title = f"{workload.label}: {workload.sites} sites x {workload.steps} steps (+busy: vs plain+busy)"
    show(title, columns, rows, args.markdown)
    return outcomes


def goals(results: dict[str, dict[str, Outcome]], as_markdown: bool) -> bool:
    default = f"confide-{cores()}"
    rows, verdicts = [], []

    def check(label: str, target: str, value: float, met: bool) -> None:
        verdicts.append(met)
        rows.append([label, target, f"{value:.2f}x", "met" if met else "NOT MET"])

    for key, goal in (("compute", COMPUTE_GOAL), ("overhead", OVERHEAD_GOAL)):
        outcomes = results.get(key, {})
        plain, local = outcomes.get("plain"), outcomes.get(default)
        if plain and local and plain.weights is not None and local.weights is not None:
            ratio = local.per_round / plain.per_round
            check(f"{default} / plain ({key})", f"≤ {goal:.2f}x", ratio, ratio <= goal)
        alone, beside = outcomes.get(default), outcomes.get(f"{default}+busy")
        if alone and beside and alone.weights is not None and beside.weights is not None:
            slowdown = beside.per_round / alone.per_round
            check(
                f"{default} beside a busy process ({key})",
                f"≤ {BUSY_GOAL:.1f}x",
                slowdown,
                slowdown <= BUSY_GOAL,
            )
        one = outcomes.get("confide-1")
        for outcome in outcomes.values():
            if outcome.contender.startswith("confide") and one is not None and outcome.weights is not None:
                same = one.weights is not None and bool(np.array_equal(outcome.weights, one.weights))
                verdicts.append(same)
                if not same:
                    rows.append(
                        [f"{outcome.contender} = confide-1 ({key})", "identical", "differs", "NOT MET"]
                    )
    show("Goals", ["goal", "target", "measured", "verdict"], rows, as_markdown)
    return all(verdicts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    workload_arguments(parser, rounds=4, settle=3.0)
    args = parser.parse_args(argv)
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    torch.set_num_threads(1)
    console.print(f"[dim]{time.strftime('%Y-%m-%d %H:%M')}  {machine()}, {cores()} cores to run on[/dim]")
    console.print("[dim]torch: one thread in every process (each worker too)[/dim]\n")
    with tempfile.TemporaryDirectory(prefix="confide-bench-parallel-") as tmp:
        scratch = Path(args.output) if args.output else Path(tmp)
        scratch.mkdir(parents=True, exist_ok=True)
        log = scratch / "contenders.log"
        stamp = time.strftime("%H%M%S")
        results = {w.key: compare(w, args, scratch / stamp, log) for w in workloads(args)}
        met = goals(results, args.markdown)
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
