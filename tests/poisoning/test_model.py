"""Each model attack against a hand-computed case, and the coalition's pooling."""

from __future__ import annotations

import numpy as np
import pytest

from confide.attacks.layer import SKIPPED, AttackLayer, Coalition
from confide.attacks.model import (
    NORM_MARGIN,
    Boost,
    Byzantine,
    FreeRider,
    Gaussian,
    Honest,
    LittleIsEnough,
    NormEvading,
    Pool,
    Settings,
    SignFlip,
    little_is_enough_z,
)
from confide.core import Plan, Update
from confide.pipeline import SiteContext
from confide.randomness import SecretRandomness

U = np.array([1.0, -2.0, 2.0], dtype=np.float32)
POOL = Pool(np.array([1.0, 0.0, 3.0], np.float32), np.array([0.5, 1.0, 0.0], np.float32), 2)


def test_each_attack_against_a_hand_computed_case() -> None:
    s = Settings(boost=4.0, scale=7.0, noise_std=1.0, norm_bound=2.0, z=2.0)
    assert np.array_equal(Honest(s).malicious(U, POOL), U)
    assert np.array_equal(Boost(s).malicious(U, POOL), [4.0, 0.0, 12.0])
    assert np.array_equal(SignFlip(s).malicious(U, POOL), [-4.0, 0.0, -12.0])
    assert np.array_equal(Byzantine(s).malicious(U, POOL), [7.0, 7.0, 7.0])
    assert np.array_equal(FreeRider(s).malicious(U, POOL), [0.0, 0.0, 0.0])
    assert np.array_equal(LittleIsEnough(s).malicious(U, POOL), [0.0, -2.0, 3.0])
    noise = np.array([0.1, 0.2, 0.3], np.float32)
    assert np.array_equal(Gaussian(s).malicious(U, POOL, noise), noise)
    # ||(1, 0, 3)|| = sqrt(10): scaled to 2 (1 - margin), in the same direction.
    evading = NormEvading(s).malicious(U, POOL)
    assert np.linalg.norm(evading) == pytest.approx(2.0 * (1 - NORM_MARGIN), rel=1e-6)
    assert np.linalg.norm(evading) < 2.0
    assert np.allclose(evading, np.array([1.0, 0.0, 3.0]) * 2.0 * (1 - NORM_MARGIN) / np.sqrt(10))
    assert Boost(s).malicious(U, POOL).dtype == np.float32


def test_gaussian_draws_the_configured_spread() -> None:
    draw = Gaussian(Settings(noise_std=3.0)).draw(200_000, SecretRandomness())
    assert draw is not None and abs(float(draw.std()) - 3.0) < 0.05


def test_little_is_enough_z_follows_baruch_et_al() -> None:
    # n = 50, m = 12: s = floor(26) - 12 = 14, z = Phi^-1(36 / 50) = 0.5828.
    assert little_is_enough_z(50, 12) == pytest.approx(0.5828, abs=1e-4)
    # n = 10, m = 1: s = 5, Phi^-1(0.5) = 0: one attacker in ten may not move at all unnoticed.
    assert little_is_enough_z(10, 1) == 0.0


def test_the_coalition_pools_mean_and_spread_and_remembers_the_last_rounds_spread() -> None:
    coalition = Coalition()
    first = coalition.join(1, np.array([1.0, 2.0], np.float32))
    assert np.array_equal(first.mean, [1.0, 2.0]) and np.array_equal(first.std, [0.0, 0.0])
    second = coalition.join(1, np.array([3.0, 2.0], np.float32))
    assert np.array_equal(second.mean, [2.0, 2.0]) and np.allclose(second.std, [1.0, 0.0])
    assert second.count == 2
    # Next round: the first colluder alone takes the spread of the last round.
    again = coalition.join(2, np.array([5.0, 5.0], np.float32))
    assert np.array_equal(again.mean, [5.0, 5.0]) and np.allclose(again.std, [1.0, 0.0])


def _encode(layer: AttackLayer, site: str, vector: list[float], round: int = 1) -> tuple[Update, SiteContext]:
    update = Update(site, round, 10, np.array(vector, np.float32), 0)
    context = SiteContext(site, Plan(round=round), SecretRandomness(), {})
    return layer.encode(update, context), context


def test_the_layer_replaces_only_attackers_updates_and_they_skip_site_side_clipping() -> None:
    layer = AttackLayer(SignFlip(Settings(boost=1.0)), frozenset({"bad"}))
    honest, honest_context = _encode(layer, "good", [1.0, 1.0])
    assert honest.vector is not None and np.array_equal(honest.vector, [1.0, 1.0])
    assert honest_context.skip == set()
    bad, bad_context = _encode(layer, "bad", [1.0, 2.0])
    assert bad.vector is not None and np.array_equal(bad.vector, [-1.0, -2.0])
    assert bad_context.skip == set(SKIPPED)
    polite = AttackLayer(SignFlip(Settings()), frozenset({"bad"}), honest_layers=True)
    assert _encode(polite, "bad", [1.0])[1].skip == set()


def test_colluders_send_one_direction_and_one_noise_draw() -> None:
    layer = AttackLayer(Boost(Settings(boost=1.0)), frozenset({"a", "b"}), collude=True)
    first, _ = _encode(layer, "a", [2.0, 0.0])
    second, _ = _encode(layer, "b", [0.0, 2.0])
    assert first.vector is not None and np.array_equal(first.vector, [2.0, 0.0])
    assert second.vector is not None and np.array_equal(second.vector, [1.0, 1.0])  # the pooled mean
    alone = AttackLayer(Boost(Settings(boost=1.0)), frozenset({"a", "b"}), collude=False)
    _encode(alone, "a", [2.0, 0.0])
    assert np.array_equal(_encode(alone, "b", [0.0, 2.0])[0].vector, [0.0, 2.0])  # type: ignore[arg-type]
    noisy = AttackLayer(Gaussian(Settings()), frozenset({"a", "b"}), collude=True)
    x, _ = _encode(noisy, "a", [0.0] * 8)
    y, _ = _encode(noisy, "b", [0.0] * 8)
    assert x.vector is not None and y.vector is not None and np.array_equal(x.vector, y.vector)
    z, _ = _encode(noisy, "a", [0.0] * 8, round=2)
    assert z.vector is not None and not np.array_equal(z.vector, x.vector)  # a fresh draw each round
