"""Re-partitioning a federated data set: the same windows dealt out to sites in a different way.

Experiments compare how an algorithm copes with heterogeneity, so they need the natural split, an IID
control with the same site sizes, and a tunable label skew. Every function here is pure and seeded: the same
data set, options and seed give identical sites.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from confide.data.dataset import FederatedDataset, SiteData
from confide.data.tokenize import PAD
from confide.errors import DataError
from confide.registry import DIRICHLET_LABELS, PARTITIONS

__all__ = [
    "LABELS",
    "SCHEMES",
    "dirichlet",
    "group",
    "group_labels",
    "iid",
    "natural",
    "next_char_labels",
    "partition",
    "quantity",
]

SCHEMES = PARTITIONS.names()
LABELS = DIRICHLET_LABELS.names()

Seed = int | np.random.Generator


def natural(ds: FederatedDataset) -> FederatedDataset:
    """The data set as loaded: one site per role, file or ``site`` value."""
    return ds


def group(ds: FederatedDataset) -> FederatedDataset:
    """One site per group, holding the windows of every site of the group: for Shakespeare one site per
    play, every role of it joined (a few sites with many records each, as hospitals or banks are).

    Each role keeps its own train/test split, so the group's test windows are its roles' held-out text and
    no window is in two sites. Groups come in the order of their first site; a site is named after its
    group. A data set whose sites are their own groups (a folder of text) is returned unchanged.
    """
    members: dict[str, list[SiteData]] = {}
    for site in ds.sites:
        members.setdefault(site.group, []).append(site)
    if all(len(sites) == 1 and sites[0].name == name for name, sites in members.items()):
        return ds
    merged = tuple(
        SiteData(
            name=name,
            group=name,
            train=np.concatenate([s.train for s in sites]),
            test=np.concatenate([s.test for s in sites]),
        )
        for name, sites in members.items()
    )
    return FederatedDataset(name=f"{ds.name}:group", sites=merged, vocab_size=ds.vocab_size)


def _stack(ds: FederatedDataset, part: str) -> np.ndarray:
    arrays = [getattr(s, part) for s in ds.sites]
    width = ds.sites[0].train.shape[1] if ds.sites else 0
    return np.concatenate(arrays) if arrays else np.empty((0, width), dtype=np.uint8)


def _deal(windows: np.ndarray, order: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    """``windows[order]`` cut into consecutive pieces of ``counts`` rows."""
    return np.split(windows[order], np.cumsum(counts)[:-1])


def iid(ds: FederatedDataset, seed: Seed) -> FederatedDataset:
    """Pool all train windows and re-deal them at random, keeping each site's train count; test likewise.

    Site names stay; each site's group becomes its name, since its windows no longer come from one group.
    """
    if not ds.sites:
        return ds
    rng = np.random.default_rng(seed)
    parts = {}
    for part in ("train", "test"):
        pooled = _stack(ds, part)
        counts = np.array([getattr(s, part).shape[0] for s in ds.sites], dtype=np.int64)
        parts[part] = _deal(pooled, rng.permutation(pooled.shape[0]), counts)
    sites = tuple(
        SiteData(name=s.name, group=s.name, train=parts["train"][k], test=parts["test"][k])
        for k, s in enumerate(ds.sites)
    )
    return FederatedDataset(name=f"{ds.name}:iid", sites=sites, vocab_size=ds.vocab_size)


def group_labels(ds: FederatedDataset, part: str) -> np.ndarray:
    """One integer label per window of ``part`` (over all sites in order): the index of its site's group."""
    groups = sorted({s.group for s in ds.sites})
    index = {g: i for i, g in enumerate(groups)}
    counts = [getattr(s, part).shape[0] for s in ds.sites]
    return np.repeat(np.array([index[s.group] for s in ds.sites], dtype=np.int64), counts)


def next_char_labels(ds: FederatedDataset, part: str) -> np.ndarray:
    """One integer label per window of ``part`` (over all sites in order): the last character it predicts."""
    windows = _stack(ds, part)
    if windows.shape[0] == 0:
        return np.empty(0, dtype=np.int64)
    # The last real target: PAD only fills the tail of a window, so it sits at (number of non-PAD) - 1.
    last = (windows != PAD).sum(axis=1) - 1
    return windows[np.arange(windows.shape[0]), last].astype(np.int64)


def _check_split(scheme: str, num_sites: Any, alpha: Any) -> tuple[int, float]:
    """``num_sites`` and ``alpha`` of a re-partition into new sites, checked."""
    if isinstance(num_sites, bool) or not isinstance(num_sites, int | np.integer) or num_sites < 1:
        raise DataError(f"{scheme}: num_sites must be a positive integer, got {num_sites!r}")
    try:
        concentration = float(alpha)
    except (TypeError, ValueError):
        concentration = float("nan")
    if isinstance(alpha, bool) or not (np.isfinite(concentration) and concentration > 0):
        raise DataError(f"{scheme}: alpha must be a positive number, got {alpha!r}")
    return int(num_sites), concentration


def _new_sites(scheme: str, pieces: dict[str, list[np.ndarray]]) -> tuple[SiteData, ...]:
    """Sites ``SCHEME-000``, ... (name and group) from the dealt pieces, less those with no train window."""
    digits = max(3, len(str(len(pieces["train"]) - 1)))
    return tuple(
        SiteData(name=f"{scheme}-{k:0{digits}d}", group=f"{scheme}-{k:0{digits}d}", train=train, test=test)
        for k, (train, test) in enumerate(zip(pieces["train"], pieces["test"], strict=True))
        if train.shape[0] > 0
    )


def dirichlet(
    ds: FederatedDataset, num_sites: int, alpha: float, seed: Seed, label: str = "group"
) -> FederatedDataset:
    """Label-skewed sites (Hsu et al. 2019): each label's windows shared among sites by Dirichlet(alpha).

    ``label="group"`` uses each window's site group (the play, for Shakespeare); ``"next_char"`` uses the last
    target character of the window. Test windows of a label are split with the same shares as its train
    windows, so every new site is tested on the distribution it trains on. Small ``alpha`` gives each site few
    labels; large ``alpha`` approaches an even split. New sites are named ``dirichlet-000``, ... with the name
    as group; sites that end up with no train window are dropped, so fewer than ``num_sites`` may remain (and
    a kept site may have no test window).
    """
    num_sites, concentration = _check_split("dirichlet", num_sites, alpha)
    if label not in LABELS:
        raise DataError(f"dirichlet: label must be one of {', '.join(LABELS)}, got {label!r}")
    rng = np.random.default_rng(seed)
    labeller = DIRICHLET_LABELS.load(label)
    labels = {part: labeller(ds, part) for part in ("train", "test")}
    assigned = {part: np.empty(labels[part].shape[0], dtype=np.int64) for part in ("train", "test")}
    values = np.unique(np.concatenate([labels["train"], labels["test"]]))
    for value in values:
        shares = rng.dirichlet(np.full(num_sites, concentration))
        for part in ("train", "test"):
            members = np.flatnonzero(labels[part] == value)
            cuts = np.floor(np.cumsum(shares)[:-1] * members.size).astype(np.int64)
            counts = np.diff(np.concatenate([[0], cuts, [members.size]]))
            assigned[part][rng.permutation(members)] = np.repeat(np.arange(num_sites), counts)
    pieces = {}
    for part in ("train", "test"):
        windows = _stack(ds, part)
        order = np.argsort(assigned[part], kind="stable")
        pieces[part] = _deal(windows, order, np.bincount(assigned[part], minlength=num_sites))
    name = f"{ds.name}:dirichlet(sites={num_sites},alpha={concentration:g},label={label})"
    return FederatedDataset(name=name, sites=_new_sites("dirichlet", pieces), vocab_size=ds.vocab_size)


def quantity(ds: FederatedDataset, num_sites: int, alpha: float, seed: Seed) -> FederatedDataset:
    """Quantity skew (NIID-Bench, Li et al. 2022): the windows dealt at random, but in amounts that differ.

    Site k gets a share q_k of the windows, drawn from Dirichlet(alpha) over the sites; train and test are
    split with the same shares, each pooled and shuffled, so every site sees the same distribution of text
    (no label skew) in very different amounts when alpha is small. Sites left with no train window are
    dropped. New sites are named ``quantity-000``, ...
    """
    num_sites, concentration = _check_split("quantity", num_sites, alpha)
    rng = np.random.default_rng(seed)
    shares = rng.dirichlet(np.full(num_sites, concentration))
    pieces = {}
    for part in ("train", "test"):
        pooled = _stack(ds, part)
        cuts = np.floor(np.cumsum(shares)[:-1] * pooled.shape[0]).astype(np.int64)
        counts = np.diff(np.concatenate([[0], cuts, [pooled.shape[0]]]))
        pieces[part] = _deal(pooled, rng.permutation(pooled.shape[0]), counts)
    name = f"{ds.name}:quantity(sites={num_sites},alpha={concentration:g})"
    return FederatedDataset(name=name, sites=_new_sites("quantity", pieces), vocab_size=ds.vocab_size)


def partition(ds: FederatedDataset, scheme: str, seed: Seed = 0, **options: Any) -> FederatedDataset:
    """Apply the named scheme: ``natural`` (no options), ``group`` (none), ``iid`` (none), ``dirichlet``
    (``num_sites``, ``alpha``, optional ``label``) or ``quantity`` (``num_sites``, ``alpha``)."""
    if scheme in ("natural", "group"):
        accepted: tuple[str, ...] = ()
    elif scheme == "iid":
        accepted = ()
    elif scheme == "dirichlet":
        accepted = ("num_sites", "alpha", "label")
    elif scheme == "quantity":
        accepted = ("num_sites", "alpha")
    else:
        raise DataError(f"unknown partition scheme {scheme!r}; accepted schemes: {', '.join(SCHEMES)}")
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        allowed = ", ".join(accepted) if accepted else "none"
        raise DataError(
            f"partition scheme {scheme!r} takes no option {', '.join(unknown)} (its options: {allowed})"
        )
    if scheme == "natural":
        return natural(ds)
    if scheme == "group":
        return group(ds)
    if scheme == "iid":
        return iid(ds, seed)
    missing = [key for key in ("num_sites", "alpha") if key not in options]
    if missing:
        raise DataError(f"partition scheme {scheme!r} needs {' and '.join(missing)}")
    if scheme == "quantity":
        return quantity(ds, seed=seed, **options)
    return dirichlet(ds, seed=seed, **options)
