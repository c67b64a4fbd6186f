"""What a simulated run does for its ``[attack]``: poison the attackers' training data once, and measure the
attack at every evaluation. The runner calls only :class:`Attack`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from confide.attacks.data import poison
from confide.attacks.measure import attack_success, probes
from confide.attacks.sites import attackers_of
from confide.core import Layout, Vector
from confide.data import DEFAULT_TOKENIZER, FederatedDataset
from confide.registry import ATTACKS, POISONS_DATA


@dataclass(frozen=True)
class Attack:
    """A run's attack: its config section, the attacking sites, and the backdoor's probes (if any)."""

    config: Any
    """The run's :class:`~confide.config.Config`."""
    attackers: frozenset[str] = frozenset()
    probes: np.ndarray | None = None

    @classmethod
    def build(cls, config: Any, dataset: FederatedDataset | None) -> Attack:
        """The attack of ``config`` over ``dataset`` (no attack without one: a deployment has none)."""
        a = config.attack
        if a.kind == "none" or dataset is None:
            return cls(config)
        attackers = attackers_of(config.run.seed, dataset.site_names, a.sites)
        windows = None
        if ATTACKS.fact(a.kind, POISONS_DATA) == "backdoor":
            honest = set(dataset.site_names) - attackers
            windows = probes(dataset, honest, a.trigger, a.target, a.probes, config.run.seed)
        return cls(config, attackers, windows)

    def poison(self, dataset: FederatedDataset) -> FederatedDataset:
        """``dataset`` with the attackers' training windows poisoned (unchanged for a model attack)."""
        return poison(dataset, self.config.attack, self.attackers, self.config.run.seed)

    def measure(self, model: nn.Module, layout: Layout, weights: Vector) -> dict[str, float]:
        """The attack's metrics for one evaluation (none without an attack)."""
        if not self.attackers:
            return {}
        metrics = {"attackers": float(len(self.attackers))}
        if self.probes is not None:
            target = len(DEFAULT_TOKENIZER.encode(self.config.attack.target))
            metrics.update(attack_success(model, layout, weights, self.probes, target))
        return metrics
