"""Unbiased stochastic quantization to b bits per value, optionally after a random Hadamard rotation.

The update is cut into blocks of :data:`BLOCK` values (the last one padded with zeros). Each block is sent as
its minimum ``lo``, its step ``(max - lo) / (2^b - 1)`` and one b-bit level per value, packed tight (QSGD,
Alistarh et al. 2017, with a per-block range). A value x with ``y = (x - lo) / step`` becomes the level
``floor(y + u)``, u uniform on [0, 1) (stochastic rounding): E[level] = y, so the server's estimate is
unbiased, and it is off by less than one step. Uniform quantization's error grows with the block's range,
which one large coordinate sets for the whole block; a random rotation spreads every coordinate over the block
first (Suresh et al. 2017, "Distributed Mean Estimation with Limited Communication"; DRIVE, Vargaftik et al.
2021): multiply by random signs D, then by the normalized Walsh-Hadamard matrix H. The server undoes both
(H is its own inverse and orthonormal, D squares to one), so the rotation changes the error, not the mean.

Randomness: the rotation's signs protect nothing, they only spread the coordinates, so they come from a
seed both sides know (the site's plan seed and its name; the server reads the same plan). The dither u is
the site's own secret randomness (:class:`~confide.randomness.SecretRandomness`): quantization after the DP
noise is post-processing, and the server has no reason to know the site's coins.

Under secure aggregation this layer steps aside: the server never sees one site's update, so per-site block
ranges and per-site rotations cannot be undone on the sum; the secure-aggregation layer quantizes into its
ring with one range R and a rotation common to the round instead (:mod:`confide.privacy.quantized`), reusing
:func:`hadamard` and :func:`padded_size` from here.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

from confide.compress.codec import (
    as_bytes,
    check_finite,
    compressed,
    expected_size,
    read_bytes,
    read_floats,
    restored,
    take_vector,
)
from confide.core import Plan, Update
from confide.errors import ConfigError, UpdateError
from confide.pipeline import Layer, RoundContext, SiteContext, StackContext

BLOCK = 1024
"""Values per block: each has its own range (8 bytes per block: 1/16 of a bit per value) and, with the
rotation, its own Hadamard transform. A power of two, so a block needs no padding; only the last is padded."""


def padded_size(size: int) -> int:
    """``size`` rounded up to whole blocks."""
    return max(1, math.ceil(size / BLOCK)) * BLOCK


def hadamard(blocks: np.ndarray) -> np.ndarray:
    """The normalized Walsh-Hadamard transform of each row of ``blocks`` (rows of a power-of-two length).

    The fast transform: log2(n) butterfly passes over the whole array, each a vectorised sum and difference
    of halves; H / sqrt(n) is symmetric and orthonormal, so it is its own inverse.
    """
    rows, n = blocks.shape
    if n & (n - 1):
        raise ValueError(f"the Hadamard transform needs a power-of-two length (got {n})")
    out = np.array(blocks, dtype=np.float64)
    h = 1
    while h < n:
        pairs = out.reshape(rows, n // (2 * h), 2, h)
        first, second = pairs[:, :, 0, :].copy(), pairs[:, :, 1, :]
        pairs[:, :, 0, :] += second
        pairs[:, :, 1, :] = first - second
        h *= 2
    out *= 1.0 / math.sqrt(n)
    return out


def rotation_signs(plan: Plan, site: str, size: int) -> np.ndarray:
    """The random signs D of ``site``'s rotation in the round of ``plan``: public, the same on both sides."""
    digest = hashlib.sha256(f"confide.compress.rotation:{plan.seed}:{site}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:16], "little"))
    return rng.integers(0, 2, size=size, dtype=np.int8).astype(np.float64) * 2.0 - 1.0


def pack(levels: np.ndarray, bits: int) -> np.ndarray:
    """Levels below 2^bits, ``bits`` bits each, as bytes (8 and 16 bits: plain little-endian bytes)."""
    if bits == 8:
        return as_bytes(levels, "u1")
    if bits == 16:
        return as_bytes(levels, "<u2")
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint16)
    digits = ((levels.astype(np.uint16)[:, None] >> shifts) & 1).astype(np.uint8)
    return np.packbits(digits.reshape(-1))


def unpack(data: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The ``count`` levels of ``bits`` bits each that :func:`pack` wrote into ``data``."""
    if bits == 8:
        return data.astype(np.uint32)
    if bits == 16:
        return data.view("<u2").astype(np.uint32)
    digits = np.unpackbits(data, count=count * bits).reshape(count, bits).astype(np.uint32)
    return digits @ (np.uint32(1) << np.arange(bits - 1, -1, -1, dtype=np.uint32))


def packed_bytes(count: int, bits: int) -> int:
    return math.ceil(count * bits / 8)


class QuantizeLayer(Layer):
    """Each update sent as b-bit levels per value with a range per block of :data:`BLOCK` values (uniform
    stochastic quantization, unbiased), optionally after a random Hadamard rotation (``rotate``)."""

    name = "quantize"

    @classmethod
    def from_config(cls, stack: StackContext) -> Layer | None:
        c = stack.config.compression
        # Under secure aggregation the secure-aggregation layer quantizes into its own ring instead
        # (:mod:`confide.privacy.quantized`): a payload here would leave it nothing to mask.
        return cls(c.bits, c.rotate) if c.kind == "quantize" and stack.secure is None else None

    def __init__(self, bits: int, rotate: bool = False) -> None:
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
            raise ConfigError(f"compression.bits must be a whole number from 1 to 16 (got {bits!r})")
        self.bits = bits
        self.rotate = rotate
        self.levels = (1 << bits) - 1

    def encode(self, update: Update, site: SiteContext) -> Update:
        vector = check_finite(update, take_vector(update, "quantization"), "quantization")
        size = vector.size
        flat = np.zeros(padded_size(size), dtype=np.float64)
        flat[:size] = vector
        blocks = flat.reshape(-1, BLOCK)
        if self.rotate:
            blocks = hadamard(blocks * rotation_signs(site.plan, update.site, blocks.size).reshape(-1, BLOCK))
        lo = blocks.min(axis=1, keepdims=True)
        step = (blocks.max(axis=1, keepdims=True) - lo) / self.levels
        step[step == 0] = 1.0  # a constant block: every value is lo, level 0
        # float32 ranges, rounded as the server will read them, so the levels are computed against those.
        lo, step = lo.astype(np.float32).astype(np.float64), step.astype(np.float32).astype(np.float64)
        scaled = (blocks - lo) / step
        dither = site.randomness.uniform(scaled.size).reshape(scaled.shape)
        levels = np.clip(np.floor(scaled + dither), 0, self.levels).astype(np.uint16).reshape(-1)
        ranges = np.concatenate([lo, step], axis=1).astype(np.float32).reshape(-1)
        return compressed(update, {"levels": pack(levels, self.bits), "ranges": ranges})

    def decode(self, update: Update, round: RoundContext) -> Update | None:
        if update.vector is not None:
            raise UpdateError(
                f"site {update.site!r} sent a plain vector, but this run quantizes updates "
                f"([compression] kind = 'quantize'); the site must run the same config"
            )
        size = expected_size(round)
        padded = padded_size(size)
        data = read_bytes(update, "levels", "u1", packed_bytes(padded, self.bits), f"{self.bits}-bit levels")
        ranges = read_floats(update, "ranges", 2 * (padded // BLOCK), "block ranges").reshape(-1, 2)
        if (ranges[:, 1] < 0).any():
            raise UpdateError(f"the quantized update of site {update.site!r} has a negative step")
        levels = unpack(data, self.bits, padded).reshape(-1, BLOCK)  # b bits hold no level above 2^b - 1
        blocks = ranges[:, :1].astype(np.float64) + levels * ranges[:, 1:].astype(np.float64)
        if self.rotate:
            task = round.tasks.get(update.site)
            if task is None:
                raise UpdateError(f"site {update.site!r} sent an update but was given no task this round")
            blocks = hadamard(blocks).reshape(-1) * rotation_signs(task.plan, update.site, padded)
        return restored(update, blocks.reshape(-1)[:size], ("levels", "ranges"))

    def describe(self) -> str:
        """One line for the run display."""
        rotated = " after a random Hadamard rotation" if self.rotate else ""
        per_value = self.bits / 8 + 8 / BLOCK
        return (
            f"update compression: stochastic quantization to {self.bits} bits per value{rotated}, "
            f"{per_value:.3f} bytes per value instead of 4"
        )

    def __repr__(self) -> str:
        return f"QuantizeLayer(bits={self.bits}, rotate={self.rotate})"
