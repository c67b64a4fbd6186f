"""The ``local`` backend: every site runs in this process, one after another, on one reused model.

Simulating hundreds of sites does not need hundreds of models: a site's state between rounds is its data
and, for algorithms that keep it, its own :class:`~confide.client.state.SiteState` (kept in the run store),
so one Trainer, built once, plays each selected site in turn, with weights moved in and out through the
Layout.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from dataclasses import replace

import numpy as np

from confide.client.dpsgd import DPSGD
from confide.client.personalize import Personal, personal_weights
from confide.client.site import run_task
from confide.client.state import MemorySiteState
from confide.client.trainer import Trainer
from confide.core import Layer, Plan, Update, Vector
from confide.data import FederatedDataset
from confide.runtime.federation import SiteEvaluation, Task


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
    ) -> None:
        self.dataset = dataset
        self.trainer = trainer
        self.layers = tuple(layers)
        self.eval_batch_size = eval_batch_size
        self.personal = personal or Personal(MemorySiteState(), np.empty(0, dtype=np.int64))
        self.shared = shared
        self.dpsgd = dpsgd
        self._by_name = {s.name: s for s in dataset.sites}
        self._eval_cache: tuple[tuple[str, ...], np.ndarray, np.ndarray] | None = None

    def sites(self) -> Sequence[str]:
        return self.dataset.site_names

    def train(self, weights: Vector, tasks: Sequence[Task]) -> Iterator[Update]:
        for task in tasks:
            data = self._by_name[task.site]
            yield run_task(
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

    def close(self) -> None:
        self._eval_cache = None
