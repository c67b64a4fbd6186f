"""Model poisoning: what an attacking site sends in place of its honest update, one small class per attack.

Each attack is a pure function of the attacker's own honest update (trained on its own, possibly poisoned,
data) and its :class:`Pool`: what its coalition knows of its members' honest updates in this round (the
attacker alone, without ``attack.collude``). So each one can be checked against a hand-computed case.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import ClassVar

import numpy as np

from confide.core import Vector
from confide.randomness import Randomness

NORM_MARGIN = 1e-3
"""How far under the known norm bound the norm-evading attacker stays (relative): just inside it, even after
float32 rounding."""


@dataclass(frozen=True)
class Pool:
    """What an attacker knows of honest updates this round: the mean and per-coordinate standard deviation of
    its coalition's honest updates so far (its own included), and how many there were."""

    mean: Vector
    std: Vector
    count: int

    @classmethod
    def alone(cls, update: Vector) -> Pool:
        return cls(update, np.zeros_like(update), 1)


@dataclass(frozen=True)
class Settings:
    """An attack's resolved options (from ``[attack]`` and the size of the federation)."""

    boost: float = 1.0
    """model_replacement's and sign_flip's factor."""
    scale: float = 100.0
    noise_std: float = 1.0
    norm_bound: float = 0.0
    z: float = 1.0
    """little_is_enough's number of standard deviations."""


class ModelAttack:
    """An attacker's update: by default its honest one (the data attacks act through its training data)."""

    name: ClassVar[str] = "honest"
    shared_noise: ClassVar[bool] = False
    """Colluders draw the noise once per round and all send that draw."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def malicious(self, update: Vector, pool: Pool, noise: Vector | None = None) -> Vector:
        return update

    def draw(self, size: int, randomness: Randomness) -> Vector | None:
        """Noise for :meth:`malicious` (None: the attack uses none)."""
        return None


class Honest(ModelAttack):
    """The data attacks (backdoor, label flipping): the update is what training on the poisoned data gave."""


class Boost(ModelAttack):
    """Model replacement (Bagdasaryan et al. 2020, eq. 3): X = G + gamma (L - G), i.e. the delta scaled by
    gamma = n / eta so that it survives averaging with n - 1 others. Colluders send their pooled delta."""

    name = "model_replacement"

    def malicious(self, update: Vector, pool: Pool, noise: Vector | None = None) -> Vector:
        return (self.settings.boost * pool.mean).astype(np.float32)


class SignFlip(ModelAttack):
    """The (pooled) update negated and scaled by ``boost`` (1 unless set): a step away from the optimum."""

    name = "sign_flip"

    def malicious(self, update: Vector, pool: Pool, noise: Vector | None = None) -> Vector:
        return (-self.settings.boost * pool.mean).astype(np.float32)


class Gaussian(ModelAttack):
    """The update replaced by N(0, noise_std²) per coordinate; colluders send one shared draw."""

    name = "gaussian"
    shared_noise = True

    def draw(self, size: int, randomness: Randomness) -> Vector | None:
        return randomness.normal(size, self.settings.noise_std)

    def malicious(self, update: Vector, pool: Pool, noise: Vector | None = None) -> Vector:
        assert noise is not None and noise.shape == update.shape
        return noise.astype(np.float32, copy=True)


class Byzantine(ModelAttack):
    """An arbitrarily large update: every coordinate ``scale`` (one Byzantine site breaks the mean, Blanchard
    et al. 2017)."""

    name = "byzantine"

    def malicious(self, update: Vector, pool: Pool, noise: Vector | None = None) -> Vector:
        return np.full_like(update, self.settings.scale, dtype=np.float32)


class FreeRider(ModelAttack):
    """A zero update that still claims its examples: it takes the model without contributing (Lin et al.
    2019)."""

    name = "free_rider"

    def malicious(self, update: Vector, pool: Pool, noise: Vector | None = None) -> Vector:
        return np.zeros_like(update, dtype=np.float32)


class LittleIsEnough(ModelAttack):
    """ "A little is enough" (Baruch et al. 2019): mu - z sigma, per coordinate, over the colluders' honest
    updates: far enough from the mean to push the model, close enough to hide among honest updates."""

    name = "little_is_enough"

    def malicious(self, update: Vector, pool: Pool, noise: Vector | None = None) -> Vector:
        return (pool.mean - self.settings.z * pool.std).astype(np.float32)


class NormEvading(ModelAttack):
    """An attacker that knows the defence's norm bound M (Sun et al. 2019): its (pooled, backdoored) update
    scaled to norm just under M, the most a norm check lets through."""

    name = "norm_evading"

    def malicious(self, update: Vector, pool: Pool, noise: Vector | None = None) -> Vector:
        norm = float(np.linalg.norm(pool.mean.astype(np.float64)))
        if norm == 0.0:
            return np.zeros_like(update, dtype=np.float32)
        factor = self.settings.norm_bound * (1.0 - NORM_MARGIN) / norm
        return (pool.mean.astype(np.float64) * factor).astype(np.float32)


def little_is_enough_z(sites: int, attackers: int) -> float:
    """Baruch et al. 2019, Algorithm 3: s = floor(n/2 + 1) - m sites must be won over, and z is the largest
    number of standard deviations for which s honest sites still lie farther from the mean:
    z = Phi^-1((n - s) / n). Never below 0."""
    n, m = max(sites, 1), max(attackers, 0)
    supporters = math.floor(n / 2 + 1) - m
    quantile = (n - supporters) / n
    if quantile <= 0.5:
        return 0.0
    return NormalDist().inv_cdf(min(quantile, 1 - 1e-9))
