"""Update screening: rules that refuse an update no honest site would send, each with its threshold.

* **Norm bound** (Sun et al. 2019, "Can you really backdoor federated learning?"): a model-replacement
  attacker scales its update up (Bagdasaryan et al. 2020) so that it survives averaging; an update longer than
  ``norm_bound`` is refused, or clipped to it (``norm_action = "clip"``, Sun et al.'s norm bounding).
* **Cosine** to the previous global update and to the round's coordinate-wise median update: an update that
  points away from where the federation is going (a sign flip, a backdoor in a direction of its own) is
  refused below ``min_cosine``. The median needs every update of the round, so the screen keeps the updates
  as they arrive and decides in :meth:`ScreenLayer.close`; the previous update is kept in the server state
  (checkpointed with the model).
* **Validation loss**: with a server-held validation set, the model moved by one update alone must not lose
  more than ``max_loss_increase`` nats per character against the model the round started from.

Every score goes into the round's ``scores`` (the run store keeps them per site: the anomaly history and the
reputation of :mod:`confide.server.reputation`); every refusal goes into ``rejected`` with its score, and
the runner records it as an event. The screen reads each site's own update, so it cannot run under secure
aggregation (the stack check refuses it; see the README's table of defences).

The screen is first in the stack, so the server decodes it last: it sees the updates as the aggregator will
(clipped by central DP's server-side clip). Because it keeps the updates until ``close``, layers after it in
decoding order get none of them; only the strategy's own layers would be there, and the config refuses the
strategies that have some (SCAFFOLD, FedNova) with the screen on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from confide.core import Update, Vector
from confide.errors import UpdateError
from confide.pipeline import Layer, RoundContext, StackContext, Traits
from confide.privacy.dp import clip, l2_norm

PREVIOUS_KEY = "defence.previous_delta"
"""The previous round's aggregate delta in the server state (checkpointed with the model)."""

NORM = "norm"
COSINE_PREVIOUS = "cosine_previous"
COSINE_MEDIAN = "cosine_median"
LOSS_INCREASE = "loss_increase"
REFUSED = "refused"
"""Score keys of :attr:`confide.pipeline.RoundContext.scores` (REFUSED is 1.0 for a refused update)."""

MIN_FOR_MEDIAN = 3
"""Fewest updates whose median means something: the median of two is their midpoint, close to both."""


def cosine(a: Vector, b: Vector) -> float:
    """Cosine similarity, summed in float64; 0 when either vector is zero."""
    na, nb = l2_norm(a), l2_norm(b)
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.dot(a.astype(np.float64), b.astype(np.float64)) / (na * nb))


@dataclass
class _Kept:
    update: Update
    scores: dict[str, float]


class ScreenLayer(Layer):
    """The screening rules of ``[defence]`` as one layer of the server's pipeline."""

    name = "screen"
    traits = Traits(needs_individual_updates=True)

    @classmethod
    def from_config(cls, stack: StackContext) -> Layer | None:
        d = stack.config.defence
        if not d.screens:
            return None
        return cls(d.norm_bound, d.norm_action, d.min_cosine, d.max_loss_increase)

    def __init__(
        self,
        norm_bound: float = 0.0,
        norm_action: str = "refuse",
        min_cosine: float = -1.0,
        max_loss_increase: float = 0.5,
        validation: Callable[[Vector], float] | None = None,
    ) -> None:
        self.norm_bound = float(norm_bound)
        self.norm_action = norm_action
        self.min_cosine = float(min_cosine)
        self.max_loss_increase = float(max_loss_increase)
        self.validation = validation
        """The loss of full model weights on the server's validation set; the runner sets it from
        ``defence.validation_data`` (None: no loss rule)."""

    def init_state(self, size: int) -> dict[str, Vector]:
        return {PREVIOUS_KEY: np.zeros(size, dtype=np.float32)} if self.min_cosine > -1 else {}

    def decode(self, update: Update, round: RoundContext) -> Update | None:
        if update.vector is None:
            return update  # a protected payload; the stack check keeps the screen away from hidden updates
        norm = l2_norm(update.vector)
        scores = {NORM: norm}
        if self.norm_bound > 0 and norm > self.norm_bound:
            if self.norm_action == "clip":
                clip(update.vector, self.norm_bound, out=update.vector)
            else:
                round.scores[update.site] = {**scores, REFUSED: 1.0}
                raise UpdateError(
                    f"site {update.site!r}'s update has norm {norm:.4g}, above defence.norm_bound = "
                    f"{self.norm_bound:g} (score {norm:.4g})"
                )
        round.scratch.setdefault(self.name, []).append(_Kept(update, scores))
        return None  # decided in close(), once the round's median is known

    def close(self, round: RoundContext) -> None:
        kept: list[_Kept] = round.scratch.pop(self.name, [])
        if not kept:
            return
        references = self._references(round, [k.update.vector for k in kept if k.update.vector is not None])
        base = self.validation(self._full(round, None)) if self.validation is not None else 0.0
        for item in kept:
            update, scores = item.update, item.scores
            assert update.vector is not None
            reason = self._judge(round, update.vector, scores, references, base)
            if reason is None:
                try:
                    round.add(update)
                except UpdateError as e:
                    reason = str(e)
            if reason is not None:
                scores[REFUSED] = 1.0
                round.rejected.append((update.site, reason))
            round.scores[update.site] = scores

    def _references(self, round: RoundContext, vectors: list[Vector]) -> dict[str, Vector]:
        """The directions updates are compared with: the previous global update (once there is one) and the
        round's coordinate-wise median (with at least :data:`MIN_FOR_MEDIAN` updates)."""
        if self.min_cosine <= -1:
            return {}
        references: dict[str, Vector] = {}
        previous = round.server_state.get(PREVIOUS_KEY)
        if previous is not None:
            previous = previous if round.shared is None else previous[round.shared]
            if np.any(previous):
                references[COSINE_PREVIOUS] = previous
        if len(vectors) >= MIN_FOR_MEDIAN:
            references[COSINE_MEDIAN] = np.median(np.stack(vectors), axis=0).astype(np.float32)
        return references

    def _judge(
        self,
        round: RoundContext,
        vector: Vector,
        scores: dict[str, float],
        references: dict[str, Vector],
        base: float,
    ) -> str | None:
        """Score one update against every rule; the first rule it breaks, as a reason, or None."""
        reason = None
        for key, reference in references.items():
            scores[key] = cosine(vector, reference)
            if reason is None and scores[key] < self.min_cosine:
                what = "the previous global update" if key == COSINE_PREVIOUS else "the round's median update"
                reason = (
                    f"its cosine similarity to {what} is {scores[key]:.3f}, below defence.min_cosine = "
                    f"{self.min_cosine:g} (score {scores[key]:.4g})"
                )
        if self.validation is not None:
            scores[LOSS_INCREASE] = self.validation(self._full(round, vector)) - base
            if reason is None and not scores[LOSS_INCREASE] <= self.max_loss_increase:
                reason = (
                    f"alone it raises the validation loss by {scores[LOSS_INCREASE]:.4g}, above "
                    f"defence.max_loss_increase = {self.max_loss_increase:g} "
                    f"(score {scores[LOSS_INCREASE]:.4g})"
                )
        return reason

    @staticmethod
    def _full(round: RoundContext, vector: Vector | None) -> Vector:
        """The round's starting weights, moved by ``vector`` (on the shared positions) when given."""
        weights = round.weights.copy()
        if vector is not None:
            if round.shared is None:
                weights += vector
            else:
                weights[round.shared] += vector
        return weights

    def finish(self, round: RoundContext) -> None:
        if self.min_cosine <= -1 or round.delta is None:
            return
        previous = round.server_state.get(PREVIOUS_KEY)
        if previous is None or previous.shape != round.delta.shape:
            round.server_state[PREVIOUS_KEY] = round.delta.astype(np.float32)
        else:
            previous[:] = round.delta

    def __repr__(self) -> str:
        return (
            f"ScreenLayer(norm_bound={self.norm_bound}, norm_action={self.norm_action!r}, "
            f"min_cosine={self.min_cosine}, validation={self.validation is not None})"
        )
