"""A deployment's certificate authority: the CA, the server's certificate, and the certificates it signs for
the requests that sites send.

The CA's private key (``ca.key``) signs two things, and nothing else: certificates (the server's, and a site's
client certificate for mutual TLS, each over a public key that the site or server made itself) and
endorsements of site identities (:mod:`confide.runtime.grpc.identity`). It may live in a folder of its own
(``ca_directory``), away from the folder the running server reads, and should: see the threat model in
:mod:`confide.runtime.grpc.security`.

Over 400 lines because certificate building is verbose (each extension spelled out, so that what a
certificate allows can be read here) and the checks that keep a half-made or mismatched CA from signing
anything belong beside the code that signs.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from confide.errors import DeploymentError

CA_DAYS = 10 * 365
"""A new CA outlives the certificates it signs, so that site certificates added later are still valid."""

MAX_DAYS = 100 * 365
"""The longest validity accepted (datetime ends in the year 9999; no deployment needs a century)."""

_SITE_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")  # 64: the longest common name a certificate can carry
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_CLOCK_SKEW = datetime.timedelta(minutes=5)

TlsPublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey
"""The public keys a TLS certificate here may carry (what gRPC's TLS accepts)."""


def check_site_name(site: str) -> str:
    """``site`` if it is a valid site name (it becomes a file name and a certificate's common name)."""
    if not isinstance(site, str) or not _SITE_NAME.fullmatch(site):
        raise DeploymentError(
            f"the site name {site!r} is not valid: use 1 to 64 letters, digits, '-', '_' or '.'"
        )
    return site


@dataclass(frozen=True)
class CertificatePaths:
    """Where a deployment directory keeps its certificates and keys (none of them a site's)."""

    directory: Path
    ca_directory: Path | None = None
    """Where the CA's key (and its own copy of ``ca.pem``) is kept, when not in ``directory``: a folder on
    another machine or on removable media, mounted only to create certificates and enroll sites."""

    @property
    def ca_certificate(self) -> Path:
        """The CA certificate the server reads (sites get a copy in their credentials)."""
        return self.directory / "ca.pem"

    @property
    def authority_certificate(self) -> Path:
        """The CA certificate beside ``ca.key``; the same file as :attr:`ca_certificate` without
        ``ca_directory``."""
        return (self.ca_directory or self.directory) / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return (self.ca_directory or self.directory) / "ca.key"

    @property
    def server_certificate(self) -> Path:
        return self.directory / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.directory / "server.key"


@dataclass(frozen=True)
class Authority:
    """The deployment's CA, loaded with its private key: only what enrolls sites needs one."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)


def create_certificates(
    directory: Path,
    hosts: Sequence[str],
    days: int = 365,
    overwrite: bool = False,
    ca_directory: Path | None = None,
) -> CertificatePaths:
    """Write DEVELOPMENT certificates: a CA (unless there is one) and a server certificate for ``hosts``.

    These are for trying confide out and for deployments inside one organisation that has nothing better. A
    real deployment may have its organisation's CA issue the server certificate and put it at the same
    paths; confide only reads PEM files. Site certificates are not made here: each site makes its own key
    (`confide keys`) and the CA signs its request when the site is enrolled (`confide enroll --csr`).

    The CA is created once, in ``ca_directory`` when given (with a copy of ``ca.pem`` in ``directory``), so
    that the running server never needs ``ca.key``. When it exists it signs the new server certificate; with
    no ``hosts`` only the CA is made (or checked). An existing server certificate is replaced only with
    ``overwrite``. Every host that parses as an IP address goes into the server certificate as one, the
    others as DNS names. Private keys are EC P-256, written unencrypted and readable by their owner only.
    """
    paths = CertificatePaths(Path(directory), None if ca_directory is None else Path(ca_directory))
    if isinstance(hosts, str):
        hosts = [hosts]
    names = list(dict.fromkeys(_host_name(h) for h in hosts))
    if not 1 <= days <= MAX_DAYS:
        raise DeploymentError(f"certificates must be valid for 1 to {MAX_DAYS} days (got days={days})")
    if hosts and not overwrite:
        existing = [p for p in (paths.server_certificate, paths.server_key) if p.exists()]
        if existing:
            raise DeploymentError(
                f"{existing[0]} already exists; keep using it, or replace it with overwrite "
                "(`confide certs --overwrite`), after which sites must be given the new CA certificate"
            )

    make_directory(paths.directory)
    authority = _existing_or_new_authority(paths, days)
    if hosts:
        key = ec.generate_private_key(ec.SECP256R1())
        common_name = next((h for h in hosts if not _is_ip(h)), hosts[0]).strip()
        if len(common_name) > 64:  # clients check the SubjectAltNames; the common name is only a label
            common_name = "confide server"
        certificate = _sign(
            authority, common_name, key.public_key(), days, ExtendedKeyUsageOID.SERVER_AUTH, names
        )
        write_file(paths.server_key, _private_pem(key), private=True)
        write_file(paths.server_certificate, certificate.public_bytes(serialization.Encoding.PEM))
    return paths


def _existing_or_new_authority(paths: CertificatePaths, days: int) -> Authority:
    if paths.authority_certificate.exists():
        authority = load_authority(paths)
    else:
        if paths.ca_key.exists():
            raise DeploymentError(
                f"{paths.ca_key} exists without ca.pem beside it; restore ca.pem, or move ca.key aside to "
                "create a new CA (every site will then need new credentials)"
            )
        if paths.ca_directory is not None and paths.ca_certificate.exists():
            raise DeploymentError(
                f"{paths.directory} already trusts the CA in {paths.ca_certificate}, whose key is not in "
                f"{paths.ca_directory}; give the folder that holds its ca.key"
            )
        authority = _new_authority(max(days, CA_DAYS))
        make_directory(paths.ca_key.parent)
        write_file(paths.ca_key, _private_pem(authority.key), private=True)
        write_file(paths.authority_certificate, authority.certificate_pem)
    if not paths.ca_certificate.exists():
        write_file(paths.ca_certificate, authority.certificate_pem)
    return authority


def issue_site_certificate(authority: Authority, site: str, public_key: TlsPublicKey, days: int) -> bytes:
    """A client certificate (PEM) for ``site`` over ``public_key``, which the site made and kept its private
    half of. The common name is ``site`` as enrolled, never a name copied from the site's request."""
    if not 1 <= days <= MAX_DAYS:
        raise DeploymentError(f"certificates must be valid for 1 to {MAX_DAYS} days (got days={days})")
    certificate = _sign(
        authority, check_site_name(site), public_key, days, ExtendedKeyUsageOID.CLIENT_AUTH, []
    )
    return certificate.public_bytes(serialization.Encoding.PEM)


def _new_authority(days: int) -> Authority:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "confide"),
            x509.NameAttribute(NameOID.COMMON_NAME, "confide development CA"),
        ]
    )
    now = datetime.datetime.now(datetime.UTC)
    public = key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=days))
        # path_length=0: this CA signs only end-entity certificates, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Authority(certificate, key)


def _sign(
    authority: Authority,
    common_name: str,
    public_key: TlsPublicKey,
    days: int,
    usage: x509.ObjectIdentifier,
    names: Sequence[x509.GeneralName],
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    # A certificate cannot outlive the CA that vouches for it: clients would reject it from that day on.
    not_after = min(now + datetime.timedelta(days=days), authority.certificate.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(authority.certificate.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(authority.key.public_key()), critical=False
        )
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
    return builder.sign(authority.key, hashes.SHA256())


def load_authority(paths: CertificatePaths) -> Authority:
    """The deployment's CA, checked: both files readable, the key the certificate's, not expired, and the
    same CA as the one the server and its sites trust."""
    if not paths.authority_certificate.is_file():
        raise DeploymentError(
            f"{paths.authority_certificate.parent} has no CA certificate (ca.pem); run `confide certs` first "
            "to create one"
        )
    if not paths.ca_key.is_file():
        raise DeploymentError(
            f"{paths.ca_key} is missing, so nothing can be signed by the CA in "
            f"{paths.authority_certificate}; run this where the CA key is kept (`--ca FOLDER`)"
        )
    certificate = read_certificate(paths.authority_certificate)
    try:
        key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise DeploymentError(f"cannot read the CA key {paths.ca_key}: {e}") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != certificate.public_key():
        raise DeploymentError(
            f"{paths.ca_key} is not the key of the CA certificate {paths.authority_certificate}; restore the "
            "pair that belong together"
        )
    if certificate.not_valid_after_utc <= datetime.datetime.now(datetime.UTC):
        raise DeploymentError(
            f"the CA certificate {paths.authority_certificate} expired on "
            f"{certificate.not_valid_after_utc:%Y-%m-%d}; create a new CA and give every site new credentials"
        )
    if paths.ca_certificate.exists() and read_certificate(paths.ca_certificate) != certificate:
        raise DeploymentError(
            f"{paths.ca_certificate} is not the CA whose key is {paths.ca_key}: certificates signed with "
            "this key would not be trusted; give the CA folder of this deployment"
        )
    return Authority(certificate, key)


def read_certificate(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as e:
        raise DeploymentError(f"cannot read the certificate {path}: {e}") from e


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip().removeprefix("[").removesuffix("]"))
    except ValueError:
        return False
    return True


def _host_name(host: str) -> x509.GeneralName:
    """The subjectAltName entry that makes a client dialling ``host`` accept the server's certificate."""
    text = host.strip() if isinstance(host, str) else ""
    bare = text.removeprefix("[").removesuffix("]")  # [::1], as written in a URL
    try:
        return x509.IPAddress(ipaddress.ip_address(bare))
    except ValueError:
        pass
    labels = text.removesuffix(".").split(".")
    if text and len(text) <= 253 and all(_DNS_LABEL.fullmatch(label) for label in labels):
        return x509.DNSName(text.removesuffix(".").lower())
    hint = "; give the host without a port" if ":" in text else ""
    raise DeploymentError(f"{host!r} is neither a host name nor an IP address{hint}")


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_directory(path: Path) -> None:
    """``path`` and its parents, created readable by their owner only (they hold keys)."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise DeploymentError(f"cannot create the directory {path}: {e}") from e


def write_file(path: Path, data: bytes, private: bool = False) -> None:
    """Write ``path`` whole or not at all, and a secret so that no one else can read it even for an instant.

    The file is born with its final mode (a chmod afterwards would leave a window in which it is readable),
    under a temporary name, and renamed over any older file, which also drops the older file's mode.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as e:
        raise DeploymentError(f"cannot write {path}: {e}") from e
