"""A LoRA fine-tuning deployed: a real `confide server` and real `confide client` processes on 127.0.0.1
train an 'hf' model's adapters under secure aggregation, each site re-tokenizing its own text with the model's
tokenizer; the run's metrics are those of the same run simulated, and a site with another base is refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import tomli_w

from confide import config
from confide.runtime.runner import Runner
from tests.llm.conftest import tiny_hf_model
from tests.runtime.grpc_harness import Cluster, enroll, metrics, query

SITES = [f"site{i}" for i in range(3)]


def lora_config(base: Path, corpus: Path, output: Path) -> str:
    raw = {
        "run": {"name": "lora", "output": str(output), "rounds": 2, "checkpoint_every": 1, "seed": 3},
        "data": {"dataset": "text", "path": str(corpus)},
        "model": {"kind": "hf", "path": str(base), "max_length": 32},
        "adapter": {"kind": "lora", "r": 4},
        "client": {"max_steps": 2, "batch_size": 4, "optimizer": "adam", "learning_rate": 0.01},
        "server": {"sites_per_round": 3},
        "privacy": {"secure_aggregation": True},
    }
    return tomli_w.dumps(raw)


@pytest.fixture
def corpus(tmp_path: Path, text_corpus: Path) -> Path:
    """Three of the text corpus's sites: one a client."""
    root = tmp_path / "three"
    root.mkdir()
    for site in SITES:
        (root / f"{site}.txt").write_text((text_corpus / f"{site}.txt").read_text())
    return root


def test_a_deployed_lora_run_gives_the_metrics_of_the_simulation(
    tmp_path: Path, llama_dir: Path, corpus: Path
) -> None:
    text = lora_config(llama_dir, corpus, tmp_path / "runs")
    (tmp_path / "run.toml").write_text(text)
    credentials = enroll(tmp_path / "deploy", SITES)
    c = Cluster(tmp_path, tmp_path / "run.toml", tmp_path / "deploy")
    try:
        c.start_server()
        for site in SITES:
            c.start_client(site, credentials[site], corpus)
        assert c.wait_server(timeout=600) == 0, c.log("server")
        assert set(c.wait_clients(timeout=120).values()) == {0}, c.log("site0")
    finally:
        c.close()
    run_dir = tmp_path / "runs" / "lora"
    assert query(run_dir, "SELECT message FROM events WHERE kind = 'dropped'") == []
    deployed = metrics(run_dir)

    local = tmp_path / "local.toml"
    local.write_text(text.replace(str(tmp_path / "runs"), str(tmp_path / "local-runs")))
    runner = Runner.start(config.load(local))
    runner.run()
    runner.store.close()
    simulated = metrics(runner.store.run_dir)
    assert [m["round"] for m in deployed] == [m["round"] for m in simulated] == [1, 2]
    for a, b in zip(deployed, simulated, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)  # the same training, summed the same way
        assert a["update_fraction"] == b["update_fraction"] < 0.05  # only the adapters travelled


def test_a_site_with_another_base_is_refused(tmp_path: Path, llama_dir: Path, corpus: Path) -> None:
    base = tmp_path / "base"
    shutil.copytree(llama_dir, base)
    text = lora_config(base, corpus, tmp_path / "runs")
    (tmp_path / "run.toml").write_text(text)
    credentials = enroll(tmp_path / "deploy", ["site0"])
    c = Cluster(tmp_path, tmp_path / "run.toml", tmp_path / "deploy")
    try:
        c.start_server()  # it has hashed its base
        tiny_hf_model(base, "llama", seed=1)  # the site's folder of that name holds other weights
        client = c.start_client("site0", credentials["site0"], corpus)
        assert client.wait(300) != 0
    finally:
        c.close()
    assert "holds a different base model than the server" in c.log("site0"), c.log("site0")
