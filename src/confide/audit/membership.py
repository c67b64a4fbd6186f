"""Membership inference: can an attacker tell the records a model trained on from records it never saw?

The attacker holds a record and the trained model and guesses "member" when the record's score is high. A
score here is the model's negative mean loss on the record (a window of text): the likelier the model finds
it, the more likely it trained on it (Yeom et al. 2018, the *loss attack*). Over a set of members and
non-members, every threshold on the score gives a true-positive rate (members called members) and a
false-positive rate (non-members called members); the ROC curve is all of them. Its area (AUC) summarises the
attack on average, but an attack matters when it is confident, so the numbers to read are the true-positive
rates at low false-positive rates, 1% and 0.1% (Carlini et al. 2022, "Membership Inference Attacks From First
Principles").

A false-positive rate is a count of non-members over their number N: the smallest non-zero one is 1/N, so a
rate of 0.1% can only be read with N >= 1000 non-members. :func:`tpr_at_fpr` says when it cannot (None)
rather than report the true-positive rate at some larger false-positive rate.

Some records are easy for any model (common words) and some hard for any (a rare name), whether trained on or
not, which blurs the loss attack. The *reference attack* calibrates each record by its difficulty, measured
with reference models trained the same way on data without it:

- with one reference model, the score is the target's score minus the reference's (Watson et al. 2022,
  "On the Importance of Difficulty Calibration in Membership Inference Attacks");
- with several, the offline likelihood-ratio attack (LiRA, Carlini et al. 2022): the reference scores of a
  record are its scores when OUT of training, fitted by a Gaussian; the attack scores the record by how far
  above that Gaussian the target's score lies, in standard deviations. With few references the standard
  deviation is pooled over every record (the paper's fixed variance), each record's own from
  :data:`PER_RECORD_VARIANCE` references on.

Everything here is plain numpy on score arrays; :func:`window_scores` computes scores with a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

from confide.client.trainer import Trainer
from confide.core import Vector

PER_RECORD_VARIANCE = 8
"""From this many reference models on, each record's OUT scores get a standard deviation of their own."""

FPR_TARGETS = (0.01, 0.001)
"""The false-positive rates at which true-positive rates are reported."""


def window_scores(
    trainer: Trainer, weights: Vector, windows: np.ndarray, batch_size: int = 256
) -> np.ndarray:
    """Each window's score for a membership attack: the model's negative mean loss (nats per target) on it.

    A window without a target (all padding) scores 0; none is built that way (see
    :func:`confide.data.dataset.windows`).
    """
    if len(windows) == 0:
        return np.empty(0, dtype=np.float64)
    out = trainer.evaluate(weights, windows, batch_size)
    return -out[:, 0] / np.maximum(out[:, 2], 1.0)


def _check(members: np.ndarray, nonmembers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    m = np.asarray(members, dtype=np.float64).reshape(-1)
    n = np.asarray(nonmembers, dtype=np.float64).reshape(-1)
    if m.size == 0 or n.size == 0:
        raise ValueError(
            f"a membership attack needs at least one member and one non-member (got {m.size} and {n.size})"
        )
    if not (np.isfinite(m).all() and np.isfinite(n).all()):
        raise ValueError("membership scores must be finite (a diverged model scores NaN or infinity)")
    return m, n


def roc_curve(members: np.ndarray, nonmembers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive rates, true-positive rates) of every threshold on the scores, from (0, 0) to (1, 1).

    Calling "member" every record whose score is at least a threshold; tied scores move together, so the
    curve has one point per distinct score (plus the origin) and is non-decreasing in both rates.
    """
    m, n = _check(members, nonmembers)
    scores = np.concatenate([m, n])
    is_member = np.concatenate([np.ones(m.size), np.zeros(n.size)])
    order = np.argsort(-scores, kind="stable")
    scores, is_member = scores[order], is_member[order]
    # The last index of each run of equal scores: a threshold there takes the whole run.
    last = np.flatnonzero(np.r_[scores[1:] != scores[:-1], True])
    true_positives = np.cumsum(is_member)[last]
    false_positives = (last + 1) - true_positives
    fpr = np.r_[0.0, false_positives / n.size]
    tpr = np.r_[0.0, true_positives / m.size]
    return fpr, tpr


def auc(members: np.ndarray, nonmembers: np.ndarray) -> float:
    """The area under the ROC curve: the probability that a random member scores above a random non-member,
    ties counted a half (the Mann-Whitney statistic). 0.5 is chance; 1 separates them entirely."""
    m, n = _check(members, nonmembers)
    ranks = stats.rankdata(np.concatenate([m, n]))  # ties get their mean rank
    u = float(ranks[: m.size].sum()) - m.size * (m.size + 1) / 2
    return u / (m.size * n.size)


def min_nonmembers(fpr: float) -> int:
    """How many non-members a false-positive rate of ``fpr`` needs to be resolved: one false positive among
    them must not exceed it (1 / N <= fpr)."""
    if not 0.0 < fpr <= 1.0:
        raise ValueError(f"a false-positive rate must lie in (0, 1], got {fpr}")
    return math.ceil(1.0 / fpr - 1e-9)


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float, nonmembers: int) -> float | None:
    """The largest true-positive rate on the ROC curve (``fpr``, ``tpr``) whose false-positive rate is at most
    ``target``, or None when ``nonmembers`` (the count the curve was drawn from) cannot resolve ``target``:
    with fewer than :func:`min_nonmembers` of them the only threshold within it is the one that calls no
    record a member, and a true-positive rate of 0 there would say nothing about the attack."""
    if nonmembers < min_nonmembers(target):
        return None
    within = np.asarray(fpr) <= target + 1e-12
    return float(np.asarray(tpr)[within].max())


def downsample_roc(fpr: np.ndarray, tpr: np.ndarray, points: int = 100) -> list[tuple[float, float]]:
    """At most about ``2 * points`` (fpr, tpr) points of the curve for a plot: the upper envelope at
    false-positive rates spaced evenly on a log scale (from the smallest the curve has) and on a linear scale,
    so that both a log-log and a linear plot of them follow the curve. Always includes (0, 0) and (1, 1)."""
    fpr, tpr = np.asarray(fpr, dtype=np.float64), np.asarray(tpr, dtype=np.float64)
    positive = fpr[fpr > 0]
    grid = np.linspace(0.0, 1.0, points + 1)
    if positive.size:
        grid = np.concatenate([grid, np.geomspace(positive.min(), 1.0, points)])
    grid = np.unique(grid)
    # For each grid rate, the curve's point with the largest false-positive rate not above it.
    index = np.searchsorted(fpr, grid + 1e-12, side="right") - 1
    index = np.unique(index[index >= 0])
    curve = [(float(fpr[i]), float(tpr[i])) for i in index]
    return curve if curve[0] == (0.0, 0.0) else [(0.0, 0.0), *curve]


def reference_scores(target: np.ndarray, references: np.ndarray) -> np.ndarray:
    """The reference attack's score of each record: ``target`` (shape (N,)) calibrated by the record's scores
    under reference models that never trained on it, ``references`` (shape (R, N), R >= 1).

    R = 1: the difference of scores (Watson et al. 2022). R >= 2: offline LiRA (Carlini et al. 2022), the
    target's score in standard deviations above the mean of the record's reference scores, with the standard
    deviation pooled over all records below :data:`PER_RECORD_VARIANCE` references and the record's own from
    there (floored at a small fraction of the pooled one, so that a record scored identically everywhere does
    not divide by zero). A higher score means likelier a member.
    """
    t = np.asarray(target, dtype=np.float64).reshape(-1)
    refs = np.asarray(references, dtype=np.float64)
    if refs.ndim == 1:
        refs = refs[None, :]
    if refs.ndim != 2 or refs.shape[0] < 1 or refs.shape[1] != t.size:
        raise ValueError(
            f"reference scores must have shape (references, {t.size}) with at least one reference, "
            f"got {refs.shape}"
        )
    mean = refs.mean(axis=0)
    if refs.shape[0] == 1:
        return t - mean
    pooled = float(np.sqrt(np.mean(refs.var(axis=0, ddof=1))))
    floor = max(pooled * 1e-3, 1e-12)
    if refs.shape[0] >= PER_RECORD_VARIANCE:
        spread = np.maximum(refs.std(axis=0, ddof=1), floor)
    else:
        spread = np.full(t.size, max(pooled, floor))
    return (t - mean) / spread


@dataclass(frozen=True)
class AttackResult:
    """One attack on one model: how well its scores separate the members from the non-members."""

    attack: str
    """'loss' or 'reference'."""
    members: int
    nonmembers: int
    auc: float
    tpr_at_1pct_fpr: float | None
    """None: fewer than 100 non-members, too few to read a false-positive rate of 1%."""
    tpr_at_01pct_fpr: float | None
    """None: fewer than 1000 non-members, too few to read a false-positive rate of 0.1%."""
    roc: list[tuple[float, float]]
    """The ROC curve's (fpr, tpr) points, downsampled for a plot (:func:`downsample_roc`)."""


def attack(name: str, members: np.ndarray, nonmembers: np.ndarray, roc_points: int = 100) -> AttackResult:
    """The attack ``name``'s result from its scores of members and of non-members (higher: member)."""
    fpr, tpr = roc_curve(members, nonmembers)
    n = int(np.size(nonmembers))
    return AttackResult(
        name,
        int(np.size(members)),
        n,
        auc(members, nonmembers),
        tpr_at_fpr(fpr, tpr, FPR_TARGETS[0], n),
        tpr_at_fpr(fpr, tpr, FPR_TARGETS[1], n),
        downsample_roc(fpr, tpr, roc_points),
    )
