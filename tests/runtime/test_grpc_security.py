"""A deployment's credentials (confide.runtime.grpc.security, pki, identity): the development CA and the
server's certificate, the keys a site makes itself and the certificate the CA signs for its request, the
enrollment registry, a site's credentials file, and the Authenticator, which is checked over real gRPC
connections on 127.0.0.1 with TLS (and mutual TLS) built from the files these modules write."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import sqlite3
import stat
from collections.abc import Iterator, Sequence
from concurrent import futures
from contextlib import closing, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from confide.errors import DeploymentError
from confide.runtime.grpc.deployment import endorsed_registry
from confide.runtime.grpc.identity import SiteKeyPaths, make_site_keys
from confide.runtime.grpc.pki import issue_site_certificate, load_authority
from confide.runtime.grpc.security import (
    CA_DAYS,
    TOKEN_PREFIX,
    Authenticator,
    AuthError,
    CertificatePaths,
    Credentials,
    Enrollment,
    check_site_name,
    create_certificates,
    issue_site_credentials,
    server_credentials,
)

HOSTS = ["localhost", "127.0.0.1"]
SERVICE = "confide.test.Probe"
METHOD = f"/{SERVICE}/WhoAmI"
TIMEOUT = 10.0
"""Every call here takes milliseconds; the deadline only keeps a broken one from hanging the test."""

Metadata = Sequence[tuple[str, str]]


# -- helpers ------------------------------------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def common_names(cert: x509.Certificate) -> list[str]:
    return [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]


def registry_bytes(directory: Path) -> bytes:
    """Everything SQLite keeps on disk for the registry: the database and its write-ahead log, if any."""
    return b"".join(p.read_bytes() for p in sorted(directory.glob("sites.sqlite*")))


@pytest.fixture
def deployment(tmp_path: Path) -> Path:
    """A deployment directory: a CA and a server certificate for localhost and 127.0.0.1 (no site yet)."""
    directory = tmp_path / "deploy"
    create_certificates(directory, HOSTS)
    return directory


@pytest.fixture
def foreign(tmp_path: Path) -> Path:
    """Another deployment, with a CA of its own."""
    directory = tmp_path / "foreign"
    create_certificates(directory, HOSTS)
    return directory


def site_folder(deployment: Path, site: str) -> Path:
    """Where ``site`` keeps its keys: a folder of its own, outside the server's."""
    return deployment.parent / f"site-{deployment.name}-{site}"


def enrolled(deployment: Path, site: str, auth: str = "mtls", **options: Any) -> Credentials:
    """The whole flow: ``site`` makes its keys and request in its own folder, the server enrolls it from
    the request, and the site loads the credentials file the server wrote, put beside its keys."""
    keys = make_site_keys(site_folder(deployment, site), site)
    issued = issue_site_credentials(
        deployment, site, request=keys.paths.request.read_bytes(), auth=auth, **options
    )
    issued.save(keys.paths.credentials)
    return Credentials.load(keys.paths.credentials)


def certificate_credentials(directory: Path, site: str, trust: Path | None = None) -> Credentials:
    """Credentials with a certificate that the CA of ``directory`` signed for a key ``site`` made, WITHOUT
    enrolling the site, trusting the CA of ``trust`` (by default, of ``directory`` itself)."""
    keys = make_site_keys(site_folder(directory, site), site)
    key_pem = keys.paths.tls_key.read_bytes()
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    cert_pem = issue_site_certificate(
        load_authority(CertificatePaths(directory)), site, key.public_key(), 365
    )
    return Credentials(
        site=site,
        ca_pem=CertificatePaths(trust or directory).ca_certificate.read_bytes(),
        cert_pem=cert_pem,
        key_pem=key_pem,
    )


@dataclass
class Server:
    port: int
    enrollment: Enrollment
    """The server's own connection to the registry."""


@contextmanager
def serving(directory: Path, auth: str, tls: bool = True) -> Iterator[Server]:
    """A real gRPC server on 127.0.0.1 whose one method answers with the name of the calling site, as
    the deployment's Authenticator identifies it (a refused call is aborted by the Authenticator)."""
    enrollment = Enrollment.open(directory)
    authenticator = Authenticator(enrollment, auth)

    def who_am_i(request: bytes, context: grpc.ServicerContext) -> bytes:
        return authenticator(context).encode()

    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"WhoAmI": grpc.unary_unary_rpc_method_handler(who_am_i)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=[handler])
    try:
        if tls:
            port = server.add_secure_port("127.0.0.1:0", server_credentials(directory, auth == "mtls"))
        else:
            port = server.add_insecure_port("127.0.0.1:0")
        assert port > 0
        server.start()
        yield Server(port, enrollment)
    finally:
        server.stop(None)
        enrollment.close()


def call(
    port: int,
    credentials: grpc.ChannelCredentials | None,
    metadata: Metadata = (),
    target_name: str | None = None,
) -> str:
    """One call on a fresh channel (TLS with ``credentials``, plaintext without); the site the server saw."""
    # A channel of its own, sharing no connection with another test's channel.
    options: list[tuple[str, Any]] = [("grpc.use_local_subchannel_pool", 1)]
    if target_name is not None:
        options.append(("grpc.ssl_target_name_override", target_name))
    address = f"127.0.0.1:{port}"
    if credentials is None:
        channel = grpc.insecure_channel(address, options=options)
    else:
        channel = grpc.secure_channel(address, credentials, options=options)
    with channel:
        reply = channel.unary_unary(METHOD)(b"", metadata=tuple(metadata), timeout=TIMEOUT)
    return bytes(reply).decode()


def call_as(port: int, credentials: Credentials, metadata: Metadata | None = None) -> str:
    """A call the way a site makes it: its TLS credentials, and its token as metadata."""
    return call(
        port,
        credentials.channel_credentials(),
        credentials.call_metadata() if metadata is None else metadata,
    )


def refused(
    port: int,
    credentials: grpc.ChannelCredentials | None,
    metadata: Metadata = (),
    target_name: str | None = None,
) -> tuple[grpc.StatusCode, str]:
    """The status code and details of a call that must fail."""
    with pytest.raises(grpc.RpcError) as failure:
        call(port, credentials, metadata, target_name)
    error: Any = failure.value
    return error.code(), error.details() or ""


# -- site names ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("site", ["a", "site-1", "Hospital_B.eu", "x" * 64])
def test_valid_site_names_are_accepted(site: str) -> None:
    assert check_site_name(site) == site


@pytest.mark.parametrize("site", ["", "a b", "../etc", "a/b", "x" * 65, "é", "site\n", None, 7])
def test_invalid_site_names_are_refused_with_the_rule(site: Any) -> None:
    with pytest.raises(DeploymentError, match="is not valid: use 1 to 64 letters"):
        check_site_name(site)


# -- certificates -------------------------------------------------------------------------------------------


def test_create_certificates_writes_a_ca_and_a_server_certificate(tmp_path: Path) -> None:
    directory = tmp_path / "deploy"
    paths = create_certificates(directory, ["Server.Example.ORG.", "localhost", "127.0.0.1", "[::1]"])
    assert paths.directory == directory

    ca = certificate(paths.ca_certificate)
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0
    assert ca.issuer == ca.subject
    ca.verify_directly_issued_by(ca)
    # The CA outlives the certificates it signs (CA_DAYS), so sites added later are still covered.
    now = datetime.datetime.now(datetime.UTC)
    assert ca.not_valid_after_utc - now > datetime.timedelta(days=CA_DAYS - 1)

    server = certificate(paths.server_certificate)
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    # Host names are lower-cased and lose a trailing dot; addresses are IP entries, brackets or not.
    assert names.get_values_for_type(x509.DNSName) == ["server.example.org", "localhost"]
    assert names.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert common_names(server) == ["Server.Example.ORG."]  # the first host that is not an address
    usage = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert server.not_valid_after_utc - now < datetime.timedelta(days=366)

    # Each key is the key of its certificate.
    for key_path, cert in [(paths.ca_key, ca), (paths.server_key, server)]:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert key.public_key() == cert.public_key()
    # No site's file is made at the server.
    assert sorted(p.name for p in directory.iterdir()) == ["ca.key", "ca.pem", "server.key", "server.pem"]


def test_a_site_certificate_is_signed_for_the_key_the_site_made(deployment: Path) -> None:
    alpha = enrolled(deployment, "alpha")
    assert alpha.cert_pem is not None and alpha.key_pem is not None
    site = x509.load_pem_x509_certificate(alpha.cert_pem)
    site.verify_directly_issued_by(certificate(CertificatePaths(deployment).ca_certificate))
    assert common_names(site) == ["alpha"]
    usage = site.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not site.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    key = serialization.load_pem_private_key(
        SiteKeyPaths(site_folder(deployment, "alpha"), "alpha").tls_key.read_bytes(), password=None
    )
    assert key.public_key() == site.public_key()


def test_private_keys_are_readable_by_their_owner_only(deployment: Path) -> None:
    paths = CertificatePaths(deployment)
    keys = make_site_keys(site_folder(deployment, "alpha"), "alpha")
    for key in [paths.ca_key, paths.server_key, keys.paths.tls_key, keys.paths.identity_key]:
        assert mode(key) == 0o600, key
    assert mode(keys.paths.request) == 0o644  # the request holds no secret
    assert mode(deployment) & 0o077 == 0
    assert mode(keys.paths.directory) & 0o077 == 0
    # No temporary file (from writing each file whole, then renaming it) is left behind.
    assert not [p for p in deployment.rglob("*") if p.name.endswith(".tmp")]
    assert not [p for p in keys.paths.directory.rglob("*") if p.name.endswith(".tmp")]


def test_an_ip_only_server_certificate_is_named_after_its_first_address(tmp_path: Path) -> None:
    paths = create_certificates(tmp_path / "d", "10.0.0.7")  # one host may be given as a plain string
    server = certificate(paths.server_certificate)
    assert common_names(server) == ["10.0.0.7"]
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.7")]
    assert names.get_values_for_type(x509.DNSName) == []


def test_certificates_last_the_days_asked_for(tmp_path: Path) -> None:
    directory = tmp_path / "d"
    paths = create_certificates(directory, ["localhost"], days=30)
    site = enrolled(directory, "s", days=30)
    assert site.cert_pem is not None
    now = datetime.datetime.now(datetime.UTC)
    for cert in [certificate(paths.server_certificate), x509.load_pem_x509_certificate(site.cert_pem)]:
        assert abs(cert.not_valid_after_utc - (now + datetime.timedelta(days=30))) < datetime.timedelta(
            minutes=1
        )
        # Valid a little before now, for clocks that lag.
        assert cert.not_valid_before_utc < now


def test_existing_certificates_are_not_replaced_without_overwrite(deployment: Path) -> None:
    paths = CertificatePaths(deployment)
    before = {p: p.read_bytes() for p in deployment.rglob("*") if p.is_file()}

    with pytest.raises(DeploymentError, match=r"server\.(pem|key) already exists.*overwrite"):
        create_certificates(deployment, HOSTS)
    assert {p: p.read_bytes() for p in deployment.rglob("*") if p.is_file()} == before

    # With overwrite the server certificate is new, and still signed by the same CA.
    create_certificates(deployment, HOSTS, overwrite=True)
    assert paths.ca_certificate.read_bytes() == before[paths.ca_certificate]
    assert paths.ca_key.read_bytes() == before[paths.ca_key]
    assert paths.server_certificate.read_bytes() != before[paths.server_certificate]
    assert paths.server_key.read_bytes() != before[paths.server_key]
    certificate(paths.server_certificate).verify_directly_issued_by(certificate(paths.ca_certificate))
    assert mode(paths.server_key) == 0o600


def test_without_hosts_only_the_ca_is_made_or_kept(tmp_path: Path, deployment: Path) -> None:
    paths = create_certificates(tmp_path / "ca-only", [])
    assert sorted(p.name for p in paths.directory.iterdir()) == ["ca.key", "ca.pem"]
    before = {p: p.read_bytes() for p in deployment.rglob("*") if p.is_file()}
    create_certificates(deployment, [])
    assert {p: p.read_bytes() for p in deployment.rglob("*") if p.is_file()} == before


def test_the_ca_key_can_be_kept_away_from_the_server(tmp_path: Path) -> None:
    """With ``ca_directory`` the server's folder holds only ca.pem (a copy), and enrolling a site needs the
    CA's folder: the running server cannot sign or endorse anything."""
    server, offline = tmp_path / "deploy", tmp_path / "offline-ca"
    paths = create_certificates(server, HOSTS, ca_directory=offline)
    assert sorted(p.name for p in server.iterdir()) == ["ca.pem", "server.key", "server.pem"]
    assert sorted(p.name for p in offline.iterdir()) == ["ca.key", "ca.pem"]
    assert paths.ca_key == offline / "ca.key"
    assert (offline / "ca.pem").read_bytes() == (server / "ca.pem").read_bytes()
    certificate(paths.server_certificate).verify_directly_issued_by(certificate(server / "ca.pem"))

    with pytest.raises(DeploymentError, match=r"ca\.key is missing.*--ca FOLDER"):
        enrolled(server, "alpha")
    alpha = enrolled(server, "alpha", ca_directory=offline)
    assert alpha.cert_pem is not None
    x509.load_pem_x509_certificate(alpha.cert_pem).verify_directly_issued_by(certificate(server / "ca.pem"))
    # A new server certificate later is signed by the same CA, from its folder.
    create_certificates(server, HOSTS, overwrite=True, ca_directory=offline)
    assert not (server / "ca.key").exists()


def test_a_ca_folder_of_another_deployment_is_refused(deployment: Path, foreign: Path) -> None:
    with pytest.raises(DeploymentError, match=r"is not the CA whose key is .*foreign.*give the CA folder"):
        enrolled(deployment, "alpha", ca_directory=foreign)
    with Enrollment.open(deployment) as enrollment:
        assert enrollment.sites() == []


def test_a_ca_folder_must_hold_the_key_of_the_ca_the_server_trusts(deployment: Path, tmp_path: Path) -> None:
    with pytest.raises(DeploymentError, match=r"already trusts the CA in .*whose key is not in"):
        create_certificates(deployment, [], ca_directory=tmp_path / "empty")


@pytest.mark.parametrize(
    ("host", "message"),
    [
        ("localhost:8443", "is neither a host name nor an IP address; give the host without a port"),
        ("bad_host", "is neither a host name nor an IP address"),
        ("", "is neither a host name nor an IP address"),
        ("-lead.example", "is neither a host name nor an IP address"),
        ("a..b", "is neither a host name nor an IP address"),
        ("*.example.org", "is neither a host name nor an IP address"),
        ("x" * 64 + ".example", "is neither a host name nor an IP address"),  # a label of 64 characters
        ("https://example.org", "is neither a host name nor an IP address"),
    ],
)
def test_bad_host_names_are_refused(tmp_path: Path, host: str, message: str) -> None:
    with pytest.raises(DeploymentError, match=message) as refusal:
        create_certificates(tmp_path / "d", ["localhost", host])
    assert repr(host) in str(refusal.value)
    assert not (tmp_path / "d").exists()  # nothing is written before the hosts are checked


@pytest.mark.parametrize("days", [0, -5, 10_000_000, 10**10])
def test_certificates_must_last_between_a_day_and_a_century(tmp_path: Path, days: int) -> None:
    with pytest.raises(DeploymentError, match=f"valid for 1 to 36500 days \\(got days={days}\\)"):
        create_certificates(tmp_path / "d", ["localhost"], days=days)
    assert not (tmp_path / "d").exists()


def test_an_invalid_site_name_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(DeploymentError, match="is not valid"):
        make_site_keys(tmp_path / "site", "not ok")
    assert not (tmp_path / "site").exists()


def test_a_ca_key_without_its_certificate_is_not_replaced(deployment: Path) -> None:
    paths = CertificatePaths(deployment)
    paths.ca_certificate.unlink()
    key = paths.ca_key.read_bytes()
    with pytest.raises(DeploymentError, match=r"ca\.key exists without ca\.pem"):
        create_certificates(deployment, HOSTS, overwrite=True)
    assert paths.ca_key.read_bytes() == key
    assert not paths.ca_certificate.exists()


def test_new_certificates_need_the_ca_key(deployment: Path) -> None:
    CertificatePaths(deployment).ca_key.unlink()
    with pytest.raises(DeploymentError, match=r"ca\.key is missing"):
        enrolled(deployment, "gamma")
    with pytest.raises(DeploymentError, match=r"ca\.key is missing"):
        create_certificates(deployment, HOSTS, overwrite=True)


def test_a_ca_key_that_is_not_the_ca_certificates_key_is_refused(deployment: Path, foreign: Path) -> None:
    CertificatePaths(deployment).ca_key.write_bytes(CertificatePaths(foreign).ca_key.read_bytes())
    with pytest.raises(DeploymentError, match=r"is not the key of the CA certificate"):
        enrolled(deployment, "gamma")
    with Enrollment.open(deployment) as enrollment:
        assert enrollment.record("gamma") is None


def test_an_unreadable_ca_certificate_is_reported(deployment: Path) -> None:
    CertificatePaths(deployment).ca_certificate.write_text("not a certificate")
    with pytest.raises(DeploymentError, match=r"cannot read the certificate .*ca\.pem"):
        create_certificates(deployment, HOSTS, overwrite=True)


def test_an_expired_ca_signs_nothing(tmp_path: Path) -> None:
    directory = tmp_path / "d"
    directory.mkdir()
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old CA")])
    long_ago = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    expired = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(long_ago)
        .not_valid_after(long_ago + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    paths = CertificatePaths(directory)
    paths.ca_certificate.write_bytes(expired.public_bytes(serialization.Encoding.PEM))
    paths.ca_key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(DeploymentError, match="expired on 2020-01-02"):
        create_certificates(directory, ["localhost"])
    assert not paths.server_certificate.exists()


def test_the_longest_valid_site_name_gets_a_certificate(deployment: Path) -> None:
    site = "s" * 64
    assert check_site_name(site) == site
    credentials = enrolled(deployment, site)
    assert credentials.cert_pem is not None
    assert common_names(x509.load_pem_x509_certificate(credentials.cert_pem)) == [site]


def test_a_host_name_longer_than_a_common_name_still_gets_a_certificate(tmp_path: Path) -> None:
    host = "node-" + "a" * 50 + ".example.org"  # 67 characters, every label under 64
    paths = create_certificates(tmp_path / "d", [host])
    names = certificate(paths.server_certificate).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert names.value.get_values_for_type(x509.DNSName) == [host]


# -- the enrollment registry --------------------------------------------------------------------------------


def test_enroll_returns_a_prefixed_token_that_identifies_its_site(tmp_path: Path) -> None:
    with Enrollment.open(tmp_path / "d") as enrollment:
        alpha, beta = enrollment.enroll("alpha"), enrollment.enroll("beta")
        assert alpha.startswith(TOKEN_PREFIX) and beta.startswith(TOKEN_PREFIX)
        assert len(alpha) >= len(TOKEN_PREFIX) + 43  # 32 random bytes, base64
        assert alpha != beta
        assert enrollment.verify_token(alpha) == "alpha"
        assert enrollment.verify_token(beta) == "beta"
        owner = enrollment.token_owner(alpha)
        assert owner is not None
        assert (owner.site, owner.method, owner.active) == ("alpha", "token", True)
        assert owner.certificate_sha256 is None
        for wrong in [TOKEN_PREFIX + "0" * 43, alpha[:-1], alpha + "x", "", alpha.upper()]:
            assert enrollment.verify_token(wrong) is None
            assert enrollment.token_owner(wrong) is None
        assert enrollment.token_owner(123) is None  # type: ignore[arg-type]


def test_the_registry_keeps_only_the_tokens_hash(tmp_path: Path) -> None:
    directory = tmp_path / "d"
    with Enrollment.open(directory) as enrollment:
        token = enrollment.enroll("alpha")
        digest = hashlib.sha256(token.encode()).hexdigest()
        # While the registry is open, its write-ahead log holds the newest row.
        on_disk = registry_bytes(directory)
        assert token.encode() not in on_disk
        assert token[len(TOKEN_PREFIX) :].encode() not in on_disk
        for path in directory.glob("sites.sqlite*"):
            assert mode(path) & 0o077 == 0, path
    on_disk = registry_bytes(directory)
    assert token.encode() not in on_disk and digest.encode() in on_disk
    with closing(sqlite3.connect(directory / "sites.sqlite")) as db:
        assert db.execute("SELECT site, token_hash FROM sites").fetchall() == [("alpha", digest)]
    assert mode(directory / "sites.sqlite") == 0o600


def test_enrolling_again_retires_the_old_token(tmp_path: Path) -> None:
    with Enrollment.open(tmp_path / "d") as enrollment:
        old = enrollment.enroll("alpha")
        new = enrollment.enroll("alpha")
        assert new != old
        assert enrollment.verify_token(old) is None and enrollment.token_owner(old) is None
        assert enrollment.verify_token(new) == "alpha"
        assert [r.site for r in enrollment.sites()] == ["alpha"]


def test_revoking_a_site_refuses_its_token_until_it_is_enrolled_again(tmp_path: Path) -> None:
    with Enrollment.open(tmp_path / "d") as enrollment:
        token = enrollment.enroll("alpha")
        enrollment.enroll("beta")
        enrollment.revoke("alpha")
        assert not enrollment.is_active("alpha") and enrollment.is_active("beta")
        assert enrollment.verify_token(token) is None
        owner = enrollment.token_owner(token)  # still known, so that a refusal can say why
        assert owner is not None and owner.site == "alpha" and not owner.active
        record = enrollment.record("alpha")
        assert record is not None and record.revoked_at is not None
        assert record.revoked_at >= record.enrolled_at
        # Revoking again keeps the first revocation time.
        first = record.revoked_at
        enrollment.revoke("alpha")
        again = enrollment.record("alpha")
        assert again is not None and again.revoked_at == first

        fresh = enrollment.enroll("alpha")
        assert enrollment.is_active("alpha")
        assert enrollment.verify_token(fresh) == "alpha"
        assert enrollment.verify_token(token) is None


def test_revoking_a_site_that_is_not_enrolled_is_an_error(tmp_path: Path) -> None:
    with Enrollment.open(tmp_path / "d") as enrollment:
        with pytest.raises(DeploymentError, match="no site named 'ghost' is enrolled"):
            enrollment.revoke("ghost")
        assert enrollment.record("ghost") is None
        assert not enrollment.is_active("ghost")


def test_sites_and_active_sites_list_the_registry_by_name(tmp_path: Path) -> None:
    directory = tmp_path / "d"
    with Enrollment.open(directory) as enrollment:
        assert enrollment.sites() == [] and enrollment.active_sites() == []
        enrollment.enroll("charlie")
        enrollment.enroll_certificate("alpha")
        enrollment.enroll("bravo")
        enrollment.revoke("bravo")
    # The registry lives on disk: a new connection sees the same sites.
    with Enrollment.open(directory) as enrollment:
        records = enrollment.sites()
        assert [(r.site, r.method, r.active) for r in records] == [
            ("alpha", "certificate", True),
            ("bravo", "token", False),
            ("charlie", "token", True),
        ]
        assert enrollment.active_sites() == ["alpha", "charlie"]


@pytest.mark.parametrize("site", ["", "a b", "../x", "x" * 129])
def test_an_invalid_site_name_cannot_be_enrolled(tmp_path: Path, site: str) -> None:
    with Enrollment.open(tmp_path / "d") as enrollment:
        with pytest.raises(DeploymentError, match="is not valid"):
            enrollment.enroll(site)
        with pytest.raises(DeploymentError, match="is not valid"):
            enrollment.enroll_certificate(site)
        assert enrollment.sites() == []


def test_a_pinned_certificate_is_recorded_by_its_fingerprint(deployment: Path) -> None:
    pem = certificate_credentials(deployment, "alpha").cert_pem
    assert pem is not None
    with Enrollment.open(deployment) as enrollment:
        token = enrollment.enroll("alpha")
        enrollment.enroll_certificate("alpha", pem)
        record = enrollment.record("alpha")
        assert record is not None and record.method == "certificate"
        assert (
            record.certificate_sha256
            == x509.load_pem_x509_certificate(pem).fingerprint(hashes.SHA256()).hex()
        )
        # The site now authenticates by certificate: its token no longer works.
        assert enrollment.verify_token(token) is None


def test_a_certificate_is_pinned_only_for_the_site_it_was_issued_to(deployment: Path) -> None:
    beta = certificate_credentials(deployment, "beta").cert_pem
    with Enrollment.open(deployment) as enrollment:
        with pytest.raises(DeploymentError, match="was issued to beta, not to 'alpha'"):
            enrollment.enroll_certificate("alpha", beta)
        with pytest.raises(DeploymentError, match="is not a PEM certificate"):
            enrollment.enroll_certificate("alpha", b"-----BEGIN CERTIFICATE-----\ngarbage\n")
        assert enrollment.sites() == []


def test_a_site_enrolled_from_its_request_has_an_endorsed_identity(deployment: Path) -> None:
    alpha = enrolled(deployment, "alpha")
    beta = enrolled(deployment, "beta", auth="token")  # a token, and an identity all the same
    enrolled(deployment, "gamma")
    issue_site_credentials(deployment, "delta")  # a token alone: no identity
    identities = {}
    for credentials in (alpha, beta):
        key = credentials.identity()
        assert key is not None
        identities[credentials.site] = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
    with Enrollment.open(deployment) as enrollment:
        registry = enrollment.identities(["beta", "alpha"])
        assert sorted(registry) == ["alpha", "beta"]
        assert {site: public for site, (public, _) in registry.items()} == identities
        record = enrollment.record("beta")
        assert record is not None and record.method == "token" and record.identity == registry["beta"]
        with pytest.raises(
            DeploymentError, match=r"1 site\(s\) have no active enrolled identity .*\(delta\)"
        ):
            enrollment.identities(["alpha", "delta"])
        enrollment.revoke("gamma")
        with pytest.raises(DeploymentError, match=r"no active enrolled identity .*\(gamma, ghost\)"):
            enrollment.identities(["gamma", "ghost"])
        # Enrolling again with a token alone drops the identity: everything recorded is replaced.
        enrollment.enroll("alpha")
        with pytest.raises(DeploymentError, match=r"\(alpha\).*confide enroll SITE --csr SITE\.csr"):
            enrollment.identities(["alpha"])


def test_a_registry_from_before_identities_gains_the_columns(tmp_path: Path) -> None:
    """A sites.sqlite written by the first release opens, keeps its sites, and can store identities."""
    directory = tmp_path / "d"
    directory.mkdir()
    digest = hashlib.sha256(b"cfd_old").hexdigest()
    with closing(sqlite3.connect(directory / "sites.sqlite")) as db, db:
        db.execute(
            "CREATE TABLE sites (site TEXT PRIMARY KEY, token_hash TEXT UNIQUE, method TEXT NOT NULL CHECK "
            "(method IN ('token', 'certificate')), enrolled_at REAL NOT NULL, revoked_at REAL, "
            "certificate_sha256 TEXT)"
        )
        db.execute("INSERT INTO sites VALUES ('old', ?, 'token', 1.0, NULL, NULL)", (digest,))
    with Enrollment.open(directory) as enrollment:
        assert enrollment.verify_token("cfd_old") == "old"
        record = enrollment.record("old")
        assert record is not None and record.identity is None
        enrollment.enroll("new", (b"k" * 32, b"endorsement"))
        new = enrollment.record("new")
        assert new is not None and new.identity == (b"k" * 32, b"endorsement")


def test_a_revocation_by_another_connection_is_seen_at_once(tmp_path: Path) -> None:
    directory = tmp_path / "d"
    with Enrollment.open(directory) as server, Enrollment.open(directory) as operator:
        token = operator.enroll("alpha")
        assert server.verify_token(token) == "alpha"
        operator.revoke("alpha")
        assert server.verify_token(token) is None
        new = operator.enroll("alpha")
        assert server.verify_token(new) == "alpha"


def test_a_file_that_is_not_a_database_is_not_taken_for_a_registry(tmp_path: Path) -> None:
    directory = tmp_path / "d"
    directory.mkdir()
    garbage = b"this is not an SQLite database, just some bytes " * 40
    (directory / "sites.sqlite").write_bytes(garbage)
    with pytest.raises(
        DeploymentError, match=r"is not a confide enrollment registry.*enroll the sites again"
    ):
        Enrollment.open(directory)
    assert (directory / "sites.sqlite").read_bytes() == garbage  # left as it was, for the operator


def test_a_database_with_another_sites_table_is_not_taken_for_a_registry(tmp_path: Path) -> None:
    directory = tmp_path / "d"
    directory.mkdir()
    with closing(sqlite3.connect(directory / "sites.sqlite")) as db, db:
        db.execute("CREATE TABLE sites (name TEXT)")
    with pytest.raises(DeploymentError, match="is not a confide enrollment registry"):
        Enrollment.open(directory)


def test_a_registry_that_cannot_be_created_is_reported(tmp_path: Path) -> None:
    directory = tmp_path / "d"
    (directory / "sites.sqlite").mkdir(parents=True)  # a directory where the file should be
    with pytest.raises(DeploymentError, match="cannot open the enrollment registry"):
        Enrollment.open(directory)


# -- a site's credentials file ------------------------------------------------------------------------------


def test_token_credentials_survive_a_save_and_load(deployment: Path, tmp_path: Path) -> None:
    issued = issue_site_credentials(deployment, "alpha", server="example.org:8443")
    assert issued.token is not None and issued.token.startswith(TOKEN_PREFIX)
    assert issued.cert_pem is None and issued.key_pem is None
    assert issued.ca_pem == CertificatePaths(deployment).ca_certificate.read_bytes()
    with Enrollment.open(deployment) as enrollment:
        assert enrollment.verify_token(issued.token) == "alpha"

    path = tmp_path / "alpha.json"
    issued.save(path)
    assert mode(path) == 0o600
    assert Credentials.load(path) == issued
    assert issued.call_metadata() == (("authorization", f"Bearer {issued.token}"),)
    # The secrets stay out of repr, so the object can be logged.
    assert issued.token not in repr(issued) and "alpha" in repr(issued)


def test_certificate_credentials_name_the_sites_key_files_and_hold_no_key(deployment: Path) -> None:
    keys = make_site_keys(site_folder(deployment, "alpha"), "alpha")
    issued = issue_site_credentials(deployment, "alpha", request=keys.paths.request.read_bytes())
    assert issued.token is None and issued.cert_pem is not None
    assert issued.key_pem is None and issued.identity_pem is None  # the server never had them
    assert (issued.key_file, issued.identity_key_file) == ("alpha.key", "alpha.identity.key")
    assert issued.call_metadata() == ()
    cert = x509.load_pem_x509_certificate(issued.cert_pem)
    assert common_names(cert) == ["alpha"]
    with Enrollment.open(deployment) as enrollment:
        record = enrollment.record("alpha")
        assert record is not None and record.method == "certificate"
        assert record.certificate_sha256 == cert.fingerprint(hashes.SHA256()).hex()

    issued.save(keys.paths.credentials)
    saved = json.loads(keys.paths.credentials.read_text())
    assert saved["format"] == 2 and "key_pem" not in saved and "identity_pem" not in saved
    assert "PRIVATE KEY" not in keys.paths.credentials.read_text()
    loaded = Credentials.load(keys.paths.credentials)
    assert loaded == replace(
        issued, key_pem=keys.paths.tls_key.read_bytes(), identity_pem=keys.paths.identity_key.read_bytes()
    )
    identity = loaded.identity()
    assert identity is not None
    assert (
        identity.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        == keys.identity_public
    )
    assert keys.paths.tls_key.read_text() not in repr(loaded)
    assert keys.paths.identity_key.read_text() not in repr(loaded)


def test_a_credentials_file_of_the_first_format_still_loads(deployment: Path, tmp_path: Path) -> None:
    """Files written before sites made their own keys hold the TLS key inline and no format field."""
    made = certificate_credentials(deployment, "alpha")
    assert made.cert_pem is not None and made.key_pem is not None
    record = _record(deployment, token=None, cert_pem=made.cert_pem.decode(), key_pem=made.key_pem.decode())
    path = tmp_path / "old.json"
    path.write_text(json.dumps(record))
    loaded = Credentials.load(path)
    assert (loaded.cert_pem, loaded.key_pem, loaded.identity_pem) == (made.cert_pem, made.key_pem, None)
    assert loaded.identity() is None
    # Saved again, a key that has no file stays inline.
    loaded.save(tmp_path / "again.json")
    assert Credentials.load(tmp_path / "again.json") == loaded


def test_the_sites_key_files_must_be_there_private_and_match(deployment: Path) -> None:
    alpha = enrolled(deployment, "alpha")
    paths = SiteKeyPaths(site_folder(deployment, "alpha"), "alpha")
    assert alpha.key_pem == paths.tls_key.read_bytes()

    moved = paths.directory.parent / "elsewhere.json"
    moved.write_bytes(paths.credentials.read_bytes())
    with pytest.raises(DeploymentError, match=r"alpha\.key does not exist; keep the credentials file in"):
        Credentials.load(moved)

    paths.identity_key.chmod(0o644)
    with pytest.raises(DeploymentError, match=r"can be read by other users \(mode 0644\).*chmod 600"):
        Credentials.load(paths.credentials)
    paths.identity_key.chmod(0o600)

    # New keys after the request was signed: the certificate no longer fits the key.
    make_site_keys(paths.directory, "alpha", overwrite=True)
    with pytest.raises(DeploymentError, match=r"was not issued for the key in .*alpha\.key"):
        Credentials.load(paths.credentials)

    paths.identity_key.write_bytes(paths.tls_key.read_bytes())  # an EC key where the identity should be
    record = json.loads(paths.credentials.read_text())
    token_file = paths.directory / "token.json"
    record.update(cert_pem=None, key_file=None, token=TOKEN_PREFIX + "x" * 43)
    token_file.write_text(json.dumps(record))
    token_file.chmod(0o600)
    with pytest.raises(DeploymentError, match=r"alpha\.identity\.key holds a .*not an Ed25519 identity key"):
        Credentials.load(token_file)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"format": 3}, r"is of format 3, which this version of confide does not read \(it reads 1 and 2\)"),
        ({"format": True}, r"is of format True"),
        ({"key_pem": "k", "key_file": "alpha.key"}, r"holds key_pem and also names a file for it"),
    ],
)
def test_credentials_in_an_unknown_format_or_with_a_key_twice_are_refused(
    deployment: Path, tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    path = tmp_path / "creds.json"
    path.write_text(json.dumps(_record(deployment, **changes)))
    with pytest.raises(DeploymentError, match=message):
        Credentials.load(path)


def test_credentials_are_issued_only_where_there_is_a_ca(tmp_path: Path, deployment: Path) -> None:
    with pytest.raises(DeploymentError, match=r"has no CA certificate \(ca\.pem\)"):
        issue_site_credentials(tmp_path / "empty", "alpha")
    with pytest.raises(DeploymentError, match="is not valid"):
        issue_site_credentials(deployment, "no good")


def test_a_site_certificate_needs_the_sites_request(deployment: Path) -> None:
    """The server cannot make a site's key any more: mutual TLS needs the request the site made."""
    with pytest.raises(DeploymentError, match=r"the site runs `confide keys alpha` and sends alpha\.csr"):
        issue_site_credentials(deployment, "alpha", auth="mtls")
    with pytest.raises(DeploymentError, match=r"must be 'token' or 'mtls' \(got 'password'\)"):
        issue_site_credentials(deployment, "alpha", auth="password")
    with Enrollment.open(deployment) as enrollment:
        assert enrollment.sites() == []


def test_a_missing_credentials_file_says_who_creates_it(tmp_path: Path) -> None:
    with pytest.raises(DeploymentError, match=r"does not exist.*confide enroll SITE"):
        Credentials.load(tmp_path / "nowhere.json")


def test_an_unreadable_credentials_file_is_reported(tmp_path: Path) -> None:
    (tmp_path / "creds.json").mkdir()
    with pytest.raises(DeploymentError, match="cannot read the credentials file"):
        Credentials.load(tmp_path / "creds.json")
    (tmp_path / "latin.json").write_bytes(b'{"site": "\xe9"}')
    with pytest.raises(DeploymentError, match="cannot read the credentials file"):
        Credentials.load(tmp_path / "latin.json")


def test_a_credentials_file_that_is_not_json_is_reported_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "creds.json"
    path.write_text('{\n  "site": "alpha",\n  oops\n}\n')
    with pytest.raises(DeploymentError, match=r"is not valid JSON \(line 3: .*\); ask for it again"):
        Credentials.load(path)
    path.write_text("[1, 2]")
    with pytest.raises(DeploymentError, match="does not hold a JSON object"):
        Credentials.load(path)


def _record(deployment: Path, **changes: Any) -> dict[str, Any]:
    """A valid token credentials record, with ``changes`` (a value of ... removes the field)."""
    record: dict[str, Any] = {
        "site": "alpha",
        "server": "",
        "ca_pem": CertificatePaths(deployment).ca_certificate.read_text(),
        "token": TOKEN_PREFIX + "x" * 43,
        "cert_pem": None,
        "key_pem": None,
    }
    record.update(changes)
    return {k: v for k, v in record.items() if v is not ...}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"site": ...}, r"needs 'site' as a non-empty string \(it is missing\)"),
        ({"site": 7}, r"needs 'site' as a non-empty string \(got int\)"),
        ({"site": "no good"}, r"the site name 'no good' is not valid"),
        ({"ca_pem": ...}, r"needs 'ca_pem' as a non-empty string \(it is missing\)"),
        ({"ca_pem": "not a certificate"}, r"ca_pem in the credentials file .* is not a PEM certificate"),
        ({"token": 5}, r"needs 'token' as a non-empty string \(got int\)"),
        ({"token": None}, r"holds neither a token nor a certificate, so site 'alpha' cannot prove who it is"),
        ({"token": ""}, r"holds neither a token nor a certificate"),
        ({"cert_pem": "x"}, r"holds a certificate without its key"),
        ({"key_pem": "x"}, r"a key without its certificate"),
        (
            {"cert_pem": "not a certificate", "key_pem": "k"},
            r"cert_pem in the credentials file .* is not a PEM",
        ),
    ],
)
def test_a_credentials_file_with_a_bad_field_names_the_problem(
    deployment: Path, tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    path = tmp_path / "creds.json"
    path.write_text(json.dumps(_record(deployment, **changes)))
    with pytest.raises(DeploymentError, match=message):
        Credentials.load(path)


def test_a_minimal_credentials_file_loads_with_defaults(deployment: Path, tmp_path: Path) -> None:
    path = tmp_path / "creds.json"
    path.write_text(json.dumps(_record(deployment, server=..., cert_pem=..., key_pem=...)))
    loaded = Credentials.load(path)
    assert (loaded.site, loaded.server, loaded.cert_pem, loaded.key_pem) == ("alpha", "", None, None)
    assert loaded.token == TOKEN_PREFIX + "x" * 43


# -- the server's TLS ---------------------------------------------------------------------------------------


def test_server_credentials_name_the_missing_files(tmp_path: Path, deployment: Path) -> None:
    with pytest.raises(DeploymentError, match=r"has no server\.key or server\.pem or ca\.pem.*confide certs"):
        server_credentials(tmp_path / "empty", require_client_certificates=False)
    CertificatePaths(deployment).server_key.unlink()
    with pytest.raises(DeploymentError, match=r"has no server\.key;"):
        server_credentials(deployment, require_client_certificates=True)


def test_the_authentication_mode_must_be_token_or_mtls(tmp_path: Path) -> None:
    with (
        Enrollment.open(tmp_path / "d") as enrollment,
        pytest.raises(DeploymentError, match="must be 'token' or 'mtls' \\(got 'password'\\)"),
    ):
        Authenticator(enrollment, "password")


# -- over real gRPC: tokens ---------------------------------------------------------------------------------


def test_a_good_token_identifies_its_site(deployment: Path) -> None:
    alpha = issue_site_credentials(deployment, "alpha")
    beta = issue_site_credentials(deployment, "beta")
    with serving(deployment, "token") as server:
        assert call_as(server.port, alpha) == "alpha"
        assert call_as(server.port, beta) == "beta"
        # The scheme is case-insensitive, and spaces around the token do not matter.
        assert call_as(server.port, alpha, [("authorization", f"bearer  {alpha.token} ")]) == "alpha"


def test_a_token_site_with_a_certificate_in_its_file_is_still_identified_by_its_token(
    deployment: Path,
) -> None:
    token = issue_site_credentials(deployment, "alpha")
    beta = certificate_credentials(deployment, "beta")
    both = Credentials(
        site="alpha", ca_pem=token.ca_pem, token=token.token, cert_pem=beta.cert_pem, key_pem=beta.key_pem
    )
    with serving(deployment, "token") as server:
        assert call_as(server.port, both) == "alpha"


def test_calls_without_a_valid_token_are_refused(deployment: Path) -> None:
    alpha = issue_site_credentials(deployment, "alpha")
    assert alpha.token is not None
    tls = alpha.channel_credentials()
    cases: list[tuple[Metadata, str]] = [
        ((), "no token"),
        ([("authorization", f"Bearer {TOKEN_PREFIX}{'A' * 43}")], "unknown token"),
        ([("authorization", alpha.token)], "not of the form `Bearer TOKEN`"),
        ([("authorization", f"Basic {alpha.token}")], "not of the form `Bearer TOKEN`"),
        ([("authorization", "Bearer ")], "not of the form `Bearer TOKEN`"),
        ([("x-token", alpha.token)], "no token"),
        (
            [("authorization", f"Bearer {alpha.token}"), ("authorization", f"Bearer {alpha.token}")],
            "more than one authorization header",
        ),
    ]
    with serving(deployment, "token") as server:
        for metadata, reason in cases:
            code, details = refused(server.port, tls, metadata)
            assert code == grpc.StatusCode.UNAUTHENTICATED, metadata
            assert reason in details, (metadata, details)
        # The same channel credentials with the right token still work: only the token was at fault.
        assert call_as(server.port, alpha) == "alpha"


def test_a_revoked_sites_token_is_refused_from_its_next_call(deployment: Path) -> None:
    alpha = issue_site_credentials(deployment, "alpha")
    beta = issue_site_credentials(deployment, "beta")
    with serving(deployment, "token") as server:
        assert call_as(server.port, alpha) == "alpha"
        # The operator revokes the site from another connection while the server runs.
        with Enrollment.open(deployment) as operator:
            operator.revoke("alpha")
        code, details = refused(server.port, alpha.channel_credentials(), alpha.call_metadata())
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert "site alpha is revoked" in details
        assert call_as(server.port, beta) == "beta"


def test_enrolling_a_site_again_retires_its_old_token_on_a_running_server(deployment: Path) -> None:
    old = issue_site_credentials(deployment, "alpha")
    with serving(deployment, "token") as server:
        assert call_as(server.port, old) == "alpha"
        new = issue_site_credentials(deployment, "alpha")
        code, details = refused(server.port, old.channel_credentials(), old.call_metadata())
        assert code == grpc.StatusCode.UNAUTHENTICATED and "unknown token" in details
        assert call_as(server.port, new) == "alpha"


def test_a_token_does_not_work_on_a_plaintext_port(deployment: Path) -> None:
    """The Authenticator refuses a call that did not come over TLS, even with a good token (a guard against
    a port opened without TLS)."""
    alpha = issue_site_credentials(deployment, "alpha")
    with serving(deployment, "token", tls=False) as server:
        code, details = refused(server.port, None, alpha.call_metadata())
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "did not come over TLS" in details


# -- over real gRPC: TLS itself -----------------------------------------------------------------------------


def test_a_plaintext_client_cannot_talk_to_the_tls_server(deployment: Path) -> None:
    alpha = issue_site_credentials(deployment, "alpha")
    for auth in ["token", "mtls"]:
        with serving(deployment, auth) as server:
            code, _ = refused(server.port, None, alpha.call_metadata())
            assert code == grpc.StatusCode.UNAVAILABLE


def test_a_site_trusts_only_its_deployments_ca(deployment: Path, foreign: Path) -> None:
    """A site never talks to a server whose certificate another CA signed (an impostor)."""
    alpha = issue_site_credentials(deployment, "alpha")
    misled = Credentials(
        site="alpha", ca_pem=CertificatePaths(foreign).ca_certificate.read_bytes(), token=alpha.token
    )
    with serving(deployment, "token") as server:
        code, _ = refused(server.port, misled.channel_credentials(), misled.call_metadata())
        assert code == grpc.StatusCode.UNAVAILABLE
        assert call_as(server.port, alpha) == "alpha"


def test_the_server_certificate_is_valid_only_for_its_hosts(tmp_path: Path) -> None:
    """A certificate made for example.org only is refused by a site dialling 127.0.0.1, and accepted when
    the site dials it by that name: the subjectAltNames are what the site checks."""
    directory = tmp_path / "d"
    create_certificates(directory, ["example.org"])
    alpha = issue_site_credentials(directory, "alpha")
    with serving(directory, "token") as server:
        code, _ = refused(server.port, alpha.channel_credentials(), alpha.call_metadata())
        assert code == grpc.StatusCode.UNAVAILABLE
        name = "example.org"
        assert call(server.port, alpha.channel_credentials(), alpha.call_metadata(), name) == "alpha"
        code, _ = refused(server.port, alpha.channel_credentials(), alpha.call_metadata(), "other.org")
        assert code == grpc.StatusCode.UNAVAILABLE


# -- over real gRPC: mutual TLS -----------------------------------------------------------------------------


def test_a_site_certificate_identifies_its_site(deployment: Path) -> None:
    alpha = enrolled(deployment, "alpha")
    with Enrollment.open(deployment) as enrollment:
        enrollment.enroll_certificate("beta")  # any certificate the CA issued to beta
    beta = certificate_credentials(deployment, "beta")
    with serving(deployment, "mtls") as server:
        assert call_as(server.port, alpha) == "alpha"
        assert call_as(server.port, beta) == "beta"
        # In mtls mode the certificate alone decides; a token (even another site's) is ignored.
        other = issue_site_credentials(deployment, "gamma")
        assert call_as(server.port, alpha, other.call_metadata()) == "alpha"


def test_a_certificate_of_a_site_that_is_not_enrolled_is_refused(deployment: Path) -> None:
    enrolled(deployment, "alpha")
    beta = certificate_credentials(deployment, "beta")  # signed by the CA, but beta was never enrolled
    with serving(deployment, "mtls") as server:
        code, details = refused(server.port, beta.channel_credentials())
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "certificate for beta, which is not enrolled" in details


def test_a_certificate_of_a_token_site_is_refused(deployment: Path) -> None:
    issue_site_credentials(deployment, "beta")  # enrolled for tokens, not for mutual TLS
    beta = certificate_credentials(deployment, "beta")
    with serving(deployment, "mtls") as server:
        code, details = refused(server.port, beta.channel_credentials())
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "not enrolled for mutual TLS (it uses a token)" in details


def test_a_revoked_sites_certificate_is_refused_from_its_next_call(deployment: Path) -> None:
    alpha = enrolled(deployment, "alpha")
    with serving(deployment, "mtls") as server:
        assert call_as(server.port, alpha) == "alpha"
        server.enrollment.revoke("alpha")
        code, details = refused(server.port, alpha.channel_credentials())
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert "site alpha is revoked" in details


def test_enrolling_a_site_again_retires_its_old_certificate(deployment: Path) -> None:
    old = enrolled(deployment, "alpha")
    with serving(deployment, "mtls") as server:
        assert call_as(server.port, old) == "alpha"
        new = enrolled(deployment, "alpha")  # the same key, a new certificate
        assert new.cert_pem != old.cert_pem
        # The old certificate still chains to the CA and names alpha, but it is no longer the pinned one.
        code, details = refused(server.port, old.channel_credentials())
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert "is not the one enrolled" in details
        assert call_as(server.port, new) == "alpha"


def test_a_certificate_signed_by_another_ca_fails_the_handshake(deployment: Path, foreign: Path) -> None:
    """Even for an enrolled site that accepts any certificate with its name, a certificate another CA
    signed never gets past TLS."""
    with Enrollment.open(deployment) as enrollment:
        enrollment.enroll_certificate("alpha")
    forged = certificate_credentials(foreign, "alpha", trust=deployment)
    genuine = certificate_credentials(deployment, "alpha")
    with serving(deployment, "mtls") as server:
        code, _ = refused(server.port, forged.channel_credentials())
        assert code == grpc.StatusCode.UNAVAILABLE
        assert call_as(server.port, genuine) == "alpha"


def test_a_client_without_a_certificate_fails_the_mtls_handshake(deployment: Path) -> None:
    alpha = issue_site_credentials(deployment, "alpha")  # a token, but no certificate
    with serving(deployment, "mtls") as server:
        code, _ = refused(server.port, alpha.channel_credentials(), alpha.call_metadata())
    assert code == grpc.StatusCode.UNAVAILABLE


# -- identify, with what gRPC would report ------------------------------------------------------------------


def test_identify_refuses_what_grpc_cannot_deliver_over_the_wire(deployment: Path) -> None:
    """Cases a real connection cannot produce here: a certificate context without a common name, and
    metadata values as bytes."""
    with Enrollment.open(deployment) as enrollment:
        token = enrollment.enroll("alpha")
        tls = {"transport_security_type": [b"ssl"]}
        by_token = Authenticator(enrollment, "token")
        assert by_token.identify([("authorization", f"Bearer {token}".encode())], tls) == "alpha"
        with pytest.raises(AuthError, match="did not come over TLS"):
            by_token.identify([("authorization", f"Bearer {token}")], {})
        with pytest.raises(AuthError, match="did not come over TLS"):
            by_token.identify(
                [("authorization", f"Bearer {token}")], {"transport_security_type": [b"ssl", b"x"]}
            )
        by_certificate = Authenticator(enrollment, "mtls")
        with pytest.raises(AuthError, match="no client certificate"):
            by_certificate.identify([("authorization", f"Bearer {token}")], tls)


# -- the registry of identities a server sends (confide.runtime.grpc.deployment) -----------------------------


def test_the_server_loads_and_checks_the_endorsed_registry(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server, offline = tmp_path / "deploy", tmp_path / "offline-ca"
    create_certificates(server, HOSTS, ca_directory=offline)
    for site in ["alpha", "beta"]:
        enrolled(server, site, ca_directory=offline)
    with Enrollment.open(server) as enrollment, caplog.at_level("WARNING"):
        registry = endorsed_registry(enrollment, ["alpha", "beta"], server)
        assert sorted(registry) == ["alpha", "beta"]
        assert not caplog.records  # the CA's key is not in the server's folder
        with pytest.raises(DeploymentError, match=r"no active enrolled identity .*\(gamma\)"):
            endorsed_registry(enrollment, ["alpha", "gamma"], server)
        # The server's ca.pem replaced by another CA's: the entries no longer verify, and it says so at start.
        other = create_certificates(tmp_path / "other", [])
        (server / "ca.pem").write_bytes(other.ca_certificate.read_bytes())
        with pytest.raises(DeploymentError, match=r"site 'alpha' .* is not endorsed by the deployment's CA"):
            endorsed_registry(enrollment, ["alpha", "beta"], server)


def test_a_server_that_holds_the_ca_key_is_warned(deployment: Path, caplog: pytest.LogCaptureFixture) -> None:
    enrolled(deployment, "alpha")
    with Enrollment.open(deployment) as enrollment, caplog.at_level("WARNING"):
        endorsed_registry(enrollment, ["alpha"], deployment)
    assert "can endorse false site identities" in caplog.text


def test_a_site_certificate_lasts_between_a_day_and_a_century(deployment: Path) -> None:
    with pytest.raises(DeploymentError, match=r"valid for 1 to 36500 days \(got days=0\)"):
        enrolled(deployment, "alpha", days=0)
    with Enrollment.open(deployment) as enrollment:
        assert enrollment.record("alpha") is None
