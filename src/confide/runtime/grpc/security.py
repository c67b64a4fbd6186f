"""A deployment's credentials: who may take part, how a site proves who it is, and whose keys it trusts.

```
CA_FOLDER/ (best kept off the server: see below; by default the deployment folder itself)
  ca.key, ca.pem            the certificate authority: signs certificates and endorses site identities
DEPLOYMENT_DIR/             what the running server reads
  ca.pem                    the CA every site trusts (a copy)
  server.pem, server.key    the server's certificate, valid for each host name or address sites dial
  sites.sqlite              the enrollment registry: every site, how it authenticates, whether it is
                            revoked, its pinned certificate and its CA-endorsed identity key
  sites/SITE.json           a site's credentials (its token or certificate, never a private key)
SITE_FOLDER/ (at the site: `confide keys`; see confide.runtime.grpc.identity)
  SITE.key, SITE.identity.key, SITE.csr, SITE.json
```

Every connection is TLS: the server proves who it is with a certificate signed by the CA that each site
holds, so a site never sends anything to an impostor, and nothing crosses the network in plaintext. A site
proves who it is in one of two ways, chosen for the whole server (gRPC either asks every client for a
certificate or none):

- ``token``: a bearer token in each call's ``authorization`` metadata. The server keeps only its SHA-256, so
  a copy of ``sites.sqlite`` lets no one impersonate a site.
- ``mtls``: a client certificate signed by the deployment's CA whose common name is the site name, over a
  key the site made itself: the server signs the site's request and never holds a site's private key.

Threat model, transport: an attacker on the network, or one holding a leaked token or site key. The
registry is the one authority in both modes and is read on every call, so revoking a site shuts it out from
its next call, whatever certificate or token it still holds, and enrolling a site again retires its old
token and its old certificate (the registry pins the one it issued).

Threat model, identities (``privacy.secagg_authenticated``): a malicious server, which may run modified
code, must not be able to unmask one site's update by substituting public keys in secure aggregation. Each
site signs its per-round keys with an Ed25519 identity it made itself; at enrollment the CA endorses the
pair (site name, identity key), and a site accepts another site's identity only when that endorsement
verifies against the CA certificate in its own credentials (:func:`~confide.runtime.grpc.identity.
verify_registry`), never because the server sent it. What that gives depends on who holds ``ca.key``:

- Kept away from the running server (``confide certs --ca FOLDER`` and ``confide enroll --ca FOLDER``, the
  folder on another machine or on media mounted only while enrolling): the server holds only its own
  certificate and key, ``ca.pem`` and the registry of endorsed keys. A server that substitutes a key, or
  moves one site's endorsed key to another name, is refused by every honest site, so it cannot sign in any
  site's place and cannot unmask an individual update. It can still leave sites out of a round, stop a
  round, or collude with sites: secure aggregation's own bounds (threshold, neighbours) apply.
- Held by the server (the default layout, where ``confide certs`` puts ``ca.key`` beside ``server.key``): an
  operator or intruder with that file can endorse a key of its own under any site's name, sites accept it,
  and authenticated secure aggregation protects no more than against an honest-but-curious server. It still
  stops anyone without ``ca.key`` (another site, an attacker on the network) from injecting keys.
- Either way an endorsement does not expire: a site whose identity key leaked must be given a new CA (every
  site then enrolls again), since an old endorsement still verifies. The same ``ca.key`` also mints TLS
  certificates for any site name, so in ``mtls`` mode it is as sensitive as the registry itself, and an
  organisation's CA used in its place must issue client certificates only to this deployment's sites.

Over 400 lines because the registry, the credentials file and the Authenticator make one trust decision
together and are read together; the CA and certificates are in ``pki.py``, a site's keys, its request and
identity endorsements in ``identity.py``.

Over ~400 lines because certificates, enrollment, credentials files and the per-call authentication are the
one trust boundary of a deployment, and read best together.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID

from confide.errors import DeploymentError
from confide.runtime.grpc.identity import (
    SiteKeyPaths,
    load_identity_key,
    read_private_file,
    read_request,
    sign_identity,
)
from confide.runtime.grpc.pki import (
    CA_DAYS,
    MAX_DAYS,
    CertificatePaths,
    check_site_name,
    create_certificates,
    issue_site_certificate,
    load_authority,
    make_directory,
    write_file,
)

__all__ = [  # the names the runtime and the command line use; certificates and identities re-exported
    "AUTH_MODES",
    "CA_DAYS",
    "MAX_DAYS",
    "TOKEN_PREFIX",
    "AuthError",
    "Authenticator",
    "CertificatePaths",
    "Credentials",
    "Enrollment",
    "Identity",
    "SiteRecord",
    "check_site_name",
    "create_certificates",
    "issue_site_credentials",
    "server_credentials",
]

log = logging.getLogger(__name__)

TOKEN_PREFIX = "cfd_"
"""Starts every token, so that one pasted into a log or a repository is recognisable (and scannable)."""

AUTH_MODES = ("token", "mtls")
"""How sites prove who they are: a bearer token, or a client certificate (mutual TLS)."""


class AuthError(DeploymentError):
    """A call is refused: it carries no credentials, or credentials of no active enrolled site."""


# -- enrollment ------------------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sites (
  site TEXT PRIMARY KEY,
  token_hash TEXT UNIQUE,
  method TEXT NOT NULL CHECK (method IN ('token', 'certificate')),
  enrolled_at REAL NOT NULL,
  revoked_at REAL,
  certificate_sha256 TEXT,
  identity_public BLOB,
  identity_endorsement BLOB);
"""

_ADDED_COLUMNS = {"identity_public": "BLOB", "identity_endorsement": "BLOB"}
"""Columns added since the first release: a registry written before them gains them when opened."""

Method = Literal["token", "certificate"]

Identity = tuple[bytes, bytes]
"""A site's Ed25519 identity public key (32 bytes) and the CA's endorsement of it for the site's name."""


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
    identity: Identity | None = None
    """The site's identity key and its endorsement, when it was enrolled from its own request."""

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
        make_directory(directory)
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
            # The first release's columns first: a table of that name from anything else is left untouched.
            db.execute(
                "SELECT site, token_hash, method, enrolled_at, revoked_at, certificate_sha256 FROM sites"
            )
            present = {row[1] for row in db.execute("PRAGMA table_info(sites)")}
            with db:
                for column, kind in _ADDED_COLUMNS.items():
                    if column not in present:
                        db.execute(f"ALTER TABLE sites ADD COLUMN {column} {kind}")
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

    def enroll(self, site: str, identity: Identity | None = None) -> str:
        """Enroll ``site`` for token authentication and return its new token: the only time it is shown.

        Enrolling a site again replaces everything recorded for it (its old token stops working at once, and
        its identity is the one given now, or none) and lifts a revocation. ``identity`` is not checked here:
        :func:`issue_site_credentials` makes it with the CA, and sites check it themselves.
        """
        check_site_name(site)
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        self._put(SiteRecord(site, "token", time.time(), identity=identity), _token_hash(token))
        return token

    def enroll_certificate(
        self, site: str, certificate_pem: bytes | None = None, identity: Identity | None = None
    ) -> None:
        """Enroll ``site`` for mutual TLS; with ``certificate_pem``, only that certificate is accepted for it.

        Pinning the certificate means that a certificate issued to the site earlier (perhaps the one that
        leaked) stops working when the site is enrolled again with a new one. Lifts a revocation, and replaces
        the site's identity with ``identity`` (or none).
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
        self._put(SiteRecord(site, "certificate", time.time(), None, fingerprint, identity), None)

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
        public, endorsement = record.identity or (None, None)
        with self._lock, self._db:
            self._db.execute(
                f"INSERT OR REPLACE INTO sites (token_hash, {_COLUMNS}) VALUES (?, ?, ?, ?, NULL, ?, ?, ?)",
                (
                    token_hash,
                    record.site,
                    record.method,
                    record.enrolled_at,
                    record.certificate_sha256,
                    public,
                    endorsement,
                ),
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

    def identities(self, sites: Iterable[str]) -> dict[str, Identity]:
        """The endorsed identity of each of ``sites``: what the server sends every site (in its join reply)
        for secure aggregation's authenticated mode, and what its own SecAggServer checks signatures with.

        Raises DeploymentError naming the sites that are not enrolled, are revoked, or have no identity
        (enrolled with a token alone, without their request).
        """
        wanted = list(dict.fromkeys(sites))
        records = {r.site: r for r in self.sites()}
        found = {
            site: records[site].identity
            for site in wanted
            if site in records and records[site].active and records[site].identity is not None
        }
        missing = [site for site in wanted if site not in found]
        if missing:
            shown = ", ".join(missing[:10]) + (", ..." if len(missing) > 10 else "")
            raise DeploymentError(
                f"{len(missing)} site(s) have no active enrolled identity in {self.path} ({shown}); "
                "secure aggregation's authenticated mode needs one for every site: each site runs `confide "
                "keys SITE` and is enrolled with `confide enroll SITE --csr SITE.csr`"
            )
        return {site: identity for site, identity in found.items() if identity is not None}

    def _query(self, where: str, args: tuple[Any, ...], with_hash: bool = False) -> list[tuple[Any, ...]]:
        columns = _COLUMNS
        if with_hash:
            columns = "token_hash, " + columns
        with self._lock:
            return self._db.execute(f"SELECT {columns} FROM sites {where}", args).fetchall()


_COLUMNS = "site, method, enrolled_at, revoked_at, certificate_sha256, identity_public, identity_endorsement"


def _record(row: Sequence[Any]) -> SiteRecord:
    site, method, enrolled_at, revoked_at, fingerprint, public, endorsement = row
    identity = None if public is None or endorsement is None else (bytes(public), bytes(endorsement))
    revoked = None if revoked_at is None else float(revoked_at)
    return SiteRecord(str(site), method, float(enrolled_at), revoked, fingerprint, identity)


def _token_hash(token: str) -> str:
    # A plain hash, not a slow password hash: tokens carry 256 random bits, so there is nothing to guess.
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


# -- a site's credentials ----------------------------------------------------------------------------------


CREDENTIALS_FORMAT = 2
"""The credentials file's format: 2 names the site's key files (made at the site) instead of holding a key."""


@dataclass(frozen=True)
class Credentials:
    """All a site needs to reach the server: the CA to trust, its token or its certificate, and its keys.

    Saved as one JSON file that the site keeps private (mode 0600). Since sites make their own keys (format
    2), the file the server's operator writes holds no private key: ``key_file`` (the TLS key, with a
    certificate) and ``identity_key_file`` (the Ed25519 identity) name files beside it, where `confide keys`
    wrote them, and :meth:`load` reads them in, refusing one that other users can read. A format 1 file, with
    the TLS key inline in ``key_pem`` and no identity, still loads. The secrets stay out of ``repr``, so the
    object can be logged.
    """

    site: str
    ca_pem: bytes = field(repr=False)
    token: str | None = field(default=None, repr=False)
    cert_pem: bytes | None = field(default=None, repr=False)
    key_pem: bytes | None = field(default=None, repr=False)
    server: str = ""
    """HOST:PORT of the server the site dials (optional: the site's command line may give it instead)."""
    identity_pem: bytes | None = field(default=None, repr=False)
    """The site's Ed25519 identity key (PKCS#8 PEM), for secure aggregation's authenticated mode."""
    key_file: str | None = None
    """Where the TLS key is, relative to the credentials file's folder (saved instead of ``key_pem``)."""
    identity_key_file: str | None = None
    """Where the identity key is, relative to the credentials file's folder (saved instead of
    ``identity_pem``)."""

    def save(self, path: Path) -> None:
        """Write the file; a key is saved inline only when no ``*_file`` names where it is kept."""
        record: dict[str, Any] = {
            "format": CREDENTIALS_FORMAT,
            "site": self.site,
            "server": self.server,
            "ca_pem": self.ca_pem.decode("ascii"),
            "token": self.token,
            "cert_pem": None if self.cert_pem is None else self.cert_pem.decode("ascii"),
            "key_file": self.key_file,
            "identity_key_file": self.identity_key_file,
        }
        if self.key_file is None and self.key_pem is not None:
            record["key_pem"] = self.key_pem.decode("ascii")
        if self.identity_key_file is None and self.identity_pem is not None:
            record["identity_pem"] = self.identity_pem.decode("ascii")
        write_file(Path(path), (json.dumps(record, indent=2) + "\n").encode(), private=True)

    @classmethod
    def load(cls, path: Path) -> Credentials:
        path = Path(path)
        record = _read_record(path)

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
        token, cert = text_field("token"), text_field("cert_pem")
        key_file, identity_file = text_field("key_file"), text_field("identity_key_file")
        key = _key_field(path, "key_pem", text_field("key_pem"), key_file)
        identity = _key_field(path, "identity_pem", text_field("identity_pem"), identity_file)
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
        if cert is not None and key is not None:
            _check_key_pair(path, cert.encode(), key, key_file)
        if identity is not None:
            load_identity_key(identity, identity_file or f"identity_pem in {path}")
        return cls(
            site=site,
            ca_pem=ca_pem,
            token=token,
            cert_pem=None if cert is None else cert.encode(),
            key_pem=key,
            server=text_field("server") or "",
            identity_pem=identity,
            key_file=key_file,
            identity_key_file=identity_file,
        )

    def identity(self) -> ed25519.Ed25519PrivateKey | None:
        """The site's Ed25519 identity, which signs its keys in authenticated secure aggregation; None when
        it was enrolled without one (a token alone, or credentials from before identities)."""
        if self.identity_pem is None:
            return None
        return load_identity_key(self.identity_pem, f"the identity key of site {self.site}")

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """TLS that trusts only the deployment's CA, presenting the site's certificate when it has one."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_pem, private_key=self.key_pem, certificate_chain=self.cert_pem
        )

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata every call carries: the bearer token, when the site authenticates with one."""
        return (("authorization", "Bearer " + self.token),) if self.token else ()


def _read_record(path: Path) -> dict[str, Any]:
    """The JSON object of a credentials file, in a format this version reads."""
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
        raise DeploymentError(f"the credentials file {path} does not hold a JSON object; ask for it again")
    version = record.get("format", 1)
    if version not in (1, CREDENTIALS_FORMAT) or isinstance(version, bool):
        raise DeploymentError(
            f"the credentials file {path} is of format {version!r}, which this version of confide does not "
            f"read (it reads 1 and {CREDENTIALS_FORMAT}); upgrade confide, or ask for the file again"
        )
    return record


def _key_field(path: Path, name: str, inline: str | None, file: str | None) -> bytes | None:
    """A private key of a credentials file: inline (``name``), or read from ``file`` beside it."""
    if inline is not None and file is not None:
        raise DeploymentError(
            f"the credentials file {path} holds {name} and also names a file for it; keep one of the two"
        )
    if file is None:
        return None if inline is None else inline.encode()
    return read_private_file(path.parent / file)


def _check_key_pair(path: Path, cert_pem: bytes, key_pem: bytes, key_file: str | None) -> None:
    """A certificate useless with the key beside it would only fail in the TLS handshake, obscurely."""
    where = path.parent / key_file if key_file else f"key_pem in {path}"
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise DeploymentError(f"{where} does not hold a readable private key ({e})") from e
    certificate = x509.load_pem_x509_certificate(cert_pem)
    if key.public_key() != certificate.public_key():
        raise DeploymentError(
            f"the certificate in {path} was not issued for the key in {where}: the site made new keys after "
            "its request was signed; send the request `confide keys` wrote last and enroll the site again"
        )


def issue_site_credentials(
    directory: Path,
    site: str,
    server: str = "",
    request: bytes | None = None,
    auth: str | None = None,
    ca_directory: Path | None = None,
    days: int = 365,
    source: str = "the request",
) -> Credentials:
    """Enroll ``site`` (again) and return the credentials to hand to it; its previous ones stop working.

    ``request`` is the site's ``SITE.csr`` (:func:`~confide.runtime.grpc.identity.make_site_keys`), checked
    by :func:`~confide.runtime.grpc.identity.read_request`: with it the CA (``ca.key`` in ``ca_directory``,
    by default ``directory``) endorses the site's identity key, and with ``auth="mtls"`` (the default with a
    request) signs a client certificate over the site's TLS key. ``auth="token"`` issues a token (with a
    request, the identity is registered too; without one the site has no identity). The credentials hold no
    private key: they name the key files the site keeps beside them.
    """
    paths = CertificatePaths(Path(directory), None if ca_directory is None else Path(ca_directory))
    check_site_name(site)
    auth = auth or ("mtls" if request is not None else "token")
    if auth not in AUTH_MODES:
        raise DeploymentError(f"the authentication mode must be 'token' or 'mtls' (got {auth!r})")
    if auth == "mtls" and request is None:
        raise DeploymentError(
            f"a site certificate is made over the site's own key: the site runs `confide keys {site}` and "
            f"sends {site}.csr, which is enrolled with `confide enroll {site} --csr {site}.csr`"
        )
    if not paths.ca_certificate.is_file():
        raise DeploymentError(
            f"{paths.directory} has no CA certificate (ca.pem); run `confide certs` first to create the "
            "deployment's certificates"
        )
    ca_pem = paths.ca_certificate.read_bytes()
    if request is None:
        with Enrollment.open(paths.directory) as enrollment:
            token = enrollment.enroll(site)
        return Credentials(site=site, ca_pem=ca_pem, token=token, server=server)
    keys = read_request(request, site, source)
    authority = load_authority(paths)
    identity = (keys.identity_public, sign_identity(authority.key, site, keys.identity_public))
    identity_file = SiteKeyPaths.identity_key_name(site)
    with Enrollment.open(paths.directory) as enrollment:
        if auth == "token":
            token = enrollment.enroll(site, identity)
            return Credentials(site, ca_pem, token, server=server, identity_key_file=identity_file)
        cert_pem = issue_site_certificate(authority, site, keys.tls_public_key, days)
        enrollment.enroll_certificate(site, cert_pem, identity)
    return Credentials(
        site,
        ca_pem,
        cert_pem=cert_pem,
        server=server,
        key_file=SiteKeyPaths.tls_key_name(site),
        identity_key_file=identity_file,
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
