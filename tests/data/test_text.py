"""Loading a user's own text: folder of files, folder of folders, jsonl, and the errors a user can hit."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from confide.data import DEFAULT_TOKENIZER, load_text, read_sites, split_text, windows
from confide.errors import DataError

FIXTURES = Path(__file__).parent / "fixtures"
LINE = "A line of ordinary text that is long enough to count for something.\n"


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def _check_site_windows(text: str, train: np.ndarray, test: np.ndarray) -> None:
    train_text, test_text = split_text(text)
    assert np.array_equal(train, windows(DEFAULT_TOKENIZER.encode(train_text)))
    assert np.array_equal(test, windows(DEFAULT_TOKENIZER.encode(test_text)))


def test_folder_of_files(tmp_path: Path) -> None:
    _write(tmp_path / "alpha.txt", LINE * 10)
    _write(tmp_path / "beta.txt", (LINE * 12).replace("\n", "\r\n"))
    _write(tmp_path / "short.csv", "too,short,to,be,a,site\n")
    _write(tmp_path / ".hidden.txt", LINE * 10)
    ds = load_text(tmp_path)
    assert ds.site_names == ("alpha", "beta")
    assert [s.group for s in ds.sites] == ["alpha", "beta"]
    assert ds.vocab_size == 97
    texts = read_sites(tmp_path)
    assert texts["beta"] == LINE * 12  # line endings normalised
    for site in ds.sites:
        _check_site_windows(texts[site.name], site.train, site.test)


def test_folder_of_folders_fixture() -> None:
    texts = read_sites(FIXTURES / "corpus")
    assert list(texts) == ["clinic_north", "clinic_south"]
    monday = (FIXTURES / "corpus/clinic_north/01_monday.txt").read_text()
    tuesday = (FIXTURES / "corpus/clinic_north/02_tuesday.txt").read_text()
    assert texts["clinic_north"] == monday + tuesday  # concatenated in sorted order
    ds = load_text(FIXTURES / "corpus")
    assert ds.name == "corpus" and ds.site_names == ("clinic_north", "clinic_south")
    for site in ds.sites:
        assert site.num_test >= 1
        _check_site_windows(texts[site.name], site.train, site.test)


def test_jsonl_fixture() -> None:
    texts = read_sites(FIXTURES / "tiny.jsonl")
    records = [json.loads(line) for line in (FIXTURES / "tiny.jsonl").read_text().splitlines()]
    harbour = [r["text"] for r in records if r["site"] == "harbour"]
    assert list(texts) == ["harbour", "orchard"]
    assert texts["harbour"] == "\n".join(harbour) + "\n"
    ds = load_text(FIXTURES / "tiny.jsonl")
    assert ds.site_names == ("harbour", "orchard")
    for site in ds.sites:
        _check_site_windows(texts[site.name], site.train, site.test)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_text(tmp_path / "nowhere")


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="holds no site"):
        load_text(tmp_path)


def test_not_a_folder_or_jsonl(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"neither a folder nor a \.jsonl"):
        load_text(_write(tmp_path / "data.csv", "a,b\n"))


def test_jsonl_bad_json_names_the_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", '{"site": "a", "text": "x"}\n\n{"site": "a", "text": \n')
    with pytest.raises(DataError, match="line 3 is not valid JSON"):
        load_text(path)


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"text": "x"}', "lacks the 'site' field"),
        ('{"site": "a"}', "lacks the 'text' field"),
        ('["a", "x"]', "must be a JSON object"),
        ('{"site": "a", "text": 3}', "'text' must be a string"),
        ('{"site": "", "text": "x"}', "'site' is empty"),
    ],
)
def test_jsonl_bad_record_names_the_line(tmp_path: Path, line: str, problem: str) -> None:
    path = _write(tmp_path / "d.jsonl", '{"site": "a", "text": "x"}\n' + line + "\n")
    with pytest.raises(DataError, match=f"line 2.*{problem}"):
        load_text(path)


def test_any_text_file_is_a_site_and_binaries_are_skipped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _write(tmp_path / "good.txt", LINE * 10)
    _write(tmp_path / "README", LINE * 11)  # a plain file without an extension, as many corpora ship
    _write(tmp_path / "notes.md", LINE * 12)
    _write(tmp_path / "latin.txt", ("caf\xe9\n" * 200).encode("latin-1"))
    _write(tmp_path / "image.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 8)
    _write(tmp_path / "folder" / "part", LINE * 10)
    _write(tmp_path / "folder" / "scan.bin", b"\x00" * 1000)
    with caplog.at_level(logging.WARNING, logger="confide.data.text"):
        ds = load_text(tmp_path)
    assert ds.site_names == ("README", "folder", "good", "notes")
    assert read_sites(tmp_path)["folder"] == LINE * 10  # the binary in the folder is not part of its text
    warning = caplog.text
    assert "skipped 3 files that are not text" in warning
    assert "latin.txt (it is not UTF-8 (byte 3); convert it to UTF-8 if it is text)" in warning
    assert "image.png (it holds NUL bytes (binary))" in warning and "scan.bin" in warning
    lazy = load_text(tmp_path, lazy=True)
    assert lazy.site_names == ds.site_names


def test_a_folder_of_binaries_is_an_error_that_says_so(tmp_path: Path) -> None:
    _write(tmp_path / "a.bin", b"\x00\x01" * 100)
    with pytest.raises(DataError, match=r"holds no site: put one UTF-8 text file.*1 files were skipped"):
        load_text(tmp_path)


def test_two_files_for_one_site_are_refused(tmp_path: Path) -> None:
    _write(tmp_path / "play.txt", LINE * 10)
    _write(tmp_path / "play.md", LINE * 10)
    with pytest.raises(DataError, match=r"two sources for site 'play': play.md and play.txt"):
        load_text(tmp_path)


def test_short_sites_are_skipped_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _write(tmp_path / "long.txt", LINE * 10)
    _write(tmp_path / "short.txt", LINE * 2)
    with caplog.at_level(logging.WARNING, logger="confide.data.text"):
        ds = load_text(tmp_path)
    assert ds.site_names == ("long",)
    assert "'short'" in caplog.text and "81" in caplog.text


def test_all_sites_too_short_is_an_error(tmp_path: Path) -> None:
    _write(tmp_path / "a.txt", LINE)
    _write(tmp_path / "b" / "part.txt", LINE * 3)
    with pytest.raises(DataError, match=r"no site .* long enough.*81 characters.*too short: a, b"):
        load_text(tmp_path)


def test_min_chars_is_respected(tmp_path: Path) -> None:
    _write(tmp_path / "a.txt", LINE * 10)
    assert load_text(tmp_path).site_names == ("a",)
    with pytest.raises(DataError, match="at least 5000 characters"):
        load_text(tmp_path, min_chars=5000)


def test_a_deployed_sites_data_file_may_have_any_extension_but_must_be_text(tmp_path: Path) -> None:
    from confide.runtime.grpc.client import load_site_data

    plain = _write(tmp_path / "clinic_north", LINE * 10)
    site = load_site_data(plain, "clinic_north")
    _check_site_windows(LINE * 10, site.train, site.test)
    binary = _write(tmp_path / "scan.dat", b"\x00\x01" * 500)
    with pytest.raises(DataError, match=r"scan.dat is not a text file: it holds NUL bytes"):
        load_site_data(binary, "scan")
