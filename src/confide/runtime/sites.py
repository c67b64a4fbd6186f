"""A process that plays many simulated sites: the worker of the local backend's worker processes
(:mod:`confide.runtime.pool`) and of the Ray backend's actors (:mod:`confide.runtime.raysites`). It imports
neither; whoever runs it carries its messages.

A :class:`SiteWorker` builds, once, what the local backend builds once in its process: the model, the layer
stack and one :class:`~confide.client.site.SiteKit`, from a picklable :class:`SiteRecipe` (the run's config
and directory, and the few things the driver drew that a site must share with the server), over the
driver's data set when it is handed one (the local backend's workers) or the config's (a Ray worker, which
may run on another node). It then plays every site the driver sends it with the same
:class:`~confide.client.site.Site` code as every other backend, and keeps each Site (its protocol sessions,
its held update) until the driver tells it to let the site go: the driver sends a site's work always to the
worker that holds it.

A site's own state between rounds (SCAFFOLD's control variate, Ditto's and FedRep's personal parts, error
feedback, a DP-SGD ledger) is not the worker's: it goes to the run store through the
:class:`~confide.client.state.SiteState` the worker is given, so a restarted worker loses none of it, and a
resumed run finds it rewound with the global model.
"""

from __future__ import annotations

import logging
import os
import resource
import tomllib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from confide.client.site import Site, SiteKit, evaluate_many
from confide.client.state import SiteState
from confide.core import Plan, SiteEvaluation, Task, Update, Vector
from confide.data import FederatedDataset
from confide.errors import ConfideError, DataError, UpdateError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteRecipe:
    """What a worker needs to build its sites, all of it picklable: the run's config (with its data paths
    made absolute) and run directory, and what the driver drew that the sites must share with the server."""

    config_toml: str
    run_dir: str
    sites: tuple[str, ...]
    """The federation's sites, in the driver's order (a worker checks that its data set has the same)."""
    secure: Any = None
    """Secure aggregation's settings as the driver built them (its registry of identity keys), or None."""
    identities: Mapping[str, bytes] = field(default_factory=dict)
    """Simulated sites' long-term identity keys (Ed25519, raw private bytes), where the run signs."""
    base_sha256: str = ""
    threads: int = 1
    """Torch threads of a worker."""


@dataclass(frozen=True)
class Trained:
    """A worker's answer to one training task: the update (None when the site could not train), why not,
    and what the driver's virtual clock and memory report need."""

    site: str
    update: Update | None
    failure: str | None = None
    steps: int = 0
    peak_memory: int = 0


@dataclass(frozen=True)
class Answered:
    """A worker's answer to one protocol message: the site's answer (empty: none due), or why it left."""

    site: str
    answer: bytes = b""
    failure: str | None = None


def train_site(site: Site, weights: Vector, task: Task) -> Trained:
    """``site``'s update for ``task``, encoded by the stack, or why it has none: an UpdateError (it diverged,
    and secure aggregation cannot encode NaN) or a DataError (its lazily read data is unreadable); to the
    server it has then dropped out, as a deployed site that gives up would. The steps are those the site
    took (none for an update it only releases), which the virtual clock charges."""
    site.steps = 0
    try:
        update = site.train(weights, task)
    except (UpdateError, DataError) as e:
        return Trained(task.site, None, str(e), site.steps, site.peak_memory)
    steps = 0 if task.plan.release else site.steps
    return Trained(task.site, update, None, steps, site.peak_memory)


def answer_site(site: Site, data: bytes) -> Answered:
    """``site``'s answer to one protocol message, or why it left the protocol step."""
    try:
        return Answered(site.name, site.answer(data))
    except ConfideError as e:  # the site gives up on this round; for the server it has dropped
        return Answered(site.name, b"", str(e))


class SiteWorker:
    """One model and kit, built once, that plays the sites the driver sends it."""

    def __init__(self, recipe: SiteRecipe, state: SiteState, dataset: FederatedDataset | None = None) -> None:
        """Build from ``recipe``, with the sites' state in ``state``, over ``dataset`` (the driver's, already
        poisoned as the run's attack says) or, without it, the config's data set, poisoned here by the same
        draw as in the driver."""
        from confide.config import from_dict
        from confide.core import Layout
        from confide.data import DEFAULT_TOKENIZER
        from confide.models.hf import check_base
        from confide.runtime.stack import (
            build_layers,
            build_model_for,
            build_site_dp,
            build_site_kit,
            personal_parts,
        )

        config = from_dict(tomllib.loads(recipe.config_toml))
        torch.set_num_threads(max(1, recipe.threads))
        if dataset is None:
            from confide.attacks.run import Attack
            from confide.runtime.runner import load_dataset

            loaded = load_dataset(config)
            if tuple(loaded.site_names) != recipe.sites:
                raise DataError(
                    f"a Ray worker loaded {len(loaded.site_names)} sites from data.path or data.dataset, "
                    f"where the run has {len(recipe.sites)} (or others): every node must see the same data "
                    "set at the same path as the machine that runs `confide run` (and a run on Ray takes its "
                    "data set from the config, not one given to it in code)"
                )
            dataset = Attack.build(config, loaded).poison(loaded)
        self.dataset = dataset
        self._by_name = {s.name: s for s in self.dataset.sites}
        model = build_model_for(config, DEFAULT_TOKENIZER.vocab_size)
        check_base("every simulated site", model, recipe.base_sha256)
        layout = Layout.of_module(model)
        population = len(recipe.sites)
        dp = build_site_dp(config, population)
        _, shared = personal_parts(config, model, layout)
        identities = {s: Ed25519PrivateKey.from_private_bytes(k) for s, k in recipe.identities.items()}
        layers = build_layers(
            config,
            dp,
            recipe.secure,
            layout.size if shared is None else shared.size,
            identities,
            sites=recipe.sites,
            population=population,
        )
        self.kit: SiteKit = build_site_kit(config, model, layers, state)
        self._sites: dict[str, Site] = {}

    def ready(self) -> bool:
        """True once the worker is built (a failure to build raises its error at the driver)."""
        return True

    def pid(self) -> int:
        return os.getpid()

    def peak_memory(self) -> int:
        """This worker's peak resident bytes so far (ru_maxrss)."""
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def site(self, name: str) -> Site:
        site = self._sites.get(name)
        if site is None:
            site = self._sites[name] = Site(name, self._by_name[name], self.kit)
        return site

    def forget(self, keep: Collection[str]) -> None:
        """With lazily registered sites (``data.lazy``; the driver asks only then): forget every site but
        ``keep`` and those holding an update for an asynchronous round, as the local backend does when a
        round's training begins."""
        self.drop([n for n, site in self._sites.items() if n not in keep and site.held is None])

    def drop(self, names: Collection[str]) -> None:
        """Let the sites ``names`` go (their sessions, and a lazily registered site's windows): the driver
        sends them elsewhere from now on, or they are done with this round."""
        for name in names:
            site = self._sites.pop(name, None)
            if site is not None:
                site.data.release()

    def train(self, weights: Vector, task: Task) -> Trained:
        """The site's update for ``task`` (see :func:`train_site`)."""
        return train_site(self.site(task.site), _writable(weights), task)

    def answer(self, name: str, data: bytes) -> Answered:
        return answer_site(self.site(name), data)

    def evaluate(
        self, weights: Vector, names: Sequence[str], plan: Plan | None = None
    ) -> list[SiteEvaluation]:
        weights = _writable(weights)
        if plan is not None and plan.personalization != "none":
            return [self.site(name).evaluate(weights, plan) for name in names]
        return evaluate_many(self.kit, [self.site(name) for name in names], weights)


def _writable(weights: Vector) -> Vector:
    """Ray hands arrays out of its object store read-only; torch wants to own what it wraps."""
    return weights if weights.flags.writeable else weights.copy()
