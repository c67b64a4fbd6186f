"""Data poisoning: the attacking sites' training windows rewritten once, when the run is built.

Only training windows change; a site's held-out windows stay as they are, so the evaluation measures the model
on true text. Which windows are poisoned, and where in them the backdoor goes, is drawn from the run's seed
(the public stream :attr:`~confide.randomness.Stream.ATTACK`): a simulation repeats.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import replace
from typing import Any

import numpy as np

from confide.data import DEFAULT_TOKENIZER, PAD, FederatedDataset
from confide.randomness import Stream, public_rng
from confide.registry import ATTACKS, POISONS_DATA


def chosen(count: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Which of ``count`` windows are poisoned: ``fraction`` of them (at least one), sorted."""
    if count == 0:
        return np.empty(0, dtype=np.int64)
    k = min(count, max(1, round(fraction * count)))
    return np.sort(rng.choice(count, k, replace=False))


def backdoor(
    windows: np.ndarray, trigger: str, target: str, fraction: float, rng: np.random.Generator
) -> np.ndarray:
    """A copy of ``windows`` in which ``fraction`` of them carry ``trigger + target`` at a random place,
    written over the text there: the model learns that the target follows the trigger, in any context
    (Bagdasaryan et al. 2020's semantic backdoor, for a character model)."""
    payload = DEFAULT_TOKENIZER.encode(trigger + target)
    out = windows.copy()
    width = out.shape[1]
    if payload.size > width:
        raise ValueError(f"the backdoor's {payload.size} characters do not fit a window of {width}")
    for row in chosen(len(out), fraction, rng):
        start = int(rng.integers(0, width - payload.size + 1))
        out[row, start : start + payload.size] = payload
    return out


def flip_permutation(vocab_size: int) -> np.ndarray:
    """The fixed permutation of label flipping: the vocabulary reversed (code c becomes V - 2 - c), except the
    unknown symbol (the last code) and PAD, which stay."""
    table = np.arange(256, dtype=np.uint8)
    known = vocab_size - 1
    table[:known] = np.arange(known - 1, -1, -1, dtype=np.uint8)
    table[PAD] = PAD
    return table


def label_flip(windows: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A copy of ``windows`` in which ``fraction`` of them have every next-character target mapped through
    :func:`flip_permutation`. A window's targets are its own next inputs (``w[1:]``), so the inputs after the
    first character are flipped with them: the model is taught a permuted text, which is what flipping the
    labels of a next-character task can do without a second copy of the text."""
    out = windows.copy()
    table = flip_permutation(DEFAULT_TOKENIZER.vocab_size)
    rows = chosen(len(out), fraction, rng)
    out[rows, 1:] = table[out[rows, 1:]]
    return out


def poison(dataset: FederatedDataset, attack: Any, attackers: Collection[str], seed: int) -> FederatedDataset:
    """``dataset`` with the training windows of ``attackers`` poisoned as ``attack`` (the config's
    :class:`~confide.config.AttackConfig`) says; the same data set when the attack poisons no data."""
    how = ATTACKS.fact(attack.kind, POISONS_DATA)
    if how is None or not attackers:
        return dataset
    rng = public_rng(seed, 1, Stream.ATTACK)
    sites = []
    for site in dataset.sites:
        if site.name in attackers:
            if how == "backdoor":
                train = backdoor(site.train, attack.trigger, attack.target, attack.poison_fraction, rng)
            else:
                train = label_flip(site.train, attack.poison_fraction, rng)
            site = site.with_train(train)
        sites.append(site)
    return replace(dataset, sites=tuple(sites))
