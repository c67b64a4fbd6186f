"""Fixed-point encoding of float32 vectors into the ring Z_(2^b), with room for the sum of n of them.

Two encodings share this ring: the fixed point below (many levels, rounded to nearest), and stochastic
quantization to a few levels (``quantize_bits``, further down), which makes the masked vector itself small.

Masks cancel exactly only in integer arithmetic, so each site rounds its update to a multiple of 2^-f after
clipping every coordinate to [-R, R]: q = round(clip(x, -R, R) * 2^f), an integer with
|q| <= M = ceil(R * 2^f). The sum of n such integers lies in [-n*M, n*M]; with b bits and two's complement,
the ring Z_(2^b) holds every integer in [-2^(b-1), 2^(b-1)), so

    b = bit_length(n * M) + 1        (the smallest b with 2^(b-1) > n * M)

guarantees that the sum of any n encoded updates never wraps around and decodes to the exact integer sum.
Arithmetic mod 2^b runs in uint32 arrays when b <= 32 and in uint64 otherwise: numpy's unsigned arithmetic
wraps mod 2^32 (or 2^64), and since 2^b divides that, reducing with ``& (2^b - 1)`` at the end gives the
result mod 2^b. Rounding costs at most 2^-(f+1) per value and site, so a decoded sum is within n * 2^-(f+1)
of the float sum of the clipped vectors.

Quantized (``quantize_bits`` = q >= 1): each coordinate is clipped to [-R, R] and scaled to L levels each
side of zero, L = 2^(q-1) - 1 (q = 1: the two levels -1 and +1, with L = 1), then rounded *stochastically*:
y = clip(x, -R, R) L / R becomes floor(y + u) with u uniform on [0, 1) (q = 1: 2 floor((y + 1) / 2 + u) - 1),
so E[level] = y and the decoded sum is unbiased (QSGD, Alistarh et al. 2017; stochastic rounding into the
secure-aggregation field as in Kairouz, Liu and Steinke 2021, "The Distributed Discrete Gaussian Mechanism",
and Chen et al. 2022, "The Fundamental Price of Secure Aggregation in Differentially Private Federated
Learning"). Now M = L, and the same headroom rule b = bit_length(n L) + 1 holds: 8-bit quantization of 100
sites' updates needs b = 16, against 28 for the default fixed point. Each value then errs by less than one
step R / L, with variance at most (R / L)^2 / 4. The dither u is the caller's (a site's secret randomness);
a coordinate that must arrive exactly (an integer on the grid) takes u = 1/2, which rounds to nearest.

Vectors are flat float32 numpy arrays, as everywhere in confide (``confide.core.Vector``, not imported here
so that the cryptographic code does not pull in torch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from confide.errors import ConfigError

MAX_MODULUS_BITS = 64
MAX_QUANTIZE_BITS = 16
MAX_MAGNITUDE = 1 << 53
"""Largest |q| encoded: float64 holds every integer up to 2^53 exactly, so rounding stays exact."""


@dataclass(frozen=True)
class FixedPoint:
    """Encoding of values in [-clip_range, clip_range] with ``fractional_bits`` bits after the point, for
    sums of up to ``sites`` vectors."""

    clip_range: float
    fractional_bits: int
    sites: int
    quantize_bits: int = 0
    """q: 0 for the fixed point with ``fractional_bits``; 1 to 16 for stochastic quantization to
    2^(q-1) - 1 levels each side of zero (1: the levels -1 and +1), where ``fractional_bits`` is unused."""

    def __post_init__(self) -> None:
        if isinstance(self.quantize_bits, bool) or not 0 <= self.quantize_bits <= MAX_QUANTIZE_BITS:
            raise ConfigError(
                f"quantization bits must be 0 (fixed point) or 1 to {MAX_QUANTIZE_BITS} (got "
                f"{self.quantize_bits!r})"
            )
        if not (math.isfinite(self.clip_range) and self.clip_range > 0):
            raise ConfigError(f"the clipping range R must be a finite number > 0 (got {self.clip_range})")
        if not 0 <= self.fractional_bits <= 52:
            raise ConfigError(f"fractional_bits must be between 0 and 52 (got {self.fractional_bits})")
        if self.sites < 1:
            raise ConfigError(f"the fixed-point encoding needs at least 1 site (got {self.sites})")
        if self.max_magnitude > MAX_MAGNITUDE:
            raise ConfigError(
                f"clip_range {self.clip_range} with {self.fractional_bits} fractional bits needs integers of "
                f"{self.max_magnitude.bit_length()} bits; at most 53 fit exactly: lower one of them"
            )
        if self.modulus_bits > MAX_MODULUS_BITS:
            raise ConfigError(
                f"the sum of {self.sites} updates clipped to ±{self.clip_range} with {self.fractional_bits} "
                f"fractional bits needs {self.modulus_bits} bits, more than {MAX_MODULUS_BITS}: lower "
                "fractional_bits or clip_range"
            )

    @property
    def quantized(self) -> bool:
        return self.quantize_bits > 0

    @property
    def levels(self) -> int:
        """L: the levels each side of zero of the quantized encoding (0 for the fixed point)."""
        if not self.quantized:
            return 0
        return max(1, (1 << (self.quantize_bits - 1)) - 1)

    @property
    def scale(self) -> float:
        """Encoded units per unit of value: 2^f, or L / R when quantized."""
        if self.quantized:
            return self.levels / self.clip_range
        return float(2.0**self.fractional_bits)

    @property
    def max_magnitude(self) -> int:
        """M: the largest absolute value of one encoded coordinate, ceil(R * 2^f) or L when quantized."""
        if self.quantized:
            return self.levels
        return math.ceil(self.clip_range * 2**self.fractional_bits)

    @property
    def modulus_bits(self) -> int:
        """b: the sums live in Z_(2^b), with b = bit_length(n * M) + 1."""
        return (self.sites * self.max_magnitude).bit_length() + 1

    @property
    def mask(self) -> int:
        return (1 << self.modulus_bits) - 1

    @property
    def dtype(self) -> np.dtype:
        """The unsigned little-endian integer type the masked vectors travel in."""
        return np.dtype("<u4") if self.modulus_bits <= 32 else np.dtype("<u8")

    def encode(self, vector: np.ndarray, dither: np.ndarray | None = None) -> np.ndarray:
        """Clip, scale and round ``vector``; return it in Z_(2^b) (two's complement, as unsigned integers).

        The vector must be finite: NaN has no fixed-point value (the caller checks, since only the site
        can: after masking the server sees uniform noise). ``dither``: the quantized encoding's u, one
        value in [0, 1) per coordinate (required when quantized, refused otherwise).
        """
        scaled = np.clip(vector.astype(np.float64), -self.clip_range, self.clip_range)
        scaled *= self.scale
        if self.quantized:
            integers = self._quantize(scaled, dither)
        else:
            if dither is not None:
                raise ValueError("the fixed-point encoding rounds to nearest; it takes no dither")
            integers = np.rint(scaled, out=scaled).astype(np.int64)
        # int64 -> unsigned is two's complement modulo 2^32 or 2^64 in numpy, so negatives wrap as wanted.
        encoded = integers.astype(self.dtype)
        encoded &= self.dtype.type(self.mask)
        return encoded

    def _quantize(self, scaled: np.ndarray, dither: np.ndarray | None) -> np.ndarray:
        """floor(y + u) on the grid, clamped to [-L, L] (y = L (1 + 2^-52) must not become L + 1)."""
        if dither is None or dither.shape != scaled.shape:
            raise ValueError(
                f"the quantized encoding needs one dither value per coordinate ({scaled.shape}), got "
                f"{None if dither is None else dither.shape}"
            )
        if not ((dither >= 0) & (dither < 1)).all():
            raise ValueError("dither values must lie in [0, 1)")
        if self.quantize_bits == 1:  # the two levels -1 and +1
            integers = 2 * np.floor((scaled + 1.0) / 2.0 + dither).astype(np.int64) - 1
        else:
            integers = np.floor(scaled + dither).astype(np.int64)
        return np.clip(integers, -self.max_magnitude, self.max_magnitude)

    def signed(self, total: np.ndarray) -> np.ndarray:
        """The integers (int64) that ``total`` (in Z_(2^b), possibly not yet reduced) stands for."""
        bits = self.modulus_bits
        if bits == 64:
            return total.astype(np.uint64).view(np.int64)
        values = (total & total.dtype.type(self.mask)).astype(np.int64)
        values -= (values >> (bits - 1)) << bits
        return values

    def decode(self, total: np.ndarray) -> np.ndarray:
        """The float32 vector a sum in Z_(2^b) stands for: its signed integers times 2^-f (R / L when
        quantized)."""
        return (self.signed(total).astype(np.float64) / self.scale).astype(np.float32)
