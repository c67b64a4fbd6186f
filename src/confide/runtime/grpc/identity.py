"""A site's own keys, the request it sends to be enrolled, and the CA's endorsement of its identity.

A site makes every private key it uses itself (`confide keys SITE --dir DIR`), and none leaves its folder:

```
DIR/
  SITE.key            its TLS key (EC P-256), for mutual TLS                          mode 0600
  SITE.identity.key   its Ed25519 identity, which signs its secure-aggregation keys    mode 0600
  SITE.csr            its request to the server's operator: no secret in it            mode 0644
  SITE.json           its credentials, as the operator's `confide enroll --csr` wrote them (put here)
```

``SITE.csr`` holds two PKCS#10 certificate requests (RFC 2986) in PEM, both with the common name SITE: one
over the TLS key and one over the identity key, each signed by its own key, so the operator knows the site
holds both private keys. Enrollment checks both signatures and both names, has the CA sign a client
certificate over the TLS key, and has the CA endorse the pair (SITE, identity public key).

An endorsement is the CA's ECDSA-SHA256 signature over ``frame("confide/site-identity/v1", SITE, KEY)``
(length-prefixed fields, so no other name and key can share it; it can never pass for a certificate, which
the CA signs as DER). A site checks every identity the server sends it with :func:`verify_registry` against
the CA certificate from its own credentials, so the server cannot put a key of its own in place of another
site's (which would let it unmask that site in secure aggregation: against an active server, Bonawitz et
al. 2017, "Practical Secure Aggregation for Privacy-Preserving Machine Learning", and Bell et al. 2020
(SecAgg+) assume exactly such a PKI). What this does and does not protect, and why ``ca.key`` should not
live on the server, is in :mod:`confide.runtime.grpc.security`.
"""

from __future__ import annotations

import hashlib
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from confide.errors import DeploymentError
from confide.privacy.secagg.keys import frame
from confide.runtime.grpc.pki import TlsPublicKey, check_site_name, make_directory, write_file

IDENTITY_CONTEXT = b"confide/site-identity/v1"
"""Names what an endorsement vouches for, so that the CA's signature can mean nothing else."""

IDENTITY_KEY_BYTES = 32
_REQUEST_BLOCK = re.compile(
    rb"-----BEGIN CERTIFICATE REQUEST-----\r?\n.+?-----END CERTIFICATE REQUEST-----", re.DOTALL
)
_TLS_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)


# -- the site's folder ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteKeyPaths:
    """The files of one site in its own folder (see the module's docstring)."""

    directory: Path
    site: str

    @staticmethod
    def tls_key_name(site: str) -> str:
        return f"{check_site_name(site)}.key"

    @staticmethod
    def identity_key_name(site: str) -> str:
        return f"{check_site_name(site)}.identity.key"

    @property
    def tls_key(self) -> Path:
        return self.directory / self.tls_key_name(self.site)

    @property
    def identity_key(self) -> Path:
        return self.directory / self.identity_key_name(self.site)

    @property
    def request(self) -> Path:
        return self.directory / f"{check_site_name(self.site)}.csr"

    @property
    def credentials(self) -> Path:
        return self.directory / f"{check_site_name(self.site)}.json"


@dataclass(frozen=True)
class SiteKeys:
    """What :func:`make_site_keys` did: where the files are, and which keys it made (the others it reused)."""

    paths: SiteKeyPaths
    identity_public: bytes
    made: tuple[str, ...]
    """The names of the key files made now ("SITE.key", "SITE.identity.key"); empty when both were reused."""

    @property
    def fingerprint(self) -> str:
        return identity_fingerprint(self.identity_public)


def make_site_keys(directory: Path, site: str, overwrite: bool = False) -> SiteKeys:
    """At the site: its TLS key and Ed25519 identity (each made unless it is already there, or anew with
    ``overwrite``), and the request ``SITE.csr`` signed by both, to send to the server's operator.

    Reusing the keys lets a site ask for a new certificate (or re-enroll after a token was replaced) without
    its identity changing; ``overwrite`` replaces both, after which the site must be enrolled again. The keys
    come from the OS's cryptographic generator (through ``cryptography``) and are written readable by their
    owner only.
    """
    paths = SiteKeyPaths(Path(directory), check_site_name(site))
    make_directory(paths.directory)
    made = []
    if overwrite or not paths.tls_key.exists():
        tls_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = ec.generate_private_key(ec.SECP256R1())
        write_file(paths.tls_key, _private_pem(tls_key), private=True)
        made.append(paths.tls_key.name)
    else:
        tls_key = _load_tls_key(paths.tls_key)
    if overwrite or not paths.identity_key.exists():
        identity = ed25519.Ed25519PrivateKey.generate()
        write_file(paths.identity_key, _private_pem(identity), private=True)
        made.append(paths.identity_key.name)
    else:
        identity = load_identity_key(read_private_file(paths.identity_key), paths.identity_key)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, site)])
    tls_request = x509.CertificateSigningRequestBuilder().subject_name(name).sign(tls_key, hashes.SHA256())
    identity_request = x509.CertificateSigningRequestBuilder().subject_name(name).sign(identity, None)
    write_file(
        paths.request,
        tls_request.public_bytes(serialization.Encoding.PEM)
        + identity_request.public_bytes(serialization.Encoding.PEM),
    )
    return SiteKeys(paths, _raw_public(identity.public_key()), tuple(made))


def read_private_file(path: Path) -> bytes:
    """A private key file's bytes, refused when other users could read it (as ssh refuses such a key)."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise DeploymentError(
                f"{path} can be read by other users (mode {mode:04o}); make it private with "
                f"`chmod 600 {path}`"
            )
        return path.read_bytes()
    except FileNotFoundError:
        raise DeploymentError(
            f"the key file {path} does not exist; keep the credentials file in the folder where "
            "`confide keys` wrote the site's keys"
        ) from None
    except OSError as e:
        raise DeploymentError(f"cannot read the key file {path}: {e}") from e


def load_identity_key(pem: bytes, source: Path | str) -> ed25519.Ed25519PrivateKey:
    """The Ed25519 identity key in ``pem`` (PKCS#8), or a DeploymentError naming ``source``."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:
        raise DeploymentError(f"{source} does not hold a readable private key ({e})") from e
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise DeploymentError(
            f"{source} holds a {type(key).__name__}, not an Ed25519 identity key; make one with "
            "`confide keys`"
        )
    return key


def _load_tls_key(path: Path) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    try:
        key = serialization.load_pem_private_key(read_private_file(path), password=None)
    except (ValueError, TypeError) as e:
        raise DeploymentError(f"{path} does not hold a readable private key ({e})") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise DeploymentError(f"{path} holds a {type(key).__name__}, not a TLS key (EC or RSA)")
    return key


def identity_fingerprint(public_key: bytes) -> str:
    """A short form of an identity public key for people to compare (the first 128 bits of its SHA-256):
    `confide keys` prints it at the site and `confide enroll` at the server, and the two operators compare
    them over a channel they trust (a phone call), which is what makes a request arriving by e-mail safe."""
    digest = hashlib.sha256(IDENTITY_CONTEXT + public_key).hexdigest()[:32]
    return "-".join(digest[i : i + 4] for i in range(0, 32, 4))


# -- the request, read at the server ----------------------------------------------------------------------


@dataclass(frozen=True)
class SiteRequest:
    """A site's request, checked: the public halves of the keys it holds."""

    site: str
    tls_public_key: TlsPublicKey
    identity_public: bytes


def read_request(data: bytes, site: str, source: Path | str = "the request") -> SiteRequest:
    """The keys in ``SITE.csr`` from the site ``site``, refused unless it holds exactly one TLS and one
    identity request, each signed by its own key and each for the common name ``site`` and nothing else."""
    check_site_name(site)
    blocks = _REQUEST_BLOCK.findall(data if isinstance(data, bytes) else b"")
    if not blocks:
        raise DeploymentError(
            f"{source} holds no certificate request; the site makes it with `confide keys {site}`"
        )
    tls: list[TlsPublicKey] = []
    identities: list[bytes] = []
    for block in blocks:
        try:
            request = x509.load_pem_x509_csr(block)
            valid = request.is_signature_valid
        except (ValueError, TypeError) as e:
            raise DeploymentError(f"{source} holds a certificate request that cannot be read ({e})") from e
        if not valid:
            raise DeploymentError(
                f"a certificate request in {source} is not signed by its own key: it was altered, or made "
                "by someone who does not hold the key; ask the site for its request again"
            )
        names = [str(a.value) for a in request.subject]
        common = [str(a.value) for a in request.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        if common != [site] or len(names) != 1:  # the name alone: nothing else the CA might copy
            raise DeploymentError(
                f"{source} is a request for {', '.join(names) or 'no name'}, not for site {site!r}: a site "
                "may only ask for its own name; enroll it under the name it asked for, or ask it to run "
                f"`confide keys {site}`"
            )
        key = request.public_key()
        if isinstance(key, ed25519.Ed25519PublicKey):
            identities.append(_raw_public(key))
        elif isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
            tls.append(_check_tls_key(key, source))
        else:
            raise DeploymentError(f"{source} asks for a {type(key).__name__}, which confide does not use")
    if len(tls) != 1 or len(identities) != 1:
        raise DeploymentError(
            f"{source} must hold one TLS key request and one identity (Ed25519) request, as `confide keys` "
            f"writes them (it holds {len(tls)} and {len(identities)})"
        )
    return SiteRequest(site, tls[0], identities[0])


def _check_tls_key(key: TlsPublicKey, source: Path | str) -> TlsPublicKey:
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < 2048:
        raise DeploymentError(
            f"{source} asks for an RSA key of {key.key_size} bits; at least 2048 are needed"
        )
    if isinstance(key, ec.EllipticCurvePublicKey) and not isinstance(key.curve, _TLS_CURVES):
        raise DeploymentError(f"{source} asks for a key on the curve {key.curve.name}; use P-256")
    return key


# -- endorsements: the CA vouches for (site, identity key) --------------------------------------------------


def identity_statement(site: str, public_key: bytes) -> bytes:
    """What the CA signs to endorse ``public_key`` as the identity of ``site``."""
    return frame(IDENTITY_CONTEXT, check_site_name(site), public_key)


def sign_identity(ca_key: ec.EllipticCurvePrivateKey, site: str, public_key: bytes) -> bytes:
    """The CA's endorsement (a DER ECDSA-SHA256 signature) of ``public_key`` as ``site``'s identity."""
    _check_identity_key(site, public_key)
    return ca_key.sign(identity_statement(site, public_key), ec.ECDSA(hashes.SHA256()))


def verify_identity(
    ca_certificate: x509.Certificate, site: str, public_key: bytes, endorsement: bytes
) -> None:
    """Raise DeploymentError unless ``endorsement`` is the CA's for exactly this site and this key."""
    ca_public = ca_certificate.public_key()
    if not isinstance(ca_public, ec.EllipticCurvePublicKey):
        raise DeploymentError(
            f"the deployment's CA has a {type(ca_public).__name__}; identity endorsements need an EC CA "
            "(`confide certs` makes one)"
        )
    _check_identity_key(site, public_key)
    try:
        ca_public.verify(endorsement, identity_statement(site, public_key), ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError, TypeError):
        raise DeploymentError(
            f"the identity key given for site {site!r} ({identity_fingerprint(public_key)}) is not endorsed "
            "by the deployment's CA for that site: the server substituted it, or the site was enrolled under "
            "another CA; refusing it"
        ) from None


def verify_registry(ca_cert_pem: bytes, entries: Mapping[str, tuple[bytes, bytes]]) -> dict[str, bytes]:
    """The identity keys of ``entries`` (site -> (Ed25519 public key, endorsement)), each checked against the
    CA certificate ``ca_cert_pem`` that the site holds in its own credentials: never against anything the
    server sent. Raises DeploymentError naming the first site whose entry does not verify.

    The result is the registry that :class:`~confide.privacy.secagg.protocol.SecureSite` takes.
    """
    try:
        ca_certificate = x509.load_pem_x509_certificate(ca_cert_pem)
    except ValueError as e:
        raise DeploymentError(f"the CA certificate to check identities against is not PEM ({e})") from e
    registry: dict[str, bytes] = {}
    owners: dict[bytes, str] = {}
    for site in sorted(entries):
        public_key, endorsement = entries[site]
        verify_identity(ca_certificate, site, public_key, endorsement)
        if public_key in owners:
            raise DeploymentError(
                f"sites {owners[public_key]!r} and {site!r} have the same identity key; each site must make "
                "its own with `confide keys`"
            )
        owners[public_key] = site
        registry[site] = public_key
    return registry


def _check_identity_key(site: str, public_key: bytes) -> None:
    check_site_name(site)
    if not isinstance(public_key, bytes) or len(public_key) != IDENTITY_KEY_BYTES:
        raise DeploymentError(
            f"the identity key given for site {site!r} is not an Ed25519 public key of {IDENTITY_KEY_BYTES} "
            "bytes; refusing it"
        )
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(public_key)
    except ValueError:
        raise DeploymentError(
            f"the identity key given for site {site!r} is not an Ed25519 public key"
        ) from None


def _raw_public(key: ed25519.Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _private_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
