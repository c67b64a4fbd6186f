"""Top-k sparsification with error feedback: each site sends only its k largest values, and keeps the rest.

A site sends the k = ceil(fraction x d) coordinates of largest magnitude, as uint32 indices and float32
values (8 bytes for each value kept, so fraction f sends 2f of the plain update's bytes). Without more, what
is not sent is lost, and small but consistent coordinates never arrive. Error feedback (Seide et al. 2014;
Stich et al. 2018, "Sparsified SGD with Memory"; Deep Gradient Compression, Lin et al. 2018) keeps the
residual, the part of the vector that was not sent, and adds it to the site's next update, so every
coordinate arrives eventually. The residual lives in the site's durable state
(:class:`~confide.client.state.SiteState`), so a restarted site process does not lose it.

With DP: the residual carries the site's earlier clipped (and noised) updates into later rounds, so the
vector sent may be longer than the clip norm; under central DP the server re-clips what it decodes
(:class:`~confide.privacy.dp.ClipLayer`), so each round still moves the sum by at most C.
"""

from __future__ import annotations

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
    with_residual,
)
from confide.core import Update
from confide.errors import ConfigError, UpdateError
from confide.pipeline import Layer, RoundContext, SiteContext, StackContext

RESIDUAL_KEY = "compress.residual"
"""The site-state key of the error-feedback residual."""


def kept(size: int, fraction: float) -> int:
    """How many of ``size`` values top-k sends at ``fraction``: at least one."""
    return max(1, min(size, math.ceil(fraction * size)))


class TopKLayer(Layer):
    """Each update sent as its ``fraction`` largest-magnitude values and their indices; with
    ``error_feedback`` the site adds what it did not send to its next update."""

    name = "topk"

    @classmethod
    def from_config(cls, stack: StackContext) -> Layer | None:
        c = stack.config.compression
        return cls(c.fraction, c.error_feedback) if c.kind == "topk" else None

    def __init__(self, fraction: float, error_feedback: bool = True) -> None:
        if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction <= 1:
            raise ConfigError(f"compression.fraction must lie in (0, 1] (got {fraction!r})")
        self.fraction = float(fraction)
        self.error_feedback = error_feedback

    def encode(self, update: Update, site: SiteContext) -> Update:
        vector = check_finite(update, take_vector(update, "top-k sparsification"), "top-k sparsification")
        if self.error_feedback:
            vector = with_residual(update, vector, site, RESIDUAL_KEY)
        k = kept(vector.size, self.fraction)
        indices = np.sort(np.argpartition(np.abs(vector), vector.size - k)[vector.size - k :])
        values = vector[indices].astype(np.float32)
        if self.error_feedback:
            rest = np.array(vector, dtype=np.float32, copy=True)
            rest[indices] = 0.0
            site.state.put(update.site, RESIDUAL_KEY, site.plan.round, rest)
        return compressed(update, {"indices": as_bytes(indices, "<u4"), "values": values})

    def decode(self, update: Update, round: RoundContext) -> Update | None:
        if update.vector is not None:
            raise UpdateError(
                f"site {update.site!r} sent a plain vector, but this run sparsifies updates "
                "([compression] kind = 'topk'); the site must run the same config"
            )
        size = expected_size(round)
        k = kept(size, self.fraction)
        indices = read_bytes(update, "indices", "<u4", k, "top-k indices")
        values = read_floats(update, "values", k, "top-k values")
        # Strictly increasing and in range: a repeated index would count one coordinate twice.
        if (indices.size and int(indices[-1]) >= size) or (np.diff(indices.astype(np.int64)) <= 0).any():
            raise UpdateError(
                f"the top-k update of site {update.site!r} has indices out of range (0 to {size - 1}), "
                "repeated or out of order"
            )
        vector = np.zeros(size, dtype=np.float32)
        vector[indices] = values
        return restored(update, vector, ("indices", "values"))

    def describe(self) -> str:
        """One line for the run display."""
        feedback = ", the rest kept for the next update" if self.error_feedback else ", the rest dropped"
        return (
            f"update compression: top-k, the {self.fraction:.2%} largest values sent{feedback}; "
            f"{8 * self.fraction:.3f} bytes per value instead of 4"
        )

    def __repr__(self) -> str:
        return f"TopKLayer(fraction={self.fraction}, error_feedback={self.error_feedback})"
