"""Update validation: the server refuses an update it can read that no honest site could have sent.

A malformed or hostile update costs its site the round, never the run: the federation records the refusal
and goes on without it. Checks here need each site's own vector, so they run only where the server can read
it (the stack check refuses them after secure aggregation, whose own range check takes their place).
"""

from __future__ import annotations

import numpy as np

from confide.core import Update
from confide.errors import UpdateError
from confide.pipeline import Layer, RoundContext, StackContext, Traits


class ValidateLayer(Layer):
    """Shape and finiteness of every readable update."""

    name = "validate"
    traits = Traits(needs_individual_updates=True)

    @classmethod
    def from_config(cls, stack: StackContext) -> Layer | None:
        # Under secure aggregation its range check does it; under encryption nothing on the server can.
        hidden = stack.secure is not None or stack.config.privacy.encryption != "none"
        return None if hidden else cls()

    def decode(self, update: Update, round: RoundContext) -> Update | None:
        if update.vector is None:
            return update  # a protected payload: the layer that protects it checks it
        size = round.weights.size if round.shared is None else round.shared.size
        vector = update.readable(size)
        if vector.dtype != np.float32:
            raise UpdateError(f"site {update.site!r} sent {vector.dtype} values; updates are float32")
        if not np.isfinite(vector).all():
            raise UpdateError(
                f"the update of site {update.site!r} holds NaN or infinite values "
                "(its local training diverged, or it is hostile)"
            )
        return update
