"""What every compression layer shares: payload arrays as little-endian bytes, read back with checks.

The wire (:mod:`confide.runtime.grpc.wire`) carries float32, float64, int64 and uint8 arrays; compressed
values of other widths (uint16 levels, uint32 indices, float16) travel as uint8 views of their
little-endian bytes, so nothing on the wire changes for them and a byte counted is a byte sent.
"""

from __future__ import annotations

import numpy as np

from confide.core import Update
from confide.errors import UpdateError
from confide.pipeline import RoundContext, SiteContext

PREFIX = "compressed_"
"""Prefix of the payload names the compression layers write (other layers' payload entries pass through)."""


def as_bytes(array: np.ndarray, dtype: str) -> np.ndarray:
    """``array`` as the uint8 view of its values in the little-endian ``dtype`` (e.g. ``"<u2"``)."""
    return np.ascontiguousarray(array, dtype=np.dtype(dtype)).view(np.uint8)


def read_bytes(update: Update, name: str, dtype: str, count: int, what: str) -> np.ndarray:
    """The payload entry ``name`` as ``count`` values of the little-endian ``dtype``; an UpdateError that
    names the site and ``what`` it should be when it is missing or of the wrong type or size."""
    array = update.payload.get(PREFIX + name)
    itemsize = np.dtype(dtype).itemsize
    if not isinstance(array, np.ndarray) or array.dtype != np.uint8 or array.ndim != 1:
        raise UpdateError(
            f"the compressed update of site {update.site!r} lacks {what} ({PREFIX + name!r}: a flat uint8 "
            "array); the site and the server must run the same [compression] settings"
        )
    if array.size != count * itemsize:
        raise UpdateError(
            f"the compressed update of site {update.site!r} holds {array.size} bytes of {what}; "
            f"{count * itemsize} were expected ({count} values of {np.dtype(dtype).name}); the site and the "
            "server must run the same [compression] settings"
        )
    return np.ascontiguousarray(array).view(np.dtype(dtype))


def read_floats(update: Update, name: str, count: int, what: str) -> np.ndarray:
    """The float32 payload entry ``name`` of ``count`` finite values (UpdateError otherwise)."""
    array = update.payload.get(PREFIX + name)
    if not isinstance(array, np.ndarray) or array.dtype != np.float32 or array.shape != (count,):
        raise UpdateError(
            f"the compressed update of site {update.site!r} must carry {what} as {count} float32 values "
            f"({PREFIX + name!r})"
        )
    if not np.isfinite(array).all():
        raise UpdateError(f"the compressed update of site {update.site!r} holds NaN or infinite {what}")
    return array


def expected_size(round: RoundContext) -> int:
    """How many values an update of this round has (the model's, or the shared part's under FedRep)."""
    return int(round.weights.size if round.shared is None else round.shared.size)


def take_vector(update: Update, layer: str) -> np.ndarray:
    """The update's clear vector, which a compression layer needs (UpdateError if a layer took it)."""
    if update.vector is None:
        raise UpdateError(
            f"site {update.site!r}: {layer} needs the update's vector, but a layer before it replaced the "
            "vector by a payload; compression comes after clipping and noise and before protection"
        )
    return update.vector


def check_finite(update: Update, vector: np.ndarray, layer: str) -> np.ndarray:
    """``vector`` if every value is finite; an UpdateError (the site drops out of the round) otherwise."""
    if not np.isfinite(vector).all():
        raise UpdateError(
            f"the update of site {update.site!r} holds NaN or infinite values, which {layer} cannot encode "
            "(its local training diverged)"
        )
    return vector


def compressed(update: Update, entries: dict[str, np.ndarray]) -> Update:
    """``update`` with its vector replaced by the payload ``entries`` (named under :data:`PREFIX`)."""
    update.vector = None
    for name, array in entries.items():
        update.payload[PREFIX + name] = array
    return update


def restored(update: Update, vector: np.ndarray, names: tuple[str, ...]) -> Update:
    """``update`` with its compressed payload entries ``names`` replaced by the decoded float32 vector."""
    if not np.isfinite(vector).all():
        raise UpdateError(f"the compressed update of site {update.site!r} decodes to NaN or infinite values")
    for name in names:
        update.payload.pop(PREFIX + name, None)
    update.vector = np.ascontiguousarray(vector, dtype=np.float32)
    return update


def with_residual(update: Update, vector: np.ndarray, site: SiteContext, key: str) -> np.ndarray:
    """``vector`` plus what this site kept back under ``key`` in its durable state (error feedback), or
    ``vector`` alone if it has kept nothing yet; an UpdateError if the site keeps no state."""
    if site.state is None:
        raise UpdateError(
            f"site {update.site!r}: error feedback keeps the unsent values in the site's state, and the site "
            "has none; set compression.error_feedback = false"
        )
    residual = site.state.get(update.site, key)
    if residual is not None and residual.shape == vector.shape:
        return vector + residual
    return vector
