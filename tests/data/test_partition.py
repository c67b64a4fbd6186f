"""Re-partitioning: natural, IID with the same site sizes, and Dirichlet label skew."""

from __future__ import annotations

import numpy as np
import pytest

from confide.data import PAD, WINDOW, FederatedDataset, SiteData, dirichlet, iid, natural, partition, quantity
from confide.data.partition import group
from confide.errors import DataError

NUM_GROUPS = 8


def _dataset(seed: int = 0) -> FederatedDataset:
    """Sites in NUM_GROUPS groups; every window is unique (its first two codes number it)."""
    rng = np.random.default_rng(seed)
    sites = []
    serial = 0
    for g in range(NUM_GROUPS):
        for r in range(3):
            parts = []
            for count in (int(rng.integers(5, 60)), int(rng.integers(1, 15))):
                w = rng.integers(0, 96, size=(count, WINDOW + 1), dtype=np.uint8)
                w[:, 0], w[:, 1] = np.divmod(np.arange(serial, serial + count), 96)
                serial += count
                # Some windows are a final, padded one.
                pad_from = rng.integers(3, WINDOW + 1, size=count)
                w[np.arange(WINDOW + 1)[None, :] >= pad_from[:, None]] = PAD
                parts.append(w)
            sites.append(SiteData(name=f"g{g}/r{r}", group=f"g{g}", train=parts[0], test=parts[1]))
    return FederatedDataset(name="synthetic", sites=tuple(sites), vocab_size=97)


def _rows(arrays: list[np.ndarray]) -> list[bytes]:
    return sorted(row.tobytes() for a in arrays for row in a)


def _same_windows(a: FederatedDataset, b: FederatedDataset) -> bool:
    return _rows([s.train for s in a.sites]) == _rows([s.train for s in b.sites]) and _rows(
        [s.test for s in a.sites]
    ) == _rows([s.test for s in b.sites])


def test_natural_is_unchanged() -> None:
    ds = _dataset()
    assert natural(ds) is ds
    assert partition(ds, "natural") is ds


def test_group_makes_one_site_of_each_groups_windows() -> None:
    ds = _dataset()
    grouped = partition(ds, "group")
    assert grouped.site_names == tuple(f"g{g}" for g in range(NUM_GROUPS))
    assert _same_windows(ds, grouped)
    for site in grouped.sites:
        roles = [s for s in ds.sites if s.group == site.name]
        assert site.group == site.name
        assert _rows([site.train]) == _rows([s.train for s in roles])
        assert _rows([site.test]) == _rows([s.test for s in roles])
    assert group(grouped) is grouped  # already one site per group


def test_iid_keeps_counts_and_windows() -> None:
    ds = _dataset()
    mixed = iid(ds, seed=1)
    assert mixed.site_names == ds.site_names
    assert [s.num_train for s in mixed.sites] == [s.num_train for s in ds.sites]
    assert [s.num_test for s in mixed.sites] == [s.num_test for s in ds.sites]
    assert _same_windows(ds, mixed)
    # Train windows stay train windows and test stay test.
    assert _rows([s.train for s in mixed.sites]) == _rows([s.train for s in ds.sites])
    # Actually shuffled, and the same for the same seed.
    assert not np.array_equal(mixed.sites[0].train, ds.sites[0].train)
    again = iid(ds, seed=1)
    assert all(np.array_equal(a.train, b.train) for a, b in zip(mixed.sites, again.sites, strict=True))
    other = iid(ds, seed=2)
    assert not all(np.array_equal(a.train, b.train) for a, b in zip(mixed.sites, other.sites, strict=True))


def _dominant_share(ds: FederatedDataset, source: FederatedDataset) -> float:
    """Mean over new sites of the fraction of their train windows from their most common original group."""
    group_of = {row.tobytes(): s.group for s in source.sites for row in s.train}
    shares = []
    for site in ds.sites:
        groups = [group_of[row.tobytes()] for row in site.train]
        _, counts = np.unique(groups, return_counts=True)
        shares.append(counts.max() / counts.sum())
    return float(np.mean(shares))


def test_dirichlet_preserves_windows_and_is_deterministic() -> None:
    ds = _dataset()
    for label in ("group", "next_char"):
        split = dirichlet(ds, num_sites=10, alpha=0.5, seed=3, label=label)
        assert split.num_train == ds.num_train and split.num_test == ds.num_test
        assert _same_windows(ds, split)
        assert all(s.num_train > 0 for s in split.sites)
        assert all(s.name == s.group and s.name.startswith("dirichlet-") for s in split.sites)
        again = partition(ds, "dirichlet", seed=3, num_sites=10, alpha=0.5, label=label)
        assert again.site_names == split.site_names
        assert all(
            np.array_equal(a.train, b.train) and np.array_equal(a.test, b.test)
            for a, b in zip(split.sites, again.sites, strict=True)
        )


def test_dirichlet_alpha_controls_skew() -> None:
    ds = _dataset()
    even = dirichlet(ds, num_sites=5, alpha=1e6, seed=0)
    assert len(even.sites) == 5
    sizes = np.array([s.num_train for s in even.sites])
    assert sizes.max() - sizes.min() <= 2 * NUM_GROUPS  # at most one window of rounding per group and site
    assert _dominant_share(even, ds) < 0.3  # eight groups spread evenly: ~1/8 each, measured 0.16
    skewed = dirichlet(ds, num_sites=5, alpha=0.01, seed=0)
    assert _dominant_share(skewed, ds) > 0.6  # measured 0.68 with this seed (5 sites, 8 groups)


def test_dirichlet_test_windows_follow_train_labels() -> None:
    ds = _dataset()
    split = dirichlet(ds, num_sites=4, alpha=0.05, seed=5)
    group_of = {row.tobytes(): s.group for s in ds.sites for part in (s.train, s.test) for row in part}
    for site in split.sites:
        train_groups = {group_of[row.tobytes()] for row in site.train}
        test_groups = {group_of[row.tobytes()] for row in site.test}
        assert test_groups <= train_groups


def test_dirichlet_drops_sites_without_train() -> None:
    ds = _dataset()
    split = dirichlet(ds, num_sites=200, alpha=0.01, seed=0)
    assert 0 < len(split.sites) < 200
    assert split.num_train == ds.num_train


def test_partition_errors() -> None:
    ds = _dataset()
    with pytest.raises(DataError, match="accepted schemes: natural, iid, dirichlet"):
        partition(ds, "random", seed=0)
    with pytest.raises(DataError, match="takes no option alpha"):
        partition(ds, "iid", seed=0, alpha=1.0)
    with pytest.raises(DataError, match="needs alpha"):
        partition(ds, "dirichlet", seed=0, num_sites=3)
    with pytest.raises(DataError, match="alpha must be a positive"):
        dirichlet(ds, num_sites=3, alpha=0.0, seed=0)
    with pytest.raises(DataError, match="num_sites"):
        dirichlet(ds, num_sites=0, alpha=1.0, seed=0)
    with pytest.raises(DataError, match="label must be one of group, next_char"):
        dirichlet(ds, num_sites=3, alpha=1.0, seed=0, label="play")


def test_quantity_skew_deals_every_window_once_in_very_different_amounts() -> None:
    ds = _dataset()
    skewed = partition(ds, "quantity", seed=1, num_sites=10, alpha=0.2)
    assert _same_windows(ds, skewed)
    sizes = np.array([s.num_train for s in skewed.sites])
    assert sizes.max() > 10 * max(sizes.min(), 1)  # very different sizes
    even = quantity(ds, num_sites=10, alpha=1e6, seed=1)
    even_sizes = np.array([s.num_train for s in even.sites])
    assert even_sizes.max() - even_sizes.min() <= 2  # shares of 1/10 each, up to rounding
    again = quantity(ds, num_sites=10, alpha=0.2, seed=1)
    assert [s.num_train for s in again.sites] == list(sizes)
    with pytest.raises(DataError, match="quantity: alpha must be a positive number"):
        quantity(ds, num_sites=3, alpha=0, seed=0)
