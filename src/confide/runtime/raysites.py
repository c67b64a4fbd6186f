"""The Ray workers' side of the ``ray`` backend: the Ray actor that plays many simulated sites (a
:class:`~confide.runtime.sites.SiteWorker`), and the keeper of their state. Imported only where Ray runs (the
driver's :mod:`confide.runtime.ray` and Ray's worker processes); the federation never imports it.

A site's own state between rounds goes to the run store through one :class:`SiteStateKeeper` actor on the
driver's machine, so a site can be played by any worker on any node (which need not share a disk with the
driver), a restarted worker loses none of it, and a resumed run finds it rewound with the global model.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from confide.core import Vector
from confide.runtime.sites import Answered, SiteRecipe, SiteWorker, Trained

__all__ = ["Answered", "RaySiteWorker", "RemoteSiteState", "SiteRecipe", "SiteStateKeeper", "Trained"]

log = logging.getLogger(__name__)


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


class RaySiteWorker(SiteWorker):
    """One Ray actor: a :class:`~confide.runtime.sites.SiteWorker` over the config's data set, with its sites'
    state kept by the run's :class:`SiteStateKeeper` actor."""

    def __init__(self, recipe: SiteRecipe, keeper: Any) -> None:
        super().__init__(recipe, RemoteSiteState(keeper))
