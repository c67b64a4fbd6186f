"""Attack: a malicious server sits in the middle between a victim and its neighbours. It shows the victim
key pairs of its own in place of each neighbour's, so the victim encrypts its shares of its self-mask seed
to the server and agrees every pairwise mask with the server; with t of those shares and every pairwise
seed, the server strips the masks from the victim's input alone.

Without the authenticated mode the attack works (the control below reads the victim's input exactly): that
is what the mode is for. With it, every key a site accepts must carry its owner's Ed25519 signature over
(nonce, round, commitment digest, site, keys, contribution), checked against the registry the site was
given by its constructor, never against anything in a server message; the substituted keys are refused and
nothing of the victim's leaves it. (The original code already checked key signatures in this mode; this
test keeps that so, now that signatures also cover the session contribution and the digest.)
"""

from __future__ import annotations

import dataclasses
import os

import pytest

from confide.privacy.secagg import (
    SERVER,
    AdvertisedKeys,
    MessageError,
    ShareBroadcast,
    keys,
    shamir,
)
from confide.privacy.secagg.protocol import (
    SECRET_BYTES,
    SHARE_BYTES,
    mask_seed,
    share_associated_data,
    share_key,
)
from tests.privacy.secagg.adversary import reconstruct_any, recovered, unmask_alone
from tests.privacy.secagg.conftest import ROUND, Driver

VICTIM = "site00"


def man_in_the_middle(driver: Driver, forge_signatures: bool = False) -> bool:
    """Run the attack; True if the server read the victim's input (a refusal raises MessageError)."""
    broadcasts = driver.advertise()
    server = driver.server
    assert server.session is not None
    session, neighbours = server.session, sorted(server.graph[VICTIM])
    own = {a.site: a for a in broadcasts[neighbours[0]].keys}[VICTIM]  # the victim's real public keys
    fake = {v: (keys.generate(), keys.generate()) for v in neighbours}  # (cipher, mask) posing as v
    identity = keys.generate_identity()  # the server's own: it cannot sign as a registered site
    substituted = []
    for real in broadcasts[VICTIM].keys:
        cipher, mask = (keys.public_bytes(k) for k in fake[real.site])
        signature = identity.sign(b"anything") if forge_signatures else real.signature
        substituted.append(AdvertisedKeys(real.site, cipher, mask, signature))
    forged = dataclasses.replace(broadcasts[VICTIM], keys=tuple(substituted))
    shared = driver.clients[VICTIM].share_keys(SERVER, forged)
    # The victim's shares to each "neighbour" open with the server's key.
    seed_shares = {}
    for v, sealed in shared.shares:
        key = share_key(keys.agree(fake[v][0], own.cipher_key), session, ROUND, VICTIM, v)
        plaintext = keys.unseal(key, sealed, share_associated_data(session, ROUND, VICTIM, v))
        seed_shares[v] = shamir.share_from_bytes(plaintext[SHARE_BYTES:], SECRET_BYTES)
    # The victim needs shares from its neighbours before it masks: the server makes them up.
    points = {s: i + 1 for i, s in enumerate(driver.setup.sites)}
    forwarded = []
    for v in neighbours:
        junk = shamir.share_to_bytes(shamir.split(os.urandom(32), [points[VICTIM]], 1)[0])
        key = share_key(keys.agree(fake[v][0], own.cipher_key), session, ROUND, v, VICTIM)
        forwarded.append((v, keys.seal(key, junk + junk, share_associated_data(session, ROUND, v, VICTIM))))
    message = ShareBroadcast(sender=SERVER, round=ROUND, shares=tuple(forwarded))
    masked = driver.clients[VICTIM].masked_input(SERVER, message, driver.vectors[VICTIM])
    self_seed = reconstruct_any(points, seed_shares)
    assert self_seed is not None
    pairwise = {
        v: mask_seed(keys.agree(fake[v][1], own.mask_key), session, ROUND, VICTIM, v) for v in neighbours
    }
    fixed = driver.params.fixed_point
    candidate = unmask_alone(fixed, masked.vector, VICTIM, driver.sites, self_seed, pairwise)
    return recovered(fixed, candidate, driver.vectors[VICTIM])


@pytest.mark.parametrize("forge_signatures", [False, True], ids=["replayed signatures", "own signatures"])
def test_substituted_keys_are_refused_in_the_authenticated_mode(forge_signatures: bool) -> None:
    driver = Driver(5, 16, authenticated=True)
    with pytest.raises(
        MessageError, match=r"keys advertised for site 'site0[1-4]' do not carry its signature"
    ):
        man_in_the_middle(driver, forge_signatures)
    # The victim is out of the round: no masked input of it will ever exist in this attempt.
    with pytest.raises(MessageError, match="failed stage"):
        driver.clients[VICTIM].masked_input(
            SERVER, ShareBroadcast(sender=SERVER, round=ROUND, shares=()), driver.vectors[VICTIM]
        )


def test_the_attack_is_real_without_authentication() -> None:
    """The control: without the authenticated mode the same server reads the victim's input exactly."""
    assert man_in_the_middle(Driver(5, 16))
