"""A coordinate subset common to a round: under secure aggregation, every site sends the same random fraction
of its update's values, and keeps the rest for later rounds (error feedback).

Secure aggregation can only add what every site sends in the same places, so top-k (each site its own
largest values) cannot run with it, and quantization alone stops at the ring's headroom: the sum of n sites'
levels needs bit_length(n L) + 1 bits a value, 5 bits for 10 sites even at one bit a level. Fewer values is
the way further. Each round, both sides draw the same subset S of ``compression.subset`` x d coordinates from
the run's seed and the round (public: it hides nothing, and the server could choose it without harm); each
site sends its update on S, the server's sum lives on S, and the model moves on S only
(:attr:`~confide.pipeline.RoundContext.shared`, the same mechanism that shares FedRep's body).

Error feedback (Stich et al. 2018; Karimireddy et al. 2019, "Error Feedback Fixes SignSGD"): a site adds
what it did not send before to its update, sends that on S, and keeps the rest in its durable state, so
every value is sent eventually, in some later round the site takes part in.

DP. The layer sits after clipping and before any noise. What a site sends is clipped again to the clip norm
C (the residual can make its vector longer than C), so each round's sum still moves by at most C per site,
and the noise added after it (each site's share under distributed DP, or the server's under central DP) is a
Gaussian mechanism on those clipped vectors: the accountant is unchanged. The residual is the site's own
data and never leaves it except through later rounds, each of which is clipped and noised the same way.
"""

from __future__ import annotations

import math

import numpy as np

from confide.compress.codec import check_finite, take_vector, with_residual
from confide.core import Update
from confide.errors import ConfigError
from confide.pipeline import Layer, RoundContext, SiteContext, StackContext
from confide.privacy.dp import l2_norm
from confide.randomness import Stream, public_rng

RESIDUAL_KEY = "compress.subset_residual"
"""The site-state key of what a site has not sent yet."""


def subset_size(size: int, fraction: float) -> int:
    """How many of ``size`` values a round's subset holds at ``fraction``: at least one."""
    return max(1, min(size, math.ceil(fraction * size)))


def subset(seed: int, round: int, size: int, fraction: float) -> np.ndarray:
    """The sorted positions every site of ``round`` sends (public: from the run's seed and the round)."""
    rng = public_rng(seed, round, Stream.SUBSET)
    return np.sort(rng.choice(size, subset_size(size, fraction), replace=False)).astype(np.int64)


class SubsetLayer(Layer):
    """Each site sends its update (plus what it kept back) on the round's common subset, clipped to C."""

    name = "subset"

    @classmethod
    def from_config(cls, stack: StackContext) -> Layer | None:
        c = stack.config.compression
        if c.subset >= 1:
            return None
        clip_norm = stack.dp.clip_norm if stack.dp is not None else None
        return cls(c.subset, stack.config.run.seed, c.error_feedback, clip_norm)

    def __init__(
        self, fraction: float, seed: int, error_feedback: bool = True, clip_norm: float | None = None
    ) -> None:
        if not 0 < fraction < 1:
            raise ConfigError(f"compression.subset must lie in (0, 1) to send a subset (got {fraction!r})")
        self.fraction = float(fraction)
        self.seed = seed
        self.error_feedback = error_feedback
        self.clip_norm = clip_norm
        """Site-level DP's clip norm C (the plan's, when adaptive clipping moves it); None without DP."""

    def encode(self, update: Update, site: SiteContext) -> Update:
        vector = check_finite(update, take_vector(update, "the common subset"), "the common subset")
        if self.error_feedback:
            vector = with_residual(update, vector, site, RESIDUAL_KEY)
        positions = subset(self.seed, site.plan.round, vector.size, self.fraction)
        sent = np.array(vector[positions], dtype=np.float32)
        bound = self._bound(site)
        if bound is not None:
            norm = l2_norm(sent)
            if norm > bound:
                sent *= np.float32(bound / norm)
        if self.error_feedback:
            rest = np.array(vector, dtype=np.float32, copy=True)
            rest[positions] -= sent  # what was clipped off is kept too
            site.state.put(update.site, RESIDUAL_KEY, site.plan.round, rest)
        update.vector = sent
        return update

    def _bound(self, site: SiteContext) -> float | None:
        if self.clip_norm is None:
            return None
        return float(site.plan.clip_norm) if site.plan.clip_norm > 0 else self.clip_norm

    def begin(self, round: RoundContext) -> None:
        """The round's sum, and the model's step, live on the round's subset."""
        if round.shared is not None:
            raise ConfigError("compression.subset cannot run with a shared part of the model (FedRep)")
        round.shared = subset(self.seed, round.round, round.weights.size, self.fraction)
        round.aggregate = round.aggregator.init(round.shared.size)

    def describe(self) -> str:
        """One line for the run display."""
        feedback = "the rest kept for later rounds" if self.error_feedback else "the rest dropped"
        return (
            f"update compression: every site of a round sends the same {self.fraction:.0%} of the values "
            f"(drawn per round), {feedback}"
        )

    def __repr__(self) -> str:
        return f"SubsetLayer(fraction={self.fraction}, error_feedback={self.error_feedback})"
