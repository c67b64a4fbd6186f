from __future__ import annotations

import numpy as np
import pytest

from confide.core import Update
from confide.errors import ConfigError, UpdateError
from confide.randomness import SecretRandomness
from confide.server.strategy import Strategy, WeightedMean


def updates(rng: np.random.Generator, n: int, size: int) -> list[Update]:
    return [
        Update(f"s{i}", 1, int(rng.integers(1, 500)), rng.normal(size=size).astype(np.float32), 0)
        for i in range(n)
    ]


def test_fedavg_equals_example_weighted_mean() -> None:
    rng = np.random.default_rng(0)
    ups = updates(rng, 17, 1001)
    agg = WeightedMean()
    state = agg.init(1001)
    for u in ups:
        agg.add(state, u)
    got = agg.result(state, SecretRandomness())
    weights = np.array([u.num_examples for u in ups], dtype=np.float64)
    expected = (np.stack([u.vector for u in ups]).astype(np.float64) * weights[:, None]).sum(
        0
    ) / weights.sum()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert got.dtype == np.float32


def test_aggregator_refuses_wrong_size_and_empty_rounds() -> None:
    agg = WeightedMean()
    state = agg.init(4)
    with pytest.raises(UpdateError, match="sent 3 values; the model has 4"):
        agg.add(state, Update("a", 1, 5, np.zeros(3, np.float32), 0))
    with pytest.raises(UpdateError, match="at least one"):
        agg.add(state, Update("a", 1, 0, np.zeros(4, np.float32), 0))
    with pytest.raises(UpdateError, match="no update arrived"):
        agg.result(state, SecretRandomness())


def test_selection_is_seeded_per_round_and_sized() -> None:
    sites = [f"s{i}" for i in range(50)]
    s = Strategy(sites_per_round=7, seed=3)
    first = s.select(4, sites)
    assert len(first) == 7 and len(set(first)) == 7
    assert s.select(4, sites) == first  # the same round draws the same sites, whatever ran before
    assert s.select(5, sites) != first
    assert Strategy(sites_per_round=7, seed=4).select(4, sites) != first
    assert len(Strategy(sites_per_round=0.1).select(1, sites)) == 5
    assert len(Strategy(sites_per_round=100).select(1, sites)) == 50


def test_plans_carry_distinct_seeds() -> None:
    plans = Strategy(epochs=2, batch_size=4, learning_rate=0.3).plans(2, ["a", "b", "c"])
    assert {p.round for p in plans.values()} == {2}
    assert len({p.seed for p in plans.values()}) == 3
    assert plans["a"].epochs == 2 and plans["a"].batch_size == 4


@pytest.mark.parametrize("bad", [0, -1, 1.5, 2.5])
def test_sites_per_round_must_be_count_or_fraction(bad: float) -> None:
    with pytest.raises(ConfigError, match="sites_per_round"):
        Strategy(sites_per_round=bad)


def test_every_setting_the_strategy_shares_with_the_plan_reaches_the_plan() -> None:
    from confide.server.strategy import PLAN_SETTINGS

    settings = dict(
        epochs=3,
        max_steps=7,
        batch_size=5,
        learning_rate=0.3,
        algorithm="fedprox",
        mu=0.2,
        personalization="ditto",
        personal_steps=4,
        personal_lambda=0.7,
        personal_learning_rate=0.05,
        record_clip=1.5,
        record_noise=0.9,
    )
    assert set(settings) == set(PLAN_SETTINGS)
    plan = Strategy(seed=11, **settings).plan(4, seed=99, work=0.5)  # type: ignore[arg-type]
    assert (plan.round, plan.seed, plan.work) == (4, 99, 0.5)
    assert {name: getattr(plan, name) for name in PLAN_SETTINGS} == settings
