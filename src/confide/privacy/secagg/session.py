"""The round's session value, drawn jointly so that no single party chooses it (commit, then reveal).

The session value seeds the neighbour graph (``graph``: who holds whose shares) and every key derivation of
the round. If one party could choose it after seeing the sites, it could search ("grind") for a graph in
which a victim's neighbours are its own sybils, and those could then unmask the victim between them. So:

1. every site draws a fresh 32-byte contribution c_u from the OS and sends only
   C_u = SHA-256(frame(protocol, "contribution", nonce, round, u, c_u));
2. the server sends every site the digest D of the list of (site, C_u) it took; only then does a site reveal
   c_u (signed, with D, in the authenticated mode);
3. the server sends every site all the revealed contributions; each site checks them against D and its own
   c_u against what it sent, and computes session = SHA-256(frame(protocol, "session", nonce, round, D,
   (u, c_u) for every u in sorted order)) and from it the graph, itself.

A contribution is fixed (by its commitment, inside D) before any other is revealed, so a colluding site
cannot pick its contribution after seeing an honest one; every site's own contribution is uniform and unknown
to everyone else until D is fixed, so from where any honest site stands the session value is uniform. Every
committed site must reveal: a site missing at step 2 ends the attempt (dropping it would let the server pick
among the subsets of revealed contributions, a fresh graph each). This is the coin-tossing of Blum (1981)
with a hash commitment; SHA-256 is assumed binding and hiding for 32 random bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

from confide.privacy.secagg.keys import PROTOCOL, frame

CONTRIBUTION_BYTES = 32


def commitment(nonce: bytes, round: int, site: str, contribution: bytes) -> bytes:
    """C_u: what site u sends in step 1 instead of its contribution (bound to the attempt and the site, so
    no site can pass off another's commitment as its own)."""
    if len(contribution) != CONTRIBUTION_BYTES:
        raise ValueError(f"a session contribution has {CONTRIBUTION_BYTES} bytes, got {len(contribution)}")
    return hashlib.sha256(frame(PROTOCOL, "contribution", nonce, round, site, contribution)).digest()


def commitments_digest(nonce: bytes, round: int, commitments: Mapping[str, bytes]) -> bytes:
    """D: the digest of every (site, commitment) the server took, in sorted order of the sites."""
    return hashlib.sha256(frame(PROTOCOL, "commitments", nonce, round, *_pairs(commitments))).digest()


def derive_session(nonce: bytes, round: int, digest: bytes, contributions: Mapping[str, bytes]) -> bytes:
    """The session value from every committed site's revealed contribution."""
    return hashlib.sha256(frame(PROTOCOL, "session", nonce, round, digest, *_pairs(contributions))).digest()


def _pairs(entries: Mapping[str, bytes]) -> Iterable[str | bytes]:
    for site in sorted(entries):
        yield site
        yield entries[site]
