"""FedNova (Wang et al. 2020, "Tackling the Objective Inconsistency Problem"): plain local training; each site
reports its normalizer a_i (the total weight its optimizer gave the step gradients: K for plain SGD), and
the server averages d_i = delta_i / a_i.

A site that takes more local steps moves further; plain averaging then pulls the model towards the sites
that did more work, not towards the average site's optimum. FedNova divides each delta by the site's
normalizer and rescales the mean by the effective step count: delta = (sum_i p_i a_i) * sum_i p_i delta_i /
a_i, with p_i the example weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from confide.algorithms import Algorithm, FitContext, LocalFit
from confide.core import Update, Vector
from confide.errors import UpdateError
from confide.pipeline import Aggregator, Traits
from confide.randomness import Randomness
from confide.server.strategy import MeanState, WeightedMean

NORMALIZER = "normalizer"
"""Metric key of a site's FedNova normalizer a_i."""


def fednova_normalizer(steps: int, momentum: float) -> float:
    """a_i of FedNova for ``steps`` of SGD with heavy-ball ``momentum`` rho (Wang et al. 2020, sec. 4):
    the total weight the K gradients receive, (K - rho(1 - rho^K) / (1 - rho)) / (1 - rho); K without."""
    if momentum == 0:
        return float(steps)
    rho = momentum
    return (steps - rho * (1 - rho**steps) / (1 - rho)) / (1 - rho)


class _NovaFit(LocalFit):
    def __init__(self, momentum: float) -> None:
        self.momentum = momentum

    def finish(self, delta: Vector, steps: int) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        return {}, {NORMALIZER: fednova_normalizer(steps, self.momentum)}


class FedNova(Algorithm):
    name = "fednova"

    def local(self, fit: FitContext) -> LocalFit:
        return _NovaFit(fit.momentum)

    def aggregator(self, default: Aggregator) -> Aggregator:
        return default if isinstance(default, NormalizedMean) else NormalizedMean()


@dataclass
class NovaState(MeanState):
    tau: float = 0.0
    """Sum of p_i * a_i: the effective number of local steps of the round."""


class NormalizedMean(WeightedMean):
    """FedNova's normalized averaging of the updates (see the module)."""

    name = "fednova"
    traits = Traits(needs_individual_updates=True)
    """It divides each update by that site's own normalizer."""

    def init(self, size: int) -> NovaState:
        return NovaState(total=np.zeros(size, dtype=np.float32))

    def add(self, state: MeanState, update: Update) -> None:
        assert isinstance(state, NovaState)
        a = update.metrics.get(NORMALIZER, float("nan"))
        if not (np.isfinite(a) and a > 0):
            raise UpdateError(
                f"site {update.site!r} sent no valid FedNova normalizer (got {a}); it must report the "
                "positive number of local steps it took"
            )
        vector = update.readable(state.total.size)
        scaled = Update(update.site, update.round, update.num_examples, vector / np.float32(a), 0)
        super().add(state, scaled)
        state.tau += update.num_examples * a

    def add_sum(self, state: MeanState, total: Vector, count: int) -> None:
        raise UpdateError("FedNova needs each site's step count beside its update; it cannot use a bare sum")

    def result(self, state: MeanState, randomness: Randomness) -> Vector:
        assert isinstance(state, NovaState)
        mean = super().result(state, randomness)
        mean *= np.float32(state.tau / state.weight)
        return mean
