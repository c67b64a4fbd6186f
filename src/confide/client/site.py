"""What one site does with a task: train on its own windows, then pass the delta through the site layers."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from confide.client.trainer import Trainer
from confide.core import Layer, Plan, Update, Vector

LAYER_STREAM = 7


def run_task(
    trainer: Trainer,
    site: str,
    windows: np.ndarray,
    weights: Vector,
    plan: Plan,
    model_version: int,
    layers: Sequence[Layer] = (),
) -> Update:
    """Train from ``weights`` on ``windows`` and return the encoded update (layers in stack order)."""
    result = trainer.fit(weights, windows, plan)
    update = Update(
        site=site,
        round=plan.round,
        num_examples=result.num_examples,
        vector=result.delta,
        model_version=model_version,
        metrics={"train_loss": result.loss, "steps": float(result.steps), "compute_seconds": result.seconds},
    )
    rng = np.random.default_rng([plan.seed, LAYER_STREAM])
    for layer in layers:
        update = layer.encode(update, rng)
    return update
