"""Whole rounds of FedProx, SCAFFOLD, FedNova and the personalization methods through the federation."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from confide import config
from confide.algorithms.fednova import NormalizedMean
from confide.algorithms.scaffold import CONTROL_KEY, SITE_KEY
from confide.client.personalize import FEDREP_KEY, Personal
from confide.client.site import SiteKit
from confide.client.state import MemorySiteState
from confide.client.trainer import Trainer
from confide.data.text import load_text
from confide.errors import ConfigError
from confide.models import build_model, head_names
from confide.runtime.federation import Federation, ServerState
from confide.runtime.local import LocalBackend
from confide.runtime.runner import Runner
from confide.server.strategy import Strategy
from tests.conftest import tiny_config
from tests.quadratic import optimum, quadratic_problem
from tests.runtime.test_runner import Crash, CrashAfter, metrics


def run_quadratic(rounds: int, **options: object) -> tuple[np.ndarray, MemorySiteState, ServerState]:
    model, dataset, _, _ = quadratic_problem()
    trainer = Trainer(model)
    state_store = MemorySiteState()
    kit = SiteKit(trainer, Personal(state_store, np.empty(0, dtype=np.int64)))
    backend = LocalBackend(dataset, kit)
    strategy = Strategy(sites_per_round=4, batch_size=8, epochs=100, seed=1, **options)  # type: ignore[arg-type]
    federation = Federation(strategy)
    state = ServerState(0, trainer.layout.read(model).copy(), federation.init_state(trainer.layout.size))
    for _ in range(rounds):
        federation.round(state, backend)
    return state.weights, state_store, state


def test_scaffold_removes_the_drift_of_fedavg_with_many_local_steps() -> None:
    _, _, centers, curvatures = quadratic_problem()
    best = optimum(centers, curvatures)
    common = {"max_steps": 30, "learning_rate": 0.2}
    fedavg, _, _ = run_quadratic(60, **common)
    scaffold, sites, state = run_quadratic(60, algorithm="scaffold", **common)
    # FedAvg settles measurably away from the optimum of the average loss; SCAFFOLD finds it.
    assert np.linalg.norm(fedavg - best) > 0.5
    assert np.linalg.norm(scaffold - best) < 1e-3
    # c stays the mean of the sites' control variates (all four take part every round here).
    mean_c = np.mean([sites.get(f"q{k}", SITE_KEY) for k in range(4)], axis=0)
    np.testing.assert_allclose(state.optimizer_state[CONTROL_KEY], mean_c, rtol=1e-4, atol=1e-5)


def test_fedprox_with_mu_zero_is_fedavg_exactly() -> None:
    common = {"max_steps": 5, "learning_rate": 0.2}
    fedavg, _, _ = run_quadratic(3, **common)
    fedprox, _, _ = run_quadratic(3, algorithm="fedprox", mu=0.0, **common)
    np.testing.assert_array_equal(fedavg, fedprox)


def test_fednova_equals_fedavg_when_sites_do_equal_work_and_differs_with_stragglers() -> None:
    common = {"max_steps": 5, "learning_rate": 0.2}
    fedavg, _, _ = run_quadratic(3, **common)
    fednova, _, _ = run_quadratic(3, algorithm="fednova", **common)
    np.testing.assert_allclose(fednova, fedavg, rtol=1e-5, atol=1e-6)
    assert isinstance(Strategy(algorithm="fednova").aggregator, NormalizedMean)
    slow_avg, _, _ = run_quadratic(3, stragglers=0.5, **common)
    slow_nova, _, _ = run_quadratic(3, algorithm="fednova", stragglers=0.5, **common)
    assert not np.allclose(slow_avg, slow_nova, atol=1e-4)


def test_stragglers_are_drawn_per_round_and_seeded() -> None:
    strategy = Strategy(sites_per_round=10, stragglers=0.5, min_work=0.2, seed=4)
    sites = [f"s{k}" for k in range(10)]
    plans = strategy.plans(3, sites)
    work = np.array([plans[s].work for s in sites])
    assert 0 < (work < 1).sum() < 10 and work.min() >= 0.2
    assert [p.work for p in strategy.plans(3, sites).values()] == list(work)
    assert [p.work for p in strategy.plans(4, sites).values()] != list(work)


def test_fedrep_shares_only_the_body_and_keeps_each_head_at_its_site(text_corpus: Path) -> None:
    dataset = load_text(text_corpus)
    trainer = Trainer(build_model("lstm", 97, hidden=16))
    head = head_names(trainer.model)
    assert head == {"head.weight", "head.bias"}
    layout = trainer.layout
    shared = layout.index(n for n in layout.names if n not in head)
    head_index = layout.index(head)
    sites = MemorySiteState()
    backend = LocalBackend(dataset, SiteKit(trainer, Personal(sites, head_index, head), shared=shared))
    strategy = Strategy(
        sites_per_round=3,
        max_steps=3,
        batch_size=4,
        learning_rate=0.5,
        personalization="fedrep",
        personal_steps=2,
        shared=shared,
    )
    weights = layout.read(trainer.model).copy()
    state = ServerState(0, weights.copy(), strategy.init_state(layout.size))
    result = Federation(strategy).round(state, backend)
    np.testing.assert_array_equal(
        state.weights[head_index], weights[head_index]
    )  # the server's head: untouched
    assert not np.allclose(state.weights[shared], weights[shared])
    for site in result.sites:
        assert sites.get(site, FEDREP_KEY) is not None
        assert not np.allclose(sites.get(site, FEDREP_KEY), weights[head_index])
    # Only the body comes back: each update is the body's size (plus a small header), not the model's. The
    # server still sends each site the whole model (the site puts its own head on it), as counted.
    assert result.bytes_received < 3 * (shared.size * 4 + 1024)
    assert 3 * layout.size * 4 < result.bytes_sent < 3 * (layout.size * 4 + 1024)


def test_impossible_combinations_are_refused_with_reasons(tiny_config_path: Path) -> None:
    cases = {
        ("server.strategy=scaffold",): r"needs client.optimizer = 'sgd' \(got 'adam'\): its control-variate",
        ("server.strategy=fednova",): r"needs client.optimizer = 'sgd'",
        ("client.personalization=fedrep", "server.strategy=fedprox"): r"fedrep' runs with server.strategy",
        ("client.personal_layers='head'",): r"personal_layers .* needs client.personalization = 'fedrep'",
        ("server.strategy=fedsgd",): r"server.strategy must be one of 'fedavg', 'fedprox'",
        ("client.stragglers=1.5",): r"client.stragglers must be in \[0, 1\] \(got 1.5\)",
    }
    for overrides, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            config.load(tiny_config_path, list(overrides))


PERSONAL_KEYS = ("loss", "accuracy", "personal_loss", "personal_accuracy", "personal_site_accuracy_p10")


@pytest.mark.parametrize(
    "overrides",
    [
        (
            "server.strategy=scaffold",
            "client.optimizer=sgd",
            "client.learning_rate=0.5",
            "client.personalization=ditto",
        ),
        ("client.personalization=fedrep", "client.personal_steps=2"),
    ],
    ids=["scaffold+ditto", "fedrep"],
)
def test_site_state_survives_a_resume(tmp_path: Path, text_corpus: Path, overrides: tuple[str, ...]) -> None:
    path = tmp_path / "tiny.toml"
    path.write_text(tiny_config(text_corpus, tmp_path / "runs"))
    whole = Runner.start(config.load(path, ["run.name=whole", *overrides]))
    whole.run()
    reference = metrics(whole.store.run_dir)
    assert all(np.isfinite(r["personal_loss"]) for r in reference)

    killed = Runner.start(config.load(path, ["run.name=killed", *overrides]))
    with pytest.raises(Crash):
        killed.run(CrashAfter(4, 2))  # round 3's site state is newer than checkpoint 2: it must be redone
    killed.store.close()
    resumed = Runner.resume(killed.store.run_dir)
    resumed.run()
    rows = metrics(resumed.store.run_dir)
    assert [tuple(r[k] for k in PERSONAL_KEYS) for r in rows] == [
        tuple(r[k] for k in PERSONAL_KEYS) for r in reference
    ]
    db = sqlite3.connect(resumed.store.run_dir / "run.sqlite")
    assert db.execute("SELECT COUNT(*) FROM personal_site_metrics WHERE round = 4").fetchone()[0] == 6
    # After the final checkpoint only each site's newest state is kept.
    rows_per_key = db.execute("SELECT COUNT(*) FROM site_state GROUP BY site, key").fetchall()
    assert rows_per_key and all(n == 1 for (n,) in rows_per_key)
    assert json.loads((resumed.store.run_dir / "metrics.jsonl").read_text().splitlines()[-1])["round"] == 4


def test_the_config_reaches_the_quantity_skew_partition(tiny_config_path: Path) -> None:
    from confide.runtime.runner import load_dataset

    dataset = load_dataset(
        config.load(tiny_config_path, ["data.partition=quantity", "data.num_sites=4", "data.alpha=0.3"])
    )
    assert dataset.name.endswith("quantity(sites=4,alpha=0.3)")
    assert all(s.name.startswith("quantity-") for s in dataset.sites)
