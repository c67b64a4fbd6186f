"""Attacks on the registry of site identities that a server sends its sites (outside audit, issue 11 sec. 3a).

Authenticated secure aggregation is only as good as the identity keys each site checks signatures with. The
client used to take them as the server sent them (``JoinReply.registry``), so a server could put a key of its
own in place of a victim's, sign "the victim's" round keys with it, and so end up holding every secret needed
to unmask the victim's individual update (Bonawitz et al. 2017, sec. 6: the active-server model assumes a
PKI). Now each entry carries the CA's endorsement of (site, key) and a site checks it against the CA
certificate in its own credentials (``verify_registry``).

The attacker here is the running server: it holds its folder (ca.pem, server.key, sites.sqlite) but not the
CA's key, which is kept in a folder of its own, as the threat model in ``confide.runtime.grpc.security``
advises. Each test mounts the attack, shows that taken as sent the forged registry would have let the
attacker's keys into a round, and shows the site now refuses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from confide.errors import DeploymentError
from confide.privacy.secagg import SERVER, SecAggClient, SecAggExpectation, SecAggParams, SecAggServer
from confide.privacy.secagg.errors import MessageError
from confide.privacy.secagg.keys import identity_public_bytes
from confide.runtime.grpc.identity import identity_statement, make_site_keys, sign_identity, verify_registry
from confide.runtime.grpc.security import (
    Credentials,
    Enrollment,
    Identity,
    create_certificates,
    issue_site_credentials,
)

SITES = ["site00", "site01", "site02"]
VICTIM, WITNESS = "site01", "site00"
"""The site whose key the server replaces, and an honest site that is given the forged registry."""


@dataclass
class Deployment:
    server: Path
    """The running server's folder: ca.pem, server.pem, server.key, sites.sqlite, and no ca.key."""
    ca_key: Path
    """The CA's key, in a folder of its own that the server does not have."""
    sites: dict[str, Credentials]
    """Each site's credentials as the site loads them (with the keys it made)."""

    @property
    def ca_pem(self) -> bytes:
        return (self.server / "ca.pem").read_bytes()

    def registry(self) -> dict[str, Identity]:
        """What an honest server sends: each site's identity key and the CA's endorsement of it."""
        with Enrollment.open(self.server) as enrollment:
            return enrollment.identities(SITES)

    def identity(self, site: str) -> Ed25519PrivateKey:
        key = self.sites[site].identity()
        assert key is not None
        return key


@pytest.fixture
def deployment(tmp_path: Path) -> Deployment:
    server, ca = tmp_path / "deploy", tmp_path / "offline-ca"
    create_certificates(server, ["localhost", "127.0.0.1"], ca_directory=ca)
    sites = {}
    for site in SITES:
        keys = make_site_keys(tmp_path / f"site-{site}", site)
        request = keys.paths.request.read_bytes()
        issue_site_credentials(server, site, request=request, ca_directory=ca).save(keys.paths.credentials)
        sites[site] = Credentials.load(keys.paths.credentials)
    assert not (server / "ca.key").exists()
    return Deployment(server, ca / "ca.key", sites)


def keys_accepted(
    deployment: Deployment,
    registry: dict[str, bytes],
    attacker: Ed25519PrivateKey,
    forged: dict[str, bytes],
) -> None:
    """One authenticated round up to the key broadcast, the server playing the victim with ``attacker`` (and
    checking signatures with its own ``forged`` registry): returns when the witness, holding ``registry``,
    accepts the keys advertised as the victim's (it would go on to give the server the shares that unmask
    the victim); raises MessageError when it refuses them."""
    params = SecAggParams(sites=len(SITES), authenticated=True)
    expect = SecAggExpectation.of(params, 8)
    server = SecAggServer(params, SITES, 1, 8, registry=forged)
    setup = server.setup()
    clients = {
        site: SecAggClient(
            site,
            SERVER,
            setup,
            expect=expect,
            identity=attacker if site == VICTIM else deployment.identity(site),
            registry=registry,
        )
        for site in SITES
    }
    for site, client in clients.items():
        server.collect_commitment(site, client.commit())
    for site, message in server.broadcast_commitments().items():
        server.collect_advertise(site, clients[site].advertise_keys(SERVER, message))
    clients[WITNESS].share_keys(SERVER, server.broadcast_keys()[WITNESS])


def test_the_enrolled_registry_verifies_and_carries_a_round(deployment: Deployment) -> None:
    """The honest case, end to end: the site checks the registry, and a whole round sums exactly."""
    registry = verify_registry(deployment.ca_pem, deployment.registry())
    assert registry == {s: identity_public_bytes(deployment.identity(s)) for s in SITES}
    params = SecAggParams(sites=len(SITES), authenticated=True)
    vectors = {s: np.full(8, i + 1, dtype=np.float32) / 8 for i, s in enumerate(SITES)}
    server = SecAggServer(params, SITES, 1, 8, registry=registry)
    setup = server.setup()
    expect = SecAggExpectation.of(params, 8)
    clients = {
        s: SecAggClient(s, SERVER, setup, expect=expect, identity=deployment.identity(s), registry=registry)
        for s in SITES
    }
    for s in SITES:
        server.collect_commitment(s, clients[s].commit())
    for s, message in server.broadcast_commitments().items():
        server.collect_advertise(s, clients[s].advertise_keys(SERVER, message))
    for s, message in server.broadcast_keys().items():
        server.collect_shares(s, clients[s].share_keys(SERVER, message))
    for s, message in server.forward_shares().items():
        server.collect_masked_input(s, clients[s].masked_input(SERVER, message, vectors[s]))
    for s, message in server.request_consistency().items():
        server.collect_consistency(s, clients[s].confirm_survivors(SERVER, message))
    for s, message in server.request_unmasking().items():
        server.collect_unmask(s, clients[s].unmask(SERVER, message))
    np.testing.assert_allclose(server.finish().vector, sum(vectors.values()), atol=1e-5)


def forgeries(deployment: Deployment, attacker: bytes) -> dict[str, bytes]:
    """The endorsements a server without ca.key can put beside its own key for the victim."""
    genuine = deployment.registry()
    server_key = serialization.load_pem_private_key(
        (deployment.server / "server.key").read_bytes(), password=None
    )
    assert isinstance(server_key, ec.EllipticCurvePrivateKey)
    rogue = create_certificates(deployment.server.parent / "rogue-ca", [])  # a CA of the attacker's own
    rogue_key = serialization.load_pem_private_key(rogue.ca_key.read_bytes(), password=None)
    assert isinstance(rogue_key, ec.EllipticCurvePrivateKey)
    return {
        "the victim's own endorsement": genuine[VICTIM][1],
        "signed with the server's TLS key": server_key.sign(
            identity_statement(VICTIM, attacker), ec.ECDSA(hashes.SHA256())
        ),
        "endorsed by a CA of the attacker's": sign_identity(rogue_key, VICTIM, attacker),
        "no endorsement": b"",
    }


def test_a_server_that_puts_its_own_key_in_place_of_a_sites_is_refused(deployment: Deployment) -> None:
    attacker = Ed25519PrivateKey.generate()
    attacker_public = identity_public_bytes(attacker)
    genuine = deployment.registry()
    for how, endorsement in forgeries(deployment, attacker_public).items():
        forged = {**genuine, VICTIM: (attacker_public, endorsement)}
        as_sent = {s: public for s, (public, _) in forged.items()}
        # Taken as sent (the client before this fix), the substitution gets the attacker's keys accepted.
        keys_accepted(deployment, as_sent, attacker, as_sent)
        # Checked against the site's own CA certificate, the forged entry is refused, naming the site.
        with pytest.raises(
            DeploymentError, match=f"site '{VICTIM}' .* is not endorsed by the deployment's CA"
        ):
            verify_registry(deployment.sites[WITNESS].ca_pem, forged)
        # And with the registry it verified, the site refuses the attacker's keys inside the round too.
        verified = verify_registry(deployment.sites[WITNESS].ca_pem, genuine)
        with pytest.raises(MessageError, match=f"keys advertised for site '{VICTIM}' do not carry"):
            keys_accepted(deployment, verified, attacker, as_sent)
        assert how  # each forgery was tried


def test_an_endorsement_for_another_site_name_is_refused(deployment: Deployment) -> None:
    """The CA's genuine endorsements, moved: another site's (key, endorsement) under the victim's name."""
    genuine = deployment.registry()
    moved = {**genuine, VICTIM: genuine["site02"]}
    with pytest.raises(DeploymentError, match=f"site '{VICTIM}' .* is not endorsed .* for that site"):
        verify_registry(deployment.ca_pem, moved)
    # A key endorsed for one name, listed under a name that was never enrolled, is refused as well.
    with pytest.raises(DeploymentError, match=r"site 'mallory' .* is not endorsed"):
        verify_registry(deployment.ca_pem, {**genuine, "mallory": genuine[VICTIM]})


def test_one_key_under_two_names_is_refused_even_if_both_are_endorsed(deployment: Deployment) -> None:
    """Enrollment cannot endorse a site's key under another name (the request must be signed by the key:
    see test_keys_enrollment), but a CA used carelessly could; a site refuses such a registry anyway."""
    ca_key = serialization.load_pem_private_key(deployment.ca_key.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    genuine = deployment.registry()
    victim_key = genuine[VICTIM][0]
    twice = {**genuine, "site02": (victim_key, sign_identity(ca_key, "site02", victim_key))}
    with pytest.raises(DeploymentError, match=r"sites 'site01' and 'site02' have the same identity key"):
        verify_registry(deployment.ca_pem, twice)


def test_a_registry_is_checked_against_the_sites_own_ca_not_one_the_server_offers(
    deployment: Deployment, tmp_path: Path
) -> None:
    """A server that re-endorses every key with a CA of its own gets nowhere: the site checks against the
    CA certificate in its credentials, which the server cannot change."""
    rogue = create_certificates(tmp_path / "rogue", [])
    rogue_key = serialization.load_pem_private_key(rogue.ca_key.read_bytes(), password=None)
    assert isinstance(rogue_key, ec.EllipticCurvePrivateKey)
    attacker = identity_public_bytes(Ed25519PrivateKey.generate())
    reendorsed = {
        s: (public, sign_identity(rogue_key, s, public)) for s, (public, _) in deployment.registry().items()
    }
    reendorsed[VICTIM] = (attacker, sign_identity(rogue_key, VICTIM, attacker))
    assert verify_registry(rogue.ca_certificate.read_bytes(), reendorsed)[VICTIM] == attacker  # its own CA
    with pytest.raises(DeploymentError, match="is not endorsed by the deployment's CA"):
        verify_registry(deployment.sites[WITNESS].ca_pem, reendorsed)
