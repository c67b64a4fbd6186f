"""Fixed point: clipping, rounding, and enough headroom that a sum of n updates never wraps."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from confide.errors import ConfigError
from confide.privacy.secagg.fixedpoint import FixedPoint


def test_modulus_bits_by_hand() -> None:
    # M = ceil(1 * 2^20) = 2^20; n * M = 100 * 2^20 < 2^27, bit_length 27, plus the sign bit: 28.
    assert FixedPoint(1.0, 20, 100).modulus_bits == 28
    assert FixedPoint(1.0, 20, 100).dtype == np.dtype("<u4")
    # n * M = 2^11 * 2^20 = 2^31 has bit_length 32: 33 bits, so uint64.
    fixed = FixedPoint(1.0, 20, 2048)
    assert fixed.modulus_bits == 33 and fixed.dtype == np.dtype("<u8")
    # M = ceil(0.3 * 2^4) = ceil(4.8) = 5; 3 * 5 = 15 -> 4 bits + 1.
    assert FixedPoint(0.3, 4, 3).modulus_bits == 5


@pytest.mark.parametrize(
    ("clip", "bits", "sites"), [(1.0, 20, 100), (1.0, 20, 2048), (0.3, 4, 3), (8.0, 40, 50)]
)
def test_extreme_sums_do_not_wrap(clip: float, bits: int, sites: int) -> None:
    """n sites all at +R (and all at -R) decode to exactly +-n*R: the headroom is enough, and just enough."""
    fixed = FixedPoint(clip, bits, sites)
    for sign in (1.0, -1.0):
        one = fixed.encode(np.full(5, sign * clip * 10, dtype=np.float32))  # clipped to +-R first
        total = np.zeros(5, dtype=fixed.dtype)
        for _ in range(sites):
            np.add(total, one, out=total)
        assert (fixed.signed(total) == sign * sites * fixed.max_magnitude).all()
    # One bit fewer and the positive extreme would wrap to a negative number.
    assert sites * fixed.max_magnitude >= 2 ** (fixed.modulus_bits - 2)


@settings(max_examples=40, deadline=None)
@given(
    vectors=st.lists(arrays(np.float32, 16, elements=st.floats(-2, 2, width=32)), min_size=1, max_size=12),
    bits=st.integers(0, 24),
)
def test_decoded_sum_is_within_n_half_ulps(vectors: list[np.ndarray], bits: int) -> None:
    fixed = FixedPoint(1.0, bits, len(vectors))
    total = np.zeros(16, dtype=fixed.dtype)
    for v in vectors:
        np.add(total, fixed.encode(v), out=total)
    exact = np.sum([np.clip(v.astype(np.float64), -1, 1) for v in vectors], axis=0)
    decoded = fixed.signed(total).astype(np.float64) / 2.0**bits
    assert np.abs(decoded - exact).max() <= len(vectors) * 2.0 ** -(bits + 1)


def test_encode_is_in_the_ring_and_two_complement() -> None:
    fixed = FixedPoint(1.0, 3, 2)  # M = 8, n*M = 16 -> 6 bits
    encoded = fixed.encode(np.array([-1.0, -0.125, 0.0, 0.125, 0.5], dtype=np.float32))
    assert encoded.tolist() == [64 - 8, 64 - 1, 0, 1, 4]
    assert fixed.decode(encoded).tolist() == [-1.0, -0.125, 0.0, 0.125, 0.5]


def test_impossible_encodings_are_refused() -> None:
    with pytest.raises(ConfigError, match="needs 66 bits"):
        FixedPoint(8.0, 50, 2**11)  # M = 2^53 (the most that rounds exactly), n * M = 2^64
    with pytest.raises(ConfigError, match="at most 53 fit"):
        FixedPoint(2.0**10, 52, 2)
    with pytest.raises(ConfigError, match="finite number > 0"):
        FixedPoint(0.0, 10, 3)
    with pytest.raises(ConfigError, match="fractional_bits"):
        FixedPoint(1.0, 60, 3)
