"""Robust aggregators that decide whom to trust: FLTrust (a direction the server computes itself) and FLAME
(the majority cluster of update directions, clipped and noised).

Same threat model and shape as :mod:`confide.server.robust`: each keeps the round's updates, which it must
read one by one, so neither runs under secure aggregation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy.cluster.hierarchy import linkage
from scipy.spatial.distance import pdist

from confide.core import Vector
from confide.errors import ConfigError
from confide.randomness import Randomness
from confide.server.robust import KeepingAggregator, KeptState


def _norms(matrix: np.ndarray) -> np.ndarray:
    return np.sqrt(np.einsum("ij,ij->i", matrix, matrix, dtype=np.float64))


class FLTrust(KeepingAggregator):
    """FLTrust (Cao et al. 2021, "FLTrust: Byzantine-robust federated learning via trust bootstrapping",
    Algorithm 1): the server trains on its own small clean root data set to get g0; each update g_i gets the
    trust score TS_i = ReLU(cos(g_i, g0)), is rescaled to ||g0||, and the result is
    Σ TS_i · (||g0|| / ||g_i||) · g_i / Σ TS_i (zero when no update points the server's way).

    ``root`` gives g0 for the round being aggregated (the runner binds it to the round's global weights and
    the server's :class:`~confide.server.reference.ServerData`); ``reference_norm``, when given, clips g0 to
    it.

    Sensitivity 2·R where R = ``reference_norm``: the result is a convex combination of vectors of norm
    ||g0|| <= R. Without a reference norm ||g0|| is not bounded, and the sensitivity is None (central DP then
    refuses it; the stack builder passes the DP clip norm).
    """

    name = "fltrust"

    def __init__(self, root: Callable[[], Vector] | None = None, reference_norm: float | None = None) -> None:
        self.root = root
        self.reference_norm = reference_norm

    @classmethod
    def from_defence(cls, defence: Any) -> FLTrust:
        return cls()

    def reference(self) -> np.ndarray:
        if self.root is None:
            raise ConfigError(
                "the aggregator 'fltrust' has no root data to train on: set defence.root_data (a small clean "
                "text file the server holds)"
            )
        g0 = np.asarray(self.root(), dtype=np.float64)
        norm = float(np.linalg.norm(g0))
        if self.reference_norm is not None and norm > self.reference_norm:
            g0 = g0 * (self.reference_norm / norm)
        return g0

    def trust(self, matrix: np.ndarray, g0: np.ndarray) -> np.ndarray:
        """TS_i = ReLU(cos(g_i, g0)), 0 for a zero update."""
        norms = _norms(matrix)
        reference = float(np.linalg.norm(g0))
        if reference == 0.0:
            return np.zeros(len(matrix))
        cosines = (matrix.astype(np.float64) @ g0) / np.maximum(norms * reference, 1e-300)
        result: np.ndarray = np.where(norms > 0, np.maximum(cosines, 0.0), 0.0)
        return result

    def result(self, state: KeptState, randomness: Randomness) -> Vector:
        matrix = state.matrix()
        g0 = self.reference()
        if g0.shape != (state.size,):
            raise ConfigError(f"the server's root update has {g0.size} values; the updates have {state.size}")
        scores = self.trust(matrix, g0)
        if scores.sum() == 0.0:
            return np.zeros(state.size, dtype=np.float32)
        scale = scores * float(np.linalg.norm(g0)) / np.maximum(_norms(matrix), 1e-300)
        return (scale @ matrix.astype(np.float64) / scores.sum()).astype(np.float32)

    def sensitivity(self, clip_norm: float) -> float | None:
        return None if self.reference_norm is None else 2.0 * self.reference_norm

    def __repr__(self) -> str:
        return f"FLTrust(reference_norm={self.reference_norm})"


def majority_cluster(matrix: np.ndarray) -> list[int]:
    """The rows FLAME admits: the tightest majority group of update directions.

    FLAME clusters with HDBSCAN on cosine distances with min_cluster_size = n/2 + 1 and admits the cluster.
    HDBSCAN's hierarchy with min_samples = 1 is the single-linkage tree (Campello et al. 2013), which scipy
    builds (``scipy.cluster.hierarchy.linkage``, method 'single'). We cut it at the lowest height where one
    group holds a majority (n // 2 + 1) and admit that group: every other row joins only at a larger cosine
    distance. This is stricter than HDBSCAN's stability-based selection (it may leave honest sites out too,
    which costs accuracy, never safety). With fewer than 3 updates there is no majority to compare: all are
    admitted.
    """
    n = len(matrix)
    if n < 3:
        return list(range(n))
    rows = matrix.astype(np.float64)
    norms = _norms(rows)
    rows = rows / np.where(norms > 0, norms, 1.0)[:, None]
    distances = np.clip(pdist(rows, "cosine"), 0.0, 2.0)
    tree = linkage(distances, method="single")
    majority = n // 2 + 1
    members: dict[int, list[int]] = {i: [i] for i in range(n)}
    for step, (left, right, _, size) in enumerate(tree):
        joined = members.pop(int(left)) + members.pop(int(right))
        members[n + step] = joined
        if size >= majority:
            return sorted(joined)
    return list(range(n))  # unreachable: the last merge holds every row


class Flame(KeepingAggregator):
    """FLAME (Nguyen et al. 2022, "FLAME: taming backdoors in federated learning", Algorithm 1): admit the
    majority cluster of update directions (:func:`majority_cluster`), clip each admitted update to S, the
    median of all the round's update norms, average them, and add Gaussian noise of standard deviation
    λ·S (``noise``, the paper's λ = 0.001 for images, 0.01 for text) from the server's secret randomness.

    FLAME's own noise is a backdoor-smoothing device, not differential privacy: S depends on the updates,
    so no epsilon is claimed for it. Under central DP, CentralDP's noise comes on top.

    Sensitivity 2·C: the result (before noise) is a mean of updates clipped to min(S, C).
    """

    name = "flame"

    def __init__(self, noise: float = 0.001) -> None:
        if not (math.isfinite(noise) and noise >= 0):
            raise ConfigError(f"defence.flame_noise must be a finite number >= 0 (got {noise!r})")
        self.noise = float(noise)

    @classmethod
    def from_defence(cls, defence: Any) -> Flame:
        return cls(defence.flame_noise)

    def admitted(self, state: KeptState) -> list[int]:
        return majority_cluster(state.matrix())

    def result(self, state: KeptState, randomness: Randomness) -> Vector:
        matrix = state.matrix()
        norms = _norms(matrix)
        bound = float(np.median(norms))
        chosen = self.admitted(state)
        scale = np.minimum(1.0, bound / np.maximum(norms[chosen], 1e-300))
        mean = (scale @ matrix[chosen].astype(np.float64)) / len(chosen)
        result = mean.astype(np.float32)
        if self.noise > 0 and bound > 0:
            result += randomness.normal(result.size, self.noise * bound).astype(np.float32)
        return result

    def sensitivity(self, clip_norm: float) -> float | None:
        return 2.0 * clip_norm

    def __repr__(self) -> str:
        return f"Flame(noise={self.noise})"
