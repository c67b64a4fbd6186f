"""`confide aggregator` as its own process on 127.0.0.1: a round through it, and a deployment's refusals."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from confide.cli import _enclave_trust, main
from confide.config import check_deployment
from confide.errors import ConfigError, DeploymentError
from confide.privacy.secagg import keys
from confide.privacy.tee.layer import EnclaveLayer, SiteTrust
from confide.runtime.grpc import confide_pb2 as pb
from confide.runtime.grpc.aggregator import GrpcLink, check_loopback
from confide.runtime.grpc.identity import sign_identity
from confide.runtime.grpc.pki import Authority, CertificatePaths, load_authority
from confide.runtime.runner import Runner
from tests.conftest import tiny_config
from tests.tee.conftest import MakeConfig, run

SIMULATED = {"privacy__enclave": "'simulated'", "privacy__enclave_allow_insecure_simulation": "true"}


def confide(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "confide.cli", *map(str, args)], capture_output=True, text=True, timeout=300
    )


@pytest.fixture
def aggregator_config(text_corpus: Path, tmp_path: Path) -> Path:
    """The server's config file for `confide aggregator` (its address is set once the port is known)."""
    path = tmp_path / "server.toml"
    options = {"run__rounds": "2", "eval__every": "100", "run__name": "'remote'", **SIMULATED}
    path.write_text(
        tiny_config(text_corpus, tmp_path / "runs", privacy__enclave_address="'127.0.0.1:1'", **options)
    )
    return path


@pytest.fixture
def authority(tmp_path: Path) -> Authority:
    """A deployment CA (`confide certs`), which endorses the simulated sites' identities for the enclave."""
    assert main(["certs", "--dir", str(tmp_path / "deploy")]) == 0
    return load_authority(CertificatePaths(tmp_path / "deploy"))


def endorse(runner: Runner, authority: Authority) -> EnclaveLayer:
    """The run's enclave layer, its link given the sites' identities as the CA endorsed them (what a
    deployed server sends the aggregator)."""
    layer = next(layer for layer in runner.federation.layers if isinstance(layer, EnclaveLayer))
    assert isinstance(layer.link, GrpcLink)
    layer.link.identities = [
        pb.Identity(site=site, public_key=public, endorsement=sign_identity(authority.key, site, public))
        for site, public in ((s, keys.identity_public_bytes(k)) for s, k in layer.identities.items())
    ]
    return layer


@pytest.fixture
def aggregator(aggregator_config: Path, tmp_path: Path, authority: Authority) -> Iterator[tuple[int, Path]]:
    """A running `confide aggregator` on 127.0.0.1 (port, platform key file), killed at the end."""
    ready, key = tmp_path / "port", tmp_path / "platform.pem"
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "confide.cli", "aggregator", "--config", str(aggregator_config)),
            *("--population", "6", "--listen", "127.0.0.1:0", "--ready-file", str(ready)),
            *("--platform-key-out", str(key), "--ca", str(tmp_path / "deploy" / "ca.pem")),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        end = time.monotonic() + 120
        while not ready.exists() and process.poll() is None and time.monotonic() < end:
            time.sleep(0.1)
        if not ready.exists():
            process.kill()
            pytest.fail(f"confide aggregator did not start: {process.communicate()[1]}")
        yield int(ready.read_text()), key
    finally:
        process.kill()
        process.wait()


def test_a_run_through_confide_aggregator_gives_the_plain_mean(
    make_config: MakeConfig,
    aggregator: tuple[int, Path],
    aggregator_config: Path,
    authority: Authority,
    tmp_path: Path,
) -> None:
    port, key = aggregator
    ca = tmp_path / "deploy" / "ca.pem"
    measured = confide(
        "aggregator", "--config", aggregator_config, "--population", "6", "--measurement", "--ca", ca
    )
    assert measured.returncode == 0, measured.stderr
    measurement = measured.stdout.strip()
    assert len(measurement) == 64
    config = make_config("remote", privacy__enclave_address=f"'127.0.0.1:{port}'", **SIMULATED)
    runner = Runner.start(config)
    layer = endorse(runner, authority)
    assert isinstance(layer.link, GrpcLink) and layer.trust is None  # trust comes from the site's own files
    layer.trust = SiteTrust.from_files("simulated", key.read_bytes(), measurement, allow_simulated=True)
    try:
        runner.run()
    finally:
        runner.store.close()
        layer.link.close_channel()
    plain = run(make_config("plain"))
    assert runner.state.round == 2
    np.testing.assert_allclose(runner.state.weights, plain.state.weights, rtol=0, atol=1e-6)


def test_sites_refuse_a_remote_aggregator_of_another_configuration(
    make_config: MakeConfig, aggregator: tuple[int, Path], aggregator_config: Path, authority: Authority
) -> None:
    port, key = aggregator
    other = confide(
        "aggregator",
        "--config",
        aggregator_config,
        "--population",
        "6",
        "--measurement",
        "--set",
        "server.aggregator=krum",
    )
    assert other.returncode == 0, other.stderr
    config = make_config("remote", privacy__enclave_address=f"'127.0.0.1:{port}'", **SIMULATED)
    runner = Runner.start(config)
    layer = endorse(runner, authority)
    layer.trust = SiteTrust.from_files(
        "simulated", key.read_bytes(), other.stdout.strip(), allow_simulated=True
    )
    try:
        result = runner.federation.round(runner.state, runner.backend)
    finally:
        runner.store.close()
    assert result.abandoned is not None and "accepted the aggregator's attestation" in result.abandoned


def test_a_deployment_refuses_the_simulated_platform_unless_told_it_is_insecure(
    make_config: MakeConfig, aggregator_config: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="enclave_allow_insecure_simulation"):
        check_deployment(
            make_config("d", privacy__enclave="'simulated'", privacy__enclave_address="'127.0.0.1:1'")
        )
    with pytest.raises(ConfigError, match="own process"):
        check_deployment(make_config("d", **SIMULATED))
    check_deployment(make_config("d", privacy__enclave_address="'127.0.0.1:1'", **SIMULATED))
    refused = confide(
        "aggregator",
        "--config",
        aggregator_config,
        "--population",
        "6",
        "--set",
        "privacy.enclave_allow_insecure_simulation=false",
    )
    assert refused.returncode == 2 and "enclave_allow_insecure_simulation" in refused.stderr.replace(
        "\n", " "
    )
    assert (
        main(
            [
                "aggregator",
                "--config",
                str(aggregator_config),
                "--population",
                "6",
                "--listen",
                "0.0.0.0:0",
                "--platform-key-out",
                str(tmp_path / "k.pem"),
            ]
        )
        == 2
    )
    with pytest.raises(DeploymentError, match="loopback"):
        check_loopback("10.0.0.1:7444")
    check_loopback("[::1]:7444")
    # the site decides for itself, whatever the server's config says
    key = tmp_path / "key.pem"
    key.write_bytes(b"")
    arguments = argparse.Namespace(
        enclave_platform="simulated",
        enclave_platform_key=key,
        enclave_measurement="00" * 32,
        enclave_max_age=600.0,
        enclave_allow_insecure_simulation=False,
    )
    with pytest.raises(ConfigError, match="--enclave-allow-insecure-simulation"):
        _enclave_trust(arguments)
    arguments.enclave_measurement = None
    with pytest.raises(Exception, match="all three"):
        _enclave_trust(arguments)
