"""Defences with the rest of the stack: central DP wraps every robust aggregator (its noise scaled by the
aggregator's sensitivity, epsilon accounted as usual), server optimizers run unchanged after it, secure
aggregation refuses them with the options, and the [defence] settings are checked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from confide import config
from confide.core import Update
from confide.errors import ConfigError, DataError
from confide.privacy.dp import CentralDP, CentralNoise
from confide.randomness import SeededRandomness
from confide.runtime.runner import Runner
from confide.server.robust import CoordinateMedian, TrimmedMean
from confide.server.trust import FLTrust
from tests.conftest import tiny_config
from tests.defence.harness import clean_text

DP = ["privacy.dp=central", "privacy.noise_multiplier=0.8", "privacy.clip_norm=0.5"]


@pytest.fixture
def path(tmp_path: Path, text_corpus: Path) -> Path:
    p = tmp_path / "tiny.toml"
    p.write_text(tiny_config(text_corpus, tmp_path / "runs", run__rounds="2"))
    return p


def test_central_dp_noise_around_a_robust_aggregator_is_z_times_its_sensitivity() -> None:
    aggregator = CentralDP(TrimmedMean(0.2), CentralNoise(clip_norm=0.5, noise_multiplier=2.0))
    assert aggregator.traits.needs_individual_updates
    rows = np.random.default_rng(0).normal(size=(5, 40000)).astype(np.float32)
    state = aggregator.init(rows.shape[1])
    for i, row in enumerate(rows):
        aggregator.add(state, Update(f"s{i}", 1, 1, row.copy(), 0))
    clean = TrimmedMean(0.2).result(state, SeededRandomness([0]))
    noisy = aggregator.result(state, SeededRandomness([1]))
    expected = 2.0 * TrimmedMean(0.2).sensitivity(0.5)  # type: ignore[operator]
    assert expected == pytest.approx(2.0 * 2 * 0.5 / np.sqrt(0.6))
    assert np.std(noisy - clean) == pytest.approx(expected, rel=0.02)


@pytest.mark.parametrize("aggregator", ["median", "fltrust"])
def test_a_central_dp_run_with_a_robust_aggregator_and_fedadam_reports_epsilon(
    path: Path, tmp_path: Path, aggregator: str
) -> None:
    overrides = [*DP, f"server.aggregator={aggregator}"]
    if aggregator == "fltrust":
        overrides.append(f"defence.root_data={str(clean_text(tmp_path))!r}")
    runner = Runner.start(config.load(path, overrides))
    assert runner.config.server.optimizer == "adam"
    agg = runner.federation.aggregator
    assert isinstance(agg, CentralDP) and agg.name == f"central_dp({aggregator})"
    if aggregator == "fltrust":
        assert isinstance(agg.inner, FLTrust) and agg.inner.reference_norm == 0.5
    else:
        assert isinstance(agg.inner, CoordinateMedian)
    runner.run()
    rows = [r for _, r in runner.store.evaluations()]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(0 < r["epsilon"] < float("inf") for r in rows) and rows[0]["epsilon"] < rows[1]["epsilon"]
    assert np.isfinite(runner.state.weights).all()
    assert len(runner.store.ledger()) == 2


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["server.aggregator=krum"], "aggregator 'krum'"),
        (["defence.norm_bound=2.0"], "layer 'screen'"),
        (["defence.min_cosine=0.0", "server.aggregator=median"], "layer 'screen'"),
    ],
)
def test_secure_aggregation_refuses_defences_that_read_each_update(
    path: Path, extra: list[str], named: str
) -> None:
    loaded = config.load(path, ["privacy.secure_aggregation=true", *extra])
    with pytest.raises(ConfigError) as caught:
        Runner.start(loaded)
    message = str(caught.value)
    assert named in message and "'secagg'" in message
    assert "attested aggregator" in message and "privacy.secagg_range" in message


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["server.aggregator=fltrust"], "needs defence.root_data"),
        (["defence.norm_action=drop"], "defence.norm_action must be 'refuse' or 'clip' (got 'drop')"),
        (["defence.trim=0.5"], "defence.trim must be in [0, 0.5) (got 0.5)"),
        (["defence.min_cosine=2"], "defence.min_cosine must be in [-1, 1]"),
        (["server.aggregator=krumm"], "did you mean 'krum'?"),
        (["server.strategy=scaffold", "client.optimizer=sgd", "server.aggregator=median"], "use 'fedavg'"),
        (
            ["server.aggregator=multikrum", "defence.multikrum=9"],
            "cannot be more than server.sites_per_round",
        ),
        (["defence.quarantine_window=0"], "defence.quarantine_window must be >= 1"),
    ],
)
def test_defence_settings_are_checked_with_clear_errors(path: Path, overrides: list[str], says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config.load(path, overrides)
    assert says in str(caught.value)


def test_a_missing_server_data_file_is_named(path: Path, tmp_path: Path) -> None:
    loaded = config.load(path, [f"defence.validation_data={str(tmp_path / 'nope.txt')!r}"])
    with pytest.raises(DataError, match=r"nope\.txt.*cannot be read"):
        Runner.start(loaded)
