"""SCAFFOLD (Karimireddy et al. 2020, Algorithm 1, option II), both halves.

The site corrects every local gradient by c - c_i, then updates its control variate
c_i+ = c_i - c + (x - y_i) / (K * lr) and sends its change c_i+ - c_i beside the delta. The server keeps c,
the mean of all N sites' control variates, sends it with every task, and after the round moves it by the
sampled sites' changes: c <- c + (1/N) * sum_{i in S} (c_i+ - c_i), which keeps c equal to the mean of every
site's c_i (sites not sampled keep theirs).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from confide.algorithms import Algorithm, FitContext, LocalFit
from confide.client.state import SiteState
from confide.client.trainer import Objective
from confide.core import STEPS, Plan, Update, Vector
from confide.errors import UpdateError
from confide.pipeline import Layer, RoundContext, Traits

CONTROL_KEY = "scaffold.control"
"""SCAFFOLD's server control variate c, kept in the server state beside the optimizer's (and checkpointed)."""
CONTROL = "control"
"""Name of the server's control variate among a task's extras."""
CONTROL_DELTA = "control_delta"
"""Name of a site's control-variate change in its update's payload."""
SITE_KEY = "scaffold.control"
"""A site's own control variate c_i in its state."""


class Scaffold(Algorithm):
    name = "scaffold"

    def local(self, fit: FitContext) -> LocalFit:
        control = fit.extras.get(CONTROL)
        if control is None or control.shape != fit.weights.shape:
            raise UpdateError(
                f"SCAFFOLD needs the server's control variate with the task for site {fit.site!r}"
            )
        return _ScaffoldFit(fit.site, fit.plan, control, fit.state)

    def layers(self) -> list[Layer]:
        return [ScaffoldLayer()]


class _ScaffoldFit(LocalFit):
    def __init__(self, site: str, plan: Plan, control: Vector, state: SiteState) -> None:
        self.site, self.plan, self.control, self.state = site, plan, control, state
        kept = state.get(site, SITE_KEY)
        self.mine = np.zeros_like(control) if kept is None else kept
        self.objective = Objective(correction=control - self.mine)

    def finish(self, delta: Vector, steps: int) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        if steps == 0:
            return {}, {}
        # Option II: c_i+ = c_i - c + (x - y_i) / (K lr); the server needs only the change c_i+ - c_i.
        change = -self.control - delta / np.float32(steps * self.plan.learning_rate)
        self.state.put(self.site, SITE_KEY, self.plan.round, self.mine + change)
        return {CONTROL_DELTA: change.astype(np.float32, copy=False)}, {}


class ScaffoldLayer(Layer):
    name = "scaffold"
    traits = Traits(needs_individual_updates=True)
    """Each site's control-variate change travels beside its update and is summed by the server."""

    def init_state(self, size: int) -> dict[str, Vector]:
        return {CONTROL_KEY: np.zeros(size, dtype=np.float32)}  # zero, as in the paper

    def begin(self, round: RoundContext) -> None:
        control = round.server_state[CONTROL_KEY]
        for site, task in round.tasks.items():
            round.tasks[site] = replace(task, extras={**task.extras, CONTROL: control})
        round.scratch[self.name] = np.zeros_like(control)

    def decode(self, update: Update, round: RoundContext) -> Update | None:
        size = round.server_state[CONTROL_KEY].size
        change = update.payload.get(CONTROL_DELTA)
        if change is None:
            if update.sums.get(STEPS, 0.0) == 0:
                return update  # a site with nothing to train on leaves its control variate as it was
            raise UpdateError(f"site {update.site!r} trained but sent no SCAFFOLD control-variate change")
        if not (isinstance(change, np.ndarray) and change.dtype == np.float32 and change.shape == (size,)):
            raise UpdateError(
                f"site {update.site!r} sent a SCAFFOLD control change that is not {size} float32 values"
            )
        if not np.isfinite(change).all():
            raise UpdateError(f"site {update.site!r} sent a SCAFFOLD control change with NaN or infinity")
        return update

    def accept(self, update: Update, round: RoundContext) -> None:
        change = update.payload.pop(CONTROL_DELTA, None)
        if change is not None:
            torch.from_numpy(round.scratch[self.name]).add_(torch.from_numpy(change))

    def finish(self, round: RoundContext) -> None:
        round.server_state[CONTROL_KEY] += round.scratch[self.name] / np.float32(round.population)
