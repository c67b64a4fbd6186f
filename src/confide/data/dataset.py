"""Federated data sets as the rest of confide sees them: sites holding fixed-width windows of character codes.

A SAMPLE is a window of ``WINDOW + 1`` codes: a model reads ``w[:WINDOW]`` and predicts ``w[1:]``, the next
character at every position. A site's code sequence is tiled with stride ``WINDOW``, so consecutive windows
share exactly one code and every character after the first is a prediction target exactly once; the final,
partial window is padded with :data:`PAD`, which training maps to "no target".

Train and test come from one site text split once at a line boundary (first ~80% of characters to train),
so ``train_text + test_text == site_text``: nothing is lost or seen twice, and a test window never overlaps
a training window.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from confide.data.tokenize import PAD, Tokenizer
from confide.errors import DataError

__all__ = [
    "PAD",
    "WINDOW",
    "FederatedDataset",
    "SiteData",
    "cache_dir",
    "has_test_window",
    "make_site",
    "split_text",
    "windows",
]

WINDOW = 80
"""Characters of context per sample."""


def cache_dir() -> Path:
    """Where downloaded archives and processed data sets are kept: ``$CONFIDE_CACHE`` or ``~/.cache/confide``.

    Read at call time (not import time) so a test or a user can point it elsewhere with the environment.
    """
    configured = os.environ.get("CONFIDE_CACHE")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "confide"


def windows(codes: np.ndarray, window: int = WINDOW) -> np.ndarray:
    """Tile ``codes`` into ``(n, window + 1)`` uint8 windows with stride ``window``; the last one PAD-padded.

    Window k covers ``codes[k*window : k*window + window + 1]``. A sequence shorter than two codes has no
    target and gives no window.
    """
    if window < 1:
        raise DataError(f"the window must be at least 1 character, got {window}")
    codes = np.asarray(codes, dtype=np.uint8).reshape(-1)
    count = -(-(codes.size - 1) // window) if codes.size >= 2 else 0
    if count == 0:
        return np.empty((0, window + 1), dtype=np.uint8)
    padded = np.full(count * window + 1, PAD, dtype=np.uint8)
    padded[: codes.size] = codes
    view = np.lib.stride_tricks.sliding_window_view(padded, window + 1)[::window]
    return np.ascontiguousarray(view)


def split_text(text: str, train_fraction: float = 0.8) -> tuple[str, str]:
    """Split ``text`` at the line boundary nearest ``train_fraction`` of its characters.

    Splitting at a line boundary keeps whole lines on one side; ``train + test == text`` always holds. A text
    of a single line has no boundary and goes to train entirely.
    """
    if not 0.0 < train_fraction < 1.0:
        raise DataError(f"train_fraction must lie strictly between 0 and 1, got {train_fraction}")
    buffer = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    # A boundary is the position just after a newline, excluding the very end of the text.
    boundaries = np.flatnonzero(buffer[:-1] == ord("\n")) + 1
    if boundaries.size == 0:
        return text, ""
    target = train_fraction * len(text)
    cut = int(boundaries[np.argmin(np.abs(boundaries - target))])
    return text[:cut], text[cut:]


def has_test_window(test_text: str, window: int = WINDOW) -> bool:
    """Whether a test part is long enough to hold one full (unpadded) window."""
    return len(test_text) >= window + 1


def _check_windows(name: str, train: Any, test: Any) -> None:
    for part, array in (("train", train), ("test", test)):
        chars = isinstance(array, np.ndarray) and array.dtype == np.uint8 and array.ndim == 2
        # A language model's rows (confide.data.llm): token ids and labels, (n, 2, length) int32.
        tokens = isinstance(array, np.ndarray) and array.dtype == np.int32 and array.ndim == 3
        if not (chars or tokens):
            raise DataError(
                f"site {name!r}: {part} windows must be a 2-D uint8 array (or int32 token rows), "
                f"got {type(array).__name__} {getattr(array, 'dtype', '')} {getattr(array, 'shape', '')}"
            )
    if train.shape[1:] != test.shape[1:]:
        raise DataError(
            f"site {name!r}: train windows have width {train.shape[1]} but test windows {test.shape[1]}"
        )


Loader = Callable[[], tuple[np.ndarray, np.ndarray]]
"""A lazily registered site's loader: its (train, test) windows, read when they are first needed."""


class SiteData:
    """One site's windows; ``group`` is a coarser label: the play for Shakespeare, else the site itself.

    A site is either loaded (``train`` and ``test`` given) or registered lazily (``load`` given, with
    ``counts``, its (train, test) window counts as known before loading, estimated from a file's size):
    its windows are read the first time ``train`` or ``test`` is read, and :meth:`release` lets them go
    again, so a data set of 100,000 registered sites holds in memory only the windows of the sites at work
    (``data.lazy``; see :mod:`confide.data.text`). A lazily registered site's loader must be picklable when
    sites run in other processes (a module-level function with its arguments bound, for example).
    """

    __slots__ = ("_counts", "_load", "_test", "_train", "group", "name")

    def __init__(
        self,
        name: str,
        group: str,
        train: np.ndarray | None = None,
        test: np.ndarray | None = None,
        *,
        load: Loader | None = None,
        counts: tuple[int, int] = (0, 0),
    ) -> None:
        self.name = name
        self.group = group
        self._load = load
        self._counts = counts
        if load is None:
            if train is None or test is None:
                raise DataError(f"site {name!r} needs both its train and test windows, or a loader")
            _check_windows(name, train, test)
        self._train = train
        self._test = test

    @property
    def lazy(self) -> bool:
        """Whether the site was registered lazily (its windows are read when needed)."""
        return self._load is not None

    @property
    def loaded(self) -> bool:
        return self._train is not None

    @property
    def train(self) -> np.ndarray:
        return self._windows()[0]

    @property
    def test(self) -> np.ndarray:
        return self._windows()[1]

    def _windows(self) -> tuple[np.ndarray, np.ndarray]:
        train, test = self._train, self._test
        if train is None or test is None:
            assert self._load is not None
            train, test = self._load()
            _check_windows(self.name, train, test)
            self._train, self._test = train, test
        return train, test

    def release(self) -> None:
        """Let a lazily registered site's windows go (they are read again when next needed); a loaded
        site keeps them."""
        if self._load is not None:
            self._train = self._test = None

    @property
    def num_train(self) -> int:
        """Training windows: a lazily registered site not loaded yet gives its estimate."""
        return int(self._train.shape[0]) if self._train is not None else self._counts[0]

    @property
    def num_test(self) -> int:
        return int(self._test.shape[0]) if self._test is not None else self._counts[1]

    def with_train(self, train: np.ndarray) -> SiteData:
        """The same site with other training windows (a poisoned copy, planted canaries)."""
        return SiteData(self.name, self.group, train, self.test)

    def __getstate__(self) -> dict[str, Any]:
        # Sent to another process (a Ray worker), a lazily registered site goes without its windows.
        windows = (None, None) if self._load is not None else (self._train, self._test)
        return {"name": self.name, "group": self.group, "load": self._load, "counts": self._counts,
                "windows": windows}  # fmt: skip

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.name, self.group = state["name"], state["group"]
        self._load, self._counts = state["load"], state["counts"]
        self._train, self._test = state["windows"]

    def __repr__(self) -> str:
        how = "lazy, loaded" if self.lazy and self.loaded else "lazy" if self.lazy else "loaded"
        counts = f"{self.num_train} train, {self.num_test} test"
        return f"SiteData({self.name!r}, group={self.group!r}, {counts}, {how})"


@dataclass(frozen=True)
class FederatedDataset:
    """A named set of sites over one shared vocabulary."""

    name: str
    sites: tuple[SiteData, ...]
    vocab_size: int

    def __post_init__(self) -> None:
        counts = Counter(s.name for s in self.sites)
        dupes = sorted(n for n, c in counts.items() if c > 1)
        if dupes:
            raise DataError(f"data set {self.name!r}: site names must be unique, repeated: {dupes[:5]}")
        widths = {s.train.shape[1] for s in self.sites if s.loaded}
        if len(widths) > 1:
            raise DataError(f"data set {self.name!r}: sites have different window widths {sorted(widths)}")

    @property
    def site_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.sites)

    @cached_property
    def _index(self) -> dict[str, SiteData]:
        return {s.name: s for s in self.sites}

    @property
    def lazy(self) -> bool:
        """Whether any site was registered lazily (``data.lazy``)."""
        return any(s.lazy for s in self.sites)

    def by_name(self, name: str) -> SiteData:
        site = self._index.get(name)
        if site is not None:
            return site
        shown = ", ".join(self.site_names[:5]) + (", ..." if len(self.sites) > 5 else "")
        raise DataError(f"data set {self.name!r} has no site {name!r} (its sites: {shown})")

    @property
    def num_train(self) -> int:
        return sum(s.num_train for s in self.sites)

    @property
    def num_test(self) -> int:
        return sum(s.num_test for s in self.sites)

    def summary(self) -> dict[str, Any]:
        """Counts for a report: sites, train and test samples, and samples (train + test) per site."""
        per_site = np.array([s.num_train + s.num_test for s in self.sites], dtype=np.int64)
        return {
            "name": self.name,
            "num_sites": len(self.sites),
            "num_train": self.num_train,
            "num_test": self.num_test,
            "min_per_site": int(per_site.min()) if per_site.size else 0,
            "median_per_site": float(np.median(per_site)) if per_site.size else 0.0,
            "max_per_site": int(per_site.max()) if per_site.size else 0,
        }


def make_site(
    name: str, group: str, text: str, tokenizer: Tokenizer, train_fraction: float = 0.8
) -> SiteData:
    """Split ``text`` into train and test at a line boundary, then window each part separately."""
    train_text, test_text = split_text(text, train_fraction)
    return SiteData(
        name=name,
        group=group,
        train=windows(tokenizer.encode(train_text)),
        test=windows(tokenizer.encode(test_text)),
    )
