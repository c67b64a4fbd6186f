"""Half-precision transport: each update sent as float16 or bfloat16, half the bytes of float32.

float16 keeps 11 significant bits over a range of +-65504 (values below 6e-8 flush to zero); bfloat16 keeps
float32's range with 8 significant bits. Both round to nearest (even), which is deterministic and slightly
biased per value, unlike :mod:`~confide.compress.quantize`'s stochastic rounding. numpy has no bfloat16: it
is the upper 16 bits of a float32, rounded to nearest even, which is what torch and the accelerators use.
"""

from __future__ import annotations

import numpy as np

from confide.compress.codec import (
    as_bytes,
    check_finite,
    compressed,
    expected_size,
    read_bytes,
    restored,
    take_vector,
)
from confide.core import Update, Vector
from confide.errors import ConfigError, UpdateError
from confide.pipeline import Layer, RoundContext, SiteContext, StackContext

KINDS = ("float16", "bfloat16")
FLOAT16_MAX = float(np.finfo(np.float16).max)


def to_bfloat16(vector: Vector) -> np.ndarray:
    """The bfloat16 bits (uint16) of finite float32 values, rounded to nearest even."""
    bits = np.ascontiguousarray(vector, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def from_bfloat16(bits: np.ndarray) -> Vector:
    """float32 values of bfloat16 bits."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


class CastLayer(Layer):
    """Each update sent in half precision (``kind``: 'float16' or 'bfloat16')."""

    name = "cast"

    @classmethod
    def from_config(cls, stack: StackContext) -> Layer | None:
        kind = stack.config.compression.kind
        return cls(kind) if kind in KINDS else None

    def __init__(self, kind: str) -> None:
        if kind not in KINDS:
            raise ConfigError(f"a cast's kind must be one of {', '.join(map(repr, KINDS))} (got {kind!r})")
        self.kind = kind

    def encode(self, update: Update, site: SiteContext) -> Update:
        vector = check_finite(update, take_vector(update, self.kind), self.kind)
        if self.kind == "float16":
            if vector.size and float(np.abs(vector).max()) > FLOAT16_MAX:
                raise UpdateError(
                    f"the update of site {update.site!r} has values beyond float16's range (+-65504); use "
                    "compression.kind = 'bfloat16', which keeps float32's range"
                )
            bits = np.asarray(vector, dtype=np.float16).view(np.uint16)
        else:
            bits = to_bfloat16(vector)
        return compressed(update, {self.kind: as_bytes(bits, "<u2")})

    def decode(self, update: Update, round: RoundContext) -> Update | None:
        if update.vector is not None:
            raise UpdateError(
                f"site {update.site!r} sent a plain vector, but this run sends {self.kind} updates "
                f"([compression] kind = {self.kind!r}); the site must run the same config"
            )
        bits = read_bytes(update, self.kind, "<u2", expected_size(round), f"{self.kind} values")
        vector = bits.view(np.float16).astype(np.float32) if self.kind == "float16" else from_bfloat16(bits)
        return restored(update, vector, (self.kind,))

    def describe(self) -> str:
        """One line for the run display."""
        return f"update compression: each value sent as {self.kind}, 2 bytes instead of 4"

    def __repr__(self) -> str:
        return f"CastLayer({self.kind!r})"
