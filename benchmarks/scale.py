"""Many registered sites: memory and time per round grow with the sites at work, not with those registered.

A folder of ``--registered`` sites (100,000 by default), one .txt file each, is written once: each site is a
stretch of 1,000 to 2,000 characters of Shakespeare's plays (about 10 to 20 training windows), cut from the
whole text at a seeded offset. Runs register the folder lazily (``data.lazy = true``: the listing and the
file sizes only) and read a site's file when the site is drawn. Each configuration runs in a fresh process,
so its peak resident memory (``ru_maxrss``) is its own; for Ray, the workers' peak resident memory is added
(they are other processes; Ray's own daemons are not counted).

Two sweeps, each ``--rounds`` rounds of a small character LSTM (one local step of 10 windows per site, no
evaluation):

- sites per round 10, 100, 1,000 out of all the registered sites: time per round and memory should grow
  linearly with these;
- the number registered (1,000, 10,000, 100,000) at 100 sites per round: start-up (registration and the run
  store) grows with it, memory and time per round should not.

Run from the repository root:

    .venv/bin/python benchmarks/scale.py                          # both sweeps, local backend: minutes
    .venv/bin/python benchmarks/scale.py --backends local,ray     # Ray too (pip install -e '.[ray]')
    .venv/bin/python benchmarks/scale.py --registered 10000 --per-round 10,100 --quick
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from common import Recorder, build_config, console, machine, show
from confide.data import shakespeare
from confide.runtime.runner import Runner

SHORTEST, LONGEST = 1_000, 2_000


def write_sites(folder: Path, count: int, seed: int = 0) -> None:
    """``count`` site files in ``folder``: seeded stretches of the plays' text, cut at line boundaries."""
    text = "".join(t for _, _, t in shakespeare.site_texts())
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(text) - LONGEST - 200, count)
    lengths = rng.integers(SHORTEST, LONGEST, count)
    folder.mkdir(parents=True, exist_ok=True)
    digits = len(str(count - 1))
    for i, (start, length) in enumerate(zip(starts, lengths, strict=True)):
        begin = text.index("\n", start) + 1
        end = text.index("\n", begin + length) + 1
        (folder / f"site{i:0{digits}d}.txt").write_text(text[begin:end])


def raw_config(folder: Path, per_round: int, rounds: int, backend: str) -> dict[str, Any]:
    return {
        "run": {"seed": 0, "rounds": rounds, "checkpoint_every": 1_000_000},
        "data": {"dataset": "text", "path": str(folder), "lazy": True},
        "model": {"kind": "lstm", "embedding": 8, "hidden": 64, "layers": 1},
        "client": {"optimizer": "sgd", "learning_rate": 1.0, "batch_size": 10, "max_steps": 1},
        "server": {"sites_per_round": per_round, "optimizer": "sgd", "learning_rate": 1.0},
        "eval": {"every": 1_000_000, "sites": 10, "samples": 0},
        "backend": {"kind": backend, "threads": 1},
    }


def one(folder: Path, per_round: int, rounds: int, backend: str, output: Path) -> dict[str, Any]:
    """One configuration, in this process: start-up seconds, seconds of each round, peak memory."""
    began = time.perf_counter()
    name = f"{backend}-{per_round}-of-{folder.name}"
    config = build_config(raw_config(folder, per_round, rounds, backend), output, name)
    runner = Runner.start(config)
    startup = time.perf_counter() - began
    recorder = Recorder()
    try:
        runner.run(recorder)
        workers = sum(runner.backend.worker_memory()) if backend == "ray" else 0  # type: ignore[attr-defined]
    finally:
        runner.close()
    return {
        "startup": startup,
        "rounds": recorder.runner_seconds,
        "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "workers_bytes": workers,
        "registered": len(runner.sites),
    }


def measure(folder: Path, per_round: int, rounds: int, backend: str, output: Path) -> dict[str, Any]:
    """:func:`one` in a fresh process (its peak memory is its own)."""
    command = [sys.executable, __file__, "--one", json.dumps([str(folder), per_round, rounds, backend])]
    command += ["--output", str(output)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the run ({backend}, {per_round} a round) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def row(label: str, backend: str, result: dict[str, Any]) -> list[str]:
    rounds = result["rounds"][1:] or result["rounds"]  # the first round also builds the kit
    per_round = sum(rounds) / len(rounds)
    memory = (result["peak_bytes"] + result["workers_bytes"]) / 2**20
    return [label, backend, f"{result['registered']:,}", f"{result['startup']:.1f}", f"{per_round:.2f}",
            f"{memory:.0f}"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--registered", type=int, default=100_000, help="sites in the folder (100,000)")
    parser.add_argument("--per-round", default="10,100,1000", help="sites per round, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backends", default="local", help="comma-separated: local, ray")
    parser.add_argument("--folder", help="keep the site files here (made once, reused)")
    parser.add_argument("--quick", action="store_true", help="the first sweep only")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        folder, per_round, rounds, backend = json.loads(args.one)
        print(json.dumps(one(Path(folder), per_round, rounds, backend, Path(args.output))))
        return
    console.print(machine())
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    per_rounds = [int(n) for n in args.per_round.split(",")]
    with tempfile.TemporaryDirectory(prefix="confide-bench-scale-") as tmp:
        root = Path(args.folder) if args.folder else Path(tmp) / "sites"
        sizes = sorted({args.registered} | ({1_000, 10_000} if not args.quick else set()))
        folders = {}
        for size in sizes:
            folders[size] = root / f"{size}"
            if not folders[size].exists():
                began = time.perf_counter()
                write_sites(folders[size], size)
                console.print(f"[dim]wrote {size:,} site files in {time.perf_counter() - began:.0f} s[/]")
        rows = []
        for backend in backends:
            for n in per_rounds:
                console.print(f"[dim]{backend}: {n} sites a round of {args.registered:,}...[/]")
                result = measure(folders[args.registered], n, args.rounds, backend, Path(tmp) / "runs")
                rows.append(row(f"{n} a round", backend, result))
                console.print(f"[dim]  {rows[-1]}[/]")
            if not args.quick:
                for size in sizes:
                    if size == args.registered and 100 in per_rounds:
                        continue  # measured in the first sweep
                    console.print(f"[dim]{backend}: 100 sites a round of {size:,}...[/]")
                    result = measure(folders[size], 100, args.rounds, backend, Path(tmp) / "runs")
                    rows.append(row("100 a round", backend, result))
                    console.print(f"[dim]  {rows[-1]}[/]")
    show(
        f"Lazily registered sites: {args.rounds} rounds each, a character LSTM, one local step a site",
        ["sites", "backend", "registered", "start-up s", "s/round", "peak memory MiB"],
        rows,
        as_markdown=True,
    )


if __name__ == "__main__":
    main()
