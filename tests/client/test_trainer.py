from __future__ import annotations

import numpy as np
import torch

from confide.client.site import run_task
from confide.client.trainer import Trainer, split_window
from confide.core import Plan
from confide.data import PAD
from confide.models import build_model


def windows(n: int = 24) -> np.ndarray:
    text = np.tile(np.arange(10, 30, dtype=np.uint8), 200)
    return np.stack([text[i * 80 : i * 80 + 81] for i in range(n)])


def trainer(dropout: float = 0.0) -> Trainer:
    torch.manual_seed(0)
    return Trainer(build_model("gpt", 97, layers=1, heads=2, width=32, dropout=dropout))


def test_fit_is_deterministic_for_a_plan_and_does_not_rebuild_the_model() -> None:
    t = trainer(dropout=0.2)
    weights = t.layout.read(t.model).copy()
    model, optimizer = t.model, t.optimizer
    plan = Plan(round=1, epochs=2, batch_size=4, learning_rate=0.1, seed=5)
    a = t.fit(weights, windows(), plan)
    b = t.fit(weights, windows(), plan)
    np.testing.assert_array_equal(a.delta, b.delta)
    assert t.model is model and t.optimizer is optimizer
    c = t.fit(weights, windows(), Plan(round=1, epochs=2, batch_size=4, learning_rate=0.1, seed=6))
    assert not np.array_equal(a.delta, c.delta)
    assert a.steps == 12 and a.num_examples == 24 and a.seconds > 0


def test_fit_returns_local_minus_global_and_max_steps_stops_early() -> None:
    t = trainer()
    weights = t.layout.read(t.model).copy()
    result = t.fit(weights, windows(), Plan(round=1, max_steps=2, batch_size=4, learning_rate=0.1, seed=1))
    assert result.steps == 2
    np.testing.assert_allclose(t.layout.read(t.model), weights + result.delta, atol=1e-6)


def test_training_lowers_the_loss_on_local_text() -> None:
    t = trainer()
    weights = t.layout.read(t.model).copy()
    before = t.evaluate(weights, windows())[:, 0].sum()
    for r in range(5):
        weights = (
            weights + t.fit(weights, windows(), Plan(round=r, batch_size=8, learning_rate=0.5, seed=r)).delta
        )
    assert t.evaluate(weights, windows())[:, 0].sum() < 0.5 * before


def test_padding_is_no_target() -> None:
    batch = windows(1).copy()
    batch[0, 50:] = PAD
    inputs, targets = split_window(batch)
    assert int(inputs.max()) < 97 and int((targets == PAD).sum()) == 31
    t = trainer()
    scores = t.evaluate(t.layout.read(t.model), batch)
    assert scores[0, 2] == 49  # targets counted: positions 1..49


def test_run_task_builds_the_update() -> None:
    t = trainer()
    weights = t.layout.read(t.model).copy()
    update = run_task(t, "siteA", windows(), weights, Plan(round=3, batch_size=8, seed=2), model_version=2)
    assert (update.site, update.round, update.num_examples, update.model_version) == ("siteA", 3, 24, 2)
    assert update.vector is not None and update.vector.shape == weights.shape
    assert update.metrics["train_loss"] > 0 and update.metrics["steps"] == 3
