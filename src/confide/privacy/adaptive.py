"""Adaptive clipping (Andrew et al. 2021) as a layer of the round: the server moves the clip norm C towards a
quantile of the sites' update norms, from the noised count of sites whose update was not clipped.

Each round the clip norm travels in every site's plan; the sites' clip layer reports the bit b_i = [norm <=
C] as a sum; after the round the server adds N(0, sigma_b²) from its secret randomness to the sum of bits and
takes the geometric step of :class:`~confide.privacy.dp.AdaptiveClip`. The noise on the bits is part of the
privacy budget (see :func:`confide.privacy.accountant.combined_noise`). The count is noised by the
aggregator, so this layer runs only under central DP, where the aggregator is trusted.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from confide.core import Vector
from confide.pipeline import Layer, RoundContext, StackContext
from confide.privacy.dp import UNCLIPPED
from confide.privacy.policy import CLIP_KEY, SiteDP


class AdaptiveClipping(Layer):
    name = "adaptive_clip"

    @classmethod
    def from_config(cls, stack: StackContext) -> Layer | None:
        dp = stack.dp
        return cls(dp) if dp is not None and dp.adaptive is not None else None

    def __init__(self, dp: SiteDP) -> None:
        self.dp = dp

    def init_state(self, size: int) -> dict[str, Vector]:
        return {CLIP_KEY: np.array([self.dp.clip_norm], dtype=np.float32)}

    def begin(self, round: RoundContext) -> None:
        clip_norm = float(round.server_state[CLIP_KEY][0])
        for site, task in round.tasks.items():
            round.tasks[site] = replace(task, plan=replace(task.plan, clip_norm=clip_norm))

    def finish(self, round: RoundContext) -> None:
        unclipped = round.sums.get(UNCLIPPED, 0.0)
        clip_norm = self.dp.adapt(unclipped, len(round.participants), round.randomness)
        round.server_state[CLIP_KEY][0] = clip_norm
