"""Server optimizers on the pseudo-gradient (Reddi et al. 2021, "Adaptive Federated Optimization").

The aggregate of the sites' deltas, ``delta = mean_i(w_i - w)``, points the way the sites moved; the server
treats it as a (negative) gradient and takes one optimizer step:

- ``sgd``:      w ← w + η·Δ                      (η = 1 is plain FedAvg)
- ``momentum``: m ← β₁·m + Δ;  w ← w + η·m       (FedAvgM, Hsu et al. 2019)
- ``adagrad``:  m ← β₁·m + (1−β₁)·Δ;  v ← v + Δ²
- ``adam``:     m as above;  v ← β₂·v + (1−β₂)·Δ²
- ``yogi``:     m as above;  v ← v − (1−β₂)·Δ²·sign(v − Δ²)
  and for the three adaptive ones  w ← w + η·m / (√v + τ)

``schedule = "cosine"`` lowers η along half a cosine, from ``learning_rate`` in the first round to a tenth of
it in the last (:meth:`ServerOptimizer.rate`): large steps while the model is far off, small ones at the end,
where under DP the last steps' noise is what stays in the model.

These follow Algorithm 2 of the paper exactly, which has no bias correction; v starts at τ² as the paper
suggests (so the first steps are not huge). Each optimizer keeps its state as named numpy arrays, updated in
place, so a checkpoint can save it and a resumed run continues exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from confide.core import Vector
from confide.errors import ConfigError

OPTIMIZERS = ("sgd", "momentum", "adam", "yogi", "adagrad")
SCHEDULES = ("constant", "cosine")
COSINE_FLOOR = 0.1
"""The cosine schedule's last learning rate, as a fraction of the first."""


@dataclass(frozen=True)
class ServerOptimizer:
    """One of the server optimizers above, with its hyper-parameters; its state is passed explicitly."""

    name: str = "sgd"
    learning_rate: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    schedule: str = "constant"
    rounds: int = 1
    """The run's rounds, over which the cosine schedule falls."""

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"server.schedule must be 'constant' or 'cosine' (got {self.schedule!r})")
        if self.name not in OPTIMIZERS:
            raise ConfigError(
                f"server.optimizer must be one of {', '.join(map(repr, OPTIMIZERS))} (got {self.name!r})"
            )
        if not self.learning_rate > 0:
            raise ConfigError(f"server.learning_rate must be > 0 (got {self.learning_rate})")
        if not 0 <= self.beta1 < 1:
            raise ConfigError(f"server.beta1 must be in [0, 1) (got {self.beta1})")
        if not 0 <= self.beta2 < 1:
            raise ConfigError(f"server.beta2 must be in [0, 1) (got {self.beta2})")
        if not self.tau > 0:
            raise ConfigError(f"server.tau must be > 0 (got {self.tau})")

    def init(self, size: int) -> dict[str, Vector]:
        """Fresh state for a model of ``size`` parameters."""
        if self.name == "sgd":
            return {}
        state = {"m": np.zeros(size, dtype=np.float32)}
        if self.name != "momentum":
            state["v"] = np.full(size, self.tau**2, dtype=np.float32)
        return state

    def rate(self, round: int | None = None) -> float:
        """The learning rate of round ``round`` (1-based; None: the first round's)."""
        if self.schedule == "constant" or round is None or self.rounds <= 1:
            return self.learning_rate
        progress = min(max(round - 1, 0) / (self.rounds - 1), 1.0)
        return self.learning_rate * (
            COSINE_FLOOR + (1 - COSINE_FLOOR) * 0.5 * (1 + math.cos(math.pi * progress))
        )

    def step(
        self, weights: Vector, delta: Vector, state: dict[str, Vector], round: int | None = None
    ) -> None:
        """Move ``weights`` in place by one step along the pseudo-gradient ``delta``; updates ``state``.
        ``round`` sets the learning rate under a schedule."""
        lr = np.float32(self.rate(round))
        if self.name == "sgd":
            weights += lr * delta
            return
        m = state["m"]
        if self.name == "momentum":
            m *= np.float32(self.beta1)
            m += delta
            weights += lr * m
            return
        b1, b2 = np.float32(self.beta1), np.float32(self.beta2)
        m *= b1
        m += (1 - b1) * delta
        v = state["v"]
        square = delta * delta
        if self.name == "adagrad":
            v += square
        elif self.name == "adam":
            v *= b2
            v += (1 - b2) * square
        else:  # yogi: v moves towards Δ² by a fixed fraction of Δ², never overshooting in sign
            v -= (1 - b2) * square * np.sign(v - square)
        weights += lr * m / (np.sqrt(v) + np.float32(self.tau))
