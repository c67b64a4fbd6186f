"""What the framework costs on top of the work any federated run must do: two measurements in one run.

a. Round overhead. Runs the transformer demo config without privacy layers (examples/transformer.toml, the
   foundation's demo, or the same settings built in here when that file is missing) for ``--rounds``
   rounds, drops the first ``--warmup`` rounds, and compares each round's wall time
   (``RoundResult.seconds``: selection, every site's local training, decoding and
   aggregation, the server step) with the time the sites report for their forward, backward and optimizer
   steps (``RoundResult.compute_seconds``). Overhead = (wall - compute) / wall; the goal is under 5%. The
   non-compute time is then broken down by timing the framework's own per-site and per-round calls
   (Layout write, read and delta subtraction, the finiteness check, WeightedMean.add, the server step)
   directly on the same model.

b. Aggregation. ``--updates`` updates (default 100) of ``--params`` float32 parameters (default 10M, so 4 GB
   of updates, generated once) with random example counts go through WeightedMean (init, add per update,
   result). The floor is a plain numpy sum of the same arrays (``acc = a[0].copy(); acc += a[i]``); ``np.sum``
   over the stacked array is shown for information. Best of ``--repeats`` repetitions each, interleaved.
   Ratio = WeightedMean / floor; the goal is within 2x.

Both verdicts are ratios against baselines measured in the same run, so a noisy machine moves them less than
it moves the absolute times.

Run from the repository root:

    .venv/bin/python benchmarks/overhead.py            # about 1-2 minutes on a 2-core CPU; needs ~4.5 GB RAM
    .venv/bin/python benchmarks/overhead.py --quick    # a few seconds: tiny round, 20 updates of 1M values
    .venv/bin/python benchmarks/overhead.py --markdown # also print the tables as markdown

Run directories go to a temporary folder unless ``--output`` names one.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from common import Recorder, build_config, console, machine, merge, output_folder, run, show
from confide.core import Plan, Update
from confide.randomness import SecretRandomness
from confide.runtime.grpc import wire
from confide.runtime.local import LocalBackend
from confide.server.strategy import WeightedMean

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "transformer.toml"

FALLBACK_DEMO: dict[str, Any] = {
    "data": {"dataset": "shakespeare", "partition": "natural"},
    "model": {"kind": "gpt", "layers": 4, "heads": 4, "width": 128, "context": 80, "dropout": 0.0},
    "client": {"epochs": 1, "max_steps": 20, "batch_size": 16, "optimizer": "adam", "learning_rate": 0.003},
    "server": {"sites_per_round": 10, "optimizer": "sgd", "learning_rate": 1.0},
}

OVERHEAD_GOAL = 0.05
AGGREGATION_GOAL = 2.0


def demo_config() -> tuple[dict[str, Any], str]:
    if DEMO.is_file():
        return tomllib.loads(DEMO.read_text(encoding="utf-8")), str(DEMO.relative_to(ROOT))
    return FALLBACK_DEMO, "built-in copy of the demo settings (examples/transformer.toml not found)"


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls (after one untimed call)."""
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


# --- a. round overhead --------------------------------------------------------------------------------------


def round_overhead(args: argparse.Namespace, output: Path) -> float:
    raw, source = demo_config()
    rounds = args.rounds
    overrides: dict[str, Any] = {
        "run": {"rounds": rounds, "checkpoint_every": rounds, "seed": 0},
        # Evaluation and checkpoints happen outside RoundResult.seconds; keep the one at the end cheap.
        "eval": {"every": rounds, "sites": 10, "samples": 0},
    }
    if args.threads:
        overrides["backend"] = {"threads": args.threads}
    if args.quick:
        overrides["client"] = {"max_steps": 3}
        overrides["server"] = {"sites_per_round": 3}
    config = build_config(merge(raw, overrides), output, "overhead")
    console.print(f"[bold]a. Round overhead[/bold] of {source}: {rounds} rounds, first {args.warmup} skipped")
    console.print(
        f"   model {config.model}, {config.server.sites_per_round:g} sites/round, client "
        f"{config.client.optimizer} max_steps={config.client.max_steps} batch={config.client.batch_size}"
    )
    recorder = Recorder()
    runner = run(config, recorder)
    measured = list(zip(recorder.rounds, recorder.runner_seconds, strict=True))[args.warmup :]
    if not measured:
        sys.exit("--rounds must be larger than --warmup")

    rows = []
    for result, runner_s in measured:
        other = result.seconds - result.compute_seconds
        rows.append(
            [
                result.round,
                len(result.sites),
                f"{result.seconds:.3f}",
                f"{result.compute_seconds:.3f}",
                f"{other * 1000:.1f}",
                f"{100 * other / result.seconds:.2f}%",
                f"{(runner_s - result.seconds) * 1000:.1f}",
            ]
        )
    wall = sum(r.seconds for r, _ in measured)
    compute = sum(r.compute_seconds for r, _ in measured)
    store = sum(s - r.seconds for r, s in measured)
    overhead = (wall - compute) / wall
    rows.append(
        [
            "all",
            sum(len(r.sites) for r, _ in measured),
            f"{wall:.3f}",
            f"{compute:.3f}",
            f"{(wall - compute) * 1000:.1f}",
            f"{100 * overhead:.2f}%",
            f"{store * 1000:.1f}",
        ]
    )
    columns = [
        "round",
        "sites",
        "wall s",
        "compute s",
        "non-compute ms",
        "overhead",
        "runner extra ms",
    ]
    show("Round wall time vs the sites' compute time", columns, rows, args.markdown)
    console.print(
        "   runner extra = what the runner adds around a round (outside RoundResult.seconds): "
        "the round's store write and the display's site selection"
    )

    # Where the non-compute time goes: the framework's own calls, timed directly on the same model.
    sites_per_round = statistics.mean(len(r.sites) for r, _ in measured)
    backend = runner.backend
    assert isinstance(backend, LocalBackend)
    trainer = backend.kit.trainer
    layout, model = runner.layout, runner.model
    weights = runner.state.weights.copy()
    strategy = runner.strategy
    aggregator = WeightedMean()
    delta = layout.read(model) - weights
    update = u = Update("s", 1, 100, delta, 0)
    state = aggregator.init(layout.size)
    empty = np.zeros((0, 81), dtype=np.uint8)
    plan = Plan(round=1, epochs=1, max_steps=1, batch_size=16, learning_rate=0.001, seed=1)
    sites = runner.backend.sites()
    reps = 5 if args.quick else 50

    def fit_without_steps() -> None:
        result = trainer.fit(weights, empty, plan)  # everything in fit but forward/backward/step
        assert result.steps == 0

    scratch = weights.copy()
    unit = aggregator.init(layout.size)
    unit.weight, unit.count = 1.0, 1  # result() divides by 1 here, so repeating it changes nothing
    optimizer_state = strategy.optimizer.init(layout.size)

    fit_name = "Trainer.fit without steps (write, optimizer reset, read, subtract)"
    per_site = [
        ("Layout.write (global weights into the model)", lambda: layout.write(model, weights)),
        ("Layout.read + delta subtraction", lambda: layout.read(model) - weights),
        (fit_name, fit_without_steps),
        ("isfinite check of the update", lambda: np.isfinite(delta).all()),
        ("WeightedMean.add", lambda: aggregator.add(state, update)),
        ("counting the update's wire bytes", lambda: wire.message_bytes(*wire.update_message(0, b"", u))),
    ]
    per_round = [
        ("Strategy.select + plans", lambda: strategy.plans(1, strategy.select(1, sites))),
        ("WeightedMean.init", lambda: aggregator.init(layout.size)),
        ("WeightedMean.result", lambda: aggregator.result(unit, SecretRandomness())),
        (
            f"server step ({strategy.optimizer.name})",
            lambda: strategy.optimizer.step(scratch, delta, optimizer_state),
        ),
    ]
    breakdown = []
    for name, fn in per_site:
        breakdown.append((name, "per site", median_seconds(fn, reps), sites_per_round))
    for name, fn in per_round:
        breakdown.append((name, "per round", median_seconds(fn, reps), 1.0))
    non_compute = (wall - compute) / len(measured)
    # The fit without steps already holds the write, read and subtraction: they are counted once, there.
    counted = {fit_name, "isfinite check of the update", "WeightedMean.add"}
    counted |= {"counting the update's wire bytes"}
    counted |= {name for name, _ in per_round}
    explained = sum(t * n for name, _, t, n in breakdown if name in counted)
    rows = [
        [name, where, f"{t * 1e3:.3f}", f"{t * n * 1e3:.2f}", f"{100 * t * n / non_compute:.1f}%"]
        for name, where, t, n in breakdown
    ]
    rows.append(
        [
            "sum (fit without steps, isfinite, add, and the per-round calls)",
            "per round",
            "",
            f"{explained * 1e3:.2f}",
            f"{100 * explained / non_compute:.1f}%",
        ]
    )
    rows.append(
        [
            "measured non-compute time",
            "per round",
            "",
            f"{non_compute * 1e3:.2f}",
            "100%",
        ]
    )
    console.print(
        f"   model: {layout.size:,} parameters ({layout.size * 4 / 1e6:.1f} MB per vector), "
        f"{sites_per_round:g} sites per round"
    )
    show(
        "Where the non-compute time goes (calls timed directly, median)",
        ["call", "how often", "ms each", "ms per round", "share of non-compute"],
        rows,
        args.markdown,
    )
    verdict = "PASS" if overhead < OVERHEAD_GOAL else "FAIL"
    console.print(
        f"   [bold]verdict: overhead {100 * overhead:.2f}% of round wall time; goal < "
        f"{100 * OVERHEAD_GOAL:.0f}%: {verdict}[/bold]\n"
    )
    return overhead


# --- b. aggregation -----------------------------------------------------------------------------------------


def aggregation(args: argparse.Namespace) -> float:
    n, size = args.updates, args.params
    console.print(
        f"[bold]b. Aggregation[/bold]: {n} updates of {size:,} float32 values "
        f"({n * size * 4 / 1e9:.2f} GB), best of {args.repeats}, interleaved"
    )
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    stacked = np.empty((n, size), dtype=np.float32)  # the updates are its rows: no second copy for np.sum
    for i in range(n):
        rng.standard_normal(size, dtype=np.float32, out=stacked[i])
    counts = rng.integers(1, 1000, size=n)
    updates = [Update(f"site{i}", 1, int(counts[i]), stacked[i], 0) for i in range(n)]
    console.print(f"   generated in {time.perf_counter() - started:.1f}s")

    def weighted_mean() -> np.ndarray:
        agg = WeightedMean()
        state = agg.init(size)
        for u in updates:
            agg.add(state, u)
        return agg.result(state, SecretRandomness())

    def numpy_sum() -> np.ndarray:
        acc = stacked[0].copy()
        for i in range(1, n):
            acc += stacked[i]
        return acc

    def numpy_stacked() -> np.ndarray:
        return np.sum(stacked, axis=0)

    methods: list[tuple[str, Callable[[], np.ndarray]]] = [
        ("WeightedMean (init, add x n, result)", weighted_mean),
        ("floor: numpy acc += a[i]", numpy_sum),
        ("np.sum over the stacked array (info)", numpy_stacked),
    ]
    best = {name: float("inf") for name, _ in methods}
    for _ in range(args.repeats):
        for name, fn in methods:
            t0 = time.perf_counter()
            out = fn()
            best[name] = min(best[name], time.perf_counter() - t0)
            del out

    # The mean must be right, not only fast: check a slice against float64 numpy.
    check = slice(0, min(size, 100_000))
    expected = (counts[:, None] * stacked[:, check].astype(np.float64)).sum(0) / counts.sum()
    got = weighted_mean()[check]
    error = float(np.abs(got - expected).max())

    floor = best["floor: numpy acc += a[i]"]
    gbytes = n * size * 4 / 1e9
    rows = [[name, f"{t:.3f}", f"{gbytes / t:.1f}", f"{t / floor:.2f}x"] for name, t in best.items()]
    show(
        "Aggregation of the updates", ["method", "best s", "GB/s of updates", "vs floor"], rows, args.markdown
    )
    ratio = best["WeightedMean (init, add x n, result)"] / floor
    verdict = "PASS" if ratio <= AGGREGATION_GOAL else "FAIL"
    console.print(f"   WeightedMean result vs float64 reference: max abs error {error:.2e}")
    console.print(
        f"   [bold]verdict: WeightedMean {ratio:.2f}x the numpy floor; goal within "
        f"{AGGREGATION_GOAL:.0f}x: {verdict}[/bold]\n"
    )
    return ratio


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short form that runs in seconds")
    parser.add_argument("--rounds", type=int, default=5, help="demo rounds to run (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="first rounds left out (default 1)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: the config's (default)")
    parser.add_argument("--updates", type=int, default=100, help="updates to aggregate (default 100)")
    parser.add_argument("--params", type=int, default=10_000_000, help="values per update (default 10M)")
    parser.add_argument("--repeats", type=int, default=5, help="repetitions of each aggregation (best of)")
    parser.add_argument("--skip-round", action="store_true", help="only measure aggregation")
    parser.add_argument("--skip-aggregation", action="store_true", help="only measure round overhead")
    parser.add_argument("--output", help="keep run directories here (default: a temporary folder)")
    parser.add_argument("--markdown", action="store_true", help="also print the tables as markdown")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.warmup = 2, 1
        args.updates, args.params, args.repeats = 20, 1_000_000, 3
    console.print(f"[dim]{time.strftime('%Y-%m-%d %H:%M')}  {machine()}[/dim]\n")
    verdicts = []
    if not args.skip_round:
        with output_folder(args.output, "overhead") as output:
            verdicts.append(round_overhead(args, output) < OVERHEAD_GOAL)
    if not args.skip_aggregation:
        verdicts.append(aggregation(args) <= AGGREGATION_GOAL)
    return 0 if all(verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
