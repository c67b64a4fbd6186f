"""Secure aggregation inside federated rounds: the same model as plain aggregation to fixed-point precision,
dropouts, abandoned rounds, the authenticated mode, distributed DP on top, the refused combinations, and
evaluations summed securely."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from confide import config
from confide.client.site import SiteKit
from confide.client.trainer import Trainer
from confide.core import Layout, SiteEvaluation
from confide.data.text import load_text
from confide.errors import ConfigError
from confide.models import build_model
from confide.pipeline import Layer, Traits
from confide.privacy.dp import EqualMean
from confide.privacy.secure import (
    EVALUATION_SIZE,
    SecAggLayer,
    SecureAggregation,
    evaluation_digits,
    evaluation_total,
)
from confide.runtime.federation import Federation, ServerState
from confide.runtime.local import LocalBackend
from confide.runtime.runner import Runner
from confide.server.strategy import Strategy
from tests.conftest import tiny_config
from tests.runtime.test_runner import metrics


def setup(
    text_corpus: Path, dropout: float = 0.0, layers: tuple[Layer, ...] = ()
) -> tuple[LocalBackend, ServerState]:
    dataset = load_text(text_corpus)
    torch.manual_seed(0)
    trainer = Trainer(build_model("lstm", 97, hidden=8))
    backend = LocalBackend(dataset, SiteKit(trainer, layers=layers), dropout=dropout, seed=5)
    state = ServerState(0, trainer.layout.read(trainer.model).copy())
    return backend, state


def secure(settings: SecureAggregation | None = None) -> tuple[Layer, ...]:
    size = Layout.of_module(build_model("lstm", 97, hidden=8)).size  # the model setup() trains
    return (SecAggLayer(settings or SecureAggregation(), size),)


def run(backend: LocalBackend, state: ServerState, federation: Federation, rounds: int = 2) -> list[object]:
    return [federation.round(state, backend) for _ in range(rounds)]


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_secure_rounds_give_the_plain_mean_to_fixed_point_precision(
    text_corpus: Path, dropout: float
) -> None:
    common = {"sites_per_round": 6, "max_steps": 2, "batch_size": 4, "learning_rate": 0.5, "seed": 2}
    # Plain: every site weighs one, as under secure aggregation (which only ever sees the sum).
    plain_backend, plain = setup(text_corpus, dropout)
    plain_results = run(plain_backend, plain, Federation(Strategy(aggregator=EqualMean(), **common)))
    layers = secure(SecureAggregation(fractional_bits=24))
    backend, hidden = setup(text_corpus, dropout, layers)
    federation = Federation(Strategy(aggregator=EqualMean(), **common), layers)
    results = run(backend, hidden, federation)
    for a, b in zip(plain_results, results, strict=True):
        assert a.abandoned is None and b.abandoned is None  # type: ignore[attr-defined]
        assert a.participants == b.participants  # type: ignore[attr-defined]
        assert b.site_metrics == {}  # type: ignore[attr-defined]  # nothing about one site in clear
        # The sums travelled inside the masked vector: the same numbers, to fixed-point precision.
        assert b.num_examples == a.num_examples  # type: ignore[attr-defined]
    if dropout:
        assert min(len(r.participants) for r in results) < 6  # type: ignore[attr-defined]
    # Each coordinate of the sum is rounded to 2^-24 per site; the mean moves by less than that.
    np.testing.assert_allclose(hidden.weights, plain.weights, rtol=0, atol=2 * 2.0**-24)
    assert not np.array_equal(hidden.weights, plain.weights)  # it really went through fixed point
    # The masked updates (packed at b = bit_length(6 * 2^24) + 1 = 28 bits a value, not 32) and the
    # protocol's messages are counted on the wire.
    layer = layers[0]
    assert isinstance(layer, SecAggLayer) and layer.settings.params(6).fixed_point.modulus_bits == 28
    masked = math.ceil(layer.vector_size * 28 / 8)
    assert results[0].bytes_received > len(results[0].participants) * masked  # type: ignore[attr-defined]


def test_fewer_survivors_than_the_threshold_abandon_the_round(text_corpus: Path) -> None:
    backend, state = setup(text_corpus, dropout=0.7, layers=secure())
    before = state.weights.copy()
    strategy = Strategy(sites_per_round=6, max_steps=1, batch_size=4, seed=2)
    result = Federation(strategy, backend.kit.layers).round(state, backend)
    assert result.abandoned is not None and "fewer than the threshold" in result.abandoned
    assert state.round == 1
    # What went out before the round failed still crossed the wire, and is counted.
    assert result.bytes_sent > state.weights.nbytes and result.bytes_received > 0
    np.testing.assert_array_equal(state.weights, before)


def test_runs_with_authenticated_secure_aggregation_and_distributed_dp(
    tmp_path: Path, text_corpus: Path
) -> None:
    path = tmp_path / "tiny.toml"
    path.write_text(tiny_config(text_corpus, tmp_path / "runs"))
    overrides = [
        "privacy.secure_aggregation=true",
        "privacy.secagg_authenticated=true",
        "privacy.dp=distributed",
        "privacy.noise_multiplier=0.8",
        "server.sites_per_round=5",
        "backend.dropout=0.2",
    ]
    runner = Runner.start(config.load(path, overrides))
    runner.run()
    rows = metrics(runner.store.run_dir)
    assert len(rows) == 4 and all(np.isfinite(r["epsilon"]) for r in rows)
    ledger = runner.store.ledger()
    # A round with dropouts carries less noise, and is charged at the noise it really had.
    charged = {round: z for round, z, *_ in ledger}
    events = [e for e in runner.store.events() if e[2] == "abandoned"]
    assert all(z <= 0.8 + 1e-12 for z in charged.values())
    assert any(z < 0.8 for z in charged.values()) or events
    assert runner.secure is not None and runner.secure.registry is not None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ("server.strategy=scaffold", "client.optimizer=sgd"),
            r"secure_aggregation cannot run with .*'scaffold'",
        ),
        (
            ("server.strategy=fednova", "client.optimizer=sgd"),
            r"secure_aggregation cannot run with .*'fednova'",
        ),
    ],
)
def test_secure_aggregation_refuses_strategies_that_need_individual_values(
    tmp_path: Path, text_corpus: Path, overrides: tuple[str, ...], message: str
) -> None:
    path = tmp_path / "tiny.toml"
    path.write_text(tiny_config(text_corpus, tmp_path / "runs"))
    with pytest.raises(ConfigError, match=message):
        config.load(path, ["privacy.secure_aggregation=true", *overrides])


def test_an_aggregator_that_needs_each_update_is_refused_under_secure_aggregation() -> None:
    class Median(EqualMean):
        name = "median"
        traits = Traits(needs_individual_updates=True)

    with pytest.raises(ConfigError, match=r"aggregator 'median' must see each site's own update, but 'sec"):
        Federation(Strategy(aggregator=Median()), secure())
    Federation(Strategy(aggregator=Median()))  # without it, fine


def test_coordinates_clipped_by_the_fixed_point_range_are_reported(tmp_path: Path, text_corpus: Path) -> None:
    path = tmp_path / "tiny.toml"
    path.write_text(tiny_config(text_corpus, tmp_path / "runs"))
    overrides = ["privacy.secure_aggregation=true", "privacy.secagg_range=1e-6", "run.rounds=1"]
    runner = Runner.start(config.load(path, overrides))
    runner.run()
    events = [e for e in runner.store.events() if e[2] == "secagg_clipped"]
    assert len(events) == 1 and "raise privacy.secagg_range" in events[0][3]


def test_sites_that_diverge_under_secure_aggregation_drop_out_instead_of_crashing(text_corpus: Path) -> None:
    backend, state = setup(text_corpus, layers=secure())
    before = state.weights.copy()
    strategy = Strategy(sites_per_round=6, max_steps=3, batch_size=4, learning_rate=float("inf"), seed=2)
    result = Federation(strategy, backend.kit.layers).round(state, backend)
    # Every site's update is NaN, which has no fixed-point value: no site can send, so no sum can be unmasked.
    assert result.abandoned is not None
    np.testing.assert_array_equal(state.weights, before)


def test_evaluation_sums_travel_as_digits_that_add_up_exactly() -> None:
    sites = [
        SiteEvaluation("a", 1234.56789, 17, 40),
        SiteEvaluation("b", 0.0, 0, 0),
        SiteEvaluation("c", 2.0**39 - 0.5, 2**39 + 3, 2**39 + 5),  # near the per-site bound of 2^40
    ]
    digits = [evaluation_digits(e) for e in sites]
    assert all(d.dtype == np.float32 and d.size == EVALUATION_SIZE for d in digits)
    assert all(((d >= 0) & (d < 1)).all() for d in digits)  # inside the range R = 1, so never clipped
    # The secure sum adds the digits coordinate by coordinate (each an exact multiple of 2^-8).
    total = evaluation_total(np.sum(digits, axis=0, dtype=np.float32), len(sites))
    assert total.targets == sum(e.targets for e in sites)
    assert total.correct == sum(e.correct for e in sites)
    assert abs(total.loss_sum - sum(e.loss_sum for e in sites)) <= len(sites) * 2**-16
    # A diverged site's loss shows in the total as infinite, not as a finite number that hides it.
    diverged = evaluation_total(digits[0] + evaluation_digits(SiteEvaluation("d", float("nan"), 0, 9)), 2)
    assert diverged.loss_sum == float("inf") and diverged.targets == 49


def test_a_secure_evaluation_with_too_few_sites_is_abandoned_and_training_goes_on(
    tmp_path: Path, text_corpus: Path
) -> None:
    path = tmp_path / "tiny.toml"
    path.write_text(tiny_config(text_corpus, tmp_path / "runs", run__rounds="2"))
    runner = Runner.start(config.load(path, ["privacy.secure_aggregation=true", "eval.sites=1"]))
    runner.run()
    rows = [m for _, m in runner.store.evaluations()]
    assert [m["round"] for m in rows] == [1, 2]
    assert all(np.isnan(m["loss"]) for m in rows)  # no site's evaluation was sent in clear instead
    events = [m for (m,) in runner.store.db.execute("SELECT message FROM events WHERE kind = 'evaluation'")]
    assert len(events) == 2 and all("needs at least 2 sites" in m for m in events), events


def test_personalized_evaluations_are_summed_securely_too(tmp_path: Path, text_corpus: Path) -> None:
    path = tmp_path / "tiny.toml"
    path.write_text(tiny_config(text_corpus, tmp_path / "runs", run__rounds="2"))
    overrides = ["privacy.secure_aggregation=true", "client.personalization='finetune'"]
    runner = Runner.start(config.load(path, overrides))
    runner.run()
    rows = [m for _, m in runner.store.evaluations()]
    assert rows and all(np.isfinite(m["personal_loss"]) and np.isfinite(m["loss"]) for m in rows)
    assert all(runner.store.site_metrics(r, personal=True) == [] for r, _ in runner.store.evaluations())
