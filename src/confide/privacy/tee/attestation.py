"""Attestation: how a site convinces itself that it talks to the aggregator code it expects, on a real
trusted platform, before it seals its update to that aggregator's key.

A trusted execution environment (TEE) signs a *report* with a key only the platform holds: the report binds
the *measurement* of the code and configuration running inside (here a digest of confide's source files and
of the aggregator's settings, :func:`measurement`), a public key generated inside, and a nonce. A site that
checks the signature against the platform's root of trust, and the measurement against the one it expects,
knows that the private key of that public key lives only inside that code (Costan and Devadas 2016, "Intel
SGX Explained", section 3.3; AWS Nitro Enclaves' attestation documents work alike).

Every platform has one :class:`Verifier` (report bytes -> :class:`Evidence`), registered by name in
:data:`VERIFIERS`; :func:`check` then applies the site's own expectations. Where a site's trust comes from
matters more than the cryptography: the platform's root of trust and the expected measurement come from the
site's own settings (its operator's files, or in a simulation this process), never from the coordinating
server, which is the party the enclave protects against.

The *simulated* platform (:class:`SimulatedPlatform`) signs reports with an Ed25519 key of its own process.
It exercises the whole protocol in tests and simulations, and it protects nothing: whoever runs the
aggregator process holds the platform key and can read every update. It is chosen only by name, labelled
INSECURE wherever it shows, and refused by a deployment unless an option whose name says insecure allows it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from confide.errors import AttestationError

SIMULATED = "simulated"
"""The platform name of the simulated enclave."""
INSECURE_LABEL = "INSECURE simulated enclave (no hardware: whoever runs the aggregator can read every update)"
"""How the simulated platform is named in every log line and display."""
CLOCK_SKEW = 60.0
"""Seconds a report may seem to come from the future (clocks of two machines differ)."""


@dataclass(frozen=True)
class Evidence:
    """What a verified report proves about the aggregator."""

    platform: str
    """"simulated", "aws-nitro", ..."""
    measurement: str
    """Hex of the aggregator's code and configuration measurement."""
    public_key: bytes
    """The aggregator's X25519 public key, bound in the signed report."""
    nonce: bytes
    """What the report binds besides (freshness: the run, round and attempt); b"" if none."""
    issued_at: float
    """Unix seconds."""
    insecure: bool
    """True for the simulated platform."""

    def describe(self) -> str:
        label = INSECURE_LABEL if self.insecure else self.platform
        return f"{label}, measurement {self.measurement[:16]}..."


class Verifier(Protocol):
    """Turns a platform's report into :class:`Evidence`, or raises :class:`AttestationError`."""

    platform: str

    def verify(self, report: bytes, *, now: float) -> Evidence: ...


def check(evidence: Evidence, expected_measurement: str, max_age: float, now: float) -> None:
    """Refuse evidence that is not the expected aggregator, or is not fresh (AttestationError)."""
    expected = expected_measurement.strip().lower()
    if not hmac.compare_digest(evidence.measurement.lower(), expected):
        raise AttestationError(
            f"the aggregator's measurement is {evidence.measurement}, but this site expects {expected}: it "
            "runs other code or another configuration (aggregator, central DP, validation) than the one this "
            "site's operator approved; compare `confide aggregator --measurement` on the approved config"
        )
    if not math.isfinite(evidence.issued_at):
        raise AttestationError("the aggregator's report carries no valid time of issue")
    age = now - evidence.issued_at
    if age > max_age:
        raise AttestationError(
            f"the aggregator's report was issued {age:.0f} s ago, more than the {max_age:g} s a site accepts "
            "(privacy.enclave_max_age): it is stale or replayed; the aggregator must attest again"
        )
    if age < -CLOCK_SKEW:
        raise AttestationError(
            f"the aggregator's report claims to be issued {-age:.0f} s in the future: check the clocks of "
            "the aggregator's machine and this site"
        )


# -- the simulated platform ----------------------------------------------------------------------------------

_MAGIC = b"confide-simulated-attestation-v1\n"


class SimulatedPlatform:
    """A stand-in for TEE hardware: an Ed25519 platform key made from the OS's randomness in this process.

    Threat model: none. The key lives in the aggregator's ordinary memory, so the aggregator's operator can
    sign any report (a false measurement, a key of their own). Use it to test the protocol, never to protect
    data.
    """

    platform = SIMULATED
    insecure = True

    def __init__(self) -> None:
        self._key = Ed25519PrivateKey.generate()

    def public_key(self) -> bytes:
        """The platform's root of trust, as a PEM public key: what a site's operator gives the site."""
        return self._key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def attest(self, measurement: str, public_key: bytes, nonce: bytes, now: float | None = None) -> bytes:
        """A signed report binding ``measurement``, ``public_key`` and ``nonce``, issued now."""
        body = json.dumps(
            {
                "platform": SIMULATED,
                "measurement": measurement,
                "public_key": public_key.hex(),
                "nonce": nonce.hex(),
                "issued_at": time.time() if now is None else now,
            },
            sort_keys=True,
        ).encode()
        signed = _MAGIC + struct.pack("!I", len(body)) + body
        return signed + self._key.sign(signed)


class SimulatedVerifier:
    """Verifies reports of one :class:`SimulatedPlatform`, given its public key (the site's own copy)."""

    platform = SIMULATED

    def __init__(self, platform_key: bytes) -> None:
        self.key = load_platform_key(platform_key)

    def verify(self, report: bytes, *, now: float) -> Evidence:
        head = len(_MAGIC) + 4
        if len(report) < head + 64 or not report.startswith(_MAGIC):
            raise AttestationError("the aggregator's report is not a simulated-platform report")
        (size,) = struct.unpack("!I", report[len(_MAGIC) : head])
        if len(report) != head + size + 64:
            raise AttestationError("the aggregator's report is truncated or has bytes appended")
        signed, signature = report[: head + size], report[head + size :]
        try:
            self.key.verify(signature, signed)
        except InvalidSignature:
            raise AttestationError(
                "the aggregator's report is not signed by the platform key this site trusts: it was forged "
                "or altered (a swapped public key or measurement), or the site has another platform's key"
            ) from None
        try:
            body = json.loads(signed[head:])
            evidence = Evidence(
                platform=str(body["platform"]),
                measurement=str(body["measurement"]),
                public_key=bytes.fromhex(body["public_key"]),
                nonce=bytes.fromhex(body["nonce"]),
                issued_at=float(body["issued_at"]),
                insecure=True,
            )
        except (ValueError, KeyError, TypeError) as e:
            raise AttestationError(f"the aggregator's signed report is malformed: {e}") from None
        if evidence.platform != SIMULATED or len(evidence.public_key) != 32:
            raise AttestationError("the aggregator's report does not bind a simulated-platform X25519 key")
        return evidence


def load_platform_key(data: bytes) -> Ed25519PublicKey:
    """An Ed25519 platform key from PEM or its 32 raw bytes (AttestationError if it is neither)."""
    try:
        if len(data) == 32:
            return Ed25519PublicKey.from_public_bytes(data)
        key = serialization.load_pem_public_key(data)
    except ValueError as e:
        raise AttestationError(f"the simulated platform key is not an Ed25519 public key: {e}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise AttestationError("the simulated platform key is not an Ed25519 public key")
    return key


VerifierFactory = Callable[[bytes], Verifier]
"""Builds a platform's verifier from its root of trust (the contents of the file the site's operator gives:
the simulated platform's public key, or a vendor's root certificate)."""


def _nitro(root_certificate: bytes) -> Verifier:
    from confide.privacy.tee.nitro import NitroAttestation

    return NitroAttestation(root_certificate or None)  # empty: AWS's pinned root (G1)


NITRO = "aws-nitro"
"""The platform name of AWS Nitro Enclaves (:mod:`confide.privacy.tee.nitro`)."""

VERIFIERS: dict[str, VerifierFactory] = {SIMULATED: SimulatedVerifier, NITRO: _nitro}
"""Platform name -> verifier factory, given the root of trust the site's operator gave it."""


def verifier(platform: str, root_of_trust: bytes) -> Verifier:
    """The verifier of ``platform`` for the given root of trust (AttestationError for an unknown platform)."""
    factory = VERIFIERS.get(platform)
    if factory is None:
        known = ", ".join(repr(name) for name in VERIFIERS)
        raise AttestationError(f"no attestation verifier for the platform {platform!r} (known: {known})")
    return factory(root_of_trust)


# -- the measurement -----------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def code_digest(package: str | None = None) -> str:
    """SHA-256 over the confide package's source: every ``.py`` file (but the protobuf modules, which are
    generated at build and differ between protoc versions) and the ``.proto`` they come from, by relative
    path and content. Two installs of the same source agree on it."""
    root = Path(package) if package else Path(__file__).resolve().parents[2]
    digest = hashlib.sha256(b"confide-code-v1\n")
    files = sorted(
        p for p in root.rglob("*") if p.suffix in (".py", ".proto") and "_pb2" not in p.name and p.is_file()
    )
    for path in files:
        relative = path.relative_to(root).as_posix().encode()
        digest.update(struct.pack("!I", len(relative)) + relative)
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def measurement(settings: Mapping[str, Any], code: str | None = None) -> str:
    """The aggregator's measurement: SHA-256 of the code digest and its settings as canonical JSON."""
    canonical = json.dumps(dict(settings), sort_keys=True, separators=(",", ":"), default=str).encode()
    digest = hashlib.sha256(b"confide-enclave-measurement-v1\n")
    digest.update(bytes.fromhex(code or code_digest()))
    digest.update(canonical)
    return digest.hexdigest()


def fresh_nonce(run: str, round: int) -> bytes:
    """A report's nonce for one attempt at a round: the round, a digest of the run's name, 16 random bytes
    (so that each attempt, retries included, has its own report, and sealed updates of one never open in
    another)."""
    return struct.pack("!Q", round) + run_tag(run) + os.urandom(16)


def run_tag(run: str) -> bytes:
    return hashlib.sha256(b"confide-run\n" + run.encode()).digest()[:16]


def nonce_round(nonce: bytes, run: str) -> int:
    """The round a report's nonce is for, checked to be of the run ``run`` (AttestationError otherwise)."""
    if len(nonce) != 40 or not hmac.compare_digest(nonce[8:24], run_tag(run)):
        raise AttestationError(
            f"the aggregator's report is not for the run {run!r}: it was replayed from another run"
        )
    return int(struct.unpack("!Q", nonce[:8])[0])
