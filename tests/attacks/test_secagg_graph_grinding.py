"""Attack: a malicious server that picks the round's session value searches for one whose neighbour graph
surrounds a victim with its sybils; t sybil neighbours hold t shares of both of the victim's secrets and
unmask its input between them, with no help from anyone honest.

Before the fix the server chose the session value outright (the Setup carried it), so the search took a
few hundred hashes. Now the value is SHA-256 of every committed site's contribution, each committed before
any is revealed, and each site computes it itself. The adversary below tries what is left: re-choosing its
sybils' contributions after seeing the honest ones (what a server-commits-first design would allow), and
dropping sites after the reveals; the victim refuses both. What remains, choosing which commitments to take
(blind) or abandoning the attempt, gives one fresh uniform graph per attempt.
"""

from __future__ import annotations

import dataclasses
import itertools
import os

import pytest

from confide.privacy.secagg import (
    SERVER,
    AdvertisedKeys,
    AdvertiseKeys,
    KeyBroadcast,
    MessageError,
    neighbour_graph,
    session,
)
from tests.privacy.secagg.conftest import ROUND, Driver

VICTIM = "site00"
SITES, NEIGHBOURS = 20, 4  # t = 4 of 5 holders: the 4 neighbours together unmask the victim
SYBILS = {f"site{i:02d}" for i in range(14, 20)}


def reveals(driver: Driver) -> dict[str, AdvertiseKeys]:
    """Steps 1 and 2, honest: every site commits, then reveals its contribution with its keys."""
    digests = driver.commit()
    advertised = {s: driver.clients[s].advertise_keys(SERVER, digests[s]) for s in driver.sites}
    for s, message in advertised.items():
        driver.server.collect_advertise(s, message)
    return advertised


def session_of(contributions: dict[str, bytes], driver: Driver) -> bytes:
    """The session value that these contributions give, as a site computes it."""
    nonce = driver.setup.nonce
    commitments = {s: session.commitment(nonce, ROUND, s, c) for s, c in contributions.items()}
    digest = session.commitments_digest(nonce, ROUND, commitments)
    return session.derive_session(nonce, ROUND, digest, contributions)


def surrounded(sites: list[str], contributions: dict[str, bytes], driver: Driver) -> bool:
    return neighbour_graph(sites, NEIGHBOURS, session_of(contributions, driver))[VICTIM] <= SYBILS


def broadcast_for_victim(
    advertised: dict[str, AdvertiseKeys], contributions: dict[str, bytes], driver: Driver
) -> KeyBroadcast:
    """The key broadcast the adversary shows the victim: its chosen contributions and the keys of the
    neighbours they give."""
    neighbours = neighbour_graph(sorted(contributions), NEIGHBOURS, session_of(contributions, driver))[VICTIM]
    return KeyBroadcast(
        sender=SERVER,
        round=ROUND,
        contributions=tuple(sorted(contributions.items())),
        keys=tuple(
            AdvertisedKeys(v, advertised[v].cipher_key, advertised[v].mask_key, advertised[v].signature)
            for v in sorted(neighbours)
        ),
    )


def test_sybils_cannot_rechoose_their_contributions_after_the_reveals() -> None:
    driver = Driver(SITES, 16, neighbours=NEIGHBOURS)
    assert driver.params.threshold == NEIGHBOURS
    advertised = reveals(driver)
    honest = {s: m.contribution for s, m in advertised.items() if s not in SYBILS}
    # The search the old design allowed: with the honest contributions known, try sybil contributions until
    # the victim's four neighbours are all sybils (each try succeeds with probability 15/3876).
    for _ in range(20_000):
        chosen = {**honest, **{s: os.urandom(32) for s in SYBILS}}
        if surrounded(driver.sites, chosen, driver):
            break
    else:
        pytest.fail("the search found no surrounding graph in 20000 tries (probability below 1e-30)")
    with pytest.raises(MessageError, match="do not match the commitments"):
        driver.clients[VICTIM].share_keys(SERVER, broadcast_for_victim(advertised, chosen, driver))


def test_the_server_cannot_drop_sites_after_the_reveals_to_pick_a_graph() -> None:
    driver = Driver(SITES, 16, neighbours=NEIGHBOURS)
    advertised = reveals(driver)
    contributions = {s: m.contribution for s, m in advertised.items()}
    honest = sorted(set(driver.sites) - SYBILS - {VICTIM})

    # Of every way to leave out one or two honest sites, the one that puts the most sybils beside the victim.
    def sybil_neighbours(left_out: tuple[str, ...]) -> int:
        kept = {s: c for s, c in contributions.items() if s not in left_out}
        return len(neighbour_graph(sorted(kept), NEIGHBOURS, session_of(kept, driver))[VICTIM] & SYBILS)

    subsets = [c for r in (1, 2) for c in itertools.combinations(honest, r)]
    best = max(subsets, key=sybil_neighbours)
    kept = {s: c for s, c in contributions.items() if s not in best}
    with pytest.raises(MessageError, match="do not match the commitments"):
        driver.clients[VICTIM].share_keys(SERVER, broadcast_for_victim(advertised, kept, driver))


@pytest.mark.parametrize("forgery", ["replaced", "left out"])
def test_the_server_cannot_replace_the_victims_contribution_or_leave_it_out(forgery: str) -> None:
    """Without the victim's own contribution the session would be the sybils' and the honest sites' only,
    which the server, colluding, could grind again; the victim checks that its own value is in."""
    driver = Driver(SITES, 16, neighbours=NEIGHBOURS)
    reveals(driver)
    honest = driver.server.broadcast_keys()[VICTIM]
    contributions = dict(honest.contributions)
    if forgery == "replaced":
        contributions[VICTIM] = os.urandom(32)
    else:
        del contributions[VICTIM]
    message = dataclasses.replace(honest, contributions=tuple(sorted(contributions.items())))
    with pytest.raises(MessageError, match="own session contribution"):
        driver.clients[VICTIM].share_keys(SERVER, message)


def test_the_nonce_the_server_picks_does_not_fix_the_session() -> None:
    """The server may grind its nonce as long as it likes: the same nonce, sites and round give a different
    session value every time, because every site draws its contribution afresh from the OS."""
    first, second = Driver(SITES, 16, neighbours=NEIGHBOURS), Driver(SITES, 16, neighbours=NEIGHBOURS)
    assert first.setup.nonce == second.setup.nonce  # the same seed: the same nonce
    reveals(first)
    reveals(second)
    first.server.broadcast_keys()
    second.server.broadcast_keys()
    assert first.server.session != second.server.session
