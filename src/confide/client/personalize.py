"""Personalization: a model for each site besides the global one, trained and kept on the site.

- **Ditto** (Li et al. 2021): each site keeps a personal model v and, each time it takes part, trains it on
  its own data with a pull towards the global model it received: min f_i(v) + lambda/2 ||v - w||^2.
  Small lambda gives local models, large lambda the global one (lambda = inf is exactly the global model).
- **FedRep** (Collins et al. 2021): the model is split into a shared body and a personal head. A site first
  trains its head with the body frozen, then the body with its head frozen, and sends only the body's
  change; the head never leaves the site.
- **Fine-tuning**: the final global model trained for k more steps on the site's own data.

The state (Ditto's model, FedRep's head) lives in :class:`~confide.client.state.SiteState`, so it survives a
resume. A site that has no state yet (it was never selected) is served as a new site would be: Ditto's
personal model starts as the global one, FedRep's head is trained for the configured steps first.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace

import numpy as np

from confide.client.state import SiteState
from confide.client.trainer import Objective, Trainer
from confide.core import Plan, Vector

DITTO_KEY = "ditto.model"
FEDREP_KEY = "fedrep.head"


@dataclass(frozen=True)
class Personal:
    """What a site needs to personalize: where its state lives and which parameters are its head."""

    state: SiteState
    head: np.ndarray
    """Positions of the head's parameters in the flat vector (FedRep); empty for other methods."""
    head_names: frozenset[str] = frozenset()


def personal_plan(plan: Plan) -> Plan:
    """The plan of a site's personal training: ``personal_steps`` steps (or the plan's own when 0), drawn
    from a seed of its own so that it does not repeat the global training's batches."""
    steps = plan.personal_steps or plan.max_steps
    seed = zlib.crc32(f"{plan.seed}:personal".encode())
    rate = plan.personal_learning_rate or plan.learning_rate
    return replace(plan, max_steps=steps, seed=seed, learning_rate=rate)


def train_ditto(
    trainer: Trainer, site: str, windows: np.ndarray, weights: Vector, plan: Plan, personal: Personal
) -> float:
    """Ditto's personal step: train v from its last value towards the received global model; store it."""
    v = personal.state.get(site, DITTO_KEY)
    start = weights if v is None else v
    result = trainer.fit(
        start, windows, personal_plan(plan), Objective(prox_lambda=plan.personal_lambda, anchor=weights)
    )
    personal.state.put(site, DITTO_KEY, plan.round, start + result.delta)
    return result.seconds


def train_head(
    trainer: Trainer, site: str, windows: np.ndarray, weights: Vector, plan: Plan, personal: Personal
) -> tuple[Vector, float]:
    """FedRep's first phase: the site's head (the global one for a new site) trained on the global body."""
    start = weights.copy()
    head = personal.state.get(site, FEDREP_KEY)
    if head is not None:
        start[personal.head] = head
    body = frozenset(trainer.names) - personal.head_names
    result = trainer.fit(start, windows, replace(personal_plan(plan), work=1.0), Objective(frozen=body))
    return start + result.delta, result.seconds


def personal_weights(
    trainer: Trainer, site: str, windows: np.ndarray, weights: Vector, plan: Plan, personal: Personal
) -> Vector:
    """The model site ``site`` would use: its personalization of the global ``weights``."""
    method = plan.personalization
    if method == "ditto":
        v = personal.state.get(site, DITTO_KEY)
        return weights if v is None else v
    if method == "fedrep":
        head = personal.state.get(site, FEDREP_KEY)
        if head is None:
            return train_head(trainer, site, windows, weights, plan, personal)[0]
        mine = weights.copy()
        mine[personal.head] = head
        return mine
    if method == "finetune":
        return weights + trainer.fit(weights, windows, personal_plan(plan)).delta
    return weights
