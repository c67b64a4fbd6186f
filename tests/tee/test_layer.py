"""The attested aggregator in a simulation: the model of a run in clear, and no update read by the server."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from confide.core import Update, Vector
from confide.errors import ConfigError, UpdateError
from confide.pipeline import SiteContext, check_stack
from confide.privacy.secure import SecAggLayer, SecureAggregation
from confide.privacy.tee.attestation import SIMULATED, SimulatedPlatform, verifier
from confide.privacy.tee.enclave import Enclave, Summary
from confide.privacy.tee.layer import SEALED, EnclaveLayer, LocalLink, SiteTrust
from confide.runtime.runner import Runner
from confide.runtime.store import Store
from confide.server.robust import Krum
from confide.server.validate import ValidateLayer
from tests.tee.conftest import MakeConfig, run


def enclave_layer(runner: Runner) -> EnclaveLayer:
    layer = next(layer for layer in runner.federation.layers if isinstance(layer, EnclaveLayer))
    assert isinstance(layer, EnclaveLayer)
    return layer


def test_rounds_through_the_enclave_give_the_plain_mean(make_config: MakeConfig) -> None:
    plain = run(make_config("plain"))
    sealed = run(make_config("sealed", privacy__enclave="'simulated'"))
    assert sealed.state.round == plain.state.round == 2
    assert not np.array_equal(plain.state.weights, Runner.start(make_config("init")).state.weights)
    np.testing.assert_allclose(sealed.state.weights, plain.state.weights, rtol=0, atol=1e-6)


def test_a_robust_aggregator_inside_equals_it_in_clear(make_config: MakeConfig) -> None:
    median = run(make_config("median", server__aggregator="'median'"))
    inside = run(make_config("inside", server__aggregator="'median'", privacy__enclave="'simulated'"))
    mean = run(make_config("mean"))
    np.testing.assert_allclose(inside.state.weights, median.state.weights, rtol=0, atol=1e-6)
    assert np.abs(median.state.weights - mean.state.weights).max() > 1e-4  # the median is not the mean


class Recording:
    """A link that writes down everything that crosses the server's side of the enclave."""

    def __init__(self, inner: LocalLink) -> None:
        self.inner = inner
        self.crossed: list[Any] = []

    def open(self, round: int) -> bytes:
        report = self.inner.open(round)
        self.crossed.append(report)
        return report

    def submit(self, round: int, site: str, sealed: bytes) -> None:
        self.crossed.append(sealed)
        self.inner.submit(round, site, sealed)

    def close(self, round: int) -> Summary:
        summary = self.inner.close(round)
        self.crossed.append(summary)
        return summary

    def release(self, round: int) -> Vector:
        result = self.inner.release(round)
        self.crossed.append(result)
        return result


def test_the_server_side_never_holds_a_clear_update(make_config: MakeConfig) -> None:
    runner = Runner.start(make_config("watched", privacy__enclave="'simulated'"))
    layer = enclave_layer(runner)
    assert isinstance(layer.link, LocalLink)
    enclave = layer.link.enclave
    link = layer.link = Recording(layer.link)  # type: ignore[assignment]
    clear: list[np.ndarray] = []  # what the enclave reads inside, to look for on the server's side
    add = enclave.aggregator.add

    def add_inside(state: Any, update: Update) -> None:
        assert update.vector is not None
        clear.append(update.vector.copy())
        add(state, update)

    enclave.aggregator.add = add_inside  # type: ignore[method-assign]
    arrived: list[Update] = []
    decode = layer.decode

    def decode_on_server(update: Update, round: Any) -> Update | None:
        arrived.append(update)
        return decode(update, round)

    layer.decode = decode_on_server  # type: ignore[method-assign]
    try:
        runner.run()
    finally:
        runner.store.close()
    assert len(clear) == len(arrived) == 6  # 3 sites, 2 rounds
    for update in arrived:
        assert update.vector is None and update.num_examples == 0
        assert update.metrics == {} and update.sums == {} and set(update.payload) == {SEALED}
    released = [x for x in link.crossed if isinstance(x, np.ndarray)]
    assert len(released) == 2  # one aggregate per round, and nothing else as a vector
    blobs = [x for x in link.crossed if isinstance(x, bytes)]
    for vector in clear:
        prefix = vector[:8].tobytes()
        assert not any(prefix in blob for blob in blobs)
        assert all(not np.allclose(vector, result) for result in released)
    summaries = [x for x in link.crossed if isinstance(x, Summary)]
    assert [len(s.accepted) for s in summaries] == [3, 3]


def test_sites_refuse_an_aggregator_that_is_not_the_expected_one(
    make_config: MakeConfig, caplog: pytest.LogCaptureFixture
) -> None:
    runner = Runner.start(make_config("refused", privacy__enclave="'simulated'"))
    layer = enclave_layer(runner)
    trust = layer.trust
    assert trust is not None
    layer.trust = SiteTrust(trust.verifier, "00" * 32, trust.max_age, True)
    caplog.set_level(logging.INFO)
    try:
        before = runner.state.weights.copy()
        result = runner.federation.round(runner.state, runner.backend)
    finally:
        runner.store.close()
    assert result.abandoned is not None and "accepted the aggregator's attestation" in result.abandoned
    assert {why for _, why in result.rejected} == {"the site did not accept the aggregator's attestation"}
    assert f"expects {'00' * 32}" in caplog.text  # each site says why, in its own log
    np.testing.assert_array_equal(runner.state.weights, before)


def test_a_report_of_an_earlier_round_does_not_unlock_a_later_one(make_config: MakeConfig) -> None:
    runner = Runner.start(make_config("old-report", privacy__enclave="'simulated'"))
    runner.store.close()
    layer = enclave_layer(runner)
    assert isinstance(layer.link, LocalLink)
    old = layer.link.open(1)
    sessions: dict[str, object] = {}
    layer.answer(b"confide-enclave-report\n" + old, "site0", sessions)
    plan = runner.strategy.plans(2, ["site0"])["site0"]
    update = Update("site0", 2, 5, np.zeros(runner.layout.size, np.float32), 1)
    context = SiteContext("site0", plan, None, sessions)  # type: ignore[arg-type]
    with pytest.raises(UpdateError, match="verified no attestation of the aggregator for round 2"):
        layer.encode(update, context)


def test_a_site_without_the_insecure_option_refuses_the_simulated_platform(make_config: MakeConfig) -> None:
    platform = SimulatedPlatform()
    with pytest.raises(ConfigError, match="INSECURE"):
        SiteTrust.from_files(SIMULATED, platform.public_key(), "00" * 32)
    runner = Runner.start(make_config("strict", privacy__enclave="'simulated'"))
    runner.store.close()
    layer = enclave_layer(runner)
    assert layer.trust is not None and isinstance(layer.link, LocalLink)
    layer.trust = SiteTrust(layer.trust.verifier, layer.trust.measurement, 600.0, allow_simulated=False)
    with pytest.raises(Exception, match="does not accept the INSECURE"):
        layer.answer(b"confide-enclave-report\n" + layer.link.open(1), "site0", {})


def test_central_dp_inside_is_charged_every_round(make_config: MakeConfig) -> None:
    config = make_config("dp", privacy__enclave="'simulated'", privacy__dp="'central'")
    runner = run(config)
    assert runner.dp is not None and runner.dp.trust == "knows_sample"  # the server sees who sends
    layer = enclave_layer(runner)
    assert layer.settings.central_dp == (1.0, runner.dp.noise_multiplier, 3.0)
    store = Store.open(Path(config.run.output) / config.run.name)
    try:
        assert [row[0] for row in store.ledger()] == [1, 2]
    finally:
        store.close()


def test_the_insecure_label_shows_in_the_log_and_the_display(
    make_config: MakeConfig, caplog: pytest.LogCaptureFixture, tiny_config_path: Path
) -> None:
    caplog.set_level(logging.WARNING)
    runner = Runner.start(make_config("label", privacy__enclave="'simulated'"))
    runner.run()
    runner.store.close()
    assert "INSECURE simulated enclave" in enclave_layer(runner).describe()
    assert "aggregated in an INSECURE simulated enclave" in caplog.text
    assert "seal their updates to an INSECURE simulated enclave" in caplog.text
    result = subprocess.run(
        [
            *(sys.executable, "-m", "confide.cli", "run", str(tiny_config_path), "--no-report"),
            *("--set", "privacy.enclave=simulated", "--set", "run.rounds=1"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "INSECURE simulated enclave" in result.stdout.replace("\n", " ")


def test_the_stack_check_allows_what_runs_inside_the_enclave_only() -> None:
    enclave = EnclaveLayer.__new__(EnclaveLayer)
    check_stack([enclave, ValidateLayer()], Krum(1))
    secagg = SecAggLayer(SecureAggregation(), 4)
    with pytest.raises(ConfigError, match=r"privacy.enclave instead of secure aggregation"):
        check_stack([secagg], Krum(1))
    with pytest.raises(ConfigError, match=r"privacy.enclave instead of secure aggregation"):
        check_stack([secagg, ValidateLayer()])
    with pytest.raises(ConfigError):
        check_stack([enclave, secagg, ValidateLayer()])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"privacy__secure_aggregation": "true"}, "choose one of the two"),
        ({"privacy__dp": "'distributed'", "privacy__secure_aggregation": "false"}, "privacy.dp = 'central'"),
        ({"defence__norm_bound": "1.0"}, "update screening"),
        ({"server__strategy": "'scaffold'", "client__optimizer": "'sgd'"}, "per-site values"),
    ],
)
def test_the_config_refuses_what_cannot_run_with_the_enclave(
    make_config: MakeConfig, extra: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        make_config("refused", privacy__enclave="'simulated'", **extra)
    with pytest.raises(ConfigError, match=r"privacy\.enclave_address"):
        make_config("address", privacy__enclave_address="'127.0.0.1:1'")


def test_an_enclave_built_by_hand_agrees_with_its_trust() -> None:
    from confide.config import DefenceConfig
    from confide.privacy.tee.enclave import EnclaveSettings

    platform = SimulatedPlatform()
    enclave = Enclave(EnclaveSettings(SIMULATED, "r", 3, "mean", DefenceConfig()), platform)
    evidence = verifier(SIMULATED, platform.public_key()).verify(enclave.open(1), now=0)
    assert evidence.public_key == enclave.public_key and evidence.measurement == enclave.measurement
