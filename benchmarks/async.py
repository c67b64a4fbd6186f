"""Asynchronous buffered aggregation (FedBuff) against synchronous FedAvg: virtual time to the same accuracy.

The benchmarks' Shakespeare federation (the FedAvg paper's character LSTM, one site per role, plain SGD,
:func:`common.lstm_shakespeare`) runs on the local backend's virtual clock (:mod:`confide.runtime.clock`):
site speeds are lognormal (sigma ``--sigma``) and a fraction ``--slow`` of the sites are ``--slow-factor``
times slower still; each local step takes ``--step-seconds`` at typical speed, each message a network delay
(``--latency``). Virtual time is computed, not measured, so the numbers are the same on every machine.

* synchronous FedAvg: ``--concurrency`` sites per round, for ``--rounds`` rounds; a round lasts until its
  slowest site has answered;
* FedBuff: ``--concurrency`` sites training at once, buffers of ``--buffer`` updates, each discounted by
  (1 + staleness)^-1/2 (Nguyen et al. 2022), for ``--longer`` (2) times as many updates as the synchronous
  run, since stale updates may need more of them to the same accuracy (in far less virtual time).

For each: the accuracy reached (on a seeded sample of sites), the virtual time it took, and the first
virtual time at which the run reached the synchronous run's final accuracy (the issue's goal: FedBuff at
least 2x sooner; FedBuff's paper reports 3.3x on its tasks). ``--protected`` runs the same pair with secure
aggregation and distributed DP on (each buffer one secure-aggregation instance and one charge to the per-site
ledger). ``--plot FILE`` draws accuracy against virtual time.

Run from the repository root:

    .venv/bin/python benchmarks/async.py --markdown --plot async.png    # ~10 min on 2 cores
    .venv/bin/python benchmarks/async.py --quick                       # about two minutes
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import Recorder, build_config, console, lstm_shakespeare, machine, merge, output_folder, run, show


@dataclass(frozen=True)
class Outcome:
    name: str
    points: list[tuple[float, float, int]]
    """(virtual seconds, accuracy, round) of each evaluation."""
    updates: int
    epsilon: float

    @property
    def final(self) -> float:
        return self.points[-1][1] if self.points else math.nan

    @property
    def seconds(self) -> float:
        return self.points[-1][0] if self.points else math.nan

    def time_to(self, target: float) -> float | None:
        return next((t for t, accuracy, _ in self.points if accuracy >= target), None)


def clock(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "speed_sigma": args.sigma,
        "slow_fraction": args.slow,
        "slow_factor": args.slow_factor,
        "step_seconds": args.step_seconds,
        "latency": args.latency,
    }


def protection(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "secure_aggregation": True,
        "dp": "distributed",
        "clip_norm": args.clip,
        "noise_multiplier": args.noise,
    }


def run_one(
    args: argparse.Namespace, output: Path, name: str, asynchronous: bool, protected: bool
) -> Outcome:
    args.sites_per_round = args.concurrency
    base = lstm_shakespeare(args)
    rounds = args.rounds
    server: dict[str, Any] = {"sites_per_round": args.concurrency}
    evaluate = args.eval_every
    if asynchronous:
        # The same number of updates per evaluation, and --longer times as many in all: stale updates may
        # need more of them to the same accuracy, which is what time to accuracy measures.
        rounds = round(args.longer * args.rounds) * args.concurrency // args.buffer
        evaluate = args.eval_every * args.concurrency // args.buffer
        server = {
            "strategy": "fedbuff",
            "sites_per_round": args.buffer,
            "concurrency": args.concurrency,
            "max_staleness": args.max_staleness,
        }
    raw = merge(
        base,
        {
            "run": {"rounds": rounds},
            "server": server,
            "backend": clock(args),
            "eval": {**base["eval"], "sites": args.eval_sites, "every": evaluate},
            **({"privacy": protection(args)} if protected else {}),
        },
    )
    recorder = Recorder(echo=not args.quiet, label=name)
    run(build_config(raw, output, name.replace(" ", "_").replace(",", "")), recorder)
    by_round = {r.round: r for r in recorder.rounds}
    points = [
        (by_round[int(e["round"])].clock, float(e["accuracy"]), int(e["round"])) for e in recorder.evaluations
    ]
    epsilon = float(recorder.evaluations[-1].get("epsilon", math.nan)) if recorder.evaluations else math.nan
    return Outcome(name, points, sum(len(r.participants) for r in recorder.rounds), epsilon)


def report(pairs: list[tuple[Outcome, Outcome]], as_markdown: bool) -> None:
    rows = []
    for sync, fedbuff in pairs:
        target = sync.final
        reached = {o.name: o.time_to(target) for o in (sync, fedbuff)}
        for o in (sync, fedbuff):
            t = reached[o.name]
            sync_time = reached[sync.name]
            rows.append(
                [
                    o.name,
                    f"{o.updates}",
                    f"{o.final:.4f}",
                    f"{o.seconds:,.0f}",
                    f"{t:,.0f}" if t is not None else "not reached",
                    f"{sync_time / t:.1f}x" if t and sync_time else "-",
                    f"{o.epsilon:.2f}" if not math.isnan(o.epsilon) else "-",
                ]
            )
    columns = [
        "run",
        "updates",
        "final accuracy",
        "virtual s",
        "virtual s to sync's final accuracy",
        "faster",
        "epsilon (worst site)",
    ]
    show("Virtual time to the synchronous run's final accuracy", columns, rows, as_markdown)


def plot(pairs: list[tuple[Outcome, Outcome]], path: str) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4 * len(pairs), 4.2))
    for i, (sync, fedbuff) in enumerate(pairs):
        axes = figure.add_subplot(1, len(pairs), i + 1)
        for o in (sync, fedbuff):
            axes.plot([t for t, _, _ in o.points], [a for _, a, _ in o.points], marker="o", label=o.name)
        axes.axhline(sync.final, color="grey", linestyle=":", label="synchronous final accuracy")
        axes.set_xlabel("virtual seconds")
        axes.set_ylabel("accuracy")
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    console.print(f"plot written to {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="about two minutes: small LSTM, fewer rounds")
    parser.add_argument("--protected", action="store_true", help="also run both with SecAgg and DP on")
    parser.add_argument("--rounds", type=int, default=30, help="synchronous rounds (default 30)")
    parser.add_argument("--concurrency", type=int, default=10, help="sites training at once (default 10)")
    parser.add_argument("--buffer", type=int, default=5, help="FedBuff's buffer size K (default 5)")
    parser.add_argument("--longer", type=float, default=2.0, help="FedBuff's updates / sync's (2)")
    parser.add_argument("--max-staleness", type=int, default=20, help="FedBuff's staleness limit (20)")
    parser.add_argument("--eval-every", type=int, default=3, help="evaluate every N synchronous rounds (3)")
    parser.add_argument("--eval-sites", type=int, default=40, help="sites in the evaluation sample (40)")
    parser.add_argument("--max-sites", type=int, default=100, help="roles in the seeded sample (100)")
    parser.add_argument("--steps", type=int, default=20, help="local steps per site per round (default 20)")
    parser.add_argument("--batch-size", type=int, default=10, help="local batch size (default 10)")
    parser.add_argument("--lr", type=float, default=4.0, help="client SGD learning rate (default 4)")
    parser.add_argument("--hidden", type=int, default=128, help="LSTM units per layer (128: the demo)")
    parser.add_argument("--sigma", type=float, default=0.5, help="lognormal sigma of site speeds (0.5)")
    parser.add_argument("--slow", type=float, default=0.1, help="fraction of very slow sites (0.1)")
    parser.add_argument("--slow-factor", type=float, default=10.0, help="how much slower they are (10)")
    parser.add_argument("--step-seconds", type=float, default=0.1, help="virtual seconds per step (0.1)")
    parser.add_argument("--latency", type=float, default=0.05, help="one-way network delay, seconds (0.05)")
    parser.add_argument("--clip", type=float, default=3.0, help="--protected: the clip norm C (3)")
    parser.add_argument("--noise", type=float, default=0.01, help="--protected: noise multiplier (0.01)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="", help="keep the run directories here")
    parser.add_argument("--markdown", action="store_true", help="also print the table as markdown")
    parser.add_argument("--plot", default="", help="draw accuracy against virtual time into this PNG")
    parser.add_argument("--quiet", action="store_true", help="no line per evaluation")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.max_sites, args.hidden, args.eval_sites = 12, 10, 40, 64, 20
    if args.concurrency < args.buffer or args.concurrency % args.buffer:
        console.print("--concurrency must be a multiple of --buffer (so both runs hold the same updates)")
        return 2
    console.print(machine())
    pairs = []
    with output_folder(args.output, "async") as output:
        for protected in (False, True) if args.protected else (False,):
            suffix = ", SecAgg + DP" if protected else ""
            sync = run_one(args, output, f"synchronous FedAvg{suffix}", False, protected)
            fedbuff = run_one(args, output, f"FedBuff{suffix}", True, protected)
            pairs.append((sync, fedbuff))
    report(pairs, args.markdown)
    if args.plot:
        plot(pairs, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
