"""A busy machine: the demo's rounds with one CPU-bound program beside them, before and after the thread fix.

A user's laptop is never idle. torch runs each operation on a team of OpenMP threads (by default one per
core: two here) that, by libgomp's default, spin while they wait for one another; when another program holds
one core, the thread that spins keeps that core from the thread it waits for, and each of the thousands of
small operations in a training step waits for the scheduler. A simulation now trains on one torch thread
unless ``backend.threads`` says otherwise (``confide.runtime.runner.SIMULATION_THREADS``).

Each configuration runs ``confide run examples/shakespeare.toml`` (the demo: 50 sites a round, 20 local
steps each, SecAgg+ and distributed DP) for ``--rounds`` rounds in a fresh process, once on a quiet machine
and once beside a CPU-bound process (a Python loop, like a package install or a compile), and reads each
round's seconds from the run store. The configurations, in one run:

- ``before``: torch's default threads (as many as torch takes by default here) with libgomp's default wait:
  what every run did before;
- ``passive``: the same threads, with ``OMP_WAIT_POLICY=PASSIVE`` (waiting threads sleep): the other cure,
  measured and not taken;
- ``after``: the default now, one thread.

Run from the repository root (about 12 minutes on 2 cores, most of it the ``before`` rounds beside the load):

    .venv/bin/python benchmarks/busy.py
    .venv/bin/python benchmarks/busy.py --rounds 2 --configs after   # one configuration, quicker
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import console, machine, show

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "examples" / "shakespeare.toml"
CONFIDE = Path(sys.executable).parent / "confide"
DEFAULT_THREADS = torch.get_num_threads()
"""torch's default here (this process never sets it)."""
CONFIGS = {
    "before": ({}, ["--set", f"backend.threads={DEFAULT_THREADS}"]),
    "passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, ["--set", f"backend.threads={DEFAULT_THREADS}"]),
    "after": ({}, []),
}
GOAL = 2.0
"""A round beside one CPU-bound program may take at most this many times a quiet round (it lost half the
machine's CPU)."""


def burn() -> None:
    """A CPU-bound program: one core's worth of pure-Python work, until it is stopped."""
    x = 0
    while True:
        x = (x * 1_103_515_245 + 12_345) % 2_147_483_648


def run_demo(name: str, busy: bool, rounds: int, out: Path) -> list[float]:
    """Seconds of each round of the demo under configuration ``name``, beside a CPU-bound process or not."""
    extra_env, flags = CONFIGS[name]
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | extra_env
    run_name = f"{name.replace(' ', '-')}-{'busy' if busy else 'quiet'}"
    command = [
        str(CONFIDE), "run", str(CONFIG), "--no-report",
        "--set", f"run.rounds={rounds}", "--set", f"run.output={out}", "--set", f"run.name={run_name}",
        "--set", "eval.every=1000", "--set", "eval.samples=0", *flags,
    ]  # fmt: skip
    load = multiprocessing.Process(target=burn, daemon=True) if busy else None
    if load is not None:
        load.start()
        time.sleep(1.0)  # the load holds its core before the run starts
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    finally:
        if load is not None:
            load.terminate()
            load.join()
    if done.returncode != 0:
        where = "beside a CPU-bound process" if busy else "quiet"
        raise SystemExit(f"the demo run ({name}, {where}) failed:\n{done.stderr[-3000:]}")
    with sqlite3.connect(out / run_name / "run.sqlite") as db:
        return [row[0] for row in db.execute("SELECT seconds FROM rounds ORDER BY round")]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3, help="demo rounds per run (default 3)")
    parser.add_argument(
        "--configs", default=",".join(CONFIGS), help=f"comma-separated, of: {', '.join(CONFIGS)}"
    )
    args = parser.parse_args()
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configuration(s) {unknown}; choose from {list(CONFIGS)}")
    console.print(machine())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            seconds = {}
            for busy in (False, True):
                console.print(f"[dim]{name}, {'beside a CPU-bound process' if busy else 'quiet'}...[/]")
                seconds[busy] = run_demo(name, busy, args.rounds, Path(tmp))
            quiet, loaded = (sum(seconds[b]) / len(seconds[b]) for b in (False, True))
            rows.append(
                [
                    name,
                    " ".join(f"{s:.1f}" for s in seconds[False]),
                    " ".join(f"{s:.1f}" for s in seconds[True]),
                    f"{quiet:.2f}",
                    f"{loaded:.2f}",
                    f"{loaded / quiet:.2f}x",
                    "met" if loaded / quiet <= GOAL else "not met",
                ]
            )
    show(
        f"The demo's rounds, quiet and beside one CPU-bound process ({args.rounds} rounds each)",
        ["configuration", "quiet s/round", "busy s/round", "quiet mean", "busy mean", "busy / quiet",
         f"goal <= {GOAL:g}x"],
        rows,
        as_markdown=True,
    )  # fmt: skip


if __name__ == "__main__":
    main()
