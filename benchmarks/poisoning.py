"""Poisoning: what each attack does to a Shakespeare federation, and what each defence saves and costs.

A grid of attack x defence x attackers (one site, 10% and 20% of the sites) on a seeded sample of Shakespeare
roles, training the FedAvg paper's character LSTM (small, to run on a laptop's CPU). For each cell: the final
main-task accuracy, its change from the same defence's run without an attacker, and, for the backdoor
attacks (backdoor, model_replacement, norm_evading), the attack success: the fraction of probes (held-out
windows of honest sites ending with the trigger) on which the model's greedy continuation after the trigger
is the whole target (see :mod:`confide.attacks.measure`). Each defence also runs without an attacker, and
its cost is its accuracy against the undefended run's.

Defences are config overrides given on the command line, so the benchmark names none of them itself::

    --defence none=                                     (the default list: just this)
    --defence median=server.aggregator=median
    --defence normclip=defence.norm_bound=0.5
    --defence dp=privacy.dp=central,privacy.clip_norm=0.5,privacy.noise_multiplier=0.01

Run from the repository root:

    .venv/bin/python benchmarks/poisoning.py                       # no defence, 2 attacks x 3 sizes
    .venv/bin/python benchmarks/poisoning.py --quick               # 2 tiny rounds per cell
    .venv/bin/python benchmarks/poisoning.py --attacks model_replacement,sign_flip --defence none= \\
        --defence median=server.aggregator=median --markdown
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import Recorder, build_config, console, lstm_shakespeare, machine, output_folder, run, show
from confide.config import apply_override
from confide.errors import ConfigError
from confide.registry import ATTACKS, POISONS_DATA


@dataclass(frozen=True)
class Defence:
    label: str
    overrides: tuple[str, ...]


def parse_defence(text: str) -> Defence:
    """``label=section.key=value,section.key=value`` (``label=`` for no overrides)."""
    label, sep, rest = text.partition("=")
    if not sep or not label:
        raise ConfigError(
            f"--defence takes label=overrides, e.g. median=server.aggregator=median (got {text!r})"
        )
    return Defence(label, tuple(item for item in rest.split(",") if item.strip()))


def base_config(args: argparse.Namespace) -> dict[str, Any]:
    return lstm_shakespeare(args)


@dataclass
class Cell:
    defence: str
    attack: str
    attackers: str
    final: dict[str, Any]
    wall_seconds: float

    def get(self, key: str) -> float:
        return float(self.final.get(key, math.nan))


def run_cell(
    args: argparse.Namespace, output: Path, defence: Defence, attack: str, sites: float | None
) -> Cell:
    raw = copy.deepcopy(base_config(args))
    for item in defence.overrides:
        apply_override(raw, item)
    if attack != "none":
        raw["attack"] = {"kind": attack, "sites": sites, "collude": attack == "little_is_enough"}
        if attack == "norm_evading":
            raw["attack"]["norm_bound"] = args.norm_bound
    who = "—" if sites is None else (f"{int(sites)} site" if sites >= 1 else f"{sites:.0%}")
    name = f"{defence.label}-{attack}-{who.replace(' ', '').replace('%', 'pct')}"
    config = build_config(raw, output, name)
    label = f"{defence.label} / {attack} / {who}"
    console.print(f"[bold]{label}[/bold]")
    recorder = Recorder(echo=not args.quiet, label=label)
    started = time.perf_counter()
    run(config, recorder)
    final = recorder.evaluations[-1] if recorder.evaluations else {}
    return Cell(defence.label, attack, who, final, time.perf_counter() - started)


def fmt(x: float, signed: bool = False) -> str:
    if not math.isfinite(x):
        return "—"
    return f"{x:+.3f}" if signed else f"{x:.3f}"


def report(cells: list[Cell], as_markdown: bool) -> None:
    clean = {c.defence: c.get("accuracy") for c in cells if c.attack == "none"}
    undefended = next(iter(clean.values()), math.nan)
    costs = [
        [label, fmt(accuracy), fmt(accuracy - undefended, signed=True)] for label, accuracy in clean.items()
    ]
    show(
        "Each defence without an attacker: accuracy, and its cost against the first defence listed",
        ["defence", "accuracy", "change"],
        costs,
        as_markdown,
    )
    rows = [
        [
            c.defence,
            c.attack,
            c.attackers,
            fmt(c.get("accuracy")),
            fmt(c.get("accuracy") - clean.get(c.defence, math.nan), signed=True),
            fmt(c.get("attack_success")),
            fmt(c.get("attack_char_accuracy")),
            f"{c.wall_seconds:.0f}",
        ]
        for c in cells
        if c.attack != "none"
    ]
    show(
        "Attack x defence x attackers: final accuracy, its change from the same defence without an attacker, "
        "and the backdoor's success",
        ["defence", "attack", "attackers", "accuracy", "change", "attack success", "target chars", "wall s"],
        rows,
        as_markdown,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 tiny rounds per cell")
    parser.add_argument(
        "--attacks", default="model_replacement,backdoor", help="attacks (attack.kind values)"
    )
    parser.add_argument(
        "--sizes", default="1,0.1,0.2", help="attackers: counts >= 1 or fractions of the sites"
    )
    parser.add_argument(
        "--defence", action="append", default=None, help="label=overrides (repeat; default: none=)"
    )
    parser.add_argument("--rounds", type=int, default=30, help="rounds per run (default 30)")
    parser.add_argument("--eval-every", type=int, default=5, help="evaluate every N rounds (default 5)")
    parser.add_argument("--max-sites", type=int, default=50, help="roles in the seeded sample (default 50)")
    parser.add_argument("--sites-per-round", type=int, default=10, help="sites per round (default 10)")
    parser.add_argument("--steps", type=int, default=20, help="local steps per site per round (default 20)")
    parser.add_argument("--batch-size", type=int, default=10, help="local batch size (default 10)")
    parser.add_argument("--lr", type=float, default=4.0, help="client SGD learning rate (default 4)")
    parser.add_argument("--hidden", type=int, default=64, help="LSTM units per layer (default 64)")
    parser.add_argument(
        "--norm-bound",
        type=float,
        default=0.5,
        help="norm_evading: the bound it knows (default 0.5)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="", help="keep the run directories here")
    parser.add_argument("--markdown", action="store_true", help="also print the tables as markdown")
    parser.add_argument("--quiet", action="store_true", help="no line per evaluation")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.eval_every, args.steps, args.max_sites, args.hidden = 2, 1, 2, 20, 16
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    for attack in attacks:
        ATTACKS.check(attack)
    sizes = [float(s) for s in args.sizes.split(",") if s.strip()]
    defences = [parse_defence(d) for d in (args.defence or ["none="])]
    console.print(machine())
    backdoors = [a for a in attacks if ATTACKS.fact(a, POISONS_DATA) == "backdoor"]
    if backdoors:
        console.print(f"attack success is measured for {', '.join(backdoors)}")
    cells: list[Cell] = []
    with output_folder(args.output, "poisoning") as output:
        for defence in defences:
            cells.append(run_cell(args, output, defence, "none", None))
            for attack in attacks:
                for size in sizes:
                    cells.append(run_cell(args, output, defence, attack, size))
    report(cells, args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
