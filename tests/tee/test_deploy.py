"""A deployment with the attested aggregator: real `confide aggregator`, `confide server` and `confide client`
processes on 127.0.0.1, the sites trusting only their own platform key and expected measurement."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from confide import config
from confide.runtime.grpc.aggregator import aggregator_settings
from confide.runtime.runner import Runner
from confide.runtime.store import Store
from tests.conftest import tiny_config
from tests.runtime.grpc_harness import Cluster, enroll, metrics

SITES = ["site0", "site1", "site2"]


def start_aggregator(config_path: Path, tmp: Path, ca: Path) -> tuple[subprocess.Popen[bytes], int, Path]:
    ready, key = tmp / "aggregator-port", tmp / "platform.pem"
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "confide", "aggregator", "--config", str(config_path)),
            *("--population", str(len(SITES)), "--listen", "127.0.0.1:0", "--ready-file", str(ready)),
            *("--platform-key-out", str(key), "--ca", str(ca)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    end = time.monotonic() + 120
    while not (ready.exists() and ready.read_text()) and process.poll() is None and time.monotonic() < end:
        time.sleep(0.1)
    if not ready.exists():
        process.kill()
        pytest.fail("confide aggregator did not start")
    return process, int(ready.read_text()), key


def test_a_deployed_run_through_the_aggregator_gives_the_simulation(
    tmp_path: Path, text_corpus: Path
) -> None:
    options = {
        "run__rounds": "2",
        "eval__every": "1",
        "privacy__enclave": "'simulated'",
        "privacy__enclave_allow_insecure_simulation": "true",
        "privacy__enclave_address": "'127.0.0.1:1'",  # replaced by the aggregator's port below
    }
    corpus = tmp_path / "three-sites"  # the simulation to compare with has the deployment's sites
    corpus.mkdir()
    for site in SITES:
        shutil.copy(text_corpus / f"{site}.txt", corpus / f"{site}.txt")
    text = tiny_config(corpus, tmp_path / "runs", **options)
    path = tmp_path / "run.toml"
    path.write_text(text)
    # Each site makes its own identity key, which the CA endorses at enrollment: the enclave counts an
    # update only if its site signed it, checking the identities against its own copy of ca.pem.
    files = enroll(tmp_path / "deploy", SITES, identity=True)
    ca = tmp_path / "deploy" / "ca.pem"
    aggregator, port, key = start_aggregator(path, tmp_path, ca)
    folder = tmp_path / "credentials"
    folder.mkdir()
    for file in files.values():  # each site's credentials with the keys it made beside them
        for kept in file.parent.iterdir():
            shutil.copy(kept, folder / kept.name)
    # The site's operator computes the measurement of the approved config (here in this process, as
    # `confide aggregator --measurement` does) and hands it, with the platform key, to the site.
    settings = aggregator_settings(config.load(path, stamp=False), len(SITES))
    settings = replace(settings, identity_ca=hashlib.sha256(ca.read_bytes()).hexdigest())
    measurement = settings.measurement()
    cluster = Cluster(tmp_path, path, tmp_path / "deploy", [f"privacy.enclave_address='127.0.0.1:{port}'"])
    try:
        cluster.start_server()
        trust = ["--enclave-platform", "simulated", "--enclave-platform-key", str(key)]
        trust += ["--enclave-measurement", measurement, "--enclave-allow-insecure-simulation"]
        cluster.start_client("site0", folder, corpus, "--site", "site1", "--site", "site2", *trust)
        assert cluster.wait_server() == 0, cluster.log("server")
        assert set(cluster.wait_clients().values()) == {0}, cluster.log("site0")
    finally:
        cluster.close()
        aggregator.kill()
        aggregator.wait()
    assert "INSECURE simulated enclave" in cluster.log("server").replace("\n", " ")
    deployed = metrics(tmp_path / "runs" / "tiny")
    local = tmp_path / "local.toml"
    local.write_text(tiny_config(corpus, tmp_path / "local-runs", run__rounds="2", eval__every="1"))
    simulated = Runner.start(config.load(local))
    simulated.run()
    simulated.store.close()
    expected = metrics(simulated.store.run_dir)
    assert [m["round"] for m in deployed] == [1, 2]
    events = _events(tmp_path / "runs" / "tiny")  # what the server recorded, should the numbers differ
    for a, b in zip(deployed, expected, strict=True):
        for metric in ("loss", "accuracy", "train_loss"):
            assert a[metric] == pytest.approx(b[metric], rel=1e-5, abs=1e-6), (a["round"], metric, events)


def _events(run_dir: Path) -> list[tuple[int | None, str, str]]:
    store = Store.open(run_dir)
    try:
        return [(round, kind, message) for _, round, kind, message in store.events()]
    finally:
        store.close()
