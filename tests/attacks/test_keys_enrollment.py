"""Attacks on enrollment (outside audit, issue 11 sec. 3a): a request for another site's name, a request for
a key its sender does not hold, and a server folder that holds site private keys.

Before this fix `confide enroll SITE --certificate` made the site's private key in the server's folder
(``sites/SITE.key``) and handed it over in the credentials file; whoever read the server's folder could be
any site. Now a site makes its keys itself (`confide keys`) and sends only a request; enrollment checks that
the request is signed by each key it names and asks for the site's own name, and nothing private of a site
ever reaches the server.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from confide.cli import main
from confide.errors import DeploymentError
from confide.runtime.grpc.identity import SiteKeyPaths, make_site_keys
from confide.runtime.grpc.security import Credentials, Enrollment, create_certificates, issue_site_credentials

PRIVATE_PEM = re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----.+?-----END [A-Z ]*PRIVATE KEY-----", re.DOTALL)


@pytest.fixture
def server(tmp_path: Path) -> Path:
    directory = tmp_path / "deploy"
    create_certificates(directory, ["localhost"])
    return directory


def request(name: str, tls_key: ec.EllipticCurvePrivateKey, identity: Ed25519PrivateKey) -> bytes:
    """A request as `confide keys` writes it, for any name and any keys (what an attacker can make)."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    tls = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(tls_key, hashes.SHA256())
    ident = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(identity, None)
    return tls.public_bytes(serialization.Encoding.PEM) + ident.public_bytes(serialization.Encoding.PEM)


def assert_nothing_enrolled(server: Path, site: str) -> None:
    with Enrollment.open(server) as enrollment:
        assert enrollment.record(site) is None
    assert not (server / "sites" / f"{site}.json").exists()


def test_a_request_for_another_sites_name_is_refused(server: Path, tmp_path: Path) -> None:
    """Mallory asks to be enrolled with a request in site00's name: signed by such a request, a
    certificate naming site00 would let mallory be site00 over mutual TLS."""
    made = make_site_keys(tmp_path / "mallory", "site00")  # mallory's own keys, the victim's name
    for auth in ("mtls", "token"):
        with pytest.raises(DeploymentError, match=r"is a request for site00, not for site 'mallory'"):
            issue_site_credentials(server, "mallory", request=made.paths.request.read_bytes(), auth=auth)
    assert_nothing_enrolled(server, "mallory")
    # The same through the command line: one error line, exit status 2, nothing written.
    assert main(["enroll", "mallory", "--dir", str(server), "--csr", str(made.paths.request)]) == 2
    assert_nothing_enrolled(server, "mallory")


def test_a_request_that_mixes_names_is_refused(server: Path) -> None:
    """Each of the two requests is checked: the TLS one for mallory, the identity one for site00."""
    tls = request("mallory", ec.generate_private_key(ec.SECP256R1()), Ed25519PrivateKey.generate())
    ident = request("site00", ec.generate_private_key(ec.SECP256R1()), Ed25519PrivateKey.generate())
    blocks = re.findall(
        rb"-----BEGIN CERTIFICATE REQUEST-----.+?-----END CERTIFICATE REQUEST-----\n", tls + ident, re.S
    )
    mixed = blocks[0] + blocks[3]  # mallory's TLS request, site00's identity request
    with pytest.raises(DeploymentError, match=r"a request for site00, not for site 'mallory'"):
        issue_site_credentials(server, "mallory", request=mixed)
    assert_nothing_enrolled(server, "mallory")


def test_a_request_for_a_key_its_sender_does_not_hold_is_refused(server: Path, tmp_path: Path) -> None:
    """Mallory copies site00's identity PUBLIC key into a request of its own name, hoping to have the CA
    endorse site00's key as mallory's; it cannot sign for that key, so the request's signature fails."""
    victim = make_site_keys(tmp_path / "site00", "site00")
    forged_key = Ed25519PrivateKey.generate()
    honest = request("mallory", ec.generate_private_key(ec.SECP256R1()), forged_key)
    own = forged_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    blocks = re.findall(rb"-----BEGIN CERTIFICATE REQUEST-----\n(.+?)-----END", honest, re.S)
    der = base64.b64decode(b"".join(blocks[1].split()))
    assert der.count(own) == 1
    swapped = der.replace(own, victim.identity_public)
    pem = (
        b"-----BEGIN CERTIFICATE REQUEST-----\n"
        + base64.encodebytes(swapped)
        + b"-----END CERTIFICATE REQUEST-----\n"
    )
    tampered = honest.split(b"-----BEGIN CERTIFICATE REQUEST-----", 2)
    forged = b"-----BEGIN CERTIFICATE REQUEST-----" + tampered[1] + pem
    with pytest.raises(DeploymentError, match=r"is not signed by its own key"):
        issue_site_credentials(server, "mallory", request=forged)
    assert_nothing_enrolled(server, "mallory")


def test_a_request_without_both_keys_is_refused(server: Path) -> None:
    whole = request("mallory", ec.generate_private_key(ec.SECP256R1()), Ed25519PrivateKey.generate())
    first = whole[: whole.index(b"-----END CERTIFICATE REQUEST-----") + 34]
    with pytest.raises(DeploymentError, match=r"must hold one TLS key request and one identity .*1 and 0"):
        issue_site_credentials(server, "mallory", request=first)
    with pytest.raises(DeploymentError, match=r"holds no certificate request.*confide keys mallory"):
        issue_site_credentials(server, "mallory", request=b"not a request")
    assert_nothing_enrolled(server, "mallory")


# -- (d) the server's folder after enrollment holds no site private key --------------------------------


def private_keys_in(folder: Path) -> dict[str, list[bytes]]:
    """Every PEM private key in any file under ``folder`` (JSON-escaped ones included), by file: the DER
    of each one's public key."""
    found: dict[str, list[bytes]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        for block in PRIVATE_PEM.findall(data.replace(b"\\n", b"\n")):
            key = serialization.load_pem_private_key(block, password=None)
            public = key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            found.setdefault(str(path.relative_to(folder)), []).append(public)
    return found


def secret_bytes(paths: SiteKeyPaths) -> list[bytes]:
    """A site's private keys in every form they could be stored in: PEM, DER, raw."""
    forms = []
    for path in (paths.tls_key, paths.identity_key):
        pem = path.read_bytes()
        key = serialization.load_pem_private_key(pem, password=None)
        der = key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        forms += [pem, der, b"".join(pem.splitlines()[1:-1])]
        if isinstance(key, Ed25519PrivateKey):
            forms.append(
                key.private_bytes(
                    serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
                )
            )
        else:
            assert isinstance(key, ec.EllipticCurvePrivateKey)
            forms.append(key.private_numbers().private_value.to_bytes(32, "big"))
    return forms


def test_the_server_folder_holds_no_site_private_key_after_enrollment(tmp_path: Path) -> None:
    """The whole flow through the command line, every way a site can be enrolled, then a scan of every
    file the server has (the registry and its write-ahead log included): the only private keys there are
    the CA's and the server's own."""
    deploy = tmp_path / "deploy"
    assert main(["certs", "--dir", str(deploy)]) == 0
    sites = {}
    for site, extra in [("alpha", []), ("beta", ["--auth", "token"])]:
        folder = tmp_path / f"site-{site}"
        assert main(["keys", site, "--dir", str(folder)]) == 0
        sites[site] = SiteKeyPaths(folder, site)
        assert main(["enroll", site, "--dir", str(deploy), "--csr", str(sites[site].request), *extra]) == 0
    assert main(["enroll", "gamma", "--dir", str(deploy)]) == 0  # a token alone

    found = private_keys_in(deploy)
    assert sorted(found) == ["ca.key", "server.key"]
    on_disk = b"".join(p.read_bytes() for p in deploy.rglob("*") if p.is_file())
    for paths in sites.values():
        for secret in secret_bytes(paths):
            assert secret not in on_disk
    # The credentials files the server wrote name the key files the site keeps; they hold none.
    alpha = json.loads((deploy / "sites" / "alpha.json").read_text())
    assert (alpha["key_file"], alpha["identity_key_file"]) == ("alpha.key", "alpha.identity.key")
    assert "key_pem" not in alpha and "identity_pem" not in alpha
    # And the site, with that file put beside its keys, has everything it needs.
    (sites["alpha"].credentials).write_bytes((deploy / "sites" / "alpha.json").read_bytes())
    (sites["alpha"].credentials).chmod(0o600)
    loaded = Credentials.load(sites["alpha"].credentials)
    assert loaded.key_pem == sites["alpha"].tls_key.read_bytes()
    assert loaded.identity_pem == sites["alpha"].identity_key.read_bytes()


def test_the_old_way_of_making_a_site_key_at_the_server_is_refused(server: Path) -> None:
    assert main(["enroll", "alpha", "--dir", str(server), "--certificate"]) == 2
    assert_nothing_enrolled(server, "alpha")
    assert sorted(private_keys_in(server)) == ["ca.key", "server.key"]
