from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import stats

from confide.core import Layer, Update
from confide.errors import ConfigError, UpdateError
from confide.privacy.dp import (
    CLIPPED_METRIC,
    NORM_METRIC,
    AdaptiveClip,
    CentralNoise,
    ClipLayer,
    DistributedNoiseLayer,
    DPMean,
    clip,
    l2_norm,
)

finite = st.floats(-1e6, 1e6, allow_nan=False, width=32)


def update(vector: np.ndarray, site: str = "a", examples: int = 1) -> Update:
    return Update(site=site, round=1, num_examples=examples, vector=vector, model_version=0)


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


def test_clip_layer_clips_in_place_and_reports_norm_and_bit() -> None:
    layer = ClipLayer(1.0)
    assert isinstance(layer, Layer) and layer.reveals_individual_updates
    long, short = update(np.full(4, 1.0, np.float32)), update(np.full(4, 0.1, np.float32))
    vector = long.vector
    out = layer.decode(layer.encode(long, np.random.default_rng(0)))
    assert out.vector is vector and l2_norm(vector) <= 1.0
    assert out.metrics[NORM_METRIC] == pytest.approx(2.0) and out.metrics[CLIPPED_METRIC] == 1.0
    out = layer.encode(short, np.random.default_rng(0))
    np.testing.assert_array_equal(out.vector, np.full(4, 0.1, np.float32))
    assert out.metrics[CLIPPED_METRIC] == 0.0
    hidden = Update(site="a", round=1, num_examples=1, vector=None, model_version=0)
    with pytest.raises(UpdateError, match="put clip first"):
        layer.encode(hidden, np.random.default_rng(0))
    with pytest.raises(ConfigError, match=r"clip_norm must be a finite number > 0 \(got -1"):
        ClipLayer(-1.0)


def test_distributed_noise_of_n_sites_sums_to_std_z_c() -> None:
    z, c, n, size = 1.3, 0.5, 10, 50_000
    layer = DistributedNoiseLayer(clip_norm=c, noise_multiplier=z, num_sites=n)
    assert isinstance(layer, Layer) and layer.requires_hidden_updates
    rng = np.random.default_rng(2024)
    shares = []
    for i in range(n):
        u = update(np.zeros(size, np.float32), site=str(i))
        u.metrics[NORM_METRIC] = 3.0
        out = layer.encode(u, rng)
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


def test_distributed_noise_is_reproducible_from_the_rng_unless_secret() -> None:
    layer = DistributedNoiseLayer(1.0, 1.0, 4)
    a = layer.encode(update(np.zeros(8, np.float32)), np.random.default_rng(5)).vector
    b = layer.encode(update(np.zeros(8, np.float32)), np.random.default_rng(5)).vector
    np.testing.assert_array_equal(a, b)
    secret = DistributedNoiseLayer(1.0, 1.0, 4, secret_seed=True)
    c = secret.encode(update(np.zeros(8, np.float32)), np.random.default_rng(5)).vector
    d = secret.encode(update(np.zeros(8, np.float32)), np.random.default_rng(5)).vector
    assert not np.array_equal(c, d)


def test_central_noise_has_std_z_c_on_the_sum() -> None:
    noise = CentralNoise(clip_norm=2.0, noise_multiplier=0.7)
    total = np.zeros(50_000, np.float32)
    out = noise.add(total, np.random.default_rng(11))
    assert out is total and out.dtype == np.float32
    assert variance_is(out, (0.7 * 2.0) ** 2)
    assert not variance_is(out, (0.7 * 2.0) ** 2 * 1.05)


def test_dp_mean_weights_sites_equally_and_divides_by_the_fixed_denominator() -> None:
    mean = DPMean(expected_sites=4)
    state = mean.init(3)
    mean.add(state, update(np.array([1, 2, 3], np.float32), examples=1000))
    mean.add(state, update(np.array([3, 2, 1], np.float32), examples=1))
    np.testing.assert_array_equal(mean.result(state), np.array([1, 1, 1], np.float32))
    actual = DPMean()
    state = actual.init(3)
    actual.add(state, update(np.array([1, 2, 3], np.float32), examples=1000))
    actual.add(state, update(np.array([3, 2, 1], np.float32), examples=1))
    np.testing.assert_array_equal(actual.result(state), np.array([2, 2, 2], np.float32))
    noisy = DPMean(CentralNoise(1.0, 1.0), expected_sites=10)
    state = noisy.init(40_000)
    assert variance_is(noisy.result(state, np.random.default_rng(3)), 1.0 / 10**2)
    with pytest.raises(ValueError, match="needs a random generator"):
        noisy.result(noisy.init(3))


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
        state = state.update(bits, sites, rng)
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
