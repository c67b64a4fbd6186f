"""Who shares masks and secrets with whom: the neighbour graph of SecAgg+ (Bell et al. 2020).

In the protocol of Bonawitz et al. (2017) every site agrees a mask with every other site and gives every
other site a share of its secrets: O(n) work and messages per site, O(n^2) in all. Bell et al. ("Secure
Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020) show that a sparse random graph of
degree k = O(log n) keeps the same guarantees: each site masks with and shares to its k neighbours only.

The graph here is the Harary graph H(k, n) over a random permutation of the sites (a "random Harary graph"):
the sites are put on a ring in the order of SHA-256(session, site), and each one is joined to the k/2 sites
either side of it. Every site learns the session value, so the server and every site build the same graph
themselves; a Harary graph is k-vertex-connected, so removing fewer than k sites never splits it; and
because positions on the ring are pseudo-random and the session value is drawn jointly by commit and reveal
(``session``), nobody picks who ends up next to whom. With k >= n - 1 it is the complete graph of the
original protocol.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

from confide.errors import ConfigError
from confide.privacy.secagg.keys import frame


def default_neighbours(sites: int) -> int:
    """k = 2 * ceil(log2 n) + 6, at most n - 1 (the complete graph): the default of SecAggParams.

    Why this k. Bell et al. need k = O(log n) for two properties that hold with high probability over the
    random placement: (1) the honest sites that survive stay connected, else the server learns the separate
    sums of the pieces; a random graph is connected from degree about ln n on, and 2 log2 n = 2.9 ln n leaves
    room to lose a large part of every neighbourhood. (2) every neighbourhood keeps at least t surviving share
    holders (else the round is lost) and holds fewer than t colluding sites (else they could unmask a
    neighbour). That is a binomial tail, and the margin of 6 is for it: with the default threshold of two
    thirds and 5% of sites dropping independently, a round of 100 sites (k = 20, t = 14) or of 1000
    (k = 26, t = 18) is lost with probability about 4e-4; at 10% dropping, 6% and 15% (with a majority
    threshold it was 1e-4, but that threshold tolerates no site colluding with a malicious server; see
    params.default_threshold). Where that many sites drop, raise k: k = 50 brings a round of 100 back to
    1e-4. The value is even because each site takes k/2 neighbours on either side of the ring.
    """
    if sites < 2:
        raise ConfigError(f"secure aggregation needs at least 2 sites (got {sites})")
    return min(sites - 1, 2 * math.ceil(math.log2(sites)) + 6)


def ring_order(sites: Sequence[str], session: bytes) -> list[str]:
    """The sites in the pseudo-random order that ``session`` gives: by SHA-256(session, site)."""
    return sorted(sites, key=lambda site: (hashlib.sha256(frame(b"ring", session, site)).digest(), site))


def neighbour_graph(sites: Sequence[str], neighbours: int, session: bytes) -> Mapping[str, frozenset[str]]:
    """Each site's neighbours in the random Harary graph H(k, n) with k = ``neighbours``.

    ``neighbours`` must be even or at least n - 1 (then the graph is complete).
    """
    n = len(sites)
    if len(set(sites)) != n:
        raise ConfigError("the sites of a secure aggregation round must be distinct")
    if neighbours >= n - 1:
        everyone = frozenset(sites)
        return {site: everyone - {site} for site in sites}
    if neighbours < 2 or neighbours % 2:
        raise ConfigError(
            f"neighbours must be an even number >= 2 (each site takes k/2 neighbours on either side of a "
            f"ring) or at least n - 1 = {n - 1} for the complete graph (got {neighbours})"
        )
    ring = ring_order(sites, session)
    half = neighbours // 2
    # half < n/2, so the 2 * half offsets reach 2 * half distinct sites.
    return {
        site: frozenset(ring[(i + offset) % n] for offset in range(-half, half + 1) if offset)
        for i, site in enumerate(ring)
    }
