"""A deployment's credentials: its TLS certificates, and the registry of sites allowed to take part.

```
DEPLOYMENT_DIR/
  ca.pem, ca.key            the certificate authority every site trusts (ca.key only signs; it need not
                            live on the server machine)
  server.pem, server.key    the server's certificate, valid for each host name or address sites dial
  sites/SITE.pem, SITE.key  a site's client certificate, for mutual TLS (its common name is the site name)
  sites.sqlite              the enrollment registry: every site, how it authenticates, whether it is revoked
```

Every connection is TLS: the server proves who it is with a certificate signed by the CA that each site
holds, so a site never sends anything to an impostor, and nothing crosses the network in plaintext. A site
proves who it is in one of two ways, chosen for the whole server (gRPC either asks every client for a
certificate or none):

- ``token``: a bearer token in each call's ``authorization`` metadata. The server keeps only its SHA-256, so
  a copy of ``sites.sqlite`` lets no one impersonate a site.
- ``mtls``: a client certificate signed by the deployment's CA whose common name is the site name.

Threat model: an attacker on the network, or one holding a leaked token or site key. The registry is the
one authority in both modes and is read on every call, so revoking a site shuts it out from its next call,
whatever certificate or token it still holds, and enrolling a site again retires its old token (and, for a
certificate issued here, its old certificate). Whoever holds ``ca.key`` can mint certificates for any site
name, so in ``mtls`` mode that key is as sensitive as the registry itself, and an organisation's CA used in
its place must be one that issues client certificates only to this deployment's sites.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from confide.errors import DeploymentError

log = logging.getLogger(__name__)

TOKEN_PREFIX = "cfd_"
"""Starts every token, so that one pasted into a log or a repository is recognisable (and scannable)."""

AUTH_MODES = ("token", "mtls")
"""How sites prove who they are: a bearer token, or a client certificate (mutual TLS)."""

CA_DAYS = 10 * 365
"""A new CA outlives the certificates it signs, so that site certificates added later are still valid."""

_SITE_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")  # 64: the longest common name a certificate can carry
MAX_DAYS = 100 * 365
"""The longest validity accepted (datetime ends in the year 9999; no deployment needs a century)."""
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_CLOCK_SKEW = datetime.timedelta(minutes=5)


class AuthError(DeploymentError):
    """A call is refused: it carries no credentials, or credentials of no active enrolled site."""


def check_site_name(site: str) -> str:
    """``site`` if it is a valid site name (it becomes a file name and a certificate's common name)."""
    if not isinstance(site, str) or not _SITE_NAME.fullmatch(site):
        raise DeploymentError(
            f"the site name {site!r} is not valid: use 1 to 64 letters, digits, '-', '_' or '.'"
        )
    return site


# -- certificates ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CertificatePaths:
    """Where a deployment directory keeps its certificates and keys."""

    directory: Path
    sites: tuple[str, ...] = ()
    """The sites whose certificates the call that returned this wrote."""

    @property
    def ca_certificate(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    @property
    def server_certificate(self) -> Path:
        return self.directory / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.directory / "server.key"

    def site_certificate(self, site: str) -> Path:
        return self.directory / "sites" / f"{check_site_name(site)}.pem"

    def site_key(self, site: str) -> Path:
        return self.directory / "sites" / f"{check_site_name(site)}.key"


@dataclass(frozen=True)
class _Authority:
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def create_certificates(
    directory: Path,
    hosts: Sequence[str],
    sites: Sequence[str] = (),
    days: int = 365,
    overwrite: bool = False,
) -> CertificatePaths:
    """Write DEVELOPMENT certificates: a CA, a server certificate for ``hosts`` and one per site.

    These are for trying confide out and for deployments inside one organisation that has nothing better. A
    real deployment should have its organisation's CA issue the server certificate (and the site
    certificates for mutual TLS) and put them at the same paths; confide only reads PEM files.

    The CA is created once: when ``ca.pem`` is already there it signs the new certificates, so that sites
    enrolled later trust the same root; with no ``hosts`` only the site certificates are written, beside
    the existing server certificate. An existing server or site certificate is replaced only with
    ``overwrite``. Every host that parses as an IP address goes into the server certificate as one, the
    others as DNS names. Private keys are EC P-256, written unencrypted and readable by their owner only.
    """
    paths = CertificatePaths(Path(directory), tuple(dict.fromkeys(check_site_name(s) for s in sites)))
    if isinstance(hosts, str):
        hosts = [hosts]
    if not hosts and not paths.server_certificate.exists():
        raise DeploymentError("the server certificate needs at least one host name or IP address")
    names = list(dict.fromkeys(_host_name(h) for h in hosts))
    if not 1 <= days <= MAX_DAYS:
        raise DeploymentError(f"certificates must be valid for 1 to {MAX_DAYS} days (got days={days})")
    if not overwrite:
        server = [paths.server_certificate, paths.server_key] if hosts else []
        existing = [p for p in server if p.exists()]
        existing += [
            p for s in paths.sites for p in (paths.site_certificate(s), paths.site_key(s)) if p.exists()
        ]
        if existing:
            raise DeploymentError(
                f"{existing[0]} already exists; keep using it, or replace it with overwrite "
                "(`confide certs --overwrite`), after which sites must be given the new certificates"
            )

    _make_directory(paths.directory)
    if paths.ca_certificate.exists():
        authority = _load_authority(paths)
    else:
        if paths.ca_key.exists():
            raise DeploymentError(
                f"{paths.ca_key} exists without ca.pem beside it; restore ca.pem, or move ca.key aside to "
                "create a new CA (every site will then need new credentials)"
            )
        authority = _new_authority(max(days, CA_DAYS))
        _write(paths.ca_key, _private_pem(authority.key), private=True)
        _write(paths.ca_certificate, authority.certificate.public_bytes(serialization.Encoding.PEM))

    if hosts:
        key = ec.generate_private_key(ec.SECP256R1())
        common_name = next((h for h in hosts if not _is_ip(h)), hosts[0]).strip()
        if len(common_name) > 64:  # clients check the SubjectAltNames; the common name is only a label
            common_name = "confide server"
        certificate = _sign(authority, common_name, key, days, ExtendedKeyUsageOID.SERVER_AUTH, names)
        _write(paths.server_key, _private_pem(key), private=True)
        _write(paths.server_certificate, certificate.public_bytes(serialization.Encoding.PEM))
    for site in paths.sites:
        _write_site_certificate(paths, authority, site, days)
    return paths


def _write_site_certificate(
    paths: CertificatePaths, authority: _Authority, site: str, days: int
) -> x509.Certificate:
    _make_directory(paths.directory / "sites")
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = _sign(authority, site, key, days, ExtendedKeyUsageOID.CLIENT_AUTH, [])
    _write(paths.site_key(site), _private_pem(key), private=True)
    _write(paths.site_certificate(site), certificate.public_bytes(serialization.Encoding.PEM))
    return certificate


def _new_authority(days: int) -> _Authority:
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
    return _Authority(certificate, key)


def _sign(
    authority: _Authority,
    common_name: str,
    key: ec.EllipticCurvePrivateKey,
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
        .public_key(key.public_key())
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


def _load_authority(paths: CertificatePaths) -> _Authority:
    """The deployment's CA, checked: both files readable, the key the certificate's, not expired."""
    if not paths.ca_certificate.is_file():
        raise DeploymentError(
            f"{paths.directory} has no CA certificate (ca.pem); run `confide certs` first to create one"
        )
    if not paths.ca_key.is_file():
        raise DeploymentError(
            f"{paths.ca_key} is missing, so no new certificate can be signed by the CA in "
            f"{paths.ca_certificate}; run this where the CA key is kept"
        )
    certificate = _read_certificate(paths.ca_certificate)
    try:
        key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise DeploymentError(f"cannot read the CA key {paths.ca_key}: {e}") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != certificate.public_key():
        raise DeploymentError(
            f"{paths.ca_key} is not the key of the CA certificate {paths.ca_certificate}; restore the pair "
            "that belong together"
        )
    if certificate.not_valid_after_utc <= datetime.datetime.now(datetime.UTC):
        raise DeploymentError(
            f"the CA certificate {paths.ca_certificate} expired on "
            f"{certificate.not_valid_after_utc:%Y-%m-%d}; create a new CA and give every site new credentials"
        )
    return _Authority(certificate, key)


def _read_certificate(path: Path) -> x509.Certificate:
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


def _make_directory(path: Path) -> None:
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise DeploymentError(f"cannot create the directory {path}: {e}") from e


def _write(path: Path, data: bytes, private: bool = False) -> None:
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


# -- enrollment ------------------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sites (
  site TEXT PRIMARY KEY,
  token_hash TEXT UNIQUE,
  method TEXT NOT NULL CHECK (method IN ('token', 'certificate')),
  enrolled_at REAL NOT NULL,
  revoked_at REAL,
  certificate_sha256 TEXT);
"""

Method = Literal["token", "certificate"]


@dataclass(frozen=True)
class SiteRecord:
    """One enrolled site. Times are seconds since the epoch."""

    site: str
    method: Method
    enrolled_at: float
    revoked_at: float | None = None
    certificate_sha256: str | None = None
    """With ``method == "certificate"``: the one certificate (SHA-256 of its DER) accepted for the site, or
    None to accept any certificate the CA issued with the site's name."""

    @property
    def active(self) -> bool:
        return self.revoked_at is None


class Enrollment:
    """The registry of sites (``sites.sqlite``): the one authority on who may call the server.

    One connection serves every thread of the process behind a lock; another process (``confide enroll``
    while the server runs) can write at the same time, and since no read keeps a transaction open, each
    lookup sees the latest revocation.
    """

    def __init__(self, path: Path, connection: sqlite3.Connection) -> None:
        self.path = path
        self._db = connection
        self._lock = threading.Lock()

    @classmethod
    def open(cls, directory: Path) -> Enrollment:
        """The registry in ``directory``, created (empty) if there is none yet."""
        directory = Path(directory)
        _make_directory(directory)
        path = directory / "sites.sqlite"
        try:
            # Born owner-only, like the keys beside it (SQLite gives its -wal and -shm files the same mode).
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
            db = sqlite3.connect(path, check_same_thread=False, timeout=10.0)
        except (OSError, sqlite3.Error) as e:
            raise DeploymentError(f"cannot open the enrollment registry {path}: {e}") from e
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            with db:
                db.executescript(_SCHEMA)
            db.execute(
                "SELECT site, token_hash, method, enrolled_at, revoked_at, certificate_sha256 FROM sites"
            )
        except sqlite3.DatabaseError as e:
            db.close()
            raise DeploymentError(
                f"{path} is not a confide enrollment registry ({e}); move it aside and enroll the sites again"
            ) from e
        return cls(path, db)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Enrollment:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- writing -----------------------------------------------------------------------------------------

    def enroll(self, site: str) -> str:
        """Enroll ``site`` for token authentication and return its new token: the only time it is shown.

        Enrolling a site again replaces its token (the old one stops working at once) and lifts a revocation.
        """
        check_site_name(site)
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        self._put(SiteRecord(site, "token", time.time()), _token_hash(token))
        return token

    def enroll_certificate(self, site: str, certificate_pem: bytes | None = None) -> None:
        """Enroll ``site`` for mutual TLS; with ``certificate_pem``, only that certificate is accepted for it.

        Pinning the certificate means that a certificate issued to the site earlier (perhaps the one that
        leaked) stops working when the site is enrolled again with a new one. Lifts a revocation.
        """
        check_site_name(site)
        fingerprint = None
        if certificate_pem is not None:
            try:
                certificate = x509.load_pem_x509_certificate(certificate_pem)
            except ValueError as e:
                raise DeploymentError(
                    f"the certificate given for site {site!r} is not a PEM certificate: {e}"
                ) from e
            names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            if [n.value for n in names] != [site]:
                raise DeploymentError(
                    f"the certificate given for site {site!r} was issued to "
                    f"{', '.join(str(n.value) for n in names) or 'no common name'}, not to {site!r}"
                )
            fingerprint = certificate.fingerprint(hashes.SHA256()).hex()
        self._put(SiteRecord(site, "certificate", time.time(), None, fingerprint), None)

    def revoke(self, site: str) -> None:
        """Refuse ``site`` from its next call on, whatever token or certificate it holds."""
        with self._lock, self._db:
            changed = self._db.execute(
                "UPDATE sites SET revoked_at = COALESCE(revoked_at, ?) WHERE site = ?", (time.time(), site)
            ).rowcount
        if not changed:
            raise DeploymentError(
                f"no site named {site!r} is enrolled in {self.path}, so it cannot be revoked"
            )

    def _put(self, record: SiteRecord, token_hash: str | None) -> None:
        with self._lock, self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO sites VALUES (?, ?, ?, ?, NULL, ?)",
                (record.site, token_hash, record.method, record.enrolled_at, record.certificate_sha256),
            )

    # -- reading -----------------------------------------------------------------------------------------

    def verify_token(self, token: str) -> str | None:
        """The site whose current token ``token`` is, if that site is active; otherwise None."""
        record = self.token_owner(token)
        return record.site if record is not None and record.active else None

    def token_owner(self, token: str) -> SiteRecord | None:
        """The site whose current token ``token`` is, revoked or not (so that a refusal can say which)."""
        if not isinstance(token, str):
            return None
        digest = _token_hash(token)
        rows = self._query("WHERE token_hash = ? AND method = 'token'", (digest,), with_hash=True)
        for row in rows:
            # The indexed lookup already matched; comparing in constant time as well costs nothing and keeps
            # this correct if the lookup ever becomes a scan.
            if hmac.compare_digest(row[0], digest):
                return _record(row[1:])
        return None

    def record(self, site: str) -> SiteRecord | None:
        rows = self._query("WHERE site = ?", (site,))
        return _record(rows[0]) if rows else None

    def is_active(self, site: str) -> bool:
        record = self.record(site)
        return record is not None and record.active

    def sites(self) -> list[SiteRecord]:
        """Every enrolled site, revoked ones included, by name."""
        return [_record(row) for row in self._query("ORDER BY site", ())]

    def active_sites(self) -> list[str]:
        return [row[0] for row in self._query("WHERE revoked_at IS NULL ORDER BY site", ())]

    def _query(self, where: str, args: tuple[Any, ...], with_hash: bool = False) -> list[tuple[Any, ...]]:
        columns = "site, method, enrolled_at, revoked_at, certificate_sha256"
        if with_hash:
            columns = "token_hash, " + columns
        with self._lock:
            return self._db.execute(f"SELECT {columns} FROM sites {where}", args).fetchall()


def _record(row: Sequence[Any]) -> SiteRecord:
    site, method, enrolled_at, revoked_at, fingerprint = row
    return SiteRecord(
        str(site), method, float(enrolled_at), None if revoked_at is None else float(revoked_at), fingerprint
    )


def _token_hash(token: str) -> str:
    # A plain hash, not a slow password hash: tokens carry 256 random bits, so there is nothing to guess.
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


# -- a site's credentials ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """All a site needs to reach the server: the CA to trust, and its token or its certificate and key.

    Saved as one JSON file that the site's operator receives once and keeps private (mode 0600). The secrets
    stay out of ``repr``, so the object can be logged.
    """

    site: str
    ca_pem: bytes = field(repr=False)
    token: str | None = field(default=None, repr=False)
    cert_pem: bytes | None = field(default=None, repr=False)
    key_pem: bytes | None = field(default=None, repr=False)
    server: str = ""
    """HOST:PORT of the server the site dials (optional: the site's command line may give it instead)."""

    def save(self, path: Path) -> None:
        path = Path(path)
        record = {
            "site": self.site,
            "server": self.server,
            "ca_pem": self.ca_pem.decode("ascii"),
            "token": self.token,
            "cert_pem": None if self.cert_pem is None else self.cert_pem.decode("ascii"),
            "key_pem": None if self.key_pem is None else self.key_pem.decode("ascii"),
        }
        _write(path, (json.dumps(record, indent=2) + "\n").encode(), private=True)

    @classmethod
    def load(cls, path: Path) -> Credentials:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise DeploymentError(
                f"the credentials file {path} does not exist; the server's operator creates it with "
                "`confide enroll SITE`"
            ) from None
        except (OSError, UnicodeDecodeError) as e:
            raise DeploymentError(f"cannot read the credentials file {path}: {e}") from e
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise DeploymentError(
                f"the credentials file {path} is not valid JSON (line {e.lineno}: {e.msg}); ask for it again"
            ) from e
        if not isinstance(record, dict):
            raise DeploymentError(
                f"the credentials file {path} does not hold a JSON object; ask for it again"
            )

        def text_field(name: str, required: bool = False) -> str | None:
            value = record.get(name)
            if value in (None, "") and not required:
                return None
            if not isinstance(value, str) or not value:
                got = "it is missing" if value is None else f"got {type(value).__name__}"
                raise DeploymentError(
                    f"the credentials file {path} needs {name!r} as a non-empty string ({got}); "
                    "ask for it again"
                )
            return value

        site = check_site_name(str(text_field("site", required=True)))
        ca_pem = str(text_field("ca_pem", required=True)).encode()
        token, cert, key = text_field("token"), text_field("cert_pem"), text_field("key_pem")
        server = text_field("server") or ""
        if token is None and cert is None:
            raise DeploymentError(
                f"the credentials file {path} holds neither a token nor a certificate, so site {site!r} "
                "cannot prove who it is; ask the server's operator to enroll it again"
            )
        if (cert is None) != (key is None):
            raise DeploymentError(
                f"the credentials file {path} holds a certificate without its key or a key without its "
                "certificate; both are needed for mutual TLS"
            )
        for name, pem in (("ca_pem", ca_pem), ("cert_pem", cert)):
            if pem is not None:
                try:
                    x509.load_pem_x509_certificate(pem.encode() if isinstance(pem, str) else pem)
                except ValueError as e:
                    raise DeploymentError(
                        f"{name} in the credentials file {path} is not a PEM certificate ({e})"
                    ) from e
        return cls(
            site=site,
            ca_pem=ca_pem,
            token=token,
            cert_pem=None if cert is None else cert.encode(),
            key_pem=None if key is None else key.encode(),
            server=server,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """TLS that trusts only the deployment's CA, presenting the site's certificate when it has one."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_pem, private_key=self.key_pem, certificate_chain=self.cert_pem
        )

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata every call carries: the bearer token, when the site authenticates with one."""
        return (("authorization", "Bearer " + self.token),) if self.token else ()


def issue_site_credentials(
    directory: Path, site: str, server: str = "", certificate: bool = False
) -> Credentials:
    """Enroll ``site`` (again) and return the credentials to hand to it: a new token, or with ``certificate``
    a new client certificate signed by the deployment's CA. Either way its previous credentials stop working.
    """
    paths = CertificatePaths(Path(directory))
    check_site_name(site)
    if not paths.ca_certificate.is_file():
        raise DeploymentError(
            f"{paths.directory} has no CA certificate (ca.pem); run `confide certs` first to create the "
            "deployment's certificates"
        )
    ca_pem = paths.ca_certificate.read_bytes()
    if not certificate:
        with Enrollment.open(paths.directory) as enrollment:
            token = enrollment.enroll(site)
        return Credentials(site=site, ca_pem=ca_pem, token=token, server=server)
    written = _write_site_certificate(paths, _load_authority(paths), site, days=365)
    cert_pem = written.public_bytes(serialization.Encoding.PEM)
    with Enrollment.open(paths.directory) as enrollment:
        enrollment.enroll_certificate(site, cert_pem)
    return Credentials(
        site=site, ca_pem=ca_pem, cert_pem=cert_pem, key_pem=paths.site_key(site).read_bytes(), server=server
    )


# -- the server side -------------------------------------------------------------------------------------


def server_credentials(directory: Path, require_client_certificates: bool) -> grpc.ServerCredentials:
    """The server's TLS: its certificate and key, and (for mutual TLS) the CA that site certificates must
    chain to. gRPC asks clients for a certificate only when it requires one, so this choice is server-wide.
    """
    paths = CertificatePaths(Path(directory))
    missing = [
        p.name for p in (paths.server_key, paths.server_certificate, paths.ca_certificate) if not p.is_file()
    ]
    if missing:
        raise DeploymentError(
            f"{paths.directory} has no {' or '.join(missing)}; create the deployment's certificates with "
            "`confide certs --host HOST` (or put your organisation's there)"
        )
    try:
        key, cert, ca = (
            p.read_bytes() for p in (paths.server_key, paths.server_certificate, paths.ca_certificate)
        )
    except OSError as e:
        raise DeploymentError(f"cannot read the server's certificates in {paths.directory}: {e}") from e
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=require_client_certificates
    )


class Authenticator:
    """Says which site a call comes from, or refuses it, asking the enrollment registry on every call.

    Nothing is cached, so a revocation (even by another process) holds from the very next call; the cost is
    one SHA-256 and one indexed SQLite lookup per call.
    """

    def __init__(self, enrollment: Enrollment, mode: str) -> None:
        if mode not in AUTH_MODES:
            raise DeploymentError(f"the authentication mode must be 'token' or 'mtls' (got {mode!r})")
        self.enrollment = enrollment
        self.mode = mode

    def identify(
        self, metadata: Sequence[tuple[str, str | bytes]], auth_context: Mapping[str, Sequence[bytes]]
    ) -> str:
        """The calling site, from a call's metadata and its ``auth_context``: what gRPC verified of the peer
        (``transport_security_type``, and of a client certificate ``x509_common_name`` and ``x509_pem_cert``).
        """
        try:
            if list(auth_context.get("transport_security_type", ())) != [b"ssl"]:
                # The server only ever listens with TLS; this guards against a port added without it.
                raise AuthError("the call did not come over TLS")
            if self.mode == "token":
                return self._by_token(metadata)
            return self._by_certificate(auth_context)
        except AuthError as e:
            log.warning("refused a call: %s", e)
            raise

    def __call__(self, context: grpc.ServicerContext) -> str:
        """:meth:`identify` for a gRPC handler: the site, or the call aborted with UNAUTHENTICATED."""
        try:
            return self.identify(context.invocation_metadata(), context.auth_context())
        except AuthError as e:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))
            raise  # abort raises; this line only tells type checkers so

    def _by_token(self, metadata: Sequence[tuple[str, str | bytes]]) -> str:
        values = [value for key, value in metadata if key.lower() == "authorization"]
        if not values:
            raise AuthError("no token: the call carries no `authorization: Bearer TOKEN` metadata")
        if len(values) > 1:
            raise AuthError("the call carries more than one authorization header")
        value = values[0].decode("utf-8", "replace") if isinstance(values[0], bytes) else values[0]
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("the authorization metadata is not of the form `Bearer TOKEN`")
        record = self.enrollment.token_owner(token.strip())
        if record is None:
            raise AuthError(
                "unknown token: it was never issued here, or its site has been enrolled again since and "
                "holds a newer one"
            )
        if not record.active:
            raise AuthError(f"site {record.site} is revoked")
        return record.site

    def _by_certificate(self, auth_context: Mapping[str, Sequence[bytes]]) -> str:
        names = list(auth_context.get("x509_common_name", ()))
        if not names:
            raise AuthError("no client certificate: this server authenticates sites by mutual TLS")
        site = names[0].decode("utf-8", "replace")
        record = self.enrollment.record(site)
        if record is None or record.method != "certificate":
            how = "" if record is None else f" for mutual TLS (it uses a {record.method})"
            raise AuthError(f"certificate for {site}, which is not enrolled{how}")
        if not record.active:
            raise AuthError(f"site {site} is revoked")
        if record.certificate_sha256 is not None:
            pems = list(auth_context.get("x509_pem_cert", ()))
            fingerprint = (
                x509.load_pem_x509_certificate(pems[0]).fingerprint(hashes.SHA256()).hex() if pems else ""
            )
            if not hmac.compare_digest(fingerprint, record.certificate_sha256):
                raise AuthError(
                    f"certificate for {site} is not the one enrolled: the site has been enrolled again since "
                    "and holds a newer one"
                )
        return site
