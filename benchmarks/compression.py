"""How many upload bytes each compression of the updates saves, and what it costs in accuracy.

The demo federation of the other benchmarks (the FedAvg paper's two-layer character LSTM on Shakespeare, one
site per role, plain SGD at the sites and a plain mean at the server, :func:`common.lstm_shakespeare`) runs
``--rounds`` rounds once uncompressed and once per method: float16, bfloat16, stochastic quantization at
8, 4, 2 and 1 bits per value (with and without the random Hadamard rotation at 2 and 1 bits), and top-k
with error feedback at 10% and 1% of the values. Every run has the same seed, so the same sites train the
same number of steps from the same model each round; only what travels differs.

For each method: the bytes a site's update takes per model value (as the local backend counts the messages
the deployment's wire would carry), the upload over the run and its ratio to the uncompressed run's, the
accuracy at the last round (on a seeded sample of sites) and its difference to the uncompressed run's, and
the first evaluated round that reaches the uncompressed run's final accuracy, with the upload spent by then
against the upload the uncompressed run spent to reach it first (the issue's goal: at least 8x fewer upload
bytes within 1 point of its accuracy). The downlink (the global model
sent to every site) is not compressed and not shown.

With ``--secagg`` every run, the uncompressed one included, has secure aggregation on, and only the methods
that run with it (stochastic quantization, which secure aggregation then does into its own ring, packed at
b = bit_length(n (2^(bits-1) - 1)) + 1 bits a value) are compared with uncompressed secure aggregation (its
fixed point packed at b = bit_length(n 2^20 R) + 1 bits). ``--secagg-range`` sets privacy.secagg_range.

Run from the repository root:

    .venv/bin/python benchmarks/compression.py --markdown    # 40 rounds, 10 of 100 sites, ~30 min on 2 cores
    .venv/bin/python benchmarks/compression.py --quick       # about a minute: a small LSTM, 16 rounds
    .venv/bin/python benchmarks/compression.py --quick --secagg --secagg-range 0.5
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import Recorder, build_config, console, lstm_shakespeare, machine, merge, output_folder, run, show

PLAIN = "none"
METHODS: dict[str, dict[str, Any]] = {
    PLAIN: {},
    "float16": {"kind": "float16"},
    "bfloat16": {"kind": "bfloat16"},
    "quantize 8 bits": {"kind": "quantize", "bits": 8},
    "quantize 4 bits": {"kind": "quantize", "bits": 4},
    "quantize 2 bits": {"kind": "quantize", "bits": 2},
    "quantize 2 bits, rotated": {"kind": "quantize", "bits": 2, "rotate": True},
    "quantize 1 bit": {"kind": "quantize", "bits": 1},
    "quantize 1 bit, rotated": {"kind": "quantize", "bits": 1, "rotate": True},
    "quantize 2 bits, rotated, common half": {"kind": "quantize", "bits": 2, "rotate": True, "subset": 0.5},
    "quantize 2 bits, rotated, common half, no feedback": {
        "kind": "quantize",
        "bits": 2,
        "rotate": True,
        "subset": 0.5,
        "error_feedback": False,
    },
    "quantize 2 bits, rotated, common quarter": {
        "kind": "quantize",
        "bits": 2,
        "rotate": True,
        "subset": 0.25,
    },
    "top-k 10%": {"kind": "topk", "fraction": 0.1},
    "top-k 1%": {"kind": "topk", "fraction": 0.01},
}
QUICK = ("float16", "quantize 8 bits", "quantize 2 bits, rotated", "quantize 1 bit, rotated", "top-k 10%")


@dataclass(frozen=True)
class Outcome:
    method: str
    upload: list[int]
    """Upload bytes of each round (the sites' update messages)."""
    accuracy: list[tuple[int, float]]
    """(round, accuracy) of each evaluation."""
    updates: int
    size: int

    @property
    def total(self) -> int:
        return sum(self.upload)

    @property
    def final(self) -> float:
        return self.accuracy[-1][1] if self.accuracy else math.nan

    def upload_to(self, target: float) -> tuple[int, int] | None:
        """The first evaluated round at or above ``target`` and the upload spent by its end; None if none."""
        for round, accuracy in self.accuracy:
            if accuracy >= target:
                return round, sum(self.upload[:round])
        return None


def run_method(args: argparse.Namespace, output: Path, method: str) -> Outcome:
    overrides: dict[str, Any] = {"compression": METHODS[method]}
    if args.secagg:
        overrides["privacy"] = {"secure_aggregation": True, "secagg_range": args.secagg_range}
    raw = merge(lstm_shakespeare(args), overrides)
    raw["eval"] = {**raw["eval"], "sites": args.eval_sites}
    recorder = Recorder(echo=not args.quiet, label=method)
    name = ("secagg_" if args.secagg else "") + method.replace(" ", "_").replace(",", "").replace("%", "pct")
    runner = run(build_config(raw, output, name), recorder)
    rounds = recorder.rounds
    return Outcome(
        method,
        [r.bytes_received for r in rounds],
        [(int(e["round"]), float(e["accuracy"])) for e in recorder.evaluations],
        sum(len(r.participants) for r in rounds),
        runner.layout.size,
    )


def megabytes(n: float) -> str:
    return f"{n / 1e6:.2f}"


def report(outcomes: list[Outcome], as_markdown: bool, secagg: bool = False) -> None:
    plain = outcomes[0]
    target = plain.final
    plain_reached = plain.upload_to(target)
    assert plain_reached is not None  # its last evaluation reaches its own final accuracy
    rows = []
    for o in outcomes:
        reached = o.upload_to(target)
        rows.append(
            [
                o.method,
                f"{o.total / (o.updates * o.size):.3f}",
                megabytes(o.total),
                f"{plain.total / o.total:.1f}x",
                f"{o.final:.4f}",
                f"{100 * (o.final - plain.final):+.2f}",
                f"{reached[0]}" if reached else "not reached",
                f"{plain_reached[1] / reached[1]:.1f}x" if reached else "-",
            ]
        )
    columns = [
        "method",
        "bytes/value",
        "upload MB",
        "fewer bytes",
        "accuracy",
        "points vs none",
        "round to none's accuracy",
        "fewer bytes to it",
    ]
    protected = " with secure aggregation" if secagg else ""
    show(
        f"Upload and accuracy after {len(plain.upload)} rounds ({plain.size:,} values per update){protected}",
        columns,
        rows,
        as_markdown,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="about a minute: small LSTM, 6 methods")
    parser.add_argument(
        "--methods", default="", help="method names separated by ';' (some hold commas; default: all)"
    )
    parser.add_argument("--rounds", type=int, default=40, help="rounds per run (default 40)")
    parser.add_argument("--eval-every", type=int, default=5, help="evaluate every N rounds (default 5)")
    parser.add_argument("--eval-sites", type=int, default=50, help="sites in the evaluation sample (50)")
    parser.add_argument("--max-sites", type=int, default=100, help="roles in the seeded sample (100)")
    parser.add_argument("--sites-per-round", type=int, default=10, help="sites per round (default 10)")
    parser.add_argument("--steps", type=int, default=20, help="local steps per site per round (default 20)")
    parser.add_argument("--batch-size", type=int, default=10, help="local batch size (default 10)")
    parser.add_argument("--lr", type=float, default=4.0, help="client SGD learning rate (default 4)")
    parser.add_argument("--hidden", type=int, default=128, help="LSTM units per layer (128: the demo)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--secagg", action="store_true", help="secure aggregation on in every run")
    parser.add_argument(
        "--secagg-range", type=float, default=0.0, help="with --secagg: privacy.secagg_range (0: its default)"
    )
    parser.add_argument("--output", default="", help="keep the run directories here")
    parser.add_argument("--markdown", action="store_true", help="also print the table as markdown")
    parser.add_argument("--quiet", action="store_true", help="no line per evaluation")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(";") if m.strip()] or list(METHODS)
    if args.quick:
        args.rounds, args.eval_every, args.steps, args.max_sites, args.hidden = 16, 4, 10, 40, 64
        args.eval_sites, args.sites_per_round = 20, 8
        methods = methods if args.methods else list(QUICK)
    if args.secagg:  # only quantization runs with secure aggregation
        methods = [m for m in methods if METHODS[m].get("kind", "quantize") == "quantize"]
    else:  # a subset common to the round is for secure aggregation only
        methods = [m for m in methods if "subset" not in METHODS[m]]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        console.print(f"unknown methods {unknown}; choose from {', '.join(map(repr, METHODS))}")
        return 2
    if PLAIN in methods:
        methods.remove(PLAIN)
    console.print(machine())
    with output_folder(args.output, "compression") as output:
        outcomes = [run_method(args, output, m) for m in [PLAIN, *methods]]
    report(outcomes, args.markdown, args.secagg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
