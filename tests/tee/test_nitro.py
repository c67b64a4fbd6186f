"""AWS Nitro attestation: two real published documents, and documents signed by a test PKI of our own.

The real documents (tests/tee/data/README.md says where they come from) prove the verifier reads what AWS's
NSM actually produces and accepts AWS's real chain; the test PKI (root -> intermediate -> leaf, P-384, made
with ``cryptography`` as AWS's is) lets each attack build exactly the document it needs.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from confide.errors import AttestationError, ConfigError
from confide.privacy.tee.nitro import AWS_NITRO_ROOT_G1_SHA256, NitroDocument, NitroVerifier

DATA = Path(__file__).parent / "data"
UTC = datetime.UTC


def real_document(name: str) -> bytes:
    return base64.b64decode((DATA / name).read_text())


PRODUCTION = "eternis_example_attestation_2.b64"
DEBUG = "eternis_example_attestation_debug.b64"
PRODUCTION_TIME = datetime.datetime(2024, 7, 31, 20, 20, tzinfo=UTC).timestamp()  # 93 s after it was made
PRODUCTION_PCRS = (
    "a6cdfede5b1e7950de33218995add7d8f1f6e059c9cccd204316e69feaa2ce54f6f9ff6f5992db0f1ca6135f9b095b85",
    "4b4d5b3661b3efc12920900c80e126e4ce783c522de6c02a2a5bf7af3a2b9327b86776f188e4be1c1c404a129dbda493",
    "96305fcb8857758cba8e5b260f32dba1e00be6343c11521a5c24db6834955f116e884df8c7b2a6a1736295b48c82af14",
)


# ---------------------------------------------------------------------------------------------------------
# The real documents


def test_pinned_root_is_the_one_aws_publishes() -> None:
    assert hashlib.sha256(NitroVerifier().root_der).hexdigest() == AWS_NITRO_ROOT_G1_SHA256
    assert (
        "641A0321A3E244EFE456463195D606317ED7CDCC3C1756E09893F3C68F79BB5B".lower() == AWS_NITRO_ROOT_G1_SHA256
    )


def test_real_document_verifies_against_aws_root() -> None:
    document = NitroVerifier().verify(
        real_document(PRODUCTION),
        now=PRODUCTION_TIME,
        nonce=bytes(19) + b"\x01",
        measurement="".join(PRODUCTION_PCRS).upper(),
    )
    assert document.module_id == "i-0809070ca8037095f-enc01910a70380dca7e"
    assert document.timestamp == 1722457107.047
    assert [document.pcrs[i].hex() for i in range(3)] == list(PRODUCTION_PCRS)
    assert len(document.pcrs) == 16
    assert document.measurement == "".join(PRODUCTION_PCRS)
    assert document.public_key == b"dummy"
    assert document.user_data[:2] == b"\x12\x20" and len(document.user_data) == 68


@pytest.mark.parametrize("where", ["payload", "signature"])
def test_real_document_with_one_byte_changed_is_refused(where: str) -> None:
    report = bytearray(real_document(PRODUCTION))
    position = report.index(bytes.fromhex(PRODUCTION_PCRS[0])) + 5 if where == "payload" else len(report) - 1
    report[position] ^= 0x01
    with pytest.raises(AttestationError, match="signature does not verify"):
        NitroVerifier().verify(bytes(report), now=PRODUCTION_TIME)


def test_real_document_claims_are_checked() -> None:
    verifier, report = NitroVerifier(), real_document(PRODUCTION)
    with pytest.raises(AttestationError, match="not the nonce"):
        verifier.verify(report, now=PRODUCTION_TIME, nonce=b"\x00" * 20)
    with pytest.raises(AttestationError, match="runs another image"):
        verifier.verify(report, now=PRODUCTION_TIME, measurement="00" * 144)
    made = datetime.datetime(2024, 7, 31, 20, 18, 27, tzinfo=UTC).timestamp()
    with pytest.raises(AttestationError, match="301 s old"):
        verifier.verify(report, now=made + 301.1)
    with pytest.raises(AttestationError, match=r"the leaf certificate .* expired at 2024-07-31 23:18:27"):
        verifier.verify(report, now=datetime.datetime(2024, 8, 1, tzinfo=UTC).timestamp())


def test_real_document_is_refused_under_another_root(pki: Pki) -> None:
    with pytest.raises(AttestationError, match="does not start at the pinned root"):
        NitroVerifier(pki.root_pem).verify(real_document(PRODUCTION), now=PRODUCTION_TIME)


def test_real_debug_mode_document_is_refused() -> None:
    now = datetime.datetime(2024, 9, 6, 4, 34, tzinfo=UTC).timestamp()
    with pytest.raises(AttestationError, match="debug mode"):
        NitroVerifier().verify(real_document(DEBUG), now=now)


# ---------------------------------------------------------------------------------------------------------
# A PKI of our own

NOW = 1_900_000_000.0
DAY = datetime.timedelta(days=1)
START = datetime.datetime.fromtimestamp(NOW, UTC)
PCRS = {index: bytes([index + 1]) * 48 for index in range(16)}


def make_certificate(
    name: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool,
    path_length: int | None = None,
    valid: tuple[datetime.datetime, datetime.datetime] = (START - DAY, START + DAY),
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, signing_key = (subject, key) if issuer is None else (issuer[0].subject, issuer[1])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True)
    )
    return builder.sign(signing_key, hashes.SHA384())


def new_key(curve: ec.EllipticCurve | None = None) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(curve or ec.SECP384R1())


@dataclass
class Pki:
    root_key: ec.EllipticCurvePrivateKey
    root: x509.Certificate
    intermediate_key: ec.EllipticCurvePrivateKey
    intermediate: x509.Certificate
    leaf_key: ec.EllipticCurvePrivateKey
    leaf: x509.Certificate

    @property
    def root_pem(self) -> bytes:
        return self.root.public_bytes(Encoding.PEM)

    def bundle(self) -> list[bytes]:
        return [self.root.public_bytes(Encoding.DER), self.intermediate.public_bytes(Encoding.DER)]


@pytest.fixture(scope="module")
def pki() -> Pki:
    root_key, intermediate_key, leaf_key = new_key(), new_key(), new_key()
    root = make_certificate("test-nitro-root", root_key, None, ca=True)
    intermediate = make_certificate(
        "test-nitro-zone", intermediate_key, (root, root_key), ca=True, path_length=0
    )
    leaf = make_certificate("test-enclave", leaf_key, (intermediate, intermediate_key), ca=False)
    return Pki(root_key, root, intermediate_key, intermediate, leaf_key, leaf)


def es384(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA384())))
    return r.to_bytes(48, "big") + s.to_bytes(48, "big")


def payload_of(pki: Pki, **fields: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "module_id": "i-0123456789abcdef0-enc0123456789abcdef",
        "digest": "SHA384",
        "timestamp": int(NOW * 1000) - 5000,
        "pcrs": PCRS,
        "certificate": pki.leaf.public_bytes(Encoding.DER),
        "cabundle": pki.bundle(),
        "public_key": b"enclave public key",
        "user_data": b"round 7",
        "nonce": b"site nonce 0123",
    }
    payload.update(fields)
    return {name: value for name, value in payload.items() if value is not DROP}


DROP = object()


def sign_document(
    payload: Any, key: ec.EllipticCurvePrivateKey, *, header: Any = None, tag: bool = False
) -> bytes:
    protected = cbor2.dumps({1: -35} if header is None else header)
    encoded = cbor2.dumps(payload)
    signature = es384(key, cbor2.dumps(["Signature1", protected, b"", encoded]))
    structure = [protected, {}, encoded, signature]
    return cbor2.dumps(cbor2.CBORTag(18, structure) if tag else structure)


def refused(pki: Pki, report: bytes, match: str, *, now: float = NOW, **options: Any) -> None:
    with pytest.raises(AttestationError, match=match):
        NitroVerifier(pki.root.public_bytes(Encoding.DER)).verify(report, now=now, **options)


@pytest.mark.parametrize("tag", [False, True])
def test_own_document_verifies(pki: Pki, tag: bool) -> None:
    report = sign_document(payload_of(pki), pki.leaf_key, tag=tag)
    document = NitroVerifier(pki.root_pem).verify(report, now=NOW, nonce=b"site nonce 0123")
    assert document == NitroDocument(
        module_id="i-0123456789abcdef0-enc0123456789abcdef",
        timestamp=NOW - 5.0,
        pcrs=PCRS,
        public_key=b"enclave public key",
        user_data=b"round 7",
        nonce=b"site nonce 0123",
    )
    assert document.measurement == (b"\x01" * 48 + b"\x02" * 48 + b"\x03" * 48).hex()


def test_optional_fields_may_be_absent_or_null(pki: Pki) -> None:
    report = sign_document(payload_of(pki, public_key=DROP, user_data=None, nonce=DROP), pki.leaf_key)
    document = NitroVerifier(pki.root_pem).verify(report, now=NOW)
    assert (document.public_key, document.user_data, document.nonce) == (b"", b"", b"")
    refused(pki, report, "carries nonce \\(none\\)", nonce=b"site nonce 0123")


def test_forged_signature_is_refused(pki: Pki) -> None:
    refused(pki, sign_document(payload_of(pki), new_key()), "signature does not verify")


def test_replaced_public_key_is_refused(pki: Pki) -> None:
    """The attack a key-substituting host mounts: keep AWS's signature, put its own key in the payload."""
    protected, unprotected, _, signature = cbor2.loads(sign_document(payload_of(pki), pki.leaf_key))
    forged = cbor2.dumps(payload_of(pki, public_key=b"the host's own key"))
    refused(pki, cbor2.dumps([protected, unprotected, forged, signature]), "signature does not verify")


def test_wrong_root_is_refused(pki: Pki) -> None:
    report = sign_document(payload_of(pki), pki.leaf_key)
    with pytest.raises(AttestationError, match="does not start at the pinned root"):
        NitroVerifier().verify(report, now=NOW)


def test_chain_not_issued_by_the_root_is_refused(pki: Pki) -> None:
    """An attacker copies the pinned root into cabundle[0] and hangs a chain of its own keys under it."""
    fake_key = new_key()
    fake_intermediate = make_certificate("test-nitro-zone", fake_key, (pki.root, new_key()), ca=True)
    leaf = make_certificate("test-enclave", pki.leaf_key, (fake_intermediate, fake_key), ca=False)
    payload = payload_of(
        pki,
        certificate=leaf.public_bytes(Encoding.DER),
        cabundle=[pki.bundle()[0], fake_intermediate.public_bytes(Encoding.DER)],
    )
    refused(pki, sign_document(payload, pki.leaf_key), "certificate 1 .* was not issued by certificate 0")


def test_leaf_cannot_issue_a_leaf(pki: Pki) -> None:
    """Whoever holds one enclave's leaf key must not be able to certify a key of its own choosing."""
    zone_key, leaf_key, own_key = new_key(), new_key(), new_key()
    zone = make_certificate("test-nitro-zone", zone_key, (pki.root, pki.root_key), ca=True)
    leaf = make_certificate("test-enclave", leaf_key, (zone, zone_key), ca=False)
    own_leaf = make_certificate("my-enclave", own_key, (leaf, leaf_key), ca=False)
    bundle = [pki.bundle()[0], zone.public_bytes(Encoding.DER), leaf.public_bytes(Encoding.DER)]
    payload = payload_of(pki, certificate=own_leaf.public_bytes(Encoding.DER), cabundle=bundle)
    refused(pki, sign_document(payload, own_key), "certificate 2 .* is not a CA certificate")


def test_path_length_is_enforced(pki: Pki) -> None:
    """The intermediate allows no CA below it; a second one it signed is refused."""
    sub_key = new_key()
    sub = make_certificate("sub-zone", sub_key, (pki.intermediate, pki.intermediate_key), ca=True)
    leaf = make_certificate("test-enclave", pki.leaf_key, (sub, sub_key), ca=False)
    payload = payload_of(
        pki,
        certificate=leaf.public_bytes(Encoding.DER),
        cabundle=[*pki.bundle(), sub.public_bytes(Encoding.DER)],
    )
    refused(
        pki, sign_document(payload, pki.leaf_key), "allows 0 CA certificates below it, and the chain has 1"
    )


@pytest.mark.parametrize(
    ("valid", "match"),
    [
        ((START - 2 * DAY, START - DAY), "the leaf certificate .* expired at"),
        ((START + DAY, START + 2 * DAY), "the leaf certificate .* is not valid until"),
    ],
)
def test_leaf_outside_its_validity_is_refused(
    pki: Pki, valid: tuple[datetime.datetime, datetime.datetime], match: str
) -> None:
    leaf = make_certificate(
        "test-enclave", pki.leaf_key, (pki.intermediate, pki.intermediate_key), ca=False, valid=valid
    )
    refused(
        pki, sign_document(payload_of(pki, certificate=leaf.public_bytes(Encoding.DER)), pki.leaf_key), match
    )


def test_old_and_future_documents_are_refused(pki: Pki) -> None:
    old = sign_document(payload_of(pki, timestamp=int((NOW - 301) * 1000)), pki.leaf_key)
    refused(pki, old, "301 s old, older than max_age = 300 s")
    assert NitroVerifier(pki.root_pem, max_age=400).verify(old, now=NOW).timestamp == NOW - 301
    future = sign_document(payload_of(pki, timestamp=int((NOW + 400) * 1000)), pki.leaf_key)
    refused(pki, future, "400 s in the future")


def test_wrong_algorithm_is_refused(pki: Pki) -> None:
    refused(pki, sign_document(payload_of(pki), pki.leaf_key, header={1: -7}), "algorithm -7, not ES384")
    refused(pki, sign_document(payload_of(pki), pki.leaf_key, header={}), "algorithm None, not ES384")
    refused(
        pki, sign_document(payload_of(pki), pki.leaf_key, header={1: -35.0}), "algorithm -35.0, not ES384"
    )


def test_leaf_key_must_be_p384(pki: Pki) -> None:
    small_key = new_key(ec.SECP256R1())
    leaf = make_certificate("test-enclave", small_key, (pki.intermediate, pki.intermediate_key), ca=False)
    payload = cbor2.dumps(payload_of(pki, certificate=leaf.public_bytes(Encoding.DER)))
    protected = cbor2.dumps({1: -35})
    r, s = decode_dss_signature(
        small_key.sign(cbor2.dumps(["Signature1", protected, b"", payload]), ec.ECDSA(hashes.SHA384()))
    )
    report = cbor2.dumps([protected, {}, payload, r.to_bytes(48, "big") + s.to_bytes(48, "big")])
    refused(pki, report, "not an ECDSA P-384 key")


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"digest": "SHA256"}, "digest is 'SHA256', not 'SHA384'"),
        ({"module_id": 7}, "module_id"),
        ({"timestamp": "yesterday"}, "timestamp"),
        ({"pcrs": [b"\x00" * 48]}, "pcrs is not a map"),
        ({"pcrs": {0: b"\x01" * 48, 1: b"\x01" * 48}}, "lacks PCR0, PCR1 or PCR2"),
        ({"pcrs": {**PCRS, 2: b"\x01" * 47}}, "PCR 2 is malformed"),
        ({"cabundle": []}, "cabundle is missing"),
        ({"cabundle": ["not bytes"]}, "cabundle has an entry"),
        ({"certificate": DROP}, "certificate must be a byte string"),
        ({"certificate": b"not DER"}, "the leaf certificate .* is not a DER X.509 certificate"),
        ({"nonce": 5}, "nonce must be a byte string of 0 to 512 bytes"),
        ({"user_data": b"\x00" * 513}, "user_data must be a byte string of 0 to 512 bytes"),
    ],
)
def test_malformed_payload_is_refused(pki: Pki, fields: dict[str, Any], match: str) -> None:
    refused(pki, sign_document(payload_of(pki, **fields), pki.leaf_key), match)


def test_malformed_cbor_is_refused(pki: Pki) -> None:
    report = sign_document(payload_of(pki), pki.leaf_key)
    refused(pki, b"", "empty")
    refused(pki, b"\xff\x00garbage", "not valid CBOR")
    for cut in (1, 2, 10, len(report) // 2, len(report) - 1):
        refused(pki, report[:cut], "not valid CBOR")
    refused(pki, report + b"\x00", "1 bytes after its CBOR item")
    refused(pki, cbor2.dumps([b"\x00" * 70_000]), "70006 bytes, more than the 65536")
    refused(pki, cbor2.dumps({"a": 1}), "not a COSE_Sign1 array")
    refused(pki, cbor2.dumps(cbor2.CBORTag(98, [])), "CBOR tag 98, not COSE_Sign1")
    protected, unprotected, payload, signature = cbor2.loads(report)
    refused(pki, cbor2.dumps([protected, unprotected, b"\x9f", signature]), "payload is not valid CBOR")
    refused(pki, cbor2.dumps([protected, unprotected, payload, signature[:95]]), "95 bytes, not 96")


def test_certificate_of_unknown_version_is_refused(pki: Pki) -> None:
    leaf = bytearray(pki.leaf.public_bytes(Encoding.DER))
    version = leaf.index(bytes.fromhex("a003020102"))  # [0] EXPLICIT INTEGER 2, i.e. X.509 v3
    leaf[version + 4] = 0x07
    report = sign_document(payload_of(pki, certificate=bytes(leaf)), pki.leaf_key)
    refused(pki, report, "the leaf certificate .* is not a DER X.509 certificate .*version")


def test_random_corruption_never_escapes_as_another_error(pki: Pki) -> None:
    """Whatever the corruption, the verifier answers with AttestationError, never a decoder's traceback."""
    report = sign_document(payload_of(pki), pki.leaf_key)
    verifier = NitroVerifier(pki.root_pem)
    generator = random.Random(20261202)
    refusals = 0
    for _ in range(400):
        corrupted = bytearray(report)
        for _ in range(generator.randint(1, 3)):
            corrupted[generator.randrange(len(corrupted))] = generator.randrange(256)
        with contextlib.suppress(AttestationError):
            verifier.verify(bytes(corrupted), now=NOW)
            continue
        refusals += 1
    assert refusals >= 390


def test_verifier_configuration_is_checked(pki: Pki) -> None:
    der = pki.root.public_bytes(Encoding.DER)
    assert NitroVerifier(der).root_der == NitroVerifier(pki.root_pem).root_der == der
    with pytest.raises(ConfigError, match="neither a PEM nor a DER"):
        NitroVerifier(b"not a certificate")
    with pytest.raises(ConfigError, match="max_age must be > 0"):
        NitroVerifier(max_age=0)
    assert NitroVerifier.platform == "aws-nitro"
    assert x509.load_der_x509_certificate(NitroVerifier().root_der).subject.rfc4514_string() == (
        "CN=aws.nitro-enclaves,OU=AWS,O=Amazon,C=US"
    )


def test_a_real_nitro_document_through_the_sites_attestation_interface() -> None:
    """A site's `--enclave-platform aws-nitro`: the real document becomes Evidence (not insecure), the site's
    own expected measurement (the image's PCR0-2) is checked, and its age against the site's own policy."""
    from confide.privacy.tee.attestation import NITRO, check, verifier
    from confide.privacy.tee.layer import SiteTrust

    trust = SiteTrust.from_files(NITRO, b"", "".join(PRODUCTION_PCRS))  # b"": AWS's pinned root
    evidence = trust.verifier.verify(real_document(PRODUCTION), now=PRODUCTION_TIME)
    assert evidence.platform == NITRO and not evidence.insecure
    assert evidence.measurement == "".join(PRODUCTION_PCRS)
    check(evidence, "".join(PRODUCTION_PCRS), max_age=600, now=PRODUCTION_TIME)
    with pytest.raises(AttestationError, match="this site expects"):
        check(evidence, "00" * 144, max_age=600, now=PRODUCTION_TIME)
    with pytest.raises(AttestationError, match="stale or replayed"):
        check(evidence, "".join(PRODUCTION_PCRS), max_age=60, now=PRODUCTION_TIME)
    with pytest.raises(AttestationError):
        verifier(NITRO, b"").verify(real_document(DEBUG), now=PRODUCTION_TIME)


def test_an_aggregator_asked_to_attest_on_nitro_says_what_this_release_lacks(tmp_path: Path) -> None:
    from confide.config import load
    from confide.runtime.grpc.aggregator import make_platform
    from tests.conftest import tiny_config

    path = tmp_path / "nitro.toml"
    path.write_text(tiny_config(tmp_path, tmp_path / "runs", privacy__enclave="'aws-nitro'"))
    with pytest.raises(ConfigError, match="Nitro Secure Module"):
        make_platform(load(path))
