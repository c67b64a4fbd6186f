"""FedProx (Li et al. 2020): the site adds mu/2 ||w - w_global||^2 to its local objective. Any amount of work
is welcome: a straggler's partial update is used, not dropped."""

from __future__ import annotations

from confide.algorithms import Algorithm, FitContext, LocalFit
from confide.client.trainer import Objective


class FedProx(Algorithm):
    name = "fedprox"

    def local(self, fit: FitContext) -> LocalFit:
        local = LocalFit()
        local.objective = Objective(prox_mu=fit.plan.mu)
        return local
