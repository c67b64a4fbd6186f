"""FedBuff (Nguyen et al. 2022, "Federated Learning with Buffered Asynchronous Aggregation"): the sites train
FedAvg's local steps on the newest model they were sent, and the server steps the model whenever a buffer of
updates is full, each update discounted by how stale it is.

This module holds the algorithm's two halves that are not the round loop: its name for the sites (local
training is FedAvg's) and the staleness discount, a layer of the update pipeline. The round loop that keeps
sites training while buffers fill is :mod:`confide.runtime.buffered`.

Where the discount is applied. An update of staleness s (the server's model moved s versions since the site's
copy) is scaled by w(s) = (1 + s)^-a (a = ``server.staleness_exponent``; FedBuff's paper uses a = 1/2). The
site scales its own update after clipping and before any noise: the server may not read a single update
(secure aggregation sums the buffer), so it cannot scale one, and scaling a clipped update by w <= 1 keeps
every site's influence within the clip norm C, so the noise calibrated to C still covers it. The server tells
the site w(s) in the plan that releases the update; a site that ignores it moves the sum by at most C, as
clipping already guarantees (and without DP by no more than a site that trains a larger update).
"""

from __future__ import annotations

import numpy as np

from confide.algorithms.fedavg import FedAvg
from confide.core import Update
from confide.errors import ConfigError
from confide.pipeline import Layer, SiteContext, StackContext


class FedBuff(FedAvg):
    """FedAvg's local training; what differs is the server's round loop (asynchronous, buffered)."""

    name = "fedbuff"


def staleness_weight(staleness: int, exponent: float) -> float:
    """FedBuff's discount of an update ``staleness`` model versions old: (1 + s)^-exponent, in (0, 1]."""
    if staleness < 0:
        raise ValueError(f"staleness cannot be negative (got {staleness})")
    if exponent < 0:
        raise ConfigError(f"server.staleness_exponent must be >= 0 (got {exponent})")
    return float((1.0 + staleness) ** -exponent)


class StalenessLayer(Layer):
    """The site scales its (clipped) update by the plan's ``staleness_weight`` before noise and protection."""

    name = "staleness"

    @classmethod
    def from_config(cls, stack: StackContext) -> Layer | None:
        return cls() if stack.config.server.strategy == FedBuff.name else None

    def encode(self, update: Update, site: SiteContext) -> Update:
        weight = site.plan.staleness_weight
        if update.vector is None or weight == 1.0:
            return update
        if not 0 < weight <= 1:
            raise ConfigError(f"a staleness weight must be in (0, 1] (got {weight})")
        update.vector = (update.vector * np.float32(weight)).astype(np.float32, copy=False)
        return update
