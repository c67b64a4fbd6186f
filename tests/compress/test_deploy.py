"""Compression in a deployment: real `confide server` and `confide client` processes on 127.0.0.1. The sites
build their compression layer from the config the server sends, the payload crosses the real wire, and a
deployed site keeps its top-k residual in its own durable state from one round to the next: the deployed
run's metrics are the simulation's (both compressions here are deterministic)."""

from __future__ import annotations

from pathlib import Path

import pytest

from confide import config
from confide.runtime.runner import Runner
from tests.compress.helpers import deploy_three_sites, three_sites
from tests.conftest import tiny_config
from tests.runtime.grpc_harness import metrics

SITES = ["site0", "site1", "site2"]


@pytest.mark.parametrize(
    "compression",
    [
        {"compression__kind": "'topk'", "compression__fraction": "0.2"},
        {"compression__kind": "'bfloat16'"},
    ],
    ids=["topk-error-feedback", "bfloat16"],
)
def test_a_deployed_compressed_run_gives_the_simulation(
    tmp_path: Path, text_corpus: Path, compression: dict[str, str]
) -> None:
    corpus = three_sites(tmp_path, text_corpus)  # one client process plays the three sites
    text = tiny_config(corpus, tmp_path / "runs", run__rounds="2", eval__every="1", **compression)
    deploy_three_sites(tmp_path, corpus, text)
    deployed = metrics(tmp_path / "runs" / "tiny")

    local = tmp_path / "local.toml"
    local.write_text(text.replace(str(tmp_path / "runs"), str(tmp_path / "local-runs")))
    runner = Runner.start(config.load(local))
    runner.run()
    runner.store.close()
    expected = metrics(runner.store.run_dir)
    assert [m["round"] for m in deployed] == [1, 2]
    for a, b in zip(deployed, expected, strict=True):
        for key in ("loss", "accuracy", "train_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["round"], key)
