from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import stats

from confide.core import Plan, Task, Update
from confide.errors import ConfigError, UpdateError
from confide.pipeline import Layer, RoundContext, SiteContext
from confide.privacy.dp import (
    CLIPPED_METRIC,
    NORM_METRIC,
    UNCLIPPED,
    AdaptiveClip,
    CentralDP,
    CentralNoise,
    ClipLayer,
    DistributedNoiseLayer,
    EqualMean,
    clip,
    l2_norm,
)
from confide.randomness import SecretRandomness, SeededRandomness
from confide.server.strategy import WeightedMean

finite = st.floats(-1e6, 1e6, allow_nan=False, width=32)


def update(vector: np.ndarray, site: str = "a", examples: int = 1) -> Update:
    return Update(site=site, round=1, num_examples=examples, vector=vector, model_version=0)


def at_site(clip_norm: float = 0.0, seed: int | None = None, site: str = "a") -> SiteContext:
    """A site's context: secret randomness, or (seed given) the insecure seeded kind."""
    randomness = SecretRandomness() if seed is None else SeededRandomness(seed)
    return SiteContext(site, Plan(round=1, clip_norm=clip_norm), randomness, {})


def server_round(clip_norm: float, sites: list[str]) -> RoundContext:
    """The server's context of a round whose plans carry ``clip_norm``."""
    tasks = {s: Task(s, Plan(round=1, clip_norm=clip_norm), 0) for s in sites}
    mean = EqualMean()
    return RoundContext(
        round=1,
        sites=sites,
        tasks=tasks,
        weights=np.zeros(4, np.float32),
        server_state={},
        exchange=lambda messages: iter(()),
        min_updates=0,
        randomness=SecretRandomness(),
        population=len(sites),
        aggregator=mean,
        aggregate=mean.init(4),
    )


def variance_is(sample: np.ndarray, variance: float, alpha: float = 1e-6) -> bool:
    """Chi-square test that a zero-mean normal sample has the given variance (two-sided, level alpha)."""
    n = sample.size
    statistic = float(np.sum(sample.astype(np.float64) ** 2)) / variance
    return bool(stats.chi2.ppf(alpha / 2, n) < statistic < stats.chi2.ppf(1 - alpha / 2, n))


@settings(max_examples=200, deadline=None)
@given(arrays(np.float32, st.integers(1, 300), elements=finite), st.floats(1e-3, 1e4))
def test_clip_bounds_every_vector_and_keeps_short_ones(vector: np.ndarray, clip_norm: float) -> None:
    original = vector.copy()
    clipped, norm = clip(vector, clip_norm)
    np.testing.assert_array_equal(vector, original)  # pure: the input is untouched
    assert clipped.dtype == np.float32
    assert norm == pytest.approx(np.linalg.norm(original.astype(np.float64)), rel=1e-12, abs=1e-30)
    assert l2_norm(clipped) <= clip_norm
    if norm <= clip_norm:
        np.testing.assert_array_equal(clipped, original)
    else:
        # Same direction, shortened to the bound (up to the safety margin of one part in 10^6).
        assert l2_norm(clipped) == pytest.approx(clip_norm, rel=1e-5)
        np.testing.assert_allclose(clipped, original * (clip_norm / norm), rtol=1e-5, atol=1e-30)


def test_clip_layer_clips_in_place_and_reports_norm_and_bits() -> None:
    layer = ClipLayer(1.0)
    assert isinstance(layer, Layer) and not layer.traits.hides_updates
    long, short = update(np.full(4, 1.0, np.float32)), update(np.full(4, 0.1, np.float32))
    vector = long.vector
    out = layer.encode(long, at_site())
    assert out.vector is vector and l2_norm(vector) <= 1.0
    assert out.metrics[NORM_METRIC] == pytest.approx(2.0) and out.metrics[CLIPPED_METRIC] == 1.0
    assert out.sums[UNCLIPPED] == 0.0
    out = layer.encode(short, at_site())
    np.testing.assert_array_equal(out.vector, np.full(4, 0.1, np.float32))
    assert out.metrics[CLIPPED_METRIC] == 0.0 and out.sums[UNCLIPPED] == 1.0
    hidden = Update(site="a", round=1, num_examples=1, vector=None, model_version=0)
    with pytest.raises(UpdateError, match="put clip first"):
        layer.encode(hidden, at_site())
    with pytest.raises(ConfigError, match=r"clip_norm must be a finite number > 0 \(got -1"):
        ClipLayer(-1.0)


def test_the_plan_clip_norm_overrides_and_the_server_clips_a_site_that_did_not() -> None:
    layer = ClipLayer(1.0)
    out = layer.encode(update(np.full(4, 1.0, np.float32)), at_site(clip_norm=0.5))
    assert l2_norm(out.vector) == pytest.approx(0.5, rel=1e-5)  # type: ignore[arg-type]
    # A hostile site skips clipping: the server, which reads its update under central DP, clips it to the
    # round's clip norm, so the sensitivity bound does not rest on the site's good will.
    hostile = update(np.full(4, 100.0, np.float32), site="evil")
    decoded = layer.decode(hostile, server_round(0.5, ["evil"]))
    assert decoded is not None and l2_norm(decoded.vector) <= 0.5  # type: ignore[arg-type]


def test_distributed_noise_of_n_sites_sums_to_std_z_c() -> None:
    z, c, n, size = 1.3, 0.5, 10, 50_000
    layer = DistributedNoiseLayer(clip_norm=c, noise_multiplier=z, num_sites=n)
    assert isinstance(layer, Layer) and layer.traits.needs_hidden_updates
    shares = []
    for i in range(n):
        u = update(np.zeros(size, np.float32), site=str(i))
        u.metrics[NORM_METRIC] = 3.0
        out = layer.encode(u, at_site(site=str(i)))
        assert out.vector is not None and out.vector.dtype == np.float32
        assert NORM_METRIC not in out.metrics  # a clear norm would bypass the noise
        shares.append(out.vector)
    assert variance_is(shares[0], (z * c) ** 2 / n)
    total = np.sum(shares, axis=0)
    assert variance_is(total, (z * c) ** 2)
    assert not variance_is(total, (z * c) ** 2 / n)  # the test can tell one share from the sum
    assert abs(float(total.mean())) < 5 * z * c / np.sqrt(size)
    # Fewer sites than planned carry less noise, and the layer says how much.
    effective = layer.effective_noise_multiplier(5)
    assert effective == pytest.approx(z * np.sqrt(0.5))
    assert variance_is(np.sum(shares[:5], axis=0), (effective * c) ** 2)


def test_distributed_noise_is_secret_and_reproducible_only_when_seeded_insecurely() -> None:
    layer = DistributedNoiseLayer(1.0, 1.0, 4)
    a = layer.encode(update(np.zeros(8, np.float32)), at_site()).vector
    b = layer.encode(update(np.zeros(8, np.float32)), at_site()).vector
    assert not np.array_equal(a, b)  # the same plan, the same seed: fresh noise every time
    c = layer.encode(update(np.zeros(8, np.float32)), at_site(seed=5)).vector
    d = layer.encode(update(np.zeros(8, np.float32)), at_site(seed=5)).vector
    np.testing.assert_array_equal(c, d)


def test_central_dp_adds_z_times_the_sensitivity_after_any_bounded_aggregator() -> None:
    noisy = CentralDP(EqualMean(expected_sites=10), CentralNoise(clip_norm=2.0, noise_multiplier=0.7))
    state = noisy.init(50_000)
    out = noisy.result(state, SecretRandomness())
    assert out.dtype == np.float32
    assert variance_is(out, (0.7 * 2.0 / 10) ** 2)  # N(0, (zC)^2) on the sum, over 10 sites
    assert not variance_is(out, (0.7 * 2.0 / 10) ** 2 * 1.05)
    with pytest.raises(ConfigError, match="weighs sites unequally"):
        CentralDP(WeightedMean(), CentralNoise(1.0, 1.0))


def test_equal_mean_weights_sites_equally_and_divides_by_the_fixed_denominator() -> None:
    mean = EqualMean(expected_sites=4)
    state = mean.init(3)
    mean.add(state, update(np.array([1, 2, 3], np.float32), examples=1000))
    mean.add(state, update(np.array([3, 2, 1], np.float32), examples=1))
    np.testing.assert_array_equal(mean.result(state, SecretRandomness()), np.array([1, 1, 1], np.float32))
    assert mean.sensitivity(2.0) == 0.5
    actual = EqualMean()
    state = actual.init(3)
    actual.add(state, update(np.array([1, 2, 3], np.float32), examples=1000))
    actual.add(state, update(np.array([3, 2, 1], np.float32), examples=1))
    np.testing.assert_array_equal(actual.result(state, SecretRandomness()), np.array([2, 2, 2], np.float32))
    assert actual.sensitivity(1.0) is None  # the count that divides may itself depend on a site


@pytest.mark.parametrize("quantile", [0.5, 0.8])
def test_adaptive_clip_converges_to_the_target_quantile_of_norms(quantile: float) -> None:
    rng = np.random.default_rng(7)
    sites = 100
    state = AdaptiveClip.init(
        initial_clip=0.05, target_quantile=quantile, learning_rate=0.2, bits_noise=sites / 20
    )
    history = []
    for _ in range(400):
        norms = rng.lognormal(mean=0.0, sigma=1.0, size=sites)
        bits = sum(state.bit(float(n)) for n in norms)
        state = state.update(bits, sites, SeededRandomness(int(rng.integers(2**31))))
        history.append(state.clip_norm)
    target = float(np.exp(stats.norm.ppf(quantile)))  # the lognormal's quantile
    late = np.array(history[-100:])
    assert abs(np.log(late.mean() / target)) < 0.1
    # The fraction of norms under the learned clip is near the target quantile.
    assert abs(stats.norm.cdf(np.log(late.mean())) - quantile) < 0.04
    assert history[0] < 0.1 * target  # it started far away


def test_adaptive_clip_is_a_checkpointable_value() -> None:
    state = AdaptiveClip.init(1.0, 0.5, 0.2, 0.0)
    # All sites unclipped (fraction 1 > 0.5): the clip shrinks by exp(-0.2 * 0.5), exactly.
    after = state.update_noised(10.0, 10)
    assert after.clip_norm == pytest.approx(np.exp(-0.1)) and state.clip_norm == 1.0
    assert AdaptiveClip(**vars(after)) == after
    # Centred bits over the expected count: 5 unclipped sites of 10 expected read as a fraction of 0.75.
    assert state.update_noised(5.0, 5, expected_sites=10).clip_norm == pytest.approx(np.exp(-0.2 * 0.25))
    with pytest.raises(ConfigError, match="target_quantile"):
        AdaptiveClip.init(1.0, 1.5, 0.2, 1.0)
