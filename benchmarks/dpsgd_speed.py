"""DP-SGD's local step against a plain one: what record-level privacy costs a site in time.

For each model, a plain local step (forward, backward and the optimizer's step on a batch of windows, as
:class:`~confide.client.trainer.Trainer` takes it) and a DP-SGD step on a batch of the same size
(:meth:`~confide.client.dpsgd.DPSGD.step_batch`: per-window gradients, clipping, noise from the site's
randomness, the optimizer's step) are timed in the same process, interleaved: each repeat times one step of
each method in turn (after an untimed one of the same method), so a change in the machine's load touches all
of them alike. DP-SGD is timed two ways:
``dp`` as a site trains now (the LSTM's hand-written backward pass with exact clipping, the GPT's vmap with
attention written out) and ``dp vmap`` the old path (``per_window="vmap"``: vmap of grad over the whole
model, which loops over the windows where torch has no batching rule, as for the fused LSTM kernel).

Reported: the median milliseconds of each method and the median over repeats of each repeat's ratio to the
plain step. The goal: DP-SGD within 3x a plain step on the LSTM and the GPT.

Models: the demo's LSTM (embedding 8, 2 layers, context 80, SGD) at 128 and 256 units and batches of 10 and
32; the transformer example's GPT (4 layers, 4 heads, width 128, context 80, Adam) at batch 16. Windows are
random characters (the time does not depend on them). Each size runs on one torch thread (a simulation's
default) and on torch's default here.

Run from the repository root (about 10 minutes on 2 cores, most of it the old path):

    .venv/bin/python benchmarks/dpsgd_speed.py --markdown
    .venv/bin/python benchmarks/dpsgd_speed.py --repeats 3 --no-vmap    # a quick look at the new path
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from common import console, machine, show
from confide.client.dpsgd import DPSGD
from confide.client.trainer import ClientOptimizer, split_window
from confide.models import build_model
from confide.randomness import SeededRandomness

GOAL = 3.0
"""DP-SGD's step may take at most this many times a plain step."""


@dataclass(frozen=True)
class Size:
    name: str
    kind: str
    options: dict[str, int]
    batch: int
    optimizer: str


SIZES = (
    Size("LSTM 128, batch 10", "lstm", {"embedding": 8, "hidden": 128, "layers": 2}, 10, "sgd"),
    Size("LSTM 128, batch 32", "lstm", {"embedding": 8, "hidden": 128, "layers": 2}, 32, "sgd"),
    Size("LSTM 256, batch 10", "lstm", {"embedding": 8, "hidden": 256, "layers": 2}, 10, "sgd"),
    Size("LSTM 256, batch 32", "lstm", {"embedding": 8, "hidden": 256, "layers": 2}, 32, "sgd"),
    Size("GPT 4x128, batch 16", "gpt", {"layers": 4, "heads": 4, "width": 128}, 16, "adam"),
)
CONTEXT = 80
VOCAB = 97


def steps(size: Size, with_vmap: bool) -> dict[str, Callable[[], None]]:
    """One step of each method on one batch of ``size``, each with its own model (same initial weights)."""
    data = np.random.default_rng(0).integers(0, VOCAB, size=(size.batch, CONTEXT + 1), dtype=np.uint8)
    inputs, targets = split_window(data)
    optimizer = ClientOptimizer(size.optimizer)

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return build_model(size.kind, VOCAB, context=CONTEXT, **size.options)

    plain_model = model()
    params = [p for p in plain_model.parameters() if p.requires_grad]
    plain_optimizer = optimizer.build(params)

    def plain() -> None:
        plain_optimizer.zero_grad(set_to_none=True)
        _, loss = plain_model(inputs, targets)
        loss.backward()
        plain_optimizer.step()

    def dp_step(per_window: str) -> Callable[[], None]:
        dp = DPSGD(model(), 1.0, 1.0, optimizer=optimizer, per_window=per_window)
        randomness = SeededRandomness(0)

        def step() -> None:
            dp.step_batch(inputs, targets, float(size.batch), randomness)

        return step

    out = {"plain": plain, "dp": dp_step("auto")}
    if with_vmap:
        out["dp vmap"] = dp_step("vmap")
    return out


def measure(size: Size, repeats: int, with_vmap: bool) -> dict[str, list[float]]:
    """Seconds of each method's step, ``repeats`` times, interleaved. Each timed step follows an untimed one
    of the same method: the old path frees hundreds of megabytes, and the step after it would pay for
    faulting fresh memory back in (a plain step measured 3x its own time right after one)."""
    methods = steps(size, with_vmap)
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, step in methods.items():
            step()
            started = time.perf_counter()
            step()
            seconds[name].append(time.perf_counter() - started)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed steps of each method (default 5)")
    parser.add_argument(
        "--threads", default="1,default", help="comma-separated torch thread counts; 'default': torch's own"
    )
    parser.add_argument("--no-vmap", action="store_true", help="leave out the old vmap path (the slow one)")
    parser.add_argument("--markdown", action="store_true", help="also print the table as markdown")
    args = parser.parse_args()
    default_threads = torch.get_num_threads()
    threads = [default_threads if t.strip() == "default" else int(t) for t in args.threads.split(",")]
    # The old path's fallback warns once per process; it is what is being measured.
    warnings.filterwarnings("ignore", message="There is a performance drop", category=UserWarning)
    console.print(machine())

    rows = []
    for count in dict.fromkeys(threads):
        torch.set_num_threads(count)
        for size in SIZES:
            console.print(f"[dim]{size.name}, {count} thread(s)...[/]")
            seconds = measure(size, args.repeats, not args.no_vmap)
            plain = seconds["plain"]
            row = [size.name, str(count), f"{statistics.median(plain) * 1e3:.1f}"]
            for name in ("dp", "dp vmap"):
                if name not in seconds:
                    row += ["-", "-"]
                    continue
                ratios = [d / p for d, p in zip(seconds[name], plain, strict=True)]
                row += [f"{statistics.median(seconds[name]) * 1e3:.1f}", f"{statistics.median(ratios):.2f}x"]
            ratio = float(row[4].rstrip("x"))
            row.append("met" if ratio <= GOAL else "not met")
            rows.append(row)
    torch.set_num_threads(default_threads)
    show(
        f"DP-SGD's step against a plain step ({args.repeats} interleaved repeats; medians)",
        ["model", "threads", "plain ms", "dp ms", "dp / plain", "dp vmap ms", "dp vmap / plain",
         f"goal <= {GOAL:g}x"],
        rows,
        args.markdown,
    )  # fmt: skip


if __name__ == "__main__":
    main()
