"""The three kinds of randomness: public streams from the seed, secret noise, and insecure seeded noise."""

from __future__ import annotations

import numpy as np
from scipy import stats

from confide.randomness import SecretRandomness, SeededRandomness, Stream, public_rng


def test_public_streams_are_independent_and_repeat_per_round() -> None:
    a = public_rng(7, 3, Stream.SELECT).random(5)
    np.testing.assert_array_equal(a, public_rng(7, 3, Stream.SELECT).random(5))
    assert not np.array_equal(a, public_rng(7, 3, Stream.SITE_PLAN).random(5))
    assert not np.array_equal(a, public_rng(7, 4, Stream.SELECT).random(5))
    assert len({int(s) for s in Stream}) == len(Stream)  # no two purposes share a stream


def test_secret_normals_are_standard_normal_and_never_repeat() -> None:
    source = SecretRandomness()
    draws = source.normal(200_001, 1.0)  # odd size: the last Box-Muller pair is cut
    assert draws.dtype == np.float32 and draws.shape == (200_001,)
    # Kolmogorov-Smirnov against N(0, 1), at a level that fails once in a million runs.
    assert stats.kstest(draws.astype(np.float64), "norm").pvalue > 1e-6
    scaled = source.normal(100_000, 3.0)
    assert abs(float(scaled.std()) - 3.0) < 0.05
    # Two sources, or two draws of one source, share nothing (they are keyed from os.urandom).
    assert not np.array_equal(SecretRandomness().normal(16, 1.0), SecretRandomness().normal(16, 1.0))
    assert not np.array_equal(source.normal(16, 1.0), source.normal(16, 1.0))


def test_secret_uniforms_are_uniform_on_the_unit_interval() -> None:
    u = SecretRandomness().uniform(100_000)
    assert u.dtype == np.float64 and u.min() >= 0.0 and u.max() < 1.0
    assert stats.kstest(u, "uniform").pvalue > 1e-6


def test_seeded_randomness_repeats_and_is_labelled_insecure() -> None:
    a, b = SeededRandomness([1, 2]), SeededRandomness([1, 2])
    np.testing.assert_array_equal(a.normal(8, 2.0), b.normal(8, 2.0))
    np.testing.assert_array_equal(a.uniform(8), b.uniform(8))
    assert not a.secret and SecretRandomness().secret
    assert "INSECURE" in repr(a)
