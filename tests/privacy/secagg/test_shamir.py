"""Shamir sharing: t shares give the secret back, t - 1 say nothing about it."""

from __future__ import annotations

import contextlib
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from confide.privacy.secagg import shamir

SECRETS = st.binary(min_size=32, max_size=32)


def lagrange_value_at(points: list[int], values: list[int], x: int) -> int:
    """The polynomial of degree < len(points) through (points, values), evaluated at x (plain Python)."""
    p = shamir.PRIME
    total = 0
    for j, (xj, yj) in enumerate(zip(points, values, strict=True)):
        term = yj
        for m, xm in enumerate(points):
            if m != j:
                term = term * (x - xm) * pow(xj - xm, p - 2, p) % p
        total = (total + term) % p
    return total


@settings(max_examples=30, deadline=None)
@given(secret=SECRETS, threshold=st.integers(1, 7), extra=st.integers(0, 4), data=st.data())
def test_any_t_shares_reconstruct(secret: bytes, threshold: int, extra: int, data: st.DataObject) -> None:
    points = data.draw(
        st.lists(
            st.integers(1, shamir.PRIME - 1),
            min_size=threshold + extra,
            max_size=threshold + extra,
            unique=True,
        )
    )
    shares = shamir.split(secret, points, threshold)
    assert shares.shape == (len(points), shamir.chunks_for(32))
    chosen = data.draw(
        st.lists(st.sampled_from(range(len(points))), min_size=threshold, max_size=len(points), unique=True)
    )
    assert shamir.reconstruct([points[i] for i in chosen], shares[chosen], 32) == secret


@settings(max_examples=30, deadline=None)
@given(secret=SECRETS, candidate=SECRETS, threshold=st.integers(2, 8))
def test_fewer_than_t_shares_fit_every_secret(secret: bytes, candidate: bytes, threshold: int) -> None:
    """For t - 1 shares and ANY candidate secret there is a polynomial of degree t - 1 through both: the
    candidate at 0 and the shares at their points. So the t - 1 shares exclude no secret."""
    points = list(range(1, threshold + 1))
    shares = shamir.split(secret, points, threshold)
    known_points, known = points[:-1], shares[:-1]
    target = shamir.secret_to_chunks(candidate)
    # Build the one missing share that, with the t - 1 real ones, makes the candidate the secret.
    missing = np.array(
        [
            lagrange_value_at(
                [0, *known_points], [int(target[c]), *(int(v) for v in known[:, c])], points[-1]
            )
            for c in range(target.size)
        ],
        dtype=np.uint64,
    )
    assert shamir.reconstruct(points, np.vstack([known, missing]), 32) == candidate
    # ... and the real last share still gives the real secret.
    assert shamir.reconstruct(points, shares, 32) == secret


def test_fewer_than_t_shares_are_uniform_whatever_the_secret() -> None:
    """t - 1 shares of the all-zero secret and of the all-ones secret are both uniform on the field
    (chi-square over 64 equal bins through many splits). The coefficients come from the OS's randomness,
    so the bar is p > 1e-6: a wrong split fails it by far (see the control), a right one once in 10^6."""
    threshold, bins = 4, 64
    for secret in (bytes(32), b"\xff" * 32):
        values = np.concatenate(
            [shamir.split(secret, [1, 2, 3, 4, 5], threshold)[:3].ravel() for _ in range(400)]
        )
        counts = np.bincount((values * bins // shamir.PRIME).astype(np.int64), minlength=bins)
        assert chisquare(counts).pvalue > 1e-6
    # The test can tell non-uniform values apart: the secret's own chunks are far from uniform.
    secret_chunks = np.tile(shamir.secret_to_chunks(b"\x01" * 32), 1200)
    counts = np.bincount((secret_chunks * bins // shamir.PRIME).astype(np.int64), minlength=bins)
    assert chisquare(counts).pvalue < 1e-9


def test_t_minus_one_shares_do_not_reconstruct() -> None:
    secret = bytes(range(32))
    shares = shamir.split(secret, [1, 2, 3, 4, 5], 3)
    for pair in itertools.combinations(range(5), 2):
        with contextlib.suppress(ValueError):  # ValueError: the value does not even fit in 32 bytes
            assert shamir.reconstruct([i + 1 for i in pair], shares[list(pair)], 32) != secret


def test_shares_travel_as_bytes_and_refuse_out_of_field_values() -> None:
    shares = shamir.split(b"k" * 32, [7, 8, 9], 2)
    wire = shamir.share_to_bytes(shares[0])
    assert len(wire) == shamir.share_bytes_for(32) == 36
    assert np.array_equal(shamir.share_from_bytes(wire, 32), shares[0])
    with pytest.raises(ValueError, match="36 bytes"):
        shamir.share_from_bytes(wire[:-1], 32)
    with pytest.raises(ValueError, match="outside the field"):
        shamir.share_from_bytes(b"\xff" * 36, 32)


def test_bad_points_and_thresholds_are_refused() -> None:
    with pytest.raises(ValueError, match="distinct"):
        shamir.split(b"x" * 32, [1, 1, 2], 2)
    with pytest.raises(ValueError, match="0 is the secret"):
        shamir.split(b"x" * 32, [0, 1, 2], 2)
    with pytest.raises(ValueError, match="threshold"):
        shamir.split(b"x" * 32, [1, 2, 3], 4)
