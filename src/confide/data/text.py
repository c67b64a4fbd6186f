"""A user's own text as a federated data set, one site per file, folder or ``site`` value.

Accepted layouts:

* a folder of text files: one site per file, named by the file's name without its extension (``.txt``,
  ``.md``, or none at all, as many corpora ship);
* a folder of folders: one site per subfolder, named by the subfolder, its text files concatenated in
  sorted order (both kinds may be mixed in one folder);
* a ``.jsonl`` file whose lines are objects with ``site`` and ``text`` fields: a site's records joined in file
  order with newlines.

With ``lazy=True`` (``data.lazy``), a folder's sites are registered from its listing alone: a site's text is
read, split and windowed only when the site is first drawn (:class:`~confide.data.dataset.SiteData`), and its
window counts are estimated from its files' sizes until then. Only a site smaller than ``min_chars`` bytes is
skipped; one whose test part turns out too short for a full window still trains, with no test windows.

Names starting with "." are ignored. A file that is not text (it holds a NUL byte or is not UTF-8 in its
first 8 KiB: an image, an archive, a file in another encoding) is skipped with one warning that names it. A
site whose text is too short to leave a full window in its test part is
SKIPPED with a logged warning rather than failing the whole load, the same way the Shakespeare loader drops
small roles; only when no site is left does loading fail. Text must be UTF-8.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from confide.data.dataset import WINDOW, FederatedDataset, SiteData, has_test_window, make_site, split_text
from confide.data.tokenize import DEFAULT_TOKENIZER, Tokenizer
from confide.errors import DataError

__all__ = ["MIN_CHARS", "load_text", "read_site_file", "read_sites"]

logger = logging.getLogger(__name__)

MIN_CHARS = 5 * (WINDOW + 1)
"""Default minimum characters per site: the least for which a 20% test part can hold one full window."""


def _normalise(text: str) -> str:
    """One line ending convention and a trailing newline, as the Shakespeare site texts have."""
    lines = text.splitlines()
    return "\n".join(lines) + "\n" if lines else ""


def _read(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(
            f"{path} is not UTF-8 text (byte {error.start} cannot be decoded); convert it to UTF-8"
        ) from error
    except OSError as error:
        raise DataError(f"cannot read {path}: {error.strerror or error}") from error


SNIFF = 8192
"""Bytes read from the start of a file to tell text from binary."""


def _binary(path: Path) -> str:
    """Why ``path`` is not a UTF-8 text file, judged by its first SNIFF bytes ("" when it is text)."""
    try:
        with path.open("rb") as f:
            head = f.read(SNIFF)
    except OSError as error:
        raise DataError(f"cannot read {path}: {error.strerror or error}") from error
    if b"\0" in head:
        return "it holds NUL bytes (binary)"
    try:
        # A character cut off at the end of the head is fine: final=False.
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError as error:
        return f"it is not UTF-8 (byte {error.start}); convert it to UTF-8 if it is text"
    return ""


def _is_text(path: Path, skipped: list[str]) -> bool:
    """Whether ``path`` is a regular file that holds text; if it is a file that does not, it and why are
    added to ``skipped``."""
    if not path.is_file():
        return False
    why = _binary(path)
    if why:
        skipped.append(f"{path} ({why})")
    return not why


def _text_files(paths: list[Path], skipped: list[str]) -> list[Path]:
    """The regular files of ``paths`` that hold text (see :func:`_is_text`)."""
    return [path for path in paths if _is_text(path, skipped)]


def _warn_skipped(folder: Path, skipped: list[str]) -> None:
    if skipped:
        shown = "; ".join(skipped[:5]) + (f"; and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        logger.warning("%s: skipped %d files that are not text: %s", folder, len(skipped), shown)


def _site_name(path: Path) -> str:
    """A site file's name without its extension (``play.txt`` and ``play`` both name site ``play``)."""
    return path.stem or path.name


def _visible(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except OSError as error:
        raise DataError(f"cannot list {folder}: {error.strerror or error}") from error


def _read_folder(folder: Path) -> dict[str, str]:
    sites: dict[str, str] = {}
    origin: dict[str, Path] = {}
    skipped: list[str] = []
    for entry in _visible(folder):
        if entry.is_dir():
            name = entry.name
            text = "".join(_normalise(_read(p)) for p in _text_files(_visible(entry), skipped))
        elif _is_text(entry, skipped):
            name = _site_name(entry)
            text = _normalise(_read(entry))
        else:
            continue
        if name in sites:
            raise DataError(
                f"{folder} has two sources for site {name!r}: {origin[name].name} and {entry.name}; "
                "keep one, or rename one of them"
            )
        sites[name], origin[name] = text, entry
    _warn_skipped(folder, skipped)
    if not sites:
        raise DataError(
            f"{folder} holds no site: put one UTF-8 text file per site in it, or one folder of text files "
            "per site" + (f" ({len(skipped)} files were skipped as not text)" if skipped else "")
        )
    return sites


def json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """Each (line number, parsed JSON value) of the non-blank lines of the UTF-8 file ``path``; a DataError
    that names the file and line for what cannot be read or parsed."""
    for number, line in enumerate(_read(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path} line {number} is not valid JSON: {error.msg}") from error


def _read_jsonl(path: Path) -> dict[str, str]:
    records: dict[str, list[str]] = {}
    for number, record in json_lines(path):
        if not isinstance(record, dict):
            raise DataError(f"{path} line {number} must be a JSON object with 'site' and 'text' fields")
        for field in ("site", "text"):
            if field not in record:
                raise DataError(f"{path} line {number} lacks the {field!r} field")
            if not isinstance(record[field], str):
                raise DataError(
                    f"{path} line {number}: {field!r} must be a string, got {type(record[field]).__name__}"
                )
        if not record["site"]:
            raise DataError(f"{path} line {number}: 'site' is empty")
        records.setdefault(record["site"], []).append(record["text"])
    if not records:
        raise DataError(f"{path} holds no records; each line must be a JSON object with 'site' and 'text'")
    return {site: _normalise("\n".join(texts)) for site, texts in records.items()}


def read_sites(path: str | os.PathLike[str]) -> dict[str, str]:
    """Each site's text (newline-terminated lines), before any length filtering, in sorted / file order."""
    source = Path(path).expanduser()
    if not source.exists():
        raise DataError(
            f"{source} does not exist; give a folder of text files (or of folders) or a .jsonl file"
        )
    if source.is_dir():
        return _read_folder(source)
    if source.suffix == ".jsonl":
        return _read_jsonl(source)
    raise DataError(f"{source} is neither a folder nor a .jsonl file")


def _site_text(entry: Path) -> str:
    """The text of one site of a folder: a text file, or a folder's text files in sorted order."""
    if entry.is_dir():
        skipped: list[str] = []
        text = "".join(_normalise(_read(p)) for p in _text_files(_visible(entry), skipped))
        _warn_skipped(entry, skipped)
        return text
    return _normalise(_read(entry))


def read_site_file(path: Path) -> str:
    """The text of one site's file given by name (a deployed site's ``--data``), newline-terminated; a
    DataError when it is not UTF-8 text."""
    why = _binary(path)
    if why:
        raise DataError(f"{path} is not a text file: {why}")
    return _normalise(_read(path))


def _load_site(entry: Path, tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """A lazily registered site's (train, test) windows, read from ``entry`` when the site is first needed."""
    if not entry.exists():
        raise DataError(
            f"site file {entry} is gone since the run began; restore it for the site to train again"
        )
    name = entry.name if entry.is_dir() else _site_name(entry)
    site = make_site(name, name, _site_text(entry), tokenizer)
    return site.train, site.test


def _estimate(chars: int) -> tuple[int, int]:
    """(train, test) windows of a text of ``chars`` characters split near 80%, before it is read."""
    train = int(0.8 * chars)
    return -(-max(train - 1, 0) // WINDOW), -(-max(chars - train - 1, 0) // WINDOW)


def register_folder(folder: Path, min_chars: int, tokenizer: Tokenizer) -> FederatedDataset:
    """The sites of ``folder`` registered lazily: from its listing and file sizes only (see the module)."""
    if not folder.is_dir():
        raise DataError(
            f"data.lazy needs a folder with one text file or folder per site; {folder} is not a folder"
        )
    sites = []
    small = 0
    skipped: list[str] = []
    seen: set[str] = set()
    with os.scandir(folder) as entries:
        listing = sorted((e for e in entries if not e.name.startswith(".")), key=lambda e: e.name)
    for entry in listing:
        path = Path(entry.path)
        if entry.is_dir():
            name = entry.name
            size = sum(p.stat().st_size for p in _text_files(_visible(path), skipped))
        elif _is_text(path, skipped):
            name = _site_name(path)
            size = entry.stat().st_size
        else:
            continue
        if name in seen:
            raise DataError(f"{folder} has two sources for site {name!r}; keep one, or rename one of them")
        seen.add(name)
        if size < min_chars:  # bytes: at least as many as characters
            small += 1
            continue
        load = partial(_load_site, path, tokenizer)
        sites.append(SiteData(name, name, load=load, counts=_estimate(size)))
    _warn_skipped(folder, skipped)
    if small:
        logger.warning("skipped %d sites of %s smaller than %d bytes", small, folder, min_chars)
    if not sites:
        raise DataError(
            f"{folder} holds no site of at least {min_chars} bytes: put one UTF-8 text file per site in it, "
            "or one folder of text files per site"
        )
    return FederatedDataset(name=folder.name, sites=tuple(sites), vocab_size=tokenizer.vocab_size)


def load_text(
    path: str | os.PathLike[str],
    min_chars: int = MIN_CHARS,
    tokenizer: Tokenizer = DEFAULT_TOKENIZER,
    *,
    lazy: bool = False,
) -> FederatedDataset:
    """A federated data set from a folder or a .jsonl file; short sites are skipped with a warning.

    A site is kept when it has at least ``min_chars`` characters and its test part (the text after the line
    boundary nearest 80%) holds a full window of ``WINDOW + 1`` characters. With ``lazy``, a folder's sites
    are registered without reading them (see the module).
    """
    if min_chars < 0:
        raise DataError(f"min_chars must not be negative, got {min_chars}")
    source = Path(path).expanduser()
    if lazy:
        return register_folder(source, min_chars, tokenizer)
    texts = read_sites(source)
    sites = []
    skipped: list[str] = []
    for name, text in texts.items():
        test_part = split_text(text)[1]
        if len(text) < min_chars or not has_test_window(test_part):
            logger.warning(
                "skipping site %r: it has %d characters and a test part of %d; a site needs at least %d "
                "characters and a test part of at least %d (the text after the line nearest 80%%)",
                name, len(text), len(test_part), min_chars, WINDOW + 1,
            )  # fmt: skip
            skipped.append(name)
            continue
        sites.append(make_site(name, name, text, tokenizer))
    if not sites:
        raise DataError(
            f"no site in {source} is long enough: each needs at least {min_chars} characters and a test part "
            f"(the last ~20%, split at a line boundary) of at least {WINDOW + 1} characters; "
            f"too short: {', '.join(skipped[:5])}{', ...' if len(skipped) > 5 else ''}"
        )
    return FederatedDataset(
        name=source.stem or str(source), sites=tuple(sites), vocab_size=tokenizer.vocab_size
    )
