"""Secure aggregation of quantized updates: the rotation all sites of a round share, exact sums in digits.

With ``[compression] kind = "quantize"`` and secure aggregation, the secure-aggregation layer itself
quantizes: each site encodes its update into the ring with q-bit stochastic rounding
(:mod:`confide.privacy.secagg.fixedpoint`), so the masked vector shrinks to b = bit_length(n L) + 1 bits a
value instead of the fixed point's 20-odd, and the server decodes the sum, never one site's update. This
module holds the two things the layer adds around that encoding.

The rotation (``compression.rotate``). Uniform quantization's error grows with the range R that every
coordinate must fit in, and one large coordinate needs a large R. A random rotation (random signs D, then the
normalized Walsh-Hadamard transform H, in blocks of :data:`~confide.compress.quantize.BLOCK` values; Suresh
et al. 2017, DRIVE, Vargaftik et al. 2021) spreads every block's energy evenly over its coordinates: after it,
each coordinate of a block of norm ||x|| is about ||x|| / sqrt(1024) in size, whatever the largest one was, so
R can be some 32 times smaller than without it (see :func:`rotated_range`). The server only ever sees the sum,
so it can only rotate the sum back: every site of the round must rotate alike. The signs are therefore public
and the same for all: drawn from the round's secure-aggregation session value (drawn jointly by the sites in
the protocol's steps 1 to 3, and known to the server too) and the round number, by AES-CTR
(:func:`~confide.privacy.secagg.prg.expand`, the same bits under any numpy). They protect nothing; a site's
secret randomness goes only into its dither.

The sums (:data:`confide.core.SUMMED`: examples, mean loss, steps, the clipping bits) travel in the masked
vector after the update, as they do under the fixed point. Quantized to 2^(q-1) - 1 levels they would be far
too coarse (the number of examples to a few thousand), so each is cut into digits that are levels of the grid
and rounded to nearest (dither 1/2), which carries them exactly: the server recombines the digits' exact
integer sums. Each value is first written as a whole number of its unit (:data:`UNITS`) offset by its
bound, so that every digit is >= 0.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

import numpy as np

from confide.compress.quantize import BLOCK, hadamard, padded_size
from confide.privacy.secagg import prg
from confide.privacy.secagg.fixedpoint import FixedPoint

UNITS: dict[str, float] = {"examples": 1.0, "loss": 2.0**-16, "steps": 1.0, "compute_seconds": 2.0**-4}
"""The resolution each sum travels in under quantization (a bit of any other layer: 2^-16)."""
DEFAULT_UNIT = 2.0**-16
ROTATED_SPREAD = 6.0
"""After the rotation a coordinate of a block of norm C is about N(0, C^2 / 1024) (and a distributed-noise
share stays Gaussian): R = 6 standard deviations clips about one coordinate in 5e8."""


def rotated_range(clip_norm: float, noise_spread: float = 0.0) -> float:
    """The default R with the rotation: six standard deviations of a rotated coordinate of an update clipped
    to ``clip_norm``, with ``noise_spread`` clip_norm of Gaussian noise per coordinate on top (a site's share
    of distributed DP's noise): 6 sqrt(C^2 / 1024 + (s C)^2)."""
    return ROTATED_SPREAD * clip_norm * math.sqrt(1.0 / BLOCK + noise_spread**2)


def rotation_signs(session: bytes, round: int, size: int) -> np.ndarray:
    """The random signs D of a round's rotation: public, from the session value every party of the round
    holds, and the same at every site and at the server."""
    seed = hashlib.sha256(b"confide.secagg.rotation\x00" + session + round.to_bytes(8, "little")).digest()
    bits = np.unpackbits(prg.expand(seed, math.ceil(size / 8), "u1"), count=size, bitorder="little")
    return 1.0 - 2.0 * bits.astype(np.float64)


def rotate(vector: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """H D x for each block of ``vector``, padded with zeros to whole blocks (float64)."""
    flat = np.zeros(padded_size(vector.size), dtype=np.float64)
    flat[: vector.size] = vector
    return hadamard((flat * signs).reshape(-1, BLOCK)).reshape(-1)


def unrotate(rotated: np.ndarray, signs: np.ndarray, size: int) -> np.ndarray:
    """x from H D x (H and D are their own inverses), the padding cut off."""
    return (hadamard(rotated.reshape(-1, BLOCK)).reshape(-1) * signs)[:size]


class Digits:
    """The sums of :data:`UNITS` (bounded by ``bounds``) as exact digits on the grid of a quantized encoding.

    The grid of q >= 2 bits is the 2L + 1 levels -L..L, so a digit d in [0, 2L] travels as the level d - L;
    the grid of one bit is the levels -1 and +1, so a digit d in [0, 1] travels as 2d - 1. Either way a level
    g0 + s d, and the server gets sum(d) = (sum(level) - n g0) / s over the n sites of the sum.
    """

    def __init__(self, keys: Sequence[str], bounds: Mapping[str, float], encoding: FixedPoint) -> None:
        self.keys = tuple(keys)
        self.encoding = encoding
        levels = encoding.levels
        one_bit = encoding.quantize_bits == 1
        self.base, self.lowest, self.stride = (2, -1, 2) if one_bit else (2 * levels + 1, -levels, 1)
        self.offsets = {key: round(bounds[key] / UNITS.get(key, DEFAULT_UNIT)) for key in self.keys}
        self.counts = {key: self._digits(2 * self.offsets[key]) for key in self.keys}
        self.size = sum(self.counts.values())

    def _digits(self, largest: int) -> int:
        count = 1
        while self.base**count <= largest:
            count += 1
        return count

    def encode(self, sums: Mapping[str, float], bounds: Mapping[str, float]) -> np.ndarray:
        """The float32 values whose encoding (rounded to nearest) is each sum's digits' levels."""
        digits: list[int] = []
        for key in self.keys:
            value = float(sums.get(key, 0.0))
            if not math.isfinite(value):
                value = 0.0
            value = max(-bounds[key], min(bounds[key], value))
            units = round(value / UNITS.get(key, DEFAULT_UNIT)) + self.offsets[key]
            units = min(max(units, 0), 2 * self.offsets[key])
            for _ in range(self.counts[key]):
                units, digit = divmod(units, self.base)
                digits.append(digit)
        levels = self.lowest + self.stride * np.array(digits, dtype=np.float64)
        return (levels / self.encoding.scale).astype(np.float32)

    def decode(self, level_sums: np.ndarray, sites: int) -> dict[str, float]:
        """The sums over ``sites`` sites from the exact integer sums of their digits' levels."""
        values: dict[str, float] = {}
        position = 0
        for key in self.keys:
            units = 0
            for i in range(self.counts[key]):
                total = int(level_sums[position + i]) - sites * self.lowest
                units += (total // self.stride) * self.base**i
            position += self.counts[key]
            values[key] = (units - sites * self.offsets[key]) * UNITS.get(key, DEFAULT_UNIT)
        return values
