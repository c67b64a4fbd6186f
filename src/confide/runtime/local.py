"""The ``local`` backend: every site runs in this process, one after another, on one reused model.

Simulating hundreds of sites does not need hundreds of models: a site's state between rounds is its data
and, for algorithms that keep it, its own :class:`~confide.client.state.SiteState` (kept in the run store),
so one Trainer, built once, plays each selected site in turn, with weights moved in and out through the
Layout.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from confide.client.dpsgd import DPSGD
from confide.client.personalize import Personal, personal_weights
from confide.client.secure import SecureSite
from confide.client.site import run_task
from confide.client.state import MemorySiteState
from confide.client.trainer import Trainer
from confide.core import Layer, Plan, Update, Vector
from confide.data import FederatedDataset
from confide.errors import ConfideError, UpdateError
from confide.runtime.federation import SiteEvaluation, Task
from confide.server.strategy import rng_for

log = logging.getLogger(__name__)

DROPOUT_STREAM = 11


class LocalBackend:
    def __init__(
        self,
        dataset: FederatedDataset,
        trainer: Trainer,
        layers: Sequence[Layer] = (),
        eval_batch_size: int = 256,
        personal: Personal | None = None,
        shared: np.ndarray | None = None,
        dpsgd: DPSGD | None = None,
        dropout: float = 0.0,
        seed: int = 0,
        identities: Mapping[str, Ed25519PrivateKey] | None = None,
        registry: Mapping[str, bytes] | None = None,
    ) -> None:
        self.dataset = dataset
        self.trainer = trainer
        self.layers = tuple(layers)
        self.eval_batch_size = eval_batch_size
        self.personal = personal or Personal(MemorySiteState(), np.empty(0, dtype=np.int64))
        self.shared = shared
        self.dpsgd = dpsgd
        self.dropout = dropout
        self.seed = seed
        self.identities = dict(identities or {})
        self.registry = registry
        self.secure_sites: dict[str, SecureSite] = {}
        """Each simulated site's secure-aggregation state (what SecAggLayer masks with)."""
        self._by_name = {s.name: s for s in dataset.sites}
        self._eval_cache: tuple[tuple[str, ...], np.ndarray, np.ndarray] | None = None

    def sites(self) -> Sequence[str]:
        return self.dataset.site_names

    def train(self, weights: Vector, tasks: Sequence[Task]) -> Iterator[Update]:
        dropped: set[str] = set()
        if self.dropout > 0 and tasks:
            # Simulated dropouts: a site vanishes after the key exchange, before it sends its update (the
            # hardest point for secure aggregation). It is asked nothing more this round: the server asks
            # only the sites whose input arrived to help unmask.
            rng = rng_for(self.seed, tasks[0].plan.round, DROPOUT_STREAM)
            dropped = {t.site for t in tasks if rng.random() < self.dropout}
        for task in tasks:
            if task.site in dropped:
                continue
            data = self._by_name[task.site]
            try:
                update = run_task(
                    self.trainer,
                    task.site,
                    data.train,
                    weights,
                    task.plan,
                    task.model_version,
                    self.layers,
                    extras=task.extras,
                    personal=self.personal,
                    shared=self.shared,
                    dpsgd=self.dpsgd,
                )
            except UpdateError as e:
                # The site cannot send an update (say, it diverged and secure aggregation cannot encode NaN):
                # to the server it has dropped out, as a deployed site that gives up would.
                log.warning("site %s sends no update in round %d: %s", task.site, task.plan.round, e)
                continue
            yield update

    def evaluate(
        self, weights: Vector, sites: Sequence[str], plan: Plan | None = None
    ) -> Iterator[SiteEvaluation]:
        if plan is not None and plan.personalization != "none":
            yield from self._evaluate_personal(weights, sites, plan)
            return
        # Sites evaluate on their own test windows; here all of them go through the model in large batches
        # at once and the per-window sums are split back by site, which is far faster than site by site.
        key = tuple(sites)
        if self._eval_cache is None or self._eval_cache[0] != key:
            parts = [self._by_name[s].test for s in sites]
            starts = np.cumsum([0] + [len(p) for p in parts[:-1]])
            self._eval_cache = (key, np.concatenate(parts), starts)
        _, windows, starts = self._eval_cache
        scores = self.trainer.evaluate(weights, windows, self.eval_batch_size)
        sums = np.add.reduceat(scores, starts, axis=0)
        for site, (loss_sum, correct, targets) in zip(sites, sums, strict=True):
            yield SiteEvaluation(site, float(loss_sum), int(correct), int(targets))

    def _evaluate_personal(
        self, weights: Vector, sites: Sequence[str], plan: Plan
    ) -> Iterator[SiteEvaluation]:
        # Each site has its own model here, so each evaluates on its own.
        for site in sites:
            data = self._by_name[site]
            site_plan = replace(plan, seed=zlib.crc32(f"{plan.seed}:{site}".encode()))
            mine = personal_weights(self.trainer, site, data.train, weights, site_plan, self.personal)
            loss_sum, correct, targets = self.trainer.evaluate(mine, data.test, self.eval_batch_size).sum(0)
            yield SiteEvaluation(site, float(loss_sum), int(correct), int(targets))

    def exchange(self, messages: Mapping[str, bytes]) -> Iterator[tuple[str, bytes]]:
        for site, data in messages.items():
            state = self.secure_sites.get(site)
            if state is None:
                state = SecureSite(site, self.identities.get(site), self.registry)
                self.secure_sites[site] = state
            try:
                answer = state.answer(data)
            except ConfideError as e:  # the site gives up on this round; for the server it has dropped
                log.info("site %s left the secure-aggregation round: %s", site, e)
                continue
            if answer:
                yield site, answer

    def close(self) -> None:
        self._eval_cache = None
