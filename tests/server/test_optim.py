"""Each server optimizer against a step computed by hand from Reddi et al. 2021, Algorithm 2."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from confide.errors import ConfigError
from confide.server.optim import ServerOptimizer

W0 = [1.0, -2.0, 0.5]
D1 = [0.1, -0.3, 0.0]
D2 = [-0.2, 0.05, 0.4]


def run(opt: ServerOptimizer, deltas: list[list[float]]) -> np.ndarray:
    w = np.array(W0, dtype=np.float32)
    state = opt.init(w.size)
    for d in deltas:
        opt.step(w, np.array(d, dtype=np.float32), state)
    return w


def by_hand(name: str, lr: float, b1: float, b2: float, tau: float) -> list[float]:
    """Two steps, one coordinate at a time, in plain Python floats."""
    out = []
    for w, d1, d2 in zip(W0, D1, D2, strict=True):
        m, v = 0.0, tau * tau
        for d in (d1, d2):
            if name == "sgd":
                w += lr * d
                continue
            if name == "momentum":
                m = b1 * m + d
                w += lr * m
                continue
            m = b1 * m + (1 - b1) * d
            if name == "adagrad":
                v = v + d * d
            elif name == "adam":
                v = b2 * v + (1 - b2) * d * d
            else:
                v = v - (1 - b2) * d * d * math.copysign(1.0, v - d * d) * (v != d * d)
            w += lr * m / (math.sqrt(v) + tau)
        out.append(w)
    return out


@pytest.mark.parametrize("name", ["sgd", "momentum", "adam", "yogi", "adagrad"])
def test_two_steps_match_hand_computation(name: str) -> None:
    opt = ServerOptimizer(name, learning_rate=0.3, beta1=0.8, beta2=0.95, tau=0.01)
    got = run(opt, [D1, D2])
    np.testing.assert_allclose(got, by_hand(name, 0.3, 0.8, 0.95, 0.01), rtol=1e-5, atol=1e-6)


def test_fedavg_is_sgd_with_unit_learning_rate() -> None:
    got = run(ServerOptimizer("sgd", learning_rate=1.0), [D1])
    np.testing.assert_array_equal(got, np.array(W0, dtype=np.float32) + np.array(D1, dtype=np.float32))


def test_yogi_differs_from_adam_when_second_moment_shrinks() -> None:
    # After a large delta, a small one: Adam decays v multiplicatively, Yogi additively by (1-b2)·Δ².
    deltas = [[1.0, 1.0, 1.0], [0.01, 0.01, 0.01], [0.01, 0.01, 0.01]]
    adam = run(ServerOptimizer("adam", 0.1, 0.9, 0.5, 1e-3), deltas)
    yogi = run(ServerOptimizer("yogi", 0.1, 0.9, 0.5, 1e-3), deltas)
    assert not np.allclose(adam, yogi)


def test_state_is_updated_in_place_so_checkpoints_capture_it() -> None:
    opt = ServerOptimizer("adam")
    state = opt.init(3)
    m = state["m"]
    opt.step(np.zeros(3, np.float32), np.ones(3, np.float32), state)
    assert state["m"] is m and m[0] == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "lamb"}, "server.optimizer must be one of"),
        ({"learning_rate": 0.0}, "server.learning_rate must be > 0 (got 0.0)"),
        ({"beta1": 1.0}, "server.beta1 must be in [0, 1)"),
        ({"tau": -1.0}, "server.tau must be > 0"),
    ],
)
def test_bad_hyperparameters_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(
        ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
    ):
        ServerOptimizer(**kwargs)  # type: ignore[arg-type]


def test_the_cosine_schedule_falls_from_the_rate_to_a_tenth_of_it() -> None:
    opt = ServerOptimizer("sgd", 0.6, schedule="cosine", rounds=80)
    rates = [opt.rate(r) for r in range(1, 81)]
    assert rates[0] == pytest.approx(0.6) and rates[-1] == pytest.approx(0.06)
    assert rates[39] == pytest.approx(0.6 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 39 / 79))))
    assert all(a > b for a, b in itertools.pairwise(rates))
    weights = np.zeros(3, dtype=np.float32)
    opt.step(weights, np.ones(3, dtype=np.float32), {}, round=80)
    assert weights == pytest.approx(np.full(3, 0.06))
    assert ServerOptimizer("sgd", 0.6).rate(80) == 0.6
    with pytest.raises(ConfigError, match=r"server\.schedule"):
        ServerOptimizer("sgd", 0.6, schedule="linear")
