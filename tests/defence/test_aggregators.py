"""Each robust aggregator against a hand-computed case, against its known breaking point, and its stated
sensitivity against replace-one changes of clipped updates."""

from __future__ import annotations

import math

import numpy as np
import pytest

from confide.core import Update
from confide.errors import UpdateError
from confide.pipeline import Aggregator
from confide.randomness import SeededRandomness
from confide.server.robust import (
    CoordinateMedian,
    GeometricMedian,
    Krum,
    MultiKrum,
    TrimmedMean,
    geometric_median,
    krum_scores,
)
from confide.server.trust import Flame, FLTrust, majority_cluster

NO_NOISE = SeededRandomness([0])


def aggregate(
    aggregator: Aggregator, rows: list[list[float]], examples: list[int] | None = None
) -> np.ndarray:
    vectors = [np.asarray(r, dtype=np.float32) for r in rows]
    state = aggregator.init(vectors[0].size)
    for i, v in enumerate(vectors):
        n = examples[i] if examples is not None else 1
        aggregator.add(state, Update(f"s{i}", 1, n, v.copy(), 0))
    return np.asarray(aggregator.result(state, NO_NOISE))


def test_median_by_hand_and_one_vote_per_site() -> None:
    rows = [[1, 10], [2, -4], [3, 0], [100, 5], [-50, 1]]
    # Per coordinate: sorted (-50, 1, 2, 3, 100) -> 2; (-4, 0, 1, 5, 10) -> 1. Examples do not weigh.
    assert aggregate(CoordinateMedian(), rows, [1, 1, 1, 10**6, 1]).tolist() == [2.0, 1.0]


def test_median_breaks_with_a_majority_of_attackers() -> None:
    honest, attack = [[1.0]] * 3, [[1000.0]] * 3
    assert aggregate(CoordinateMedian(), honest + attack[:2])[0] == 1.0  # 2 of 5: held
    assert aggregate(CoordinateMedian(), honest[:2] + attack)[0] == 1000.0  # 3 of 5: the attackers decide


def test_trimmed_mean_by_hand() -> None:
    rows = [[1, 0], [2, 0], [3, 3], [4, 0], [90, 0]]
    # trim 0.2 of 5 cuts t = 1 value at each end: mean of (2, 3, 4) = 3 and of (0, 0, 0) = 0.
    assert aggregate(TrimmedMean(0.2), rows).tolist() == [3.0, 0.0]
    assert TrimmedMean(0.2).cut(5) == 1 and TrimmedMean(0.2).cut(4) == 0


def test_trimmed_mean_breaks_with_more_attackers_than_it_trims() -> None:
    honest = [[1.0]] * 8
    within = aggregate(TrimmedMean(0.1), honest + [[1000.0]] * 1 + [[1.0]])  # t = 1, one attacker: cut
    assert within[0] == 1.0
    beyond = aggregate(TrimmedMean(0.1), honest + [[1000.0]] * 2)  # t = 1, two attackers: one survives
    assert beyond[0] == pytest.approx((7 * 1.0 + 1000.0) / 8)


def test_krum_scores_and_choice_by_hand() -> None:
    rows = np.array([[0.0], [1.0], [3.0], [10.0]], dtype=np.float32)
    # n = 4, f = 1: each row's n - f - 2 = 1 nearest other row. Squared distances: 0->1: 1, 1->0: 1,
    # 3->1: 4, 10->3: 49.
    assert krum_scores(rows, 1).tolist() == [1.0, 1.0, 4.0, 49.0]
    assert aggregate(Krum(1), rows.tolist())[0] == 0.0  # the first of the two best
    # Multi-Krum with m = 3 averages the three best scored: (0 + 1 + 3) / 3.
    assert aggregate(MultiKrum(1, 3), rows.tolist())[0] == pytest.approx(4 / 3)
    assert aggregate(MultiKrum(1), rows.tolist())[0] == pytest.approx(4 / 3)  # m = n - f


def test_krum_breaks_when_the_colluders_are_more_than_n_gt_2f_plus_2_allows() -> None:
    rng = np.random.default_rng(0)
    honest = rng.normal(0.0, 1.0, size=(5, 5)).tolist()
    attack = [[20.0] * 5] * 3  # colluders that send the same far vector: their distances to each other are 0
    # n = 7 with f = 2 meets n > 2f + 2 and 2 colluders are held off: each scores its 3 nearest rows, and a
    # colluder's include 2 far honest rows.
    assert not np.allclose(aggregate(Krum(2), honest[:4] + attack[:2] + honest[4:]), 20.0)
    # 3 colluders in n = 7: f = 3 would be needed, and n > 2f + 2 fails; with f = 3 each scores only its 2
    # nearest, which for a colluder are the other two (0): an attacker is chosen.
    assert np.allclose(aggregate(Krum(3), honest[:4] + attack), 20.0)


def test_krum_chooses_colluders_hidden_inside_the_honest_spread() -> None:
    # Baruch et al. 2019 ("A little is not enough"): vectors at the honest mean plus a small payload are
    # closer to everyone than honest rows are to each other, so Krum picks one, payload included.
    rng = np.random.default_rng(1)
    honest = rng.normal(0.0, 1.0, size=(6, 50))
    payload = honest.mean(axis=0) + np.r_[0.5, np.zeros(49)]
    chosen = aggregate(Krum(1), [*honest.tolist(), payload.tolist(), payload.tolist()])
    assert np.allclose(chosen, payload, atol=1e-6)


def test_geometric_median_by_hand_and_its_breaking_point() -> None:
    # Three points of an equilateral triangle and its centre: the geometric median is the centre (0, 0).
    rows = [[1.0, 0.0], [-0.5, math.sqrt(3) / 2], [-0.5, -math.sqrt(3) / 2], [0.0, 0.0]]
    assert np.allclose(aggregate(GeometricMedian(), rows), [0.0, 0.0], atol=1e-5)
    # On a line it is the median: 1 of (0, 1, 100).
    assert geometric_median(np.array([[0.0], [1.0], [100.0]]))[0] == pytest.approx(1.0, abs=1e-4)
    # A minority moved far stays out; a majority moves it all the way.
    honest, attack = [[0.0, 0.0]] * 3, [[1e4, 1e4]] * 2
    assert np.allclose(aggregate(GeometricMedian(), honest + attack), 0.0, atol=1e-2)
    assert np.allclose(aggregate(GeometricMedian(), honest[:2] + attack + attack[:1]), 1e4, rtol=1e-4)


def test_fltrust_by_hand() -> None:
    g0 = np.array([3.0, 4.0])  # norm 5
    rows = [[6.0, 8.0], [0.0, 1.0], [-3.0, -4.0]]
    # Trust: ReLU(cos) = 1, 0.8, 0. Rescaled to norm 5: (3, 4) and (0, 5).
    # Result: (1·(3, 4) + 0.8·(0, 5)) / 1.8.
    result = aggregate(FLTrust(lambda: g0), rows)
    assert np.allclose(result, [3.0 / 1.8, (4.0 + 4.0) / 1.8])
    # Nobody points the server's way: the round moves nothing.
    assert np.allclose(aggregate(FLTrust(lambda: g0), [[-1.0, 0.0], [0.0, -1.0]]), 0.0)


def test_fltrust_breaks_when_attackers_align_with_the_root_direction_and_scale_does_not_help() -> None:
    g0 = np.array([1.0, 0.0])
    honest = [[1.0, 0.1]] * 3
    boosted = aggregate(FLTrust(lambda: g0), [*honest, [1000.0, 100.0]])  # scaled: rescaled to ||g0||
    assert np.linalg.norm(boosted) <= 1.0 + 1e-6
    # An attacker whose direction agrees with g0 but carries a payload in the other coordinates still gets
    # trust in proportion to its cosine: FLTrust bounds its weight, it does not remove it.
    poisoned = aggregate(FLTrust(lambda: g0), [*honest, [1.0, -0.9]])
    assert poisoned[1] < aggregate(FLTrust(lambda: g0), honest)[1]


def test_flame_admits_the_majority_cluster_and_clips_to_the_median_norm() -> None:
    honest = [[1.0, 0.0], [1.0, 0.1], [1.0, -0.1], [2.0, 0.05]]
    attack = [[-1.0, 5.0], [-1.1, 5.0]]
    rows = honest + attack
    assert majority_cluster(np.array(rows)) == [0, 1, 2, 3]
    result = aggregate(Flame(noise=0.0), rows)
    norms = np.linalg.norm(np.array(rows), axis=1)
    bound = float(np.median(norms))
    expected = np.mean([np.array(r) * min(1.0, bound / np.linalg.norm(r)) for r in honest], axis=0)
    assert np.allclose(result, expected, atol=1e-6)


def test_flame_breaks_with_a_majority_of_attackers() -> None:
    honest = [[1.0, 0.0], [1.0, 0.1]]
    attack = [[-1.0, 5.0], [-1.1, 5.0], [-1.0, 5.1]]
    assert majority_cluster(np.array(honest + attack)) == [2, 3, 4]


def test_flame_noise_is_drawn_and_scaled_by_the_median_norm() -> None:
    rows = np.random.default_rng(1).normal(size=(5, 20000)).astype(np.float32)
    state = Flame(noise=0.0).init(rows.shape[1])
    for i, r in enumerate(rows):
        Flame.add(Flame(), state, Update(f"s{i}", 1, 1, r, 0))
    clean = Flame(noise=0.0).result(state, SeededRandomness([2]))
    noisy = Flame(noise=0.01).result(state, SeededRandomness([2]))
    bound = float(np.median(np.linalg.norm(rows, axis=1)))
    assert np.std(noisy - clean) == pytest.approx(0.01 * bound, rel=0.03)


ROBUST = [
    CoordinateMedian(),
    TrimmedMean(0.2),
    Krum(1),
    MultiKrum(1),
    GeometricMedian(),
    FLTrust(lambda: np.ones(6), reference_norm=1.0),
    Flame(noise=0.0),
]


@pytest.mark.parametrize("aggregator", ROBUST, ids=lambda a: a.name)
def test_sensitivity_bounds_every_replace_one_change_of_clipped_updates(aggregator: Aggregator) -> None:
    clip_norm = 1.0
    bound = aggregator.sensitivity(clip_norm)
    assert bound is not None
    rng = np.random.default_rng(3)
    worst = 0.0
    for _ in range(200):
        n = int(rng.integers(3, 9))
        rows = rng.normal(size=(n, 6)) * rng.uniform(0.1, 3, size=(n, 1))
        rows /= np.maximum(np.linalg.norm(rows, axis=1, keepdims=True) / clip_norm, 1.0)
        changed = rows.copy()
        changed[0] = rng.normal(size=6)
        changed[0] /= max(np.linalg.norm(changed[0]) / clip_norm, 1.0)
        move = np.linalg.norm(aggregate(aggregator, rows.tolist()) - aggregate(aggregator, changed.tolist()))
        worst = max(worst, float(move))
    assert worst <= bound + 1e-5


def test_the_median_moves_by_a_whole_clip_norm_so_no_bound_near_c_over_n_holds() -> None:
    d = 4
    a = 1.0 / math.sqrt(d)
    rows = [[-a] * d, [0.0] * d, [a] * d]
    moved = [[-a] * d, [a] * d, [a] * d]
    change = np.linalg.norm(aggregate(CoordinateMedian(), rows) - aggregate(CoordinateMedian(), moved))
    assert change == pytest.approx(1.0, rel=1e-6)
    assert CoordinateMedian().sensitivity(1.0) == pytest.approx(2 * math.sqrt(2))


@pytest.mark.parametrize("aggregator", ROBUST, ids=lambda a: a.name)
def test_a_sum_is_refused_with_what_to_do(aggregator: Aggregator) -> None:
    assert aggregator.traits.needs_individual_updates
    state = aggregator.init(6)
    with pytest.raises(UpdateError, match=r"server\.aggregator = 'mean' with secure aggregation"):
        aggregator.add_sum(state, np.zeros(6, np.float32), 3)


def test_fltrust_without_a_reference_bound_has_no_sensitivity() -> None:
    assert FLTrust(lambda: np.ones(2)).sensitivity(1.0) is None
