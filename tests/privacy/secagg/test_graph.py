"""The SecAgg+ neighbour graph: symmetric, k-regular, the same for everyone with the same session value."""

from __future__ import annotations

import math

import pytest

from confide.errors import ConfigError
from confide.privacy.secagg import SecAggParams, default_neighbours, default_threshold, neighbour_graph

SITES = [f"site{i:03d}" for i in range(50)]


@pytest.mark.parametrize("k", [2, 8, 20, 48])
def test_harary_graph_is_symmetric_and_k_regular(k: int) -> None:
    graph = neighbour_graph(SITES, k, b"s" * 32)
    for site, neighbours in graph.items():
        assert len(neighbours) == k and site not in neighbours
        assert all(site in graph[v] for v in neighbours)


def test_graph_is_deterministic_in_the_session_and_changes_with_it() -> None:
    a = neighbour_graph(SITES, 8, b"a" * 32)
    assert a == neighbour_graph(
        list(reversed(SITES)), 8, b"a" * 32
    )  # the order sites are given in is irrelevant
    assert a != neighbour_graph(SITES, 8, b"b" * 32)


def test_k_of_n_minus_one_or_more_is_the_complete_graph() -> None:
    for k in (49, 60):
        graph = neighbour_graph(SITES, k, b"s" * 32)
        assert all(graph[s] == set(SITES) - {s} for s in SITES)


def test_graph_stays_connected_after_removing_fewer_than_k_sites() -> None:
    """A Harary graph is k-vertex-connected: take away k - 1 of one site's k neighbours, and what is left is
    still one piece (that site included)."""
    graph = neighbour_graph(SITES, 6, b"s" * 32)
    start = SITES[0]
    removed = set(sorted(graph[start])[:5])
    left = set(SITES) - removed
    seen, frontier = {start}, [start]
    while frontier:
        site = frontier.pop()
        for v in graph[site] & left:
            if v not in seen:
                seen.add(v)
                frontier.append(v)
    assert seen == left


def test_default_neighbours_follow_the_documented_formula() -> None:
    assert default_neighbours(100) == 2 * 7 + 6 == 20
    assert default_neighbours(1000) == 2 * math.ceil(math.log2(1000)) + 6 == 26
    assert default_neighbours(10) == 9  # 2 * 4 + 6 = 14 >= n - 1: complete
    params = SecAggParams(sites=100)
    assert (params.neighbours, params.threshold) == (20, 14)  # two thirds of the 21 holders
    assert SecAggParams(sites=10).complete


def test_odd_or_too_small_neighbourhoods_are_refused() -> None:
    with pytest.raises(ConfigError, match="even"):
        neighbour_graph(SITES, 7, b"s" * 32)
    with pytest.raises(ConfigError, match="even"):
        SecAggParams(sites=50, neighbours=7)
    with pytest.raises(ConfigError, match="more than half"):
        SecAggParams(sites=50, neighbours=8, threshold=4)
    with pytest.raises(ConfigError, match="between 2 and"):
        SecAggParams(sites=1)


def test_default_threshold_tolerates_a_third_of_a_neighbourhood_colluding_with_the_server() -> None:
    assert [default_threshold(k) for k in (1, 2, 3, 4, 18, 20, 26)] == [2, 2, 3, 4, 13, 14, 18]
    for k in range(1, 200):
        t, holders = default_threshold(k), k + 1
        assert holders < 2 * t <= 2 * holders  # a majority, and reachable
        colluders = math.ceil(holders / 3) - 1  # fewer than a third
        assert 2 * t > holders + colluders  # the split-view attack needs 2t <= (k + 1) + c
        assert SecAggParams(sites=k + 1, neighbours=k).threshold == t
