"""Shamir secret sharing (Shamir 1979) of byte strings over the prime field GF(2^31 - 1), with numpy.

A secret of s bytes is cut into ceil(8s / 30) chunks of 30 bits; each chunk gets its own random polynomial of
degree t - 1 whose constant term is the chunk, and share i holds every polynomial's value at x_i. Any t shares
give each chunk back by Lagrange interpolation at 0; fewer than t say nothing: for every candidate chunk there
is exactly one polynomial of degree t - 1 through it and the t - 1 known points, so every candidate is equally
likely. This holds in any field larger than the number of shares; the Mersenne prime 2^31 - 1 is chosen so
that a product of two field elements fits in a uint64 and every step runs on whole arrays (Horner's rule over
all shares and chunks at once), with no big-integer arithmetic. A 32-byte secret is 9 chunks: 36 bytes
a share.

The polynomial coefficients come from ``os.urandom`` (uniform by rejection, no modulo bias).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence

import numpy as np

PRIME = (1 << 31) - 1
CHUNK_BITS = 30
CHUNK_MASK = (1 << CHUNK_BITS) - 1
VALUE_BYTES = 4
"""A field element on the wire: 4 bytes, little-endian."""


def chunks_for(secret_bytes: int) -> int:
    """How many field elements hold a secret of ``secret_bytes`` bytes."""
    return math.ceil(8 * secret_bytes / CHUNK_BITS)


def share_bytes_for(secret_bytes: int) -> int:
    """Size of one share of a ``secret_bytes``-byte secret, in bytes."""
    return chunks_for(secret_bytes) * VALUE_BYTES


def _uniform_field_elements(count: int) -> np.ndarray:
    """``count`` independent uniform elements of GF(PRIME), as uint64, from os.urandom."""
    out = np.empty(0, dtype=np.uint64)
    while out.size < count:
        draw = np.frombuffer(os.urandom(4 * (count - out.size + 8)), dtype="<u4") & np.uint32(0x7FFFFFFF)
        # 31 uniform bits are uniform on [0, 2^31); dropping the single value 2^31 - 1 leaves [0, PRIME).
        out = np.concatenate([out, draw[draw < PRIME].astype(np.uint64)])
    return out[:count]


def _check_points(xs: Sequence[int]) -> np.ndarray:
    points = np.asarray(xs, dtype=np.int64)
    if points.ndim != 1 or points.size == 0:
        raise ValueError("Shamir sharing needs at least one evaluation point")
    if points.min() < 1 or points.max() >= PRIME:
        raise ValueError(f"evaluation points must lie in [1, {PRIME - 1}] (0 is the secret itself)")
    if np.unique(points).size != points.size:
        raise ValueError("evaluation points must be distinct")
    return points.astype(np.uint64)


def secret_to_chunks(secret: bytes) -> np.ndarray:
    """The secret as little-endian 30-bit chunks (uint64)."""
    value = int.from_bytes(secret, "little")
    return np.array(
        [(value >> (CHUNK_BITS * i)) & CHUNK_MASK for i in range(chunks_for(len(secret)))], dtype=np.uint64
    )


def chunks_to_secret(chunks: np.ndarray, secret_bytes: int) -> bytes:
    if chunks.size != chunks_for(secret_bytes) or int(chunks.max(initial=0)) > CHUNK_MASK:
        raise ValueError("the shares are inconsistent: they do not interpolate to a secret of this size")
    value = 0
    for i, chunk in enumerate(chunks.tolist()):
        value |= int(chunk) << (CHUNK_BITS * i)
    if value.bit_length() > 8 * secret_bytes:
        raise ValueError("the shares are inconsistent: they do not interpolate to a secret of this size")
    return value.to_bytes(secret_bytes, "little")


def split(secret: bytes, xs: Sequence[int], threshold: int) -> np.ndarray:
    """Shares of ``secret`` at the points ``xs``: a (len(xs), chunks) uint64 array; any ``threshold`` of its
    rows reconstruct the secret, fewer reveal nothing about it."""
    points = _check_points(xs)
    if not 1 <= threshold <= points.size:
        raise ValueError(f"the threshold must be between 1 and the number of shares {points.size}")
    chunks = secret_to_chunks(secret)
    # coefficients[j] holds the x^j coefficient of every chunk's polynomial; row 0 is the secret.
    random = _uniform_field_elements((threshold - 1) * chunks.size).reshape(threshold - 1, chunks.size)
    coefficients = np.vstack([chunks, random])
    x = points[:, None]
    values = np.broadcast_to(coefficients[-1], (points.size, chunks.size)).copy()
    for coefficient in coefficients[-2::-1]:
        # values < 2^31 and x < 2^31, so the product stays below 2^62: exact in uint64 before the reduction.
        values *= x
        values += coefficient
        values %= np.uint64(PRIME)
    return values


@functools.lru_cache(maxsize=4096)
def _lagrange_at_zero(points: tuple[int, ...]) -> np.ndarray:
    """The weights l_j with f(0) = sum_j l_j f(x_j) for any polynomial f of degree < len(points)."""
    numerators = np.ones(len(points), dtype=np.uint64)
    denominators = np.ones(len(points), dtype=np.uint64)
    xs = np.array(points, dtype=np.uint64)
    for m, x_m in enumerate(points):
        # l_j = prod_{m != j} x_m / (x_m - x_j); the row for j = m gets the neutral factor 1.
        numerator = np.full(len(points), x_m, dtype=np.uint64)
        denominator = (np.uint64(x_m) + np.uint64(PRIME) - xs) % np.uint64(PRIME)
        numerator[m] = 1
        denominator[m] = 1
        numerators = numerators * numerator % np.uint64(PRIME)
        denominators = denominators * denominator % np.uint64(PRIME)
    inverses = np.array([pow(int(d), PRIME - 2, PRIME) for d in denominators.tolist()], dtype=np.uint64)
    weights = numerators * inverses % np.uint64(PRIME)
    weights.setflags(write=False)
    return weights


def reconstruct(xs: Sequence[int], shares: np.ndarray, secret_bytes: int) -> bytes:
    """The secret from the shares (rows) at points ``xs``, by Lagrange interpolation at 0.

    Give it at least ``threshold`` shares; with fewer the result is a random-looking value (or a ValueError
    when it does not even fit in ``secret_bytes``), never the secret.
    """
    points = _check_points(xs)
    values = np.asarray(shares, dtype=np.uint64)
    if values.shape != (points.size, chunks_for(secret_bytes)):
        raise ValueError(
            f"expected {points.size} shares of {chunks_for(secret_bytes)} field elements, "
            f"got an array of shape {values.shape}"
        )
    if values.size and int(values.max()) >= PRIME:
        raise ValueError("a share holds a value outside the field")
    weights = _lagrange_at_zero(tuple(int(x) for x in points.tolist()))
    # Each term is reduced below 2^31 before the sum, so up to 2^33 terms add without overflow.
    chunks = (weights[:, None] * values % np.uint64(PRIME)).sum(axis=0) % np.uint64(PRIME)
    return chunks_to_secret(chunks, secret_bytes)


def share_to_bytes(share: np.ndarray) -> bytes:
    """One share (a row of :func:`split`) on the wire."""
    return share.astype("<u4").tobytes()


def share_from_bytes(data: bytes, secret_bytes: int) -> np.ndarray:
    """The share :func:`share_to_bytes` wrote; ValueError if it has the wrong size or leaves the field."""
    expected = share_bytes_for(secret_bytes)
    if len(data) != expected:
        raise ValueError(f"a share of a {secret_bytes}-byte secret has {expected} bytes, got {len(data)}")
    values = np.frombuffer(data, dtype="<u4").astype(np.uint64)
    if int(values.max(initial=0)) >= PRIME:
        raise ValueError("a share holds a value outside the field")
    return values
