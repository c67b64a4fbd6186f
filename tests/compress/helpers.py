"""A site's and the server's context for one compression layer, without a federation around it."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from confide.client.state import MemorySiteState
from confide.core import Plan, Task, Update, Vector
from confide.pipeline import Layer, RoundContext, SiteContext
from confide.randomness import SecretRandomness
from confide.server.strategy import WeightedMean

SITE = "site0"


def site_context(plan: Plan | None = None, state: MemorySiteState | None = None) -> SiteContext:
    plan = plan or Plan(round=1, seed=11)
    return SiteContext(SITE, plan, SecretRandomness(), {}, state if state is not None else MemorySiteState())


def round_context(size: int, plan: Plan | None = None) -> RoundContext:
    plan = plan or Plan(round=1, seed=11)
    aggregator = WeightedMean()
    return RoundContext(
        round=plan.round,
        sites=[SITE],
        tasks={SITE: Task(SITE, plan, 0)},
        weights=np.zeros(size, dtype=np.float32),
        server_state={},
        exchange=lambda messages: iter(()),
        min_updates=1,
        randomness=SecretRandomness(),
        population=1,
        aggregator=aggregator,
        aggregate=aggregator.init(size),
    )


def update(vector: Vector, round: int = 1) -> Update:
    return Update(SITE, round, 10, np.array(vector, dtype=np.float32), 0)


def round_trip(
    layer: Layer, vector: Vector, plan: Plan | None = None, state: MemorySiteState | None = None
) -> tuple[Update, Vector]:
    """The encoded update and what the server decodes from it."""
    encoded = layer.encode(update(vector, plan.round if plan else 1), site_context(plan, state))
    sent = replace(encoded, payload=dict(encoded.payload))
    decoded = layer.decode(encoded, round_context(vector.size, plan))
    assert decoded is not None and decoded.vector is not None
    return sent, decoded.vector
