"""Helpers shared by the benchmarks: configs from dicts, a recording observer, the output folder, tables.

Not a benchmark itself. The benchmarks run from the repository root as ``python benchmarks/NAME.py``, which
puts this folder on ``sys.path``, so they import this module as ``common``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from confide.config import Config, from_dict
from confide.runtime.federation import RoundResult
from confide.runtime.runner import NullObserver, Runner

logging.getLogger("absl").setLevel(logging.ERROR)  # dp-accounting's harmless convergence notes

console = Console(highlight=False)
if not console.is_terminal:  # a log file: wide enough that the tables do not wrap
    console.width = 140


def merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` applied one level deep (``{"client": {"epochs": 5}}`` keeps the rest)."""
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in base.items()}
    for section, table in overrides.items():
        if isinstance(table, Mapping):
            out.setdefault(section, {}).update(table)
        else:
            out[section] = table
    return out


def lstm_shakespeare(args: Any) -> dict[str, Any]:
    """The raw config of the benchmarks' Shakespeare federation: the FedAvg paper's two-layer character LSTM
    with plain SGD at the sites and the server, from the flags every such benchmark takes (seed, rounds,
    max_sites, hidden, lr, batch_size, steps, sites_per_round, eval_every, threads)."""
    return {
        "run": {"seed": args.seed, "rounds": args.rounds, "checkpoint_every": 1_000_000},
        "data": {"dataset": "shakespeare", "max_sites": args.max_sites},
        "model": {"kind": "lstm", "embedding": 8, "hidden": args.hidden, "layers": 2},
        "client": {
            "optimizer": "sgd",
            "learning_rate": args.lr,
            "batch_size": args.batch_size,
            "max_steps": args.steps,
        },
        "server": {"sites_per_round": args.sites_per_round, "optimizer": "sgd", "learning_rate": 1.0},
        "eval": {"every": args.eval_every, "sites": 0, "samples": 0},
        "backend": {"threads": args.threads},
    }


def build_config(raw: Mapping[str, Any], output: Path, name: str) -> Config:
    """A validated Config from ``raw``, writing its run directory to ``output/name``."""
    return from_dict(merge(raw, {"run": {"output": str(output), "name": name}}))


@contextlib.contextmanager
def output_folder(path: str | None, prefix: str) -> Iterator[Path]:
    """``path`` when given (created, kept); else a temporary folder removed afterwards."""
    if path:
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix=f"confide-bench-{prefix}-") as tmp:
        yield Path(tmp)


@dataclass
class Recorder(NullObserver):
    """Keeps every RoundResult, every evaluation, and each round's wall time as the runner saw it.

    ``runner_seconds`` runs from ``round_started`` to ``round_finished``: the federation's round plus what the
    runner does around it (selection for the display, writing the round to the store).
    """

    rounds: list[RoundResult] = field(default_factory=list)
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    runner_seconds: list[float] = field(default_factory=list)
    echo: bool = False
    label: str = ""
    _started: float = 0.0

    def round_started(self, round: int, sites: Sequence[str]) -> None:
        self._started = time.perf_counter()

    def round_finished(self, result: RoundResult) -> None:
        self.runner_seconds.append(time.perf_counter() - self._started)
        self.rounds.append(result)

    def evaluated(self, round: int, metrics: dict[str, Any]) -> None:
        self.evaluations.append(metrics)
        if self.echo:
            console.print(
                f"  [dim]{self.label} round {round:4d}: accuracy {metrics['accuracy']:.4f}  "
                f"loss {metrics['loss']:.3f}  train loss {metrics['train_loss']:.3f}  "
                f"round {metrics['seconds']:.1f}s  eval {metrics['eval_seconds']:.1f}s[/dim]"
            )


def run(config: Config, observer: Recorder) -> Runner:
    """Start a run of ``config`` and run it to the end with ``observer``; the store is closed after."""
    runner = Runner.start(config)
    try:
        runner.run(observer)
    finally:
        runner.store.close()
    return runner


def machine() -> str:
    """One line about where the numbers were measured."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), numpy {np.__version__}, "
        f"python {platform.python_version()}; load average at start {load:.2f}"
    )


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Table:
    t = Table(title=title, title_justify="left")
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i == 0 else "right")
    for r in rows:
        t.add_row(*(escape(str(x)) for x in r))
    return t


def markdown(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """The same table as GitHub markdown, for pasting into RESULTS.md."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def show(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], as_markdown: bool) -> None:
    console.print(table(title, columns, rows))
    if as_markdown:
        console.print(markdown(columns, rows), markup=False, soft_wrap=True)
