"""A site's and the server's context for one compression layer, without a federation around it."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from confide import config
from confide.client.state import MemorySiteState
from confide.core import Plan, Task, Update, Vector
from confide.pipeline import Layer, RoundContext, SiteContext
from confide.randomness import SecretRandomness
from confide.runtime.runner import Runner
from confide.server.strategy import WeightedMean

SITE = "site0"


def site_context(plan: Plan | None = None, state: MemorySiteState | None = None) -> SiteContext:
    plan = plan or Plan(round=1, seed=11)
    return SiteContext(SITE, plan, SecretRandomness(), {}, state if state is not None else MemorySiteState())


def round_context(size: int, plan: Plan | None = None) -> RoundContext:
    plan = plan or Plan(round=1, seed=11)
    aggregator = WeightedMean()
    return RoundContext(
        round=plan.round,
        sites=[SITE],
        tasks={SITE: Task(SITE, plan, 0)},
        weights=np.zeros(size, dtype=np.float32),
        server_state={},
        exchange=lambda messages: iter(()),
        min_updates=1,
        randomness=SecretRandomness(),
        population=1,
        aggregator=aggregator,
        aggregate=aggregator.init(size),
    )


def update(vector: Vector, round: int = 1) -> Update:
    return Update(SITE, round, 10, np.array(vector, dtype=np.float32), 0)


def round_trip(
    layer: Layer, vector: Vector, plan: Plan | None = None, state: MemorySiteState | None = None
) -> tuple[Update, Vector]:
    """The encoded update and what the server decodes from it."""
    encoded = layer.encode(update(vector, plan.round if plan else 1), site_context(plan, state))
    sent = replace(encoded, payload=dict(encoded.payload))
    decoded = layer.decode(encoded, round_context(vector.size, plan))
    assert decoded is not None and decoded.vector is not None
    return sent, decoded.vector


def deploy_three_sites(tmp_path: Path, text_corpus: Path, text: str) -> Path:
    """Run ``text`` (a tiny config whose output is ``tmp_path / "runs"``, over a corpus of site0 to site2) as
    a real deployment on 127.0.0.1: a `confide server` and one `confide client` process that plays the three
    sites. Returns the run directory; nobody may have been dropped."""
    from tests.runtime.grpc_harness import Cluster, enroll, query

    sites = ["site0", "site1", "site2"]
    credentials = enroll(tmp_path / "deploy", sites)
    folder = tmp_path / "credentials"
    folder.mkdir()
    for file in credentials.values():
        shutil.copy(file, folder / file.name)
    path = tmp_path / "run.toml"
    path.write_text(text)
    c = Cluster(tmp_path, path, tmp_path / "deploy")
    try:
        c.start_server()
        c.start_client("site0", folder, text_corpus, "--site", "site1", "--site", "site2")
        assert c.wait_server() == 0, c.log("server")
        assert set(c.wait_clients().values()) == {0}, c.log("site0")
    finally:
        c.close()
    run = tmp_path / "runs" / "tiny"
    assert query(run, "SELECT message FROM events WHERE kind IN ('dropped', 'failed')") == []
    return run


def three_sites(tmp_path: Path, text_corpus: Path) -> Path:
    """A corpus of the first three of ``text_corpus``'s sites (one client process plays them)."""
    corpus = tmp_path / "three-sites"
    corpus.mkdir()
    for site in ("site0", "site1", "site2"):
        shutil.copy(text_corpus / f"{site}.txt", corpus / f"{site}.txt")
    return corpus


def module_config(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """A tiny config over the text_corpus fixture's corpus, made once for a test module's runs."""
    from tests.conftest import tiny_config, write_corpus

    tmp = tmp_path_factory.mktemp(name)
    corpus = write_corpus(tmp / "corpus")
    path = tmp / "tiny.toml"
    path.write_text(tiny_config(corpus, tmp / "runs"))
    return path


def run(path: Path, *overrides: str) -> tuple[Runner, list[dict[str, Any]]]:
    """A whole run of the config at ``path`` with ``overrides``, and the rows of its metrics.jsonl."""
    runner = Runner.start(config.load(path, list(overrides)))
    try:
        runner.run()
    finally:
        runner.store.close()
    rows = [json.loads(line) for line in (runner.store.run_dir / "metrics.jsonl").read_text().splitlines()]
    return runner, rows
