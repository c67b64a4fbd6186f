"""What site-level differential privacy costs in accuracy on Shakespeare, and what it buys against memorizing.

DP-FedAvg (McMahan et al. 2018): each site's update is clipped to L2 norm C, the server adds Gaussian noise of
standard deviation z·C to their sum, and dp-accounting's accountant turns the rounds into (epsilon, delta).
This benchmark trains the same model without DP and with the noise calibrated so that the whole run spends
exactly each target epsilon, at delta = 1 / (10 × sites) (below 1 / sites, the usual requirement), and reports
the final accuracy, its worst decile over sites, and the epsilon spent. It then runs the canary audit
(`confide audit canaries`, Carlini et al. 2019): four random secrets planted in four sites' text, each ranked
among random secrets of the same format by the model trained without DP and with DP at the smallest epsilon.

Scale (the machine's, said plainly): all 755 Shakespeare roles with at least 16 lines, Poisson sampling of an
expected 50 sites per round (McMahan et al. 2018: 100 of 763,430 users per round, so their noise per user is
far smaller), 40 rounds, the FedAvg paper's LSTM with 128 units a layer, 20 local SGD steps. The accounting is
PLD (tighter than RDP) under add-or-remove-one-site neighbours. The clip norm is adaptive (Andrew et al.
2021: it follows the median update norm, from noised clipping bits whose noise is part of the budget) unless
``--fixed-clip``.

``--few-sites`` asks the other question: a few sites with many records each (hospitals, banks), where
site-level DP must hide a whole site among a handful and drowns the model. It runs `examples/plays-dpsgd.toml`
(10 plays, one site each, all in every round) without DP, and with record-level DP-SGD calibrated so that
every site spends at most each target epsilon on any one of its windows (secure aggregation on, its range
derived from the DP-SGD bound), and reports accuracy, the sites' record-level epsilon and wall time.

Run from the repository root:

    .venv/bin/python benchmarks/dp_utility.py                 # about 20 min on 2 cores
    .venv/bin/python benchmarks/dp_utility.py --quick         # tiny: checks that it runs (about 1 min)
    .venv/bin/python benchmarks/dp_utility.py --epsilons 4 --no-audit
    .venv/bin/python benchmarks/dp_utility.py --few-sites --epsilons 8,2     # record-level DP, 10 plays
    .venv/bin/python benchmarks/dp_utility.py --few-sites --quick             # checks that it runs
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

from common import Recorder, build_config, console, machine, merge, output_folder, run, show
from confide import config as confide_config
from confide.privacy.secure import SECAGG_CLIPPED
from confide.runtime.audit import audit_canaries
from confide.runtime.runner import load_dataset


def base_config(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "run": {"seed": args.seed, "rounds": args.rounds, "checkpoint_every": 1_000_000},
        "data": {"dataset": "shakespeare", "min_lines": args.min_lines, "max_sites": args.max_sites},
        "model": {"kind": "lstm", "embedding": 8, "hidden": args.hidden, "layers": 2},
        "client": {"optimizer": "sgd", "learning_rate": args.lr, "batch_size": 10, "max_steps": args.steps},
        "server": {
            "sites_per_round": args.sites_per_round,
            "sampling": "poisson",
            "optimizer": "sgd",
            "learning_rate": 1.0,
        },
        "eval": {"every": args.eval_every, "sites": args.eval_sites, "samples": 0},
        "backend": {"threads": args.threads},
    }


def dp_overrides(args: argparse.Namespace, epsilon: float) -> dict[str, Any]:
    if epsilon == 0:  # clipping and equal weights, no noise: what DP-FedAvg costs besides its noise
        return {"privacy": {"dp": "central", "clip_norm": args.clip, "noise_multiplier": 0.0}}
    return {
        "privacy": {
            "dp": "central",
            "clip_norm": args.clip,
            "target_epsilon": epsilon,
            "calibrate": True,
            "accounting": "pld",
            "adaptive_clip": not args.fixed_clip,
        }
    }


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DEMO = EXAMPLES / "shakespeare.toml"
FTRL = EXAMPLES / "shakespeare-ftrl.toml"
EXAMPLE = EXAMPLES / "plays-dpsgd.toml"
"""The few-site federation with record-level DP that ``--few-sites`` measures."""

SAMPLE_AWARE: dict[str, tuple[Path, list[str]]] = {
    "no DP (FedAvg)": (
        DEMO,
        [
            "privacy.dp=none",
            "privacy.secure_aggregation=false",
            "privacy.target_epsilon=0",
            "privacy.calibrate=false",
            "privacy.max_participations=0",
        ],
    ),
    "DP-FedAvg, distributed, SecAgg (the demo)": (DEMO, []),
    "DP-FTRL, central, momentum, cosine rate (examples/shakespeare-ftrl.toml)": (FTRL, []),
}
"""The demo federation three ways, each as its config says, each epsilon held against a server that knows
who took part."""


def sample_aware(args: argparse.Namespace) -> int:
    """The demo federation (755 sites) at epsilon 8 against a server that knows the sample: the demo's
    distributed DP-FedAvg against DP-FTRL, and no DP, with a sample of each model's text."""
    console.print(f"[dim]{time.strftime('%Y-%m-%d %H:%M')}  {machine()}[/dim]")
    rows, texts = [], []
    with output_folder(args.output, "dp-aware") as output:
        for label, (path, overrides) in SAMPLE_AWARE.items():
            name = label.split(",")[0].split(" (")[0].lower().replace(" ", "-")
            extra = ["eval.samples=0", f"run.output={output}", f"run.name={name}"]
            config = confide_config.load(path, [*overrides, *extra, *args.set])
            console.print(f"[bold]{label}[/bold]")
            recorder = Recorder(echo=True, label=label)
            t0 = time.perf_counter()
            runner = run(config, recorder)
            last = recorder.evaluations[-1]
            texts.append((label, runner.generate("ROMEO.\n", 200, seed=0)))
            amplified = last.get("epsilon_amplified")
            rows.append(
                [
                    label,
                    str(config.run.rounds),
                    "—" if runner.dp is None else f"{runner.dp.noise_multiplier:.4g}",
                    "—" if runner.dp is None else f"{last['epsilon_worst_site']:.3f}",
                    "—" if amplified is None else f"{amplified:.3f}",
                    f"{last['accuracy']:.3f}",
                    f"{time.perf_counter() - t0:.0f}",
                ]
            )
    show(
        "The demo federation at epsilon 8 against a server that knows the sample",
        [
            "run",
            "rounds",
            "noise multiplier",
            "epsilon (knows the sample)",
            "amplified",
            "accuracy",
            "wall s",
        ],
        rows,
        args.markdown,
    )
    for label, text in texts:
        console.print(f"\n[bold]{label}[/bold]:")
        console.print(text, markup=False, highlight=False)
    return 0


def few_sites(args: argparse.Namespace, epsilons: list[float], overrides: list[str]) -> int:
    """The example without DP and with record-level DP-SGD at each target epsilon: accuracy, epsilon, time."""
    rows = []
    plain = [
        "privacy.record_dp=false",
        "privacy.record_target_epsilon=0",
        "privacy.secure_aggregation=false",
        *args.plain_set,
    ]
    if args.quick:
        overrides = ["run.rounds=2", "client.max_steps=2", "eval.every=2", *overrides]
    with output_folder(args.output, "few-sites") as output:
        runs = [
            ("no DP", plain),
            *((f"epsilon {e:g}", [f"privacy.record_target_epsilon={e}"]) for e in epsilons),
        ]
        for label, extra in runs:
            name = label.replace(" ", "-")
            where = [f"run.output={str(output)!r}", f"run.name={name!r}", "eval.samples=0"]
            config = confide_config.load(EXAMPLE, [*where, *overrides, *extra])
            console.print(f"[bold]{label}[/bold]")
            recorder = Recorder(echo=True, label=label)
            started = time.perf_counter()
            runner = run(config, recorder)
            seconds = time.perf_counter() - started
            last = recorder.evaluations[-1]
            p = runner.config.privacy
            clipped = sum(1 for r in recorder.rounds if r.sums.get(SECAGG_CLIPPED, 0.0) > 0)
            windows = sorted(s.num_train for s in runner.sites)
            rows.append(
                [
                    label,
                    f"{p.record_noise:.4g}" if p.record_dp else "—",
                    f"{last['record_epsilon_max']:.3f}" if p.record_dp else "—",
                    f"{last['record_epsilon_median']:.3f}" if p.record_dp else "—",
                    f"{runner.secure.clip_range:.3g}" if runner.secure is not None else "—",
                    str(clipped) if runner.secure is not None else "—",
                    f"{last['accuracy']:.3f}",
                    f"{seconds:.0f}",
                ]
            )
    c = config
    show(
        f"Record-level DP on {len(windows)} plays ({windows[0]} to {windows[-1]} training windows a site), "
        f"{c.run.rounds} rounds of {c.client.max_steps} steps of {c.client.batch_size} windows, all sites "
        "each round",
        [
            "run",
            "noise multiplier z",
            "worst site epsilon",
            "median site epsilon",
            "secagg range R",
            "rounds with clipping",
            "accuracy",
            "wall s",
        ],
        rows,
        args.markdown,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny run that checks the script works")
    parser.add_argument("--epsilons", default="2,8", help="target epsilons, comma-separated (default 2,8)")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--sites-per-round", type=int, default=50, help="expected sites per round (Poisson)")
    parser.add_argument("--min-lines", type=int, default=16, help="a role needs this many lines (16: 755)")
    parser.add_argument("--max-sites", type=int, default=0, help="keep a seeded sample of sites; 0: all")
    parser.add_argument("--clip", type=float, default=1.0, help="(initial) clip norm C of each site's update")
    parser.add_argument(
        "--fixed-clip", action="store_true", help="keep C fixed (default: adaptive, median of the norms)"
    )
    parser.add_argument("--lr", type=float, default=4.0, help="client SGD learning rate")
    parser.add_argument("--steps", type=int, default=20, help="local steps per site per round")
    parser.add_argument("--hidden", type=int, default=128, help="LSTM units per layer")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--eval-sites", type=int, default=200, help="evaluate on a seeded sample of sites")
    parser.add_argument("--canaries", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=20, help="copies of each canary in its site")
    parser.add_argument("--candidates", type=int, default=5000, help="random secrets a canary is ranked in")
    parser.add_argument("--no-audit", action="store_true", help="skip the canary audit")
    parser.add_argument("--audit-only", action="store_true", help="run only the canary audit")
    parser.add_argument(
        "--clip-only", action="store_true", help="add a run with clipping and equal weights but no noise"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="keep run directories here (default: a temporary folder)")
    parser.add_argument("--markdown", action="store_true", help="also print the tables as markdown")
    parser.add_argument(
        "--sample-aware",
        action="store_true",
        help="the demo federation at epsilon 8 against a server that knows the sample: the demo's DP-FedAvg "
        "against examples/shakespeare-ftrl.toml, and no DP (about 25 min on 2 cores; --set overrides all)",
    )
    parser.add_argument(
        "--few-sites",
        action="store_true",
        help="record-level DP on examples/plays-dpsgd.toml (10 plays, one site each) instead",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="--sample-aware, --few-sites: override an option of the config they run (repeatable)",
    )
    parser.add_argument(
        "--plain-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="--few-sites: override an option of the run without DP only (its own learning rate)",
    )
    args = parser.parse_args(argv)
    if args.sample_aware:
        return sample_aware(args)
    if args.few_sites:
        console.print(f"[dim]{time.strftime('%Y-%m-%d %H:%M')}  {machine()}[/dim]")
        started = time.perf_counter()
        few_sites(args, [float(e) for e in args.epsilons.split(",") if e.strip()], args.set)
        console.print(f"\ntotal wall time {time.perf_counter() - started:.0f}s")
        return 0
    if args.quick:
        args.rounds, args.sites_per_round, args.max_sites, args.steps = 3, 5, 30, 2
        args.eval_every, args.eval_sites, args.candidates, args.repeats = 3, 10, 100, 5
        args.fixed_clip = True  # 5 sites a round are too few for noised clipping bits
    epsilons = [float(e) for e in args.epsilons.split(",") if e.strip()]

    console.print(f"[dim]{time.strftime('%Y-%m-%d %H:%M')}  {machine()}[/dim]")
    started = time.perf_counter()
    rows = []
    with output_folder(args.output, "dp") as output:
        probe = build_config(base_config(args), output, "probe")
        dataset = load_dataset(probe)
        sites = len(dataset.sites)
        delta = 1.0 / (10 * sites)
        console.print(
            f"scale: {sites} sites, Poisson sampling of {args.sites_per_round} expected per round "
            f"(q = {args.sites_per_round / sites:.4f}), {args.rounds} rounds, clip norm {args.clip:g}, "
            f"delta = 1/(10 x sites) = {delta:.1e}\n"
        )
        extra = [0.0] if args.clip_only else []
        for epsilon in [] if args.audit_only else [math.inf, *extra, *epsilons]:
            raw = (
                base_config(args)
                if math.isinf(epsilon)
                else merge(base_config(args), dp_overrides(args, epsilon))
            )
            name = "no-dp" if math.isinf(epsilon) else f"eps-{epsilon:g}" if epsilon else "clip-only"
            config = build_config(raw, output, name)
            label = (
                "no DP" if math.isinf(epsilon) else f"epsilon {epsilon:g}" if epsilon else "clip only, z = 0"
            )
            console.print(f"[bold]{label}[/bold]")
            recorder = Recorder(echo=True, label=label)
            t0 = time.perf_counter()
            runner = run(config, recorder)
            last = recorder.evaluations[-1]
            rows.append(
                [
                    label,
                    "—" if runner.dp is None else f"{runner.dp.noise_multiplier:.3f}",
                    "—" if runner.dp is None else f"{last['epsilon']:.3f}",
                    "—" if runner.dp is None else f"{last['clip_norm']:.2f}",
                    f"{last['accuracy']:.3f}",
                    f"{last['site_accuracy_p10']:.3f}",
                    f"{time.perf_counter() - t0:.0f}",
                ]
            )
        if rows:
            show(
                f"Accuracy against epsilon ({sites} sites, {args.rounds} rounds, delta {delta:.1e})",
                [
                    "run",
                    "noise multiplier z",
                    "epsilon spent",
                    "final clip norm",
                    "accuracy",
                    "worst decile",
                    "wall s",
                ],
                rows,
                args.markdown,
            )
        if not args.no_audit:
            raw = merge(base_config(args), dp_overrides(args, min(epsilons)))
            config = build_config(raw, output, "audit")
            _, runs = audit_canaries(config, args.canaries, args.repeats, args.candidates)
            audit_rows = []
            for i, c in enumerate(runs[0].canaries):
                row = [c.secret, c.site, str(c.rounds_trained)]
                for r in runs:
                    row += [f"{r.canaries[i].exposure:.2f}", f"{r.canaries[i].fitted_exposure:.2f}"]
                audit_rows.append(row)
            columns = ["secret", "site", "rounds its site trained"]
            for r in runs:
                columns += [f"exposure {r.label}", f"fitted {r.label}"]
            show(
                f"Canary exposure in bits ({args.repeats} copies each; at most "
                f"{math.log2(args.candidates + 1):.1f} by rank among {args.candidates}; DP run at epsilon "
                f"{runs[1].epsilon:.2f})",
                columns,
                audit_rows,
                args.markdown,
            )
    console.print(f"\ntotal wall time {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
