"""How much each algorithm for skewed data helps on our own data: Shakespeare under three partitions.

The same pool of Shakespeare windows (a seeded sample of roles) is dealt to sites three ways:

    natural      one site per speaking role: the classic non-IID split, with sites of very different sizes
    dirichlet    Dirichlet(alpha = 0.1) over the play each window comes from (Hsu et al. 2019): most sites
                 hold text of one or two plays, in amounts that differ widely
    iid          the windows dealt at random, keeping each role's count: the control

and each algorithm trains the same character LSTM (the FedAvg paper's, with 128 units a layer to fit
this machine) on each, with the same seed, rounds, sites per round and local
work, and client SGD (SCAFFOLD and FedNova are defined for SGD steps; FedAdam differs only at the server):

    FedAvg         McMahan et al. 2017; server SGD with learning rate 1
    FedProx        Li et al. 2020; proximal term mu/2 ||w - w_global||^2
    SCAFFOLD       Karimireddy et al. 2020, option II control variates
    FedAdam        Reddi et al. 2021; Adam at the server on the averaged delta
    Ditto          Li et al. 2021; FedAvg's global model, plus a personal model per site (lambda)
    FedAvg + FT    FedAvg's global model fine-tuned for the same number of local steps on each site

For each: the final pooled accuracy of the global model, the rounds it took to reach the accuracy target
(first evaluated round at or above it), and the worst-decile (10th percentile) per-site accuracy; for the
personalizing methods also the same numbers for each site's personalized model. Evaluation covers every
site's held-out windows. With ``--stragglers F``, a fraction F of each round's sites does only part of its
work, which is where FedNova's normalized averaging matters (add ``fednova`` to ``--only``).

Run from the repository root:

    .venv/bin/python benchmarks/heterogeneity.py               # the full matrix, about 30 min on 2 cores
    .venv/bin/python benchmarks/heterogeneity.py --quick       # 2 tiny rounds per cell, about 1 min
    .venv/bin/python benchmarks/heterogeneity.py --only fedavg,scaffold --partitions dirichlet --rounds 10
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common import (
    Recorder,
    build_config,
    console,
    lstm_shakespeare,
    machine,
    merge,
    output_folder,
    run,
    show,
)
from confide.runtime.runner import load_dataset


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    overrides: dict[str, Any]


def methods(args: argparse.Namespace) -> list[Method]:
    return [
        Method("fedavg", "FedAvg", {}),
        Method("fedprox", f"FedProx mu={args.mu:g}", {"server": {"strategy": "fedprox", "mu": args.mu}}),
        Method("scaffold", "SCAFFOLD", {"server": {"strategy": "scaffold"}}),
        Method("fednova", "FedNova", {"server": {"strategy": "fednova"}}),
        Method(
            "fedadam",
            f"FedAdam lr={args.adam_lr:g}",
            {"server": {"optimizer": "adam", "learning_rate": args.adam_lr, "tau": args.adam_tau}},
        ),
        Method(
            "ditto",
            f"Ditto lambda={args.ditto_lambda:g}",
            {"client": {"personalization": "ditto", "ditto_lambda": args.ditto_lambda}},
        ),
        Method("finetune", "FedAvg + FT", {"client": {"personalization": "finetune"}}),
    ]


def base_config(args: argparse.Namespace, partition: str) -> dict[str, Any]:
    data: dict[str, Any] = {"partition": partition}
    if partition == "dirichlet":
        data.update({"num_sites": args.max_sites, "alpha": args.alpha, "label": "group"})
    client = {"stragglers": args.stragglers, "personal_learning_rate": args.personal_lr}
    return merge(lstm_shakespeare(args), {"data": data, "client": client})


@dataclass
class Outcome:
    method: Method
    partition: str
    evaluations: list[dict[str, Any]]
    wall_seconds: float

    def reached(self, target: float, key: str = "accuracy") -> int | None:
        return next((int(m["round"]) for m in self.evaluations if m.get(key, -1.0) >= target), None)

    def final(self, key: str) -> float:
        return float(self.evaluations[-1].get(key, math.nan)) if self.evaluations else math.nan


def run_one(args: argparse.Namespace, output: Path, method: Method, partition: str) -> Outcome:
    raw = merge(base_config(args, partition), method.overrides)
    config = build_config(raw, output, f"{method.key}-{partition}")
    label = f"{method.label} / {partition}"
    console.print(f"[bold]{label}[/bold]")
    recorder = Recorder(echo=not args.quiet, label=label)
    started = time.perf_counter()
    run(config, recorder)
    return Outcome(method, partition, recorder.evaluations, time.perf_counter() - started)


def fmt(x: float) -> str:
    return "—" if not math.isfinite(x) else f"{x:.3f}"


def report(outcomes: list[Outcome], target: float, rounds: int, as_markdown: bool) -> None:
    columns = [
        "partition",
        "algorithm",
        "final acc",
        f"rounds to {target:.0%}",
        "worst-decile site acc",
        "personalized acc",
        "personalized worst decile",
        "wall s",
    ]
    rows = []
    for o in outcomes:
        reached = o.reached(target)
        rows.append(
            [
                o.partition,
                o.method.label,
                fmt(o.final("accuracy")),
                str(reached) if reached is not None else f"not in {rounds}",
                fmt(o.final("site_accuracy_p10")),
                fmt(o.final("personal_accuracy")),
                fmt(o.final("personal_site_accuracy_p10")),
                f"{o.wall_seconds:.0f}",
            ]
        )
    show(
        "Skewed data on Shakespeare: global model, and personalized where the method has one",
        columns,
        rows,
        as_markdown,
    )
    curves = [
        [
            f"{o.method.label} / {o.partition}",
            "  ".join(f"{m['round']}:{m['accuracy']:.3f}" for m in o.evaluations),
        ]
        for o in outcomes
    ]
    show("Accuracy curves of the global model (round:accuracy)", ["run", "evaluations"], curves, as_markdown)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 tiny rounds per cell (about 1 min)")
    parser.add_argument("--rounds", type=int, default=40, help="rounds per run (default 40)")
    parser.add_argument("--eval-every", type=int, default=5, help="evaluate every N rounds (default 5)")
    parser.add_argument("--max-sites", type=int, default=100, help="roles in the seeded sample (default 100)")
    parser.add_argument("--sites-per-round", type=int, default=10, help="sites per round (default 10)")
    parser.add_argument("--steps", type=int, default=20, help="local steps per site per round (default 20)")
    parser.add_argument("--batch-size", type=int, default=10, help="local batch size (default 10)")
    parser.add_argument("--lr", type=float, default=4.0, help="client SGD learning rate (default 4)")
    parser.add_argument("--hidden", type=int, default=128, help="LSTM units per layer (default 128)")
    parser.add_argument("--alpha", type=float, default=0.1, help="Dirichlet concentration (default 0.1)")
    parser.add_argument("--mu", type=float, default=0.01, help="FedProx mu (default 0.01)")
    parser.add_argument(
        "--adam-lr",
        type=float,
        default=0.01,
        help="FedAdam server learning rate (0.01, as first measured; 0.1 is best)",
    )
    parser.add_argument("--adam-tau", type=float, default=1e-3, help="FedAdam tau (default 1e-3)")
    parser.add_argument("--ditto-lambda", type=float, default=0.1, help="Ditto lambda (default 0.1)")
    parser.add_argument(
        "--personal-lr", type=float, default=0.0, help="personal training's learning rate; 0: --lr (default)"
    )
    parser.add_argument("--stragglers", type=float, default=0.0, help="fraction of sites doing partial work")
    parser.add_argument("--target", type=float, default=0.3, help="accuracy target (default 0.3)")
    parser.add_argument(
        "--only", default="fedavg,fedprox,scaffold,fednova,fedadam,ditto,finetune", help="algorithms to run"
    )
    parser.add_argument("--partitions", default="natural,dirichlet,iid", help="partitions to run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="keep run directories here (default: a temporary folder)")
    parser.add_argument("--markdown", action="store_true", help="also print the tables as markdown")
    parser.add_argument("--quiet", action="store_true", help="no line per evaluation")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.eval_every, args.max_sites, args.sites_per_round, args.steps = 2, 1, 12, 3, 2
    keys = [k.strip() for k in args.only.split(",") if k.strip()]
    partitions = [p.strip() for p in args.partitions.split(",") if p.strip()]
    chosen = [m for m in methods(args) if m.key in keys]
    unknown = set(keys) - {m.key for m in methods(args)}
    if unknown or not chosen or not partitions:
        parser.error(
            f"nothing to run or unknown algorithm(s) {sorted(unknown)}: check --only and --partitions"
        )

    console.print(f"[dim]{time.strftime('%Y-%m-%d %H:%M')}  {machine()}[/dim]")
    console.print(
        f"scale: {args.max_sites} sites, {args.sites_per_round} per round, {args.rounds} rounds, "
        f"{args.steps} local SGD steps of {args.batch_size} windows at lr {args.lr:g}, LSTM 2 x "
        f"{args.hidden}, stragglers {args.stragglers:g}, seed {args.seed}\n"
    )
    started = time.perf_counter()
    outcomes = []
    with output_folder(args.output, "heterogeneity") as output:
        for partition in partitions:
            dataset = load_dataset(build_config(base_config(args, partition), output, "probe"))
            sizes = np.array([s.num_train for s in dataset.sites])
            console.print(
                f"[bold]data ({partition})[/bold]: {len(sizes)} sites, {sizes.sum():,} training windows; "
                f"per site min {sizes.min()}, median {int(np.median(sizes))}, max {sizes.max()}"
            )
            for method in chosen:
                outcomes.append(run_one(args, output, method, partition))
    console.print()
    report(outcomes, args.target, args.rounds, args.markdown)
    console.print(f"\ntotal wall time {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
