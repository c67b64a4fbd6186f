"""Aggregators: how the updates of a round become its aggregate delta.

Aggregators follow FedJAX's shape: explicit state, ``init`` → ``add`` per update → ``result``. The weighted
mean keeps one running sum, updated in place as each update arrives, so the server holds one vector however
many sites report. Central DP's noise wraps any aggregator whose sensitivity is bounded
(:class:`confide.privacy.dp.CentralDP`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from confide.core import Update, Vector
from confide.errors import UpdateError
from confide.pipeline import Traits
from confide.randomness import Randomness


@dataclass
class MeanState:
    total: Vector
    weight: float = 0.0
    count: int = 0


class WeightedMean:
    """The example-weighted mean of the updates (FedAvg, McMahan et al. 2017, eq. for w_{t+1})."""

    name = "mean"
    traits = Traits()

    def init(self, size: int) -> MeanState:
        return MeanState(total=np.zeros(size, dtype=np.float32))

    def add(self, state: MeanState, update: Update) -> None:
        vector = update.readable(state.total.size)
        if update.num_examples <= 0:
            raise UpdateError(
                f"site {update.site!r} reported {update.num_examples} examples; an update needs at least one"
            )
        # One fused pass (axpy) over memory: total += n·Δ, with no temporary array.
        torch.from_numpy(state.total).add_(torch.from_numpy(vector), alpha=float(update.num_examples))
        state.weight += update.num_examples
        state.count += 1

    def add_sum(self, state: MeanState, total: Vector, count: int) -> None:
        if total.shape != state.total.shape:
            raise UpdateError(f"a sum of {total.size} values arrived; the model has {state.total.size}")
        state.total += total
        state.weight += count
        state.count += count

    def result(self, state: MeanState, randomness: Randomness) -> Vector:
        if state.count == 0:
            raise UpdateError("no update arrived this round; there is nothing to aggregate")
        state.total /= np.float32(state.weight)
        return state.total

    def sensitivity(self, clip_norm: float) -> float | None:
        return None  # one site with many examples can move an example-weighted mean arbitrarily far
