"""What one site does with a task: train on its own windows as the plan's algorithm says, keep its own state,
then pass its update through the site layers.

The algorithms differ only in what the site adds to plain local training and what it sends besides its delta:

- FedAvg (McMahan et al. 2017): local SGD from the global weights; sends the delta.
- FedProx (Li et al. 2020): adds mu/2 ||w - w_global||^2 to the local objective. Any amount of work is
  welcome: a straggler's partial update is used, not dropped.
- SCAFFOLD (Karimireddy et al. 2020), option II: corrects every local gradient by c - c_i, then updates its
  control variate c_i+ = c_i - c + (x - y_i) / (K * lr) and sends its change c_i+ - c_i beside the delta.
- FedNova (Wang et al. 2020): plain local training; reports its normalizer a_i (the sum of the weights its
  optimizer gave each step's gradient: K for SGD) so the server can average d_i = delta_i / a_i.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

import numpy as np

from confide.client.dpsgd import DPSGD, record_accountant
from confide.client.personalize import FEDREP_KEY, Personal, train_ditto, train_head
from confide.client.state import MemorySiteState
from confide.client.trainer import PLAIN, FitResult, Objective, Trainer
from confide.core import Layer, Plan, Update, Vector, configure_layers
from confide.errors import UpdateError

LAYER_STREAM = 7
DPSGD_STEPS_KEY = "dpsgd.steps"
DPSGD_EPSILON_KEY = "dpsgd.epsilon"
SCAFFOLD_KEY = "scaffold.control"
CONTROL = "control"
"""Name of SCAFFOLD's server control variate among a task's extras."""
CONTROL_DELTA = "control_delta"
"""Name of SCAFFOLD's control-variate change in an update's payload."""


def fednova_normalizer(steps: int, momentum: float) -> float:
    """a_i of FedNova for ``steps`` of SGD with heavy-ball ``momentum`` rho (Wang et al. 2020, sec. 4):
    the total weight the K gradients receive, (K - rho(1 - rho^K) / (1 - rho)) / (1 - rho); K without."""
    if momentum == 0:
        return float(steps)
    rho = momentum
    return (steps - rho * (1 - rho**steps) / (1 - rho)) / (1 - rho)


def fit_private(
    dpsgd: DPSGD,
    site: str,
    windows: np.ndarray,
    weights: Vector,
    plan: Plan,
    personal: Personal,
    metrics: dict[str, float],
) -> FitResult:
    """Local training with record-level DP-SGD; the site's epsilon for its own records goes into ``metrics``.

    A site's sampling rate (batch size over its windows) and noise stay the same from round to round, so its
    whole ledger is one number, the steps taken so far, kept in its state. Its delta is 1 / (10 x windows).
    """
    n = len(windows)
    accountant = record_accountant(max(n, 1), 1.0 / (10 * max(n, 1)))
    before = personal.state.get(site, DPSGD_STEPS_KEY)
    taken = int(before[0]) if before is not None else 0
    if taken and n:
        accountant.spend(dpsgd.noise_multiplier, min(1.0, plan.batch_size / n), taken)
    # The batch sampling and noise must be secret from the server in a deployment; in simulation they follow
    # the plan's seed so that a resumed run is identical.
    result = dpsgd.fit(
        weights, windows, plan, accountant, noise_seed=zlib.crc32(f"{plan.seed}:dpsgd".encode())
    )
    personal.state.put(site, DPSGD_STEPS_KEY, plan.round, np.array([taken + result.steps], dtype=np.float32))
    if result.epsilon is not None:
        metrics["record_epsilon"] = result.epsilon
        personal.state.put(site, DPSGD_EPSILON_KEY, plan.round, np.array([result.epsilon], dtype=np.float32))
    return result


def run_task(
    trainer: Trainer,
    site: str,
    windows: np.ndarray,
    weights: Vector,
    plan: Plan,
    model_version: int,
    layers: Sequence[Layer] = (),
    *,
    extras: Mapping[str, Vector] | None = None,
    personal: Personal | None = None,
    shared: np.ndarray | None = None,
    dpsgd: DPSGD | None = None,
) -> Update:
    """Train from ``weights`` on ``windows`` and return the encoded update (layers in stack order).

    ``extras`` are the vectors the server sent with the task (SCAFFOLD's control variate); ``personal`` is the
    site's own state; ``shared`` the positions of the parameters the federation shares (FedRep sends only
    those).
    """
    personal = personal or Personal(MemorySiteState(), np.empty(0, dtype=np.int64))
    extras = extras or {}
    metrics: dict[str, float] = {}
    payload: dict[str, np.ndarray] = {}
    seconds = 0.0

    start = weights
    objective = PLAIN
    control = mine = np.zeros(0, dtype=np.float32)
    if plan.personalization == "fedrep":
        start, seconds = train_head(trainer, site, windows, weights, plan, personal)
        objective = Objective(frozen=personal.head_names)
    elif plan.algorithm == "fedprox":
        objective = Objective(prox_mu=plan.mu)
    elif plan.algorithm == "scaffold":
        sent = extras.get(CONTROL)
        if sent is None or sent.shape != weights.shape:
            raise UpdateError(f"SCAFFOLD needs the server's control variate with the task for site {site!r}")
        control = sent
        kept = personal.state.get(site, SCAFFOLD_KEY)
        mine = np.zeros_like(weights) if kept is None else kept
        objective = Objective(correction=control - mine)

    if plan.record_clip > 0:
        if dpsgd is None:
            raise UpdateError(f"site {site!r} was asked for DP-SGD but has no DP-SGD trainer")
        result = fit_private(dpsgd, site, windows, start, plan, personal, metrics)
    else:
        result = trainer.fit(start, windows, plan, objective)
    seconds += result.seconds
    # The update is the trainer's delta as it is. Under FedRep the start differs from the global weights only
    # in the head (trained first), which the body's training leaves frozen and the site never sends.
    delta = result.delta

    if plan.algorithm == "scaffold" and result.steps > 0:
        # Option II: c_i+ = c_i - c + (x - y_i) / (K lr); the server needs only the change c_i+ - c_i.
        change = -control - delta / np.float32(result.steps * plan.learning_rate)
        personal.state.put(site, SCAFFOLD_KEY, plan.round, mine + change)
        payload[CONTROL_DELTA] = change.astype(np.float32, copy=False)
    if plan.algorithm == "fednova":
        metrics["normalizer"] = fednova_normalizer(result.steps, trainer.config.momentum)
    if plan.personalization == "fedrep":
        personal.state.put(site, FEDREP_KEY, plan.round, start[personal.head] + delta[personal.head])
    elif plan.personalization == "ditto":
        seconds += train_ditto(trainer, site, windows, weights, plan, personal)

    update = Update(
        site=site,
        round=plan.round,
        num_examples=result.num_examples,
        vector=delta if shared is None else delta[shared],
        model_version=model_version,
        metrics={
            "train_loss": result.loss,
            "steps": float(result.steps),
            "compute_seconds": seconds,
            **metrics,
        },
        payload=payload,
    )
    rng = np.random.default_rng([plan.seed, LAYER_STREAM])
    configure_layers(layers, plan)
    for layer in layers:
        update = layer.encode(update, rng)
    return update
