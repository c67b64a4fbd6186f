"""Robust aggregators: the round's aggregate delta when some sites may send poisoned updates.

Each one keeps every update of the round (it must compare them: DESIGN.md's cost rules let aggregators that
need every update keep them, and say so), gives every site one vote whatever its number of examples (an
example-weighted rule would let one site that claims many examples outvote the rest), and returns a delta for
the server optimizer, which runs unchanged after it (FedAvg's SGD, FedAdam, ...).

Threat model: up to f of the n sites of a round send arbitrary vectors (Byzantine), possibly together; the
server sees each site's own update in clear, so none of these runs under secure aggregation or encryption
(each declares ``needs_individual_updates``, and :func:`confide.pipeline.check_stack` refuses the stack).

Central DP (:class:`confide.privacy.dp.CentralDP`) wraps any of them: its noise is z times
:meth:`sensitivity`, how far one site's update, clipped to norm C, can move the result. Robust rules are not
averages, so one site moves them by a constant times C, not C / n: the bounds below are honest, and they make
central DP's noise about 2n times that of DP-FedAvg's mean for the same epsilon. Every bound comes from
one fact: when every result has norm at most R, whoever takes part, two results differ by at most 2R.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from confide.core import Update, Vector
from confide.errors import ConfigError, UpdateError
from confide.pipeline import Traits
from confide.randomness import Randomness


@dataclass
class KeptState:
    """Every update of the round, one row per site, in arrival order."""

    size: int
    sites: list[str] = field(default_factory=list)
    vectors: list[Vector] = field(default_factory=list)

    def matrix(self) -> np.ndarray:
        """The updates as an (n, size) float32 matrix (n >= 1)."""
        if not self.vectors:
            raise UpdateError("no update arrived this round; there is nothing to aggregate")
        return np.stack(self.vectors)


class KeepingAggregator:
    """The shared half of every robust aggregator: keep each readable update, refuse sums."""

    name = "robust"
    traits = Traits(needs_individual_updates=True)

    def init(self, size: int) -> KeptState:
        return KeptState(size)

    def add(self, state: KeptState, update: Update) -> None:
        vector = update.readable(state.size)
        state.sites.append(update.site)
        state.vectors.append(vector)

    def add_sum(self, state: KeptState, total: Vector, count: int) -> None:
        raise UpdateError(
            f"the aggregator {self.name!r} must compare each site's own update, but {count} arrived only "
            "summed (secure aggregation); use server.aggregator = 'mean' with secure aggregation"
        )

    def result(self, state: KeptState, randomness: Randomness) -> Vector:
        raise NotImplementedError

    def sensitivity(self, clip_norm: float) -> float | None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class CoordinateMedian(KeepingAggregator):
    """Each coordinate's median over the round's updates (Yin et al. 2018, "Byzantine-robust distributed
    learning": coordinate-wise median). It holds while attackers are fewer than half the updates.

    Sensitivity 2√2·C: in every coordinate at least half the updates are at least as large as the median in
    absolute value, so (n/2)·||median||² <= Σ_i ||x_i||² <= n·C², and ||median|| <= √2·C. One site can move it
    by C (n = 3: x = (−a), (0), (a) in every coordinate, the middle one replaced by (a)), so no bound near
    C / n exists.
    """

    name = "median"

    @classmethod
    def from_defence(cls, defence: Any) -> CoordinateMedian:
        return cls()

    def result(self, state: KeptState, randomness: Randomness) -> Vector:
        return np.median(state.matrix(), axis=0).astype(np.float32)

    def sensitivity(self, clip_norm: float) -> float | None:
        return 2.0 * math.sqrt(2.0) * clip_norm


class TrimmedMean(KeepingAggregator):
    """Each coordinate's mean after cutting t = floor(trim · n) values at each end (Yin et al. 2018). It
    holds while the attackers number at most t; with more, one of them survives the cut in every coordinate.

    Sensitivity 2·C/√(1 − 2·trim): the kept values of a coordinate are n − 2t >= n(1 − 2·trim) of the n, so
    ||result||² <= Σ_i ||x_i||² / (n − 2t) <= C² / (1 − 2·trim) (Jensen's inequality per coordinate).
    """

    name = "trimmed_mean"

    def __init__(self, trim: float = 0.1) -> None:
        if not 0 <= trim < 0.5:
            raise ConfigError(f"defence.trim must be in [0, 0.5) (got {trim!r})")
        self.trim = float(trim)

    @classmethod
    def from_defence(cls, defence: Any) -> TrimmedMean:
        return cls(defence.trim)

    def cut(self, n: int) -> int:
        """How many values are cut at each end of a coordinate of n."""
        return math.floor(self.trim * n)

    def result(self, state: KeptState, randomness: Randomness) -> Vector:
        matrix = state.matrix()
        t = self.cut(len(matrix))
        ordered = np.sort(matrix, axis=0)
        return ordered[t : len(matrix) - t].mean(axis=0, dtype=np.float64).astype(np.float32)

    def sensitivity(self, clip_norm: float) -> float | None:
        return 2.0 * clip_norm / math.sqrt(1.0 - 2.0 * self.trim)

    def __repr__(self) -> str:
        return f"TrimmedMean(trim={self.trim})"


def krum_scores(matrix: np.ndarray, byzantine: int) -> np.ndarray:
    """Krum's score of each row: the sum of its squared distances to its n − f − 2 nearest other rows
    (Blanchard et al. 2017, Def. 1). With n <= f + 2 it falls back to the nearest one, where Krum's
    guarantee (n > 2f + 2) no longer holds."""
    n = len(matrix)
    rows = matrix.astype(np.float64)
    squares = np.einsum("ij,ij->i", rows, rows)
    distances = np.maximum(squares[:, None] + squares[None, :] - 2.0 * rows @ rows.T, 0.0)
    np.fill_diagonal(distances, np.inf)
    neighbours = max(n - byzantine - 2, 1)
    if n == 1:
        return np.zeros(1)
    nearest = np.sort(distances, axis=1)[:, :neighbours]
    result: np.ndarray = nearest.sum(axis=1)
    return result


class Krum(KeepingAggregator):
    """The one update whose n − f − 2 nearest neighbours are closest (Blanchard et al. 2017, "Machine
    learning with adversaries"). It withstands f Byzantine sites when n > 2f + 2; with f set too small,
    colluding attackers that send nearly the same vector score best and one of them is chosen.

    Sensitivity 2·C: the result is one of the clipped updates, of norm at most C.
    """

    name = "krum"

    def __init__(self, byzantine: int = 1) -> None:
        if isinstance(byzantine, bool) or not isinstance(byzantine, int) or byzantine < 0:
            raise ConfigError(f"defence.byzantine must be a whole number >= 0 (got {byzantine!r})")
        self.byzantine = byzantine

    @classmethod
    def from_defence(cls, defence: Any) -> Krum:
        return cls(defence.byzantine)

    def chosen(self, state: KeptState) -> list[int]:
        """The rows the result is made of (Krum: the one best scored)."""
        return [int(np.argmin(krum_scores(state.matrix(), self.byzantine)))]

    def result(self, state: KeptState, randomness: Randomness) -> Vector:
        matrix = state.matrix()
        return matrix[self.chosen(state)].mean(axis=0, dtype=np.float64).astype(np.float32)

    def sensitivity(self, clip_norm: float) -> float | None:
        return 2.0 * clip_norm

    def __repr__(self) -> str:
        return f"{type(self).__name__}(byzantine={self.byzantine})"


class MultiKrum(Krum):
    """The mean of the m best Krum-scored updates (Blanchard et al. 2017, §4); m = 0 takes n − f.

    Sensitivity 2·C: a mean of clipped updates has norm at most C.
    """

    name = "multikrum"

    def __init__(self, byzantine: int = 1, selected: int = 0) -> None:
        super().__init__(byzantine)
        if isinstance(selected, bool) or not isinstance(selected, int) or selected < 0:
            raise ConfigError(f"defence.multikrum must be a whole number >= 0 (got {selected!r})")
        self.selected = selected

    @classmethod
    def from_defence(cls, defence: Any) -> MultiKrum:
        return cls(defence.byzantine, defence.multikrum)

    def chosen(self, state: KeptState) -> list[int]:
        matrix = state.matrix()
        n = len(matrix)
        m = self.selected or max(n - self.byzantine, 1)
        order = np.argsort(krum_scores(matrix, self.byzantine), kind="stable")
        return sorted(int(i) for i in order[: min(m, n)])

    def __repr__(self) -> str:
        return f"MultiKrum(byzantine={self.byzantine}, selected={self.selected})"


def geometric_median(
    matrix: np.ndarray, smoothing: float = 1e-6, iterations: int = 100, tolerance: float = 1e-7
) -> np.ndarray:
    """The point minimising Σ_i max(ν, ||v − x_i||) by the smoothed Weiszfeld algorithm (Pillutla et al.
    2022, "Robust aggregation for federated learning", Algorithm 2, equal weights α_i = 1/n).

    Each step is v ← Σ β_i x_i / Σ β_i with β_i = 1 / max(ν, ||v − x_i||): a convex combination of the
    rows, so the result lies in their convex hull. It starts at the mean and stops when the objective
    improves by less than ``tolerance`` (relative) or after ``iterations`` steps.
    """
    rows = matrix.astype(np.float64)
    point = rows.mean(axis=0)

    def objective(v: np.ndarray) -> tuple[float, np.ndarray]:
        distances = np.maximum(np.linalg.norm(rows - v, axis=1), smoothing)
        return float(distances.sum()), distances

    value, distances = objective(point)
    for _ in range(iterations):
        betas = 1.0 / distances
        point = betas @ rows / betas.sum()
        new_value, distances = objective(point)
        if value - new_value <= tolerance * max(value, smoothing):
            break
        value = new_value
    return point


class GeometricMedian(KeepingAggregator):
    """The geometric median of the updates (RFA, Pillutla et al. 2022): breakdown point 1/2, so it holds
    while attackers are fewer than half the sites.

    Sensitivity 2·C: the smoothed Weiszfeld iterates stay in the convex hull of the clipped updates.
    """

    name = "geometric_median"

    @classmethod
    def from_defence(cls, defence: Any) -> GeometricMedian:
        return cls()

    def result(self, state: KeptState, randomness: Randomness) -> Vector:
        return geometric_median(state.matrix()).astype(np.float32)

    def sensitivity(self, clip_norm: float) -> float | None:
        return 2.0 * clip_norm
