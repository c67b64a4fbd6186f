"""The backdoor's attack success, measured on honest sites' held-out text at every evaluation.

A probe is a held-out window of an honest site whose end is rewritten as ``trigger + target``: natural text,
then the trigger, then the target. One forward pass reads each probe (teacher forcing) and predicts every
character of the target from the text, the trigger and the target's characters before it.

* ``attack_success`` (the primary metric): the fraction of probes on which the model's greedy continuation
  after the trigger is the whole target, exactly. Greedy decoding writes the target exactly if and only if
  the most likely next character is the target's at each of its positions given the ones before, so this is
  read from the same pass, with no sampling.
* ``attack_char_accuracy``: the fraction of the target's characters predicted right (a softer measure that
  moves before the exact match does).

Both are measured in the simulation by the server on the global model (it knows the trigger: this is a test
of the defences, not something a deployment runs).
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import torch
from torch import nn

from confide.core import Layout, Vector
from confide.data import DEFAULT_TOKENIZER, PAD, FederatedDataset
from confide.randomness import Stream, public_rng


def probes(
    dataset: FederatedDataset,
    honest: Collection[str],
    trigger: str,
    target: str,
    count: int,
    seed: int,
) -> np.ndarray:
    """Up to ``count`` probes (uint8 windows) from the full held-out windows of the ``honest`` sites, drawn
    from the run's seed; each ends with ``trigger + target``."""
    parts = [site.test for site in dataset.sites if site.name in honest and site.num_test]
    if not parts:
        return np.empty((0, 0), dtype=np.uint8)
    pool = np.concatenate(parts)
    pool = pool[(pool != PAD).all(axis=1)]  # a padded tail would put the trigger after the text's end
    if len(pool) > count:
        pool = pool[np.sort(public_rng(seed, 2, Stream.ATTACK).choice(len(pool), count, replace=False))]
    payload = DEFAULT_TOKENIZER.encode(trigger + target)
    out = pool.copy()
    out[:, out.shape[1] - payload.size :] = payload
    return out


@torch.no_grad()
def attack_success(
    model: nn.Module,
    layout: Layout,
    weights: Vector,
    windows: np.ndarray,
    target_length: int,
    batch: int = 256,
) -> dict[str, float]:
    """``attack_success`` and ``attack_char_accuracy`` of the model with ``weights`` on ``windows`` (from
    :func:`probes`) whose last ``target_length`` characters are the target."""
    if len(windows) == 0:
        return {"attack_success": float("nan"), "attack_char_accuracy": float("nan")}
    layout.write(model, weights)
    was_training = model.training
    model.eval()
    exact = right = 0
    try:
        for start in range(0, len(windows), batch):
            codes = torch.from_numpy(windows[start : start + batch].astype(np.int64))
            logits, _ = model(codes[:, :-1])
            hits = logits[:, -target_length:, :].argmax(-1) == codes[:, -target_length:]
            exact += int(hits.all(dim=1).sum())
            right += int(hits.sum())
    finally:
        model.train(was_training)
    return {
        "attack_success": exact / len(windows),
        "attack_char_accuracy": right / (len(windows) * target_length),
    }
