"""The canary audit end to end on a tiny corpus: planting, two trainings, exposures, the files written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from confide import config
from confide.audit.canaries import make_canaries
from confide.data import DEFAULT_TOKENIZER
from confide.data.text import load_text
from confide.errors import ConfigError
from confide.runtime.audit import audit_canaries, plant
from confide.runtime.store import Store
from tests.conftest import tiny_config


def test_plant_adds_one_window_per_copy_to_the_chosen_sites_only(text_corpus: Path) -> None:
    dataset = load_text(text_corpus)
    canaries = make_canaries(2, np.random.default_rng(0))
    planted = plant(dataset, canaries, ["site1", "site4"], repeats=7)
    for before, after in zip(dataset.sites, planted.sites, strict=True):
        extra = 7 if before.name in ("site1", "site4") else 0
        assert after.num_train == before.num_train + extra
        np.testing.assert_array_equal(after.train[: before.num_train], before.train)
        np.testing.assert_array_equal(after.test, before.test)
    window = planted.by_name("site1").train[-1]
    text = DEFAULT_TOKENIZER.decode(window[window != 255])
    assert text == canaries[0].text + "\n"


def test_audit_trains_with_and_without_dp_and_writes_its_results(tmp_path: Path, text_corpus: Path) -> None:
    path = tmp_path / "tiny.toml"
    path.write_text(tiny_config(text_corpus, tmp_path / "runs"))
    cfg = config.load(path, ["privacy.dp=central", "privacy.noise_multiplier=2", "run.rounds=3"])
    folder, runs = audit_canaries(cfg, num_canaries=2, repeats=5, candidates=50)
    assert [r.label for r in runs] == ["without DP", "with DP"]
    assert runs[0].epsilon is None and runs[1].epsilon is not None and runs[1].epsilon > 0
    for run in runs:
        assert len(run.canaries) == 2
        for c in run.canaries:
            assert 0 <= c.exposure <= math.log2(51) + 1e-9 and np.isfinite(c.fitted_exposure)
            assert 0 <= c.rounds_trained <= 3
    summary = json.loads((folder / "canaries.json").read_text())
    assert summary["candidates"] == 50 and len(summary["runs"]) == 2
    assert (folder / "audit.html").read_text().count("<img") == 1
    runs_made = [folder / "canaries-no-dp", folder / "canaries-dp"]
    assert all((run / "metrics.jsonl").is_file() for run in runs_made)
    store = Store.open(folder)
    try:
        stored = store.audits()["canaries"][1]
    finally:
        store.close()
    assert stored == summary  # the numbers are in the audit folder's run store as in canaries.json
    # Again: the audit replaces its own runs and numbers, rather than refusing an existing run directory.
    stamp = (folder / "canaries-dp" / "run.sqlite").stat().st_mtime_ns
    audit_canaries(cfg, num_canaries=2, repeats=5, candidates=50)
    assert (folder / "canaries-dp" / "run.sqlite").stat().st_mtime_ns != stamp
    with pytest.raises(ConfigError, match=r"set privacy\.dp = 'central'"):
        audit_canaries(config.load(path), num_canaries=1)
