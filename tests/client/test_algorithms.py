"""The site side of FedProx, SCAFFOLD, FedNova and Ditto, against the formulas of their papers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from confide.algorithms.fednova import fednova_normalizer
from confide.algorithms.scaffold import CONTROL, CONTROL_DELTA, SITE_KEY
from confide.client.personalize import DITTO_KEY, Personal
from confide.client.site import run_task
from confide.client.state import MemorySiteState
from confide.client.trainer import Objective, Trainer
from confide.core import Plan
from confide.models import build_model
from tests.client.test_trainer import windows
from tests.quadratic import quadratic_problem


def gpt_trainer() -> Trainer:
    torch.manual_seed(0)
    return Trainer(build_model("gpt", 97, layers=1, heads=2, width=32, dropout=0.0))


def test_fedprox_gradient_is_the_data_gradient_plus_mu_times_the_distance() -> None:
    t = gpt_trainer()
    weights = t.layout.read(t.model).copy()
    anchor = weights + np.random.default_rng(0).normal(0, 0.05, weights.size).astype(np.float32)
    batch = windows(6)
    plain = t.gradient(weights, batch)
    prox = t.gradient(weights, batch, Objective(prox_mu=0.3, anchor=anchor))
    # By hand: the gradient of mu/2 ||w - a||^2 is mu (w - a).
    np.testing.assert_allclose(prox, plain + 0.3 * (weights - anchor), rtol=1e-5, atol=1e-6)
    assert not np.allclose(prox, plain, atol=1e-4)


def test_fedprox_with_mu_zero_trains_exactly_like_fedavg() -> None:
    t = gpt_trainer()
    weights = t.layout.read(t.model).copy()
    plan = Plan(round=1, batch_size=4, learning_rate=0.1, seed=3, max_steps=5)
    a = t.fit(weights, windows(), plan)
    b = t.fit(weights, windows(), plan, Objective(prox_mu=0.0))
    c = t.fit(weights, windows(), plan, Objective(prox_mu=1.0))
    np.testing.assert_array_equal(a.delta, b.delta)
    assert np.linalg.norm(c.delta) < np.linalg.norm(a.delta)  # the proximal term holds the site back


def test_a_straggler_does_its_fraction_of_the_work() -> None:
    t = gpt_trainer()
    weights = t.layout.read(t.model).copy()
    full = Plan(round=1, epochs=2, batch_size=4, seed=1)  # 24 windows: 6 steps an epoch
    assert t.fit(weights, windows(), full).steps == 12
    assert t.fit(weights, windows(), Plan(round=1, epochs=2, batch_size=4, seed=1, work=0.25)).steps == 3
    assert Plan(round=1, max_steps=20, batch_size=4, work=0.01).local_steps(24) == 1  # never nothing


def test_scaffold_site_step_follows_option_ii_on_a_quadratic() -> None:
    model, dataset, centers, curvatures = quadratic_problem(num_sites=2, dim=3)
    t = Trainer(model)
    state = MemorySiteState()
    personal = Personal(state, np.empty(0, dtype=np.int64))
    x = np.array([0.5, -1.0, 2.0], dtype=np.float32)
    c = np.array([0.1, 0.2, -0.3], dtype=np.float32)
    c_i = np.array([-0.2, 0.0, 0.4], dtype=np.float32)
    state.put("q1", SITE_KEY, 0, c_i)
    lr, steps = 0.1, 7
    plan = Plan(round=1, max_steps=steps, batch_size=2, epochs=10, learning_rate=lr, algorithm="scaffold")
    update = run_task(
        t, "q1", dataset.by_name("q1").train, x, plan, 0, extras={CONTROL: c}, personal=personal
    )
    # By hand: y <- y - lr (grad f_i(y) - c_i + c), K times; then c_i+ = c_i - c + (x - y) / (K lr).
    y = x.astype(np.float64)
    for _ in range(steps):
        y = y - lr * (curvatures[1] * (y - centers[1]) - c_i + c)
    c_plus = c_i - c + (x - y) / (steps * lr)
    np.testing.assert_allclose(update.vector, y - x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state.get("q1", SITE_KEY), c_plus, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(update.payload[CONTROL_DELTA], c_plus - c_i, rtol=1e-4, atol=1e-5)
    assert update.payload[CONTROL_DELTA].nbytes == x.nbytes  # the control change travels beside the delta


def test_fednova_normalizer() -> None:
    assert fednova_normalizer(5, 0.0) == 5.0
    # With momentum rho, gradient k (of K) is applied with total weight (1 - rho^(K-k)) / (1 - rho).
    rho, steps = 0.9, 6
    by_hand = sum((1 - rho ** (steps - k)) / (1 - rho) for k in range(steps))
    assert fednova_normalizer(steps, rho) == pytest.approx(by_hand)


@pytest.mark.parametrize("lam", [math.inf, 1e12])
def test_ditto_with_infinite_lambda_keeps_the_global_model(lam: float) -> None:
    t = gpt_trainer()
    weights = t.layout.read(t.model).copy()
    state = MemorySiteState()
    personal = Personal(state, np.empty(0, dtype=np.int64))
    plan = Plan(
        round=1,
        batch_size=4,
        learning_rate=0.1,
        seed=2,
        max_steps=3,
        personalization="ditto",
        personal_lambda=lam,
        personal_steps=4,
    )
    run_task(t, "s", windows(), weights, plan, 0, personal=personal)
    np.testing.assert_allclose(state.get("s", DITTO_KEY), weights, rtol=0, atol=1e-6)


def test_ditto_with_finite_lambda_moves_the_personal_model_between_local_and_global() -> None:
    t = gpt_trainer()
    weights = t.layout.read(t.model).copy()
    distances = []
    for lam in (0.0, 1.0, 10.0):
        state = MemorySiteState()
        plan = Plan(
            round=1,
            batch_size=4,
            learning_rate=0.1,
            seed=2,
            max_steps=3,
            personalization="ditto",
            personal_lambda=lam,
            personal_steps=6,
        )
        run_task(t, "s", windows(), weights, plan, 0, personal=Personal(state, np.empty(0, dtype=np.int64)))
        distances.append(float(np.linalg.norm(state.get("s", DITTO_KEY) - weights)))
    assert distances[0] > distances[1] > distances[2] > 0
