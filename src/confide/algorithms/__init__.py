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

import numpy as np

from confide.client.state import SiteState
from confide.client.trainer import PLAIN, Objective
from confide.core import Plan, Vector
from confide.pipeline import Aggregator, Layer
from confide.registry import STRATEGIES


class LocalFit:
    """One site's fit under an algorithm: the objective it trains with, and what it does after training."""

    objective: Objective = PLAIN

    def finish(self, delta: Vector, steps: int) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """What the site sends beside its delta: arrays for the update's payload, and metrics."""
        return {}, {}


class Algorithm:
    """The default is FedAvg (McMahan et al. 2017): plain local training, the delta sent as it is."""

    name = "fedavg"

    def local(
        self,
        site: str,
        weights: Vector,
        plan: Plan,
        extras: Mapping[str, Vector],
        state: SiteState,
        momentum: float,
    ) -> LocalFit:
        """The site's fit for ``plan``, starting from ``weights``, with the task's ``extras`` and its own
        ``state``; ``momentum`` is that of the site's optimizer."""
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
