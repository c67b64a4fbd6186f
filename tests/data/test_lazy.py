"""Lazily registered sites (data.lazy): nothing is read until a site is drawn, only the sites at work stay in
memory, and a run trains exactly as on the same sites loaded whole."""

from __future__ import annotations

import pickle
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from confide import config
from confide.core import Task, Update
from confide.data.text import load_text
from confide.errors import ConfigError, DataError
from confide.runtime.runner import Runner
from tests.conftest import LINES, tiny_config

SITES = 30


def write_sites(root: Path, count: int = SITES) -> Path:
    """``count`` sites of 24-40 lines each (every one long enough to keep when loaded whole)."""
    root.mkdir()
    rng = np.random.default_rng(1)
    for i in range(count):
        picks = rng.choice(len(LINES), size=int(rng.integers(24, 41)))
        (root / f"site{i:03d}.txt").write_text("\n".join(LINES[j] for j in picks) + "\n")
    return root


def test_registering_reads_no_site_and_loading_gives_the_windows_of_a_whole_load(tmp_path: Path) -> None:
    corpus = write_sites(tmp_path / "corpus")
    # Registering reads a file's first 8 KiB to tell text from binary, nothing more: the bad byte is found
    # only when the site is drawn, and a file that is binary from its start is skipped.
    (corpus / "broken.txt").write_bytes(b"text " * 2000 + b"\xff\xfe not UTF-8 " * 100)
    (corpus / "archive.gz").write_bytes(b"\x1f\x8b\x08\x00" + bytes(500))
    lazy = load_text(corpus, lazy=True)
    assert [s.name for s in lazy.sites][:2] == ["broken", "site000"]
    assert not any(s.loaded for s in lazy.sites)
    (corpus / "broken.txt").unlink()
    whole = load_text(corpus)
    for site in whole.sites:
        registered = lazy.by_name(site.name)
        assert abs(registered.num_train - site.num_train) <= 1  # estimated from the file's size
        np.testing.assert_array_equal(registered.train, site.train)
        np.testing.assert_array_equal(registered.test, site.test)
        assert registered.loaded and registered.num_train == site.num_train
        registered.release()
        assert not registered.loaded
    with pytest.raises(DataError, match="gone since the run began"):
        _ = lazy.by_name("broken").train


def test_a_lazily_registered_site_travels_to_another_process_without_its_windows(tmp_path: Path) -> None:
    site = load_text(write_sites(tmp_path / "corpus"), lazy=True).sites[0]
    train = site.train
    copy = pickle.loads(pickle.dumps(site))
    assert not copy.loaded
    np.testing.assert_array_equal(copy.train, train)


def metrics(runner: Runner) -> list[tuple[float, float]]:
    rows = runner.store.db.execute("SELECT round, train_loss FROM rounds ORDER BY round").fetchall()
    return [(r, round(loss, 6)) for r, loss in rows]


def run(path: Path, lazy: bool) -> tuple[list[tuple[float, float]], list[int]]:
    """The run's (round, training loss) rows, and how many sites hold their windows after each round's
    training."""
    overrides = [f"data.lazy={str(lazy).lower()}", f"run.name='lazy-{lazy}'"]
    runner = Runner.start(config.load(path, overrides))
    assert runner.dataset is not None
    dataset, train, loaded = runner.dataset, runner.backend.train, []

    def counting(weights: np.ndarray, tasks: Sequence[Task]) -> Iterator[Update]:
        yield from train(weights, tasks)
        loaded.append(sum(s.loaded for s in dataset.sites))

    runner.backend.train = counting  # type: ignore[method-assign]
    try:
        runner.run()
        return metrics(runner), loaded
    finally:
        runner.store.close()


def test_a_lazy_run_keeps_only_the_sites_at_work_and_trains_as_a_whole_load(tmp_path: Path) -> None:
    corpus = write_sites(tmp_path / "corpus")
    path = tmp_path / "tiny.toml"
    path.write_text(tiny_config(corpus, tmp_path / "runs", server__sites_per_round="4", eval__sites="3"))
    whole, _ = run(path, lazy=False)
    lazy, loaded = run(path, lazy=True)
    assert lazy == whole
    # After each round's training: that round's 4 sites, and the 3 evaluated sites of the round before.
    assert loaded and max(loaded) <= 4 + 3 < SITES


def test_a_site_whose_file_is_gone_is_a_dropped_site(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    corpus = write_sites(tmp_path / "corpus", 8)
    path = tmp_path / "tiny.toml"
    path.write_text(tiny_config(corpus, tmp_path / "runs", server__sites_per_round="8", eval__sites="2"))
    runner = Runner.start(config.load(path, ["data.lazy=true", "eval.every=100"]))
    (corpus / "site005.txt").unlink()
    try:
        runner.run()
        rounds = runner.store.db.execute("SELECT COUNT(*) FROM rounds").fetchone()[0]
    finally:
        runner.store.close()
    assert rounds == 4
    dropped = [r.getMessage() for r in caplog.records if "sends no update" in r.getMessage()]
    assert dropped and all("site005" in m and "is gone since the run began" in m for m in dropped)


def test_lazy_registration_is_refused_where_it_cannot_apply(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.lazy"):
        config.from_dict({"data": {"dataset": "shakespeare", "lazy": True}})
    with pytest.raises(ConfigError, match=r"data\.partition"):
        config.from_dict({"data": {"dataset": "text", "path": "x", "lazy": True, "partition": "iid"}})
    with pytest.raises(DataError, match="not a folder"):
        load_text(tmp_path / "sites.jsonl", lazy=True)
