"""Local algorithms as plug-ins: one module each, holding both halves of the algorithm.

An :class:`Algorithm` says what a site adds to plain local training (its :class:`LocalFit`: an objective,
and what it sends or keeps once the fit is done) and what the server adds to a round (layers, such as
SCAFFOLD's control variates, and an aggregator, such as FedNova's normalized mean). The site
(:mod:`confide.client.site`) and the strategy (:mod:`confide.server.strategy`) ask the plug-in by name;
neither knows any algorithm. Adding one is a new module here plus its registration in
:data:`confide.registry.STRATEGIES`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from confide.client.state import SiteState
from confide.client.trainer import PLAIN, Objective
from confide.core import Plan, Vector
from confide.pipeline import Aggregator, Layer
from confide.registry import STRATEGIES


@dataclass(frozen=True)
class FitContext:
    """What a site knows when it starts a fit: everything an algorithm's site half may use."""

    site: str
    weights: Vector
    """The global weights it received (the fit starts from them)."""
    plan: Plan
    extras: Mapping[str, Vector]
    """The vectors the server sent with the task (SCAFFOLD's control variate)."""
    state: SiteState
    """The site's own state between rounds."""
    momentum: float
    """The momentum of the site's optimizer."""


class LocalFit:
    """One site's fit under an algorithm: the objective it trains with, and what it does after training."""

    objective: Objective = PLAIN

    def finish(self, delta: Vector, steps: int) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """What the site sends beside its delta: arrays for the update's payload, and metrics."""
        return {}, {}


class Algorithm:
    """The default is FedAvg (McMahan et al. 2017): plain local training, the delta sent as it is."""

    name = "fedavg"

    def local(self, fit: FitContext) -> LocalFit:
        """The site's fit: its objective, and what it does once training is done."""
        return LocalFit()

    def layers(self) -> list[Layer]:
        """What the server adds to every round for this algorithm."""
        return []

    def aggregator(self, default: Aggregator) -> Aggregator:
        """The aggregator this algorithm needs, given the one the run would use."""
        return default


def algorithm(name: str) -> Algorithm:
    """The plug-in of algorithm ``name`` (``server.strategy``), from the registry."""
    plugin: type[Algorithm] = STRATEGIES.load(name)
    return plugin()
