"""Verify AWS Nitro Enclaves attestation documents.

An enclave asks its Nitro Secure Module (NSM) for an attestation document and hands it to a site; the site
checks it here before it sends the enclave anything. The document is a COSE_Sign1 structure (RFC 9052 §4.2):
the CBOR array ``[protected, unprotected, payload, signature]``, optionally under CBOR tag 18, signed with
ES384 (ECDSA over P-384 with SHA-384; the signature is r || s, 48 bytes each) over the CBOR encoding of
``["Signature1", protected, b"", payload]``. The payload is a CBOR map: ``module_id``, ``digest``
("SHA384"), ``timestamp`` (milliseconds since the epoch), ``pcrs`` (index -> measurement), ``certificate``
(the DER leaf certificate whose key signed the document), ``cabundle`` (DER certificates, the AWS root
first), and the optional ``public_key``, ``user_data`` and ``nonce`` that the enclave chose. The format and
the checks follow AWS's "Verifying the root of trust" page
(https://docs.aws.amazon.com/enclaves/latest/user/verify-root.html) and the NSM API's attestation_process.md.

What :meth:`NitroVerifier.verify` checks, in order:

1. the COSE and payload structure and every field's type and size (anything malformed is one
   :class:`~confide.errors.AttestationError`, never a decoder's traceback);
2. that ``cabundle[0]`` is, byte for byte, the pinned root: AWS_NitroEnclaves_Root-G1 (SHA-256 fingerprint
   641A0321...79BB5B, as AWS publishes it) unless the caller pins another;
3. the chain ``cabundle[0] -> ... -> certificate``: each certificate issued by the one before it (names and
   signature), each issuer a CA within its path length, each valid at ``now``;
4. the ES384 signature with the leaf certificate's P-384 key;
5. the document's age (``timestamp`` within ``max_age`` seconds of ``now``), that PCR0-2 are not all zero
   (a debug-mode enclave), and, when the caller asks, the nonce and the measurement.

Threat model. The attacker controls the network and the host that runs the enclave: it can replay old
documents, forge or edit any field, assemble certificate chains of its own, and run the enclave image in
debug mode (where the host can read the enclave's memory and NSM reports all-zero PCRs). It cannot forge
an ECDSA P-384 signature, and AWS's attestation PKI is trusted: a document that passes proves that an
enclave whose image measures PCR0-2 asked for it, with that public key, user data and nonce, at that time.
Freshness needs the site's own nonce (the ``nonce`` argument); ``max_age`` alone bounds a replay to a window.
Not checked: revocation (the certificates name CRLs on S3; fetching them would put network I/O inside the
verifier, and AWS's intermediate certificates live for hours to days), and the PCRs beyond 0-2, which the
caller can read from :attr:`NitroDocument.pcrs`.

Tested against two real documents published in the EternisAI/remote-attestation-verifier repository (see
tests/tee/data/README.md) and against documents built in the tests with a certificate chain of their own.
"""

from __future__ import annotations

import hmac
import io
import itertools
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import cbor2
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding

from confide.errors import AttestationError, ConfigError
from confide.privacy.tee.attestation import Evidence

logger = logging.getLogger(__name__)

AWS_NITRO_ROOT_G1_PEM = b"""-----BEGIN CERTIFICATE-----
MIICETCCAZagAwIBAgIRAPkxdWgbkK/hHUbMtOTn+FYwCgYIKoZIzj0EAwMwSTEL
MAkGA1UEBhMCVVMxDzANBgNVBAoMBkFtYXpvbjEMMAoGA1UECwwDQVdTMRswGQYD
VQQDDBJhd3Mubml0cm8tZW5jbGF2ZXMwHhcNMTkxMDI4MTMyODA1WhcNNDkxMDI4
MTQyODA1WjBJMQswCQYDVQQGEwJVUzEPMA0GA1UECgwGQW1hem9uMQwwCgYDVQQL
DANBV1MxGzAZBgNVBAMMEmF3cy5uaXRyby1lbmNsYXZlczB2MBAGByqGSM49AgEG
BSuBBAAiA2IABPwCVOumCMHzaHDimtqQvkY4MpJzbolL//Zy2YlES1BR5TSksfbb
48C8WBoyt7F2Bw7eEtaaP+ohG2bnUs990d0JX28TcPQXCEPZ3BABIeTPYwEoCWZE
h8l5YoQwTcU/9KNCMEAwDwYDVR0TAQH/BAUwAwEB/zAdBgNVHQ4EFgQUkCW1DdkF
R+eWw5b6cp3PmanfS5YwDgYDVR0PAQH/BAQDAgGGMAoGCCqGSM49BAMDA2kAMGYC
MQCjfy+Rocm9Xue4YnwWmNJVA44fA0P5W2OpYow9OYCVRaEevL8uO1XYru5xtMPW
rfMCMQCi85sWBbJwKKXdS6BptQFuZbT73o/gBh1qUxl/nNr12UO8Yfwr6wPLb+6N
IwLz3/Y=
-----END CERTIFICATE-----
"""
"""AWS_NitroEnclaves_Root-G1 (CN=aws.nitro-enclaves, O=Amazon, OU=AWS, C=US; ECDSA P-384; valid 2019-10-28 to
2049-10-28), from https://aws-nitro-enclaves.amazonaws.com/AWS_NitroEnclaves_Root-G1.zip."""

AWS_NITRO_ROOT_G1_SHA256 = "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b"
"""The root's SHA-256 fingerprint as AWS publishes it on the "Verifying the root of trust" page."""

COSE_ALGORITHM_ES384 = -35
"""COSE algorithm identifier of ECDSA P-384 with SHA-384 (IANA COSE Algorithms registry)."""

COSE_SIGN1_TAG = 18
SIGNATURE_BYTES = 96
PCR_SIZES = frozenset({32, 48, 64})
"""PCR values are SHA-256, -384 or -512 digests; the NSM API's attestation_process.md allows these three."""

MAX_REPORT_BYTES = 64 * 1024
"""Real documents are about 4.5 kB (16 PCRs, five certificates of at most 1024 bytes, user data and nonce
of at most 512): anything over 64 KiB is refused before it is decoded."""

MEASURED_PCRS = (0, 1, 2)
"""PCR0: the enclave image file; PCR1: the Linux kernel and boot ramfs; PCR2: the user applications."""


@dataclass(frozen=True)
class NitroDocument:
    """The verified contents of an attestation document: only :meth:`NitroVerifier.verify` makes these."""

    module_id: str
    timestamp: float
    """When the NSM made the document, in seconds since the epoch."""
    pcrs: Mapping[int, bytes]
    public_key: bytes
    """The key the enclave put in the document (empty if none): what a site encrypts to or checks against."""
    user_data: bytes
    nonce: bytes

    @property
    def measurement(self) -> str:
        """Hex of PCR0 || PCR1 || PCR2: the enclave image, its kernel and boot ramfs, and its applications.

        Together they name the code the enclave runs; ``nitro-cli build-enclave`` prints the same three
        values, so an operator pins the measurement of the image they built and reviewed.
        """
        return b"".join(self.pcrs[index] for index in MEASURED_PCRS).hex()


@dataclass(frozen=True)
class _Payload:
    """The payload's fields after the type checks, before any signature check."""

    module_id: str
    timestamp_ms: int
    pcrs: dict[int, bytes]
    certificate: bytes
    cabundle: list[bytes]
    public_key: bytes
    user_data: bytes
    nonce: bytes


class NitroVerifier:
    """Checks AWS Nitro Enclaves attestation documents against a pinned root certificate."""

    platform = "aws-nitro"

    def __init__(self, root_certificate: bytes | None = None, *, max_age: float = 300.0) -> None:
        """``root_certificate``: the root to pin, DER or PEM; None pins AWS_NitroEnclaves_Root-G1. A test or a
        private PKI passes its own. ``max_age``: how many seconds a document stays acceptable after the NSM
        made it (and how far its timestamp may run ahead of this machine's clock)."""
        if not max_age > 0:
            raise ConfigError(f"NitroVerifier max_age must be > 0 seconds (got {max_age!r})")
        self.max_age = float(max_age)
        root = AWS_NITRO_ROOT_G1_PEM if root_certificate is None else root_certificate
        try:
            if root.lstrip().startswith(b"-----BEGIN"):
                certificate = x509.load_pem_x509_certificate(root)
            else:
                certificate = x509.load_der_x509_certificate(root)
        except ValueError as error:
            raise ConfigError(
                f"the root certificate for Nitro attestation is neither a PEM nor a DER X.509 certificate "
                f"({error}); pass root_certificate=None to pin AWS's root"
            ) from None
        self.root_der = certificate.public_bytes(Encoding.DER)

    def verify(
        self, report: bytes, *, now: float, nonce: bytes | None = None, measurement: str | None = None
    ) -> NitroDocument:
        """Verify ``report`` at unix time ``now`` and return what it proves, or raise AttestationError.

        ``nonce``: the challenge this site sent, which the document must carry (pass it: without it a replayed
        document younger than ``max_age`` passes). ``measurement``: the expected hex of PCR0 || PCR1 || PCR2.
        """
        protected, payload_bytes, signature = _parse_cose_sign1(report)
        payload = _parse_payload(payload_bytes)
        if payload.cabundle[0] != self.root_der:
            raise AttestationError(
                "the attestation document's certificate chain does not start at the pinned root "
                "certificate (cabundle[0] differs): it was not issued by AWS Nitro Enclaves, or the "
                "verifier pins another root"
            )
        chain = [_load_certificate(der, f"cabundle[{i}]") for i, der in enumerate(payload.cabundle)]
        leaf = _load_certificate(payload.certificate, "the leaf certificate")
        _verify_chain([*chain, leaf], now)
        _verify_signature(leaf, protected, payload_bytes, signature)
        document = NitroDocument(
            module_id=payload.module_id,
            timestamp=payload.timestamp_ms / 1000.0,
            pcrs=MappingProxyType(dict(payload.pcrs)),
            public_key=payload.public_key,
            user_data=payload.user_data,
            nonce=payload.nonce,
        )
        self._check_claims(document, now=now, nonce=nonce, measurement=measurement)
        logger.debug("verified the Nitro attestation of %s: %s", document.module_id, document.measurement)
        return document

    def _check_claims(
        self, document: NitroDocument, *, now: float, nonce: bytes | None, measurement: str | None
    ) -> None:
        """The checks on what the signed document says: age, debug mode, nonce and measurement."""
        age = now - document.timestamp
        if age > self.max_age:
            raise AttestationError(
                f"the attestation document is {age:.0f} s old, older than max_age = {self.max_age:g} s: "
                "it may be replayed; ask the enclave for a fresh one"
            )
        if age < -self.max_age:
            raise AttestationError(
                f"the attestation document is timestamped {-age:.0f} s in the future (max_age = "
                f"{self.max_age:g} s): check this machine's clock"
            )
        if not any(any(document.pcrs[index]) for index in MEASURED_PCRS):
            raise AttestationError(
                "the attestation document's PCR0-2 are all zero: the enclave runs in debug mode, where the "
                "host can read its memory and the document says nothing about its code; run it without "
                "--debug-mode"
            )
        if nonce is not None and not hmac.compare_digest(document.nonce, nonce):
            raise AttestationError(
                f"the attestation document carries nonce {document.nonce.hex() or '(none)'}, not the nonce "
                f"{nonce.hex()} this site sent: it is a replay or an answer to another challenge"
            )
        if measurement is not None and document.measurement != measurement.lower():
            raise AttestationError(
                f"the enclave's measurement (PCR0 || PCR1 || PCR2) is {document.measurement}, not the "
                f"expected {measurement.lower()}: it runs another image than the one pinned"
            )


def _decode_cbor(data: bytes, what: str) -> Any:
    """Decode exactly one CBOR item; bytes left over mean the data is not what it claims to be."""
    stream = io.BytesIO(data)
    # The input is hostile: a decoder error of any kind is a malformed document, reported as one.
    try:
        item = cbor2.CBORDecoder(stream).decode()
    except (cbor2.CBORError, ValueError, TypeError, OverflowError, RecursionError, MemoryError) as error:
        raise AttestationError(f"{what} is not valid CBOR ({type(error).__name__}: {error})") from None
    if stream.tell() != len(data):
        raise AttestationError(f"{what} has {len(data) - stream.tell()} bytes after its CBOR item")
    return item


def _parse_cose_sign1(report: bytes) -> tuple[bytes, bytes, bytes]:
    """The protected header, payload and signature of a COSE_Sign1 report, checked for type and algorithm."""
    if not isinstance(report, (bytes, bytearray)) or not report:
        raise AttestationError("the attestation document is empty or not bytes")
    if len(report) > MAX_REPORT_BYTES:
        raise AttestationError(
            f"the attestation document is {len(report)} bytes, more than the {MAX_REPORT_BYTES} any NSM makes"
        )
    item = _decode_cbor(bytes(report), "the attestation document")
    if isinstance(item, cbor2.CBORTag):
        if item.tag != COSE_SIGN1_TAG:
            raise AttestationError(f"the attestation document has CBOR tag {item.tag}, not COSE_Sign1 (18)")
        item = item.value
    if not (isinstance(item, (list, tuple)) and len(item) == 4):
        raise AttestationError("the attestation document is not a COSE_Sign1 array of 4 items")
    protected, unprotected, payload, signature = item
    if not isinstance(protected, bytes) or not isinstance(unprotected, Mapping):
        raise AttestationError("the COSE_Sign1 headers are not a protected bstr and an unprotected map")
    if not isinstance(payload, bytes) or not isinstance(signature, bytes):
        raise AttestationError("the COSE_Sign1 payload or signature is not a byte string")
    header = _decode_cbor(protected, "the COSE protected header")
    algorithm = header.get(1) if isinstance(header, Mapping) else None
    if type(algorithm) is not int or algorithm != COSE_ALGORITHM_ES384:
        raise AttestationError(
            f"the COSE protected header names algorithm {algorithm!r}, not ES384 (-35), which Nitro uses"
        )
    if len(signature) != SIGNATURE_BYTES:
        raise AttestationError(f"the ES384 signature is {len(signature)} bytes, not {SIGNATURE_BYTES}")
    return protected, payload, signature


def _bytes_field(fields: Mapping[Any, Any], name: str, *, low: int, high: int, optional: bool) -> bytes:
    """A byte string of ``low`` to ``high`` bytes; an optional one may be absent or null (read as b"")."""
    value = fields.get(name)
    if value is None and optional:
        return b""
    if not isinstance(value, bytes) or not low <= len(value) <= high:
        raise AttestationError(
            f"the attestation payload's {name} must be a byte string of {low} to {high} bytes "
            f"(got {type(value).__name__}{f' of {len(value)} bytes' if isinstance(value, bytes) else ''})"
        )
    return value


def _parse_payload(payload: bytes) -> _Payload:
    """The payload map's fields, with the types and sizes attestation_process.md gives for each."""
    fields = _decode_cbor(payload, "the attestation payload")
    if not isinstance(fields, Mapping):
        raise AttestationError("the attestation payload is not a CBOR map")
    module_id = fields.get("module_id")
    if not isinstance(module_id, str) or not module_id:
        raise AttestationError("the attestation payload's module_id is missing or not a non-empty string")
    if fields.get("digest") != "SHA384":
        raise AttestationError(f"the attestation payload's digest is {fields.get('digest')!r}, not 'SHA384'")
    timestamp = fields.get("timestamp")
    if not isinstance(timestamp, int) or isinstance(timestamp, bool) or not 0 < timestamp < 2**63:
        raise AttestationError("the attestation payload's timestamp is not a positive integer (ms)")
    pcrs = fields.get("pcrs")
    if not isinstance(pcrs, Mapping) or not 1 <= len(pcrs) <= 32:
        raise AttestationError("the attestation payload's pcrs is not a map of 1 to 32 PCRs")
    for index, value in pcrs.items():
        index_ok = type(index) is int and 0 <= index < 32
        if not (index_ok and isinstance(value, bytes) and len(value) in PCR_SIZES):
            raise AttestationError(
                f"the attestation payload's PCR {index!r} is malformed (it needs an index 0-31 and a "
                "32, 48 or 64-byte value)"
            )
    if any(index not in pcrs for index in MEASURED_PCRS):
        raise AttestationError("the attestation payload lacks PCR0, PCR1 or PCR2, which name its code")
    cabundle = fields.get("cabundle")
    if not isinstance(cabundle, (list, tuple)) or not cabundle:
        raise AttestationError("the attestation payload's cabundle is missing or not a non-empty list")
    if not all(isinstance(der, bytes) and 1 <= len(der) <= 1024 for der in cabundle):
        raise AttestationError("the attestation payload's cabundle has an entry that is not 1-1024 bytes")
    return _Payload(
        module_id=module_id,
        timestamp_ms=timestamp,
        pcrs=dict(pcrs),
        certificate=_bytes_field(fields, "certificate", low=1, high=1024, optional=False),
        cabundle=list(cabundle),
        public_key=_bytes_field(fields, "public_key", low=1, high=1024, optional=True),
        user_data=_bytes_field(fields, "user_data", low=0, high=512, optional=True),
        nonce=_bytes_field(fields, "nonce", low=0, high=512, optional=True),
    )


def _load_certificate(der: bytes, what: str) -> x509.Certificate:
    """Parse a certificate, and every part the checks read: ``cryptography`` parses some of them lazily."""
    try:
        certificate = x509.load_der_x509_certificate(der)
        _ = (certificate.subject, certificate.issuer, certificate.extensions, certificate.public_key())
        _ = (certificate.not_valid_before_utc, certificate.not_valid_after_utc)
        return certificate
    except (ValueError, UnsupportedAlgorithm, x509.InvalidVersion) as error:
        raise AttestationError(
            f"{what} in the attestation document is not a DER X.509 certificate ({error})"
        ) from None


def _verify_chain(chain: list[x509.Certificate], now: float) -> None:
    """Each certificate valid at ``now`` and issued by the one before it, every issuer a CA within its limits.

    The first certificate is the pinned root (compared byte for byte by the caller), so its own signature is
    not checked. The CA check stops a holder of any leaf key (any enclave's) from issuing a leaf of its own.
    """
    for position, certificate in enumerate(chain):
        name = "the leaf certificate" if position == len(chain) - 1 else f"cabundle[{position}]"
        not_before = certificate.not_valid_before_utc.timestamp()
        not_after = certificate.not_valid_after_utc.timestamp()
        if now < not_before:
            raise AttestationError(
                f"{name} ({certificate.subject.rfc4514_string()}) is not valid until "
                f"{certificate.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC: check this machine's clock"
            )
        if now > not_after:
            raise AttestationError(
                f"{name} ({certificate.subject.rfc4514_string()}) expired at "
                f"{certificate.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC: ask the enclave for a new document"
            )
    for position, (issuer, subject) in enumerate(itertools.pairwise(chain)):
        try:
            constraints = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            constraints = None
        if constraints is None or not constraints.ca:
            raise AttestationError(
                f"certificate {position} of the attestation chain ({issuer.subject.rfc4514_string()}) is "
                "not a CA certificate, yet it issued the next one: the chain is forged"
            )
        certificates_below = len(chain) - position - 2
        if constraints.path_length is not None and certificates_below > constraints.path_length:
            raise AttestationError(
                f"certificate {position} of the attestation chain allows {constraints.path_length} CA "
                f"certificates below it, and the chain has {certificates_below}"
            )
        try:
            subject.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            raise AttestationError(
                f"certificate {position + 1} of the attestation chain ({subject.subject.rfc4514_string()}) "
                f"was not issued by certificate {position} ({issuer.subject.rfc4514_string()}): its "
                "signature or issuer name does not match"
            ) from None


def _verify_signature(leaf: x509.Certificate, protected: bytes, payload: bytes, signature: bytes) -> None:
    """The COSE_Sign1 signature (RFC 9052 §4.4) under the leaf certificate's P-384 key."""
    key = leaf.public_key()
    if not (isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP384R1)):
        raise AttestationError("the leaf certificate's key is not an ECDSA P-384 key, which ES384 needs")
    to_be_signed = cbor2.dumps(["Signature1", protected, b"", payload])
    half = SIGNATURE_BYTES // 2
    der_signature = encode_dss_signature(
        int.from_bytes(signature[:half], "big"), int.from_bytes(signature[half:], "big")
    )
    try:
        key.verify(der_signature, to_be_signed, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise AttestationError(
            "the attestation document's signature does not verify with its leaf certificate's key: "
            "the document was altered or signed by another key"
        ) from None


class NitroAttestation:
    """The Nitro verifier behind the attestation interface (``attestation.Verifier``): a verified document
    as ``attestation.Evidence``. Its measurement is the image's PCR0 || PCR1 || PCR2
    (:attr:`NitroDocument.measurement`), which a site's operator pins from ``nitro-cli build-enclave``; the
    age of the document is left to the site's own policy (``attestation.check``, ``privacy.enclave_max_age``).
    """

    platform = "aws-nitro"

    def __init__(self, root_certificate: bytes | None = None) -> None:
        self.verifier = NitroVerifier(root_certificate or None, max_age=float("inf"))

    def verify(self, report: bytes, *, now: float) -> Evidence:
        document = self.verifier.verify(report, now=now)
        return Evidence(
            platform=self.platform,
            measurement=document.measurement,
            public_key=document.public_key,
            nonce=document.nonce,
            issued_at=document.timestamp,
            insecure=False,
        )
