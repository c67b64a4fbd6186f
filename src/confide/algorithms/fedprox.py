"""FedProx (Li et al. 2020): the site adds mu/2 ||w - w_global||^2 to its local objective. Any amount of work
is welcome: a straggler's partial update is used, not dropped."""

from __future__ import annotations

from collections.abc import Mapping

from confide.algorithms import Algorithm, LocalFit
from confide.client.state import SiteState
from confide.client.trainer import Objective
from confide.core import Plan, Vector


class FedProx(Algorithm):
    name = "fedprox"

    def local(
        self,
        site: str,
        weights: Vector,
        plan: Plan,
        extras: Mapping[str, Vector],
        state: SiteState,
        momentum: float,
    ) -> LocalFit:
        fit = LocalFit()
        fit.objective = Objective(prox_mu=plan.mu)
        return fit
