"""The Ray workers' side of the ``ray`` backend: a worker that plays many simulated sites, and the keeper of
their state. Imported only where Ray runs (the driver's :mod:`confide.runtime.ray` and Ray's worker
processes); the federation never imports it.

A :class:`SiteWorker` builds, once, what the local backend builds once in its process: the config's data set
(poisoned as the run's attack says), the model, the layer stack and one
:class:`~confide.client.site.SiteKit`, from a picklable :class:`SiteRecipe` (the run's config and directory,
and the few things the driver drew that a site must share with the server). It then plays every site the
driver sends it with the same :class:`~confide.client.site.Site` code as every other backend, and keeps each
Site (its protocol sessions, its held update) for as long as the worker lives, or, with lazily registered
sites, until a round's training begins without it: the driver sends a site's work always to the same worker.

A site's own state between rounds (SCAFFOLD's control variate, Ditto's and FedRep's personal parts, error
feedback, a DP-SGD ledger) is not the worker's: it goes to the run store, through one
:class:`SiteStateKeeper` on the driver's machine, so a site can be played by any worker on any node, a
restarted worker loses none of it, and a resumed run finds it rewound with the global model.
"""

from __future__ import annotations

import logging
import resource
import tomllib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from confide.client.site import Site, SiteKit, evaluate_many
from confide.core import Plan, SiteEvaluation, Task, Update, Vector
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


class RemoteSiteState:
    """A :class:`~confide.client.state.SiteState` that reads and writes through the run's
    :class:`SiteStateKeeper` actor; each write is done before the site's update leaves the worker."""

    def __init__(self, keeper: Any) -> None:
        self.keeper = keeper

    def get(self, site: str, key: str) -> Vector | None:
        import ray

        value: Vector | None = ray.get(self.keeper.get.remote(site, key))
        return None if value is None else np.array(value, dtype=np.float32, copy=True)

    def put(self, site: str, key: str, round: int, vector: Vector) -> None:
        import ray

        ray.get(self.keeper.put.remote(site, key, round, np.asarray(vector, dtype=np.float32)))


class SiteStateKeeper:
    """Every simulated site's state in the run store (SQLite), served to the workers. It runs on the driver's
    machine, where the run directory is, so workers on other nodes reach the state without a shared disk;
    one actor serializes the writes."""

    def __init__(self, run_dir: str) -> None:
        from confide.runtime.store import Store

        self.store = Store.open(Path(run_dir))
        # The driver writes to the same file (rounds, events): wait for its lock rather than fail.
        self.store.db.execute("PRAGMA busy_timeout = 120000")

    def get(self, site: str, key: str) -> Vector | None:
        return self.store.get_site_state(site, key)

    def put(self, site: str, key: str, round: int, vector: Vector) -> None:
        self.store.put_site_state(site, key, round, vector)

    def close(self) -> None:
        self.store.close()


class SiteWorker:
    """One Ray worker: one model and kit, built once, that plays the sites the driver sends it."""

    def __init__(self, recipe: SiteRecipe, keeper: Any) -> None:
        from confide.attacks.run import Attack
        from confide.config import from_dict
        from confide.core import Layout
        from confide.data import DEFAULT_TOKENIZER
        from confide.models.hf import check_base
        from confide.runtime.runner import load_dataset
        from confide.runtime.stack import (
            build_layers,
            build_model_for,
            build_site_dp,
            build_site_kit,
            personal_parts,
        )

        config = from_dict(tomllib.loads(recipe.config_toml))
        torch.set_num_threads(max(1, recipe.threads))
        dataset = load_dataset(config)
        if tuple(dataset.site_names) != recipe.sites:
            raise DataError(
                f"a Ray worker loaded {len(dataset.site_names)} sites from data.path or data.dataset, where "
                f"the run has {len(recipe.sites)} (or others): every node must see the same data set at the "
                "same path as the machine that runs `confide run` (and a run on Ray takes its data set from "
                "the config, not one given to it in code)"
            )
        # The simulated attackers' training windows are poisoned here as in the driver (the same draw).
        self.dataset = Attack.build(config, dataset).poison(dataset)
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
        self.kit: SiteKit = build_site_kit(config, model, layers, RemoteSiteState(keeper))
        self._sites: dict[str, Site] = {}

    def ready(self) -> bool:
        """True once the worker is built (a failure to build raises its error at the driver)."""
        return True

    def pid(self) -> int:
        import os

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
        for name in [n for n, site in self._sites.items() if n not in keep and site.held is None]:
            self._sites.pop(name).data.release()

    def train(self, weights: Vector, task: Task) -> Trained:
        """The site's update for ``task``, encoded by the stack, or why it has none (an UpdateError: to the
        server it has dropped out, as in the local backend)."""
        site = self.site(task.site)
        site.steps = 0
        try:
            update = site.train(_writable(weights), task)
        except (UpdateError, DataError) as e:  # it diverged, or its lazily read data is unreadable
            return Trained(task.site, None, str(e))
        steps = 0 if task.plan.release else site.steps
        return Trained(task.site, update, None, steps, site.peak_memory)

    def answer(self, name: str, data: bytes) -> Answered:
        try:
            return Answered(name, self.site(name).answer(data))
        except ConfideError as e:  # the site gives up on this round; for the server it has dropped
            return Answered(name, b"", str(e))

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
