"""The local backend against plain training: with one site and FedAvg, a round is just local training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from confide.client.site import SiteKit
from confide.client.trainer import Trainer
from confide.data.text import load_text
from confide.models import build_model
from confide.runtime.federation import Federation, ServerState
from confide.runtime.local import LocalBackend
from confide.server.strategy import Strategy


def trainer() -> Trainer:
    torch.manual_seed(1)
    return Trainer(build_model("gpt", 97, layers=1, heads=2, width=32))


def test_one_site_fedavg_round_equals_local_training(text_corpus: Path) -> None:
    dataset = load_text(text_corpus)
    t = trainer()
    weights = t.layout.read(t.model).copy()
    strategy = Strategy(sites_per_round=1, epochs=2, batch_size=4, learning_rate=0.2, seed=3)
    state = ServerState(round=0, weights=weights.copy())
    Federation(strategy).round(state, LocalBackend(dataset, SiteKit(t)))

    (site,) = strategy.select(1, dataset.site_names)
    plan = strategy.plans(1, [site])[site]
    local = trainer().fit(weights, dataset.by_name(site).train, plan)
    # Equal up to the rounding of (n·Δ)/n in float32.
    np.testing.assert_allclose(state.weights, weights + local.delta, rtol=0, atol=1e-7)
    assert not np.allclose(state.weights, weights, rtol=0, atol=1e-4)


def test_batched_evaluation_equals_site_by_site(text_corpus: Path) -> None:
    dataset = load_text(text_corpus)
    t = trainer()
    weights = t.layout.read(t.model).copy()
    backend = LocalBackend(dataset, SiteKit(t, eval_batch_size=7))
    sites = list(dataset.site_names)[1:4]
    for evaluation in backend.evaluate(weights, sites):
        scores = t.evaluate(weights, dataset.by_name(evaluation.site).test).sum(0)
        assert evaluation.correct == scores[1] and evaluation.targets == scores[2]
        assert np.isclose(evaluation.loss_sum, scores[0], rtol=1e-6)
