"""Attestation of the aggregator: every forged, stale, replayed or unexpected report is refused."""

from __future__ import annotations

import json
import struct
import time

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from confide.errors import AttestationError
from confide.privacy.tee.attestation import (
    SIMULATED,
    VERIFIERS,
    SimulatedPlatform,
    SimulatedVerifier,
    check,
    fresh_nonce,
    measurement,
    nonce_round,
    verifier,
)

MEASUREMENT = measurement({"aggregator": "mean"})


def x25519() -> bytes:
    return (
        X25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )


def test_a_genuine_report_verifies_and_says_it_is_insecure() -> None:
    platform = SimulatedPlatform()
    key, nonce = x25519(), fresh_nonce("run", 3)
    evidence = SimulatedVerifier(platform.public_key()).verify(
        platform.attest(MEASUREMENT, key, nonce), now=0
    )
    assert (evidence.platform, evidence.measurement, evidence.public_key) == (SIMULATED, MEASUREMENT, key)
    assert evidence.insecure and "INSECURE" in evidence.describe()
    assert nonce_round(evidence.nonce, "run") == 3
    check(evidence, MEASUREMENT.upper(), max_age=60, now=evidence.issued_at + 1)


def test_a_wrong_measurement_is_refused_naming_both() -> None:
    platform = SimulatedPlatform()
    other = measurement({"aggregator": "median"})
    report = platform.attest(other, x25519(), b"")
    evidence = SimulatedVerifier(platform.public_key()).verify(report, now=time.time())
    with pytest.raises(AttestationError) as e:
        check(evidence, MEASUREMENT, max_age=600, now=time.time())
    assert other in str(e.value) and MEASUREMENT in str(e.value)


def test_an_expired_or_future_report_is_refused() -> None:
    platform = SimulatedPlatform()
    now = time.time()
    verify = SimulatedVerifier(platform.public_key()).verify
    old = verify(platform.attest(MEASUREMENT, x25519(), b"", now=now - 700), now=now)
    with pytest.raises(AttestationError, match="issued 700 s ago"):
        check(old, MEASUREMENT, max_age=600, now=now)
    future = verify(platform.attest(MEASUREMENT, x25519(), b"", now=now + 3600), now=now)
    with pytest.raises(AttestationError, match="future"):
        check(future, MEASUREMENT, max_age=600, now=now)


def test_a_report_forged_with_another_platform_key_is_refused() -> None:
    trusted, attacker = SimulatedPlatform(), SimulatedPlatform()
    forged = attacker.attest(MEASUREMENT, x25519(), b"")
    with pytest.raises(AttestationError, match="not signed by the platform key this site trusts"):
        SimulatedVerifier(trusted.public_key()).verify(forged, now=time.time())


def test_a_replayed_report_carrying_another_public_key_is_refused() -> None:
    """The server keeps a genuine report but swaps in a key of its own, to read what sites seal to it."""
    platform = SimulatedPlatform()
    report = platform.attest(MEASUREMENT, x25519(), fresh_nonce("run", 1))
    head = len(report) - 64
    start = report.index(b"{")
    body = json.loads(report[start:head])
    body["public_key"] = x25519().hex()
    swapped_body = json.dumps(body, sort_keys=True).encode()
    swapped = report[: start - 4] + struct.pack("!I", len(swapped_body)) + swapped_body + report[head:]
    verify = SimulatedVerifier(platform.public_key()).verify
    assert verify(report, now=time.time()).public_key != bytes.fromhex(body["public_key"])
    with pytest.raises(AttestationError, match="forged or altered"):
        verify(swapped, now=time.time())
    with pytest.raises(AttestationError):
        verify(report[:-1], now=time.time())


def test_a_report_of_another_run_is_refused() -> None:
    with pytest.raises(AttestationError, match="another run"):
        nonce_round(fresh_nonce("their-run", 1), "our-run")


def test_verifiers_are_looked_up_by_platform_name() -> None:
    assert VERIFIERS[SIMULATED] is SimulatedVerifier
    assert isinstance(verifier(SIMULATED, SimulatedPlatform().public_key()), SimulatedVerifier)
    with pytest.raises(AttestationError, match="no attestation verifier for the platform 'sgx'"):
        verifier("sgx", b"")
    with pytest.raises(AttestationError, match="not an Ed25519 public key"):
        verifier(SIMULATED, b"not a key")


def test_the_measurement_covers_code_and_settings() -> None:
    assert measurement({"a": 1}) == measurement({"a": 1})
    assert measurement({"a": 1}) != measurement({"a": 2})
    assert measurement({"a": 1}, code="00" * 32) != measurement({"a": 1}, code="11" * 32)
