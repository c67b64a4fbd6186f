"""The attested aggregator: the code that runs inside the enclave, the same in a simulation (in-process) and
in `confide aggregator` (its own process, reached over gRPC).

Per round the coordinating server asks it to ``open`` the round (it answers with a fresh attestation report
binding its X25519 public key and a nonce of the run, round and attempt), relays each site's sealed update to
``submit``, then ``close``s the round (the sums and which sites were accepted or refused, once enough updates
are in) and asks for the ``release`` of the aggregate. Inside, each update is opened, validated (shape and
finiteness, as :mod:`confide.server.validate`), clipped to C under central DP, and folded into the
configured aggregator (the weighted mean, or a robust one of ``server.aggregator``), with central DP's noise
from the enclave's own secret randomness on the result.

Sealing (:func:`seal`): ephemeral-static X25519, HKDF-SHA256 and AES-256-GCM (the shape of HPKE's base
mode, RFC 9180, from ``cryptography``'s primitives), with associated data binding the run, the round, the
site and the hash of the report the site verified. So a sealed update opens only in the attempt it was made
for and under the site name it was made by: the server cannot replay it into another round, a retried
attempt, or as another site.

Threat model: the server is malicious and sees everything but the inside of the enclave. It never gets an
update, only what :meth:`Enclave.release` gives: one aggregate per round of at least ``min_updates`` updates
(never a second release of a round, never a release of a round already closed with fewer). What it can still
do: drop sites' updates, choose which sites are asked, send the sites other weights, make up updates of
sites that do not exist (nothing here authenticates a site to the enclave, so without central DP a server
that adds its own updates can isolate one site's); central DP's noise, added inside, holds against all of
that. A compromised (or simulated) platform, or a side channel out of the enclave, breaks everything.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import threading
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from confide.core import EXAMPLES, Update, Vector
from confide.errors import UpdateError
from confide.pipeline import Aggregator, RoundAbandoned
from confide.privacy.dp import CentralDP, CentralNoise, EqualMean, clip
from confide.privacy.secagg import keys
from confide.privacy.tee.attestation import (
    INSECURE_LABEL,
    SIMULATED,
    SimulatedPlatform,
    fresh_nonce,
    measurement,
)
from confide.randomness import SecretRandomness
from confide.registry import AGGREGATORS, LAYERS

log = logging.getLogger(__name__)

SEAL_VERSION = 1
_INFO = b"confide-enclave-seal-v1"


class Platform(Protocol):
    """What the enclave asks of its platform: a report binding its measurement, public key and a nonce."""

    platform: str
    insecure: bool

    def attest(self, measurement: str, public_key: bytes, nonce: bytes) -> bytes: ...


PLATFORMS: dict[str, Callable[[], Platform]] = {SIMULATED: SimulatedPlatform}
"""Platform name -> the platform an aggregator process runs on (a real one plugs in here beside its
verifier in :data:`confide.privacy.tee.attestation.VERIFIERS`)."""


# -- sealing -------------------------------------------------------------------------------------------------


def associated_data(run: str, round: int, site: str, report: bytes) -> bytes:
    """What a sealed update is bound to besides its recipient: run, round, site and the verified report."""
    bound = {"run": run, "round": round, "site": site, "report": hashlib.sha256(report).hexdigest()}
    return b"confide-enclave-update-v1\n" + json.dumps(bound, sort_keys=True).encode()


def _key(shared: bytes, ephemeral: bytes, recipient: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=None, info=_INFO + ephemeral + recipient).derive(shared)


def seal(plaintext: bytes, recipient: bytes, aad: bytes) -> bytes:
    """``plaintext`` encrypted to the X25519 key ``recipient``: version, ephemeral key, nonce, ciphertext.
    The ephemeral key and the nonce come from the OS's randomness."""
    ephemeral = X25519PrivateKey.generate()
    public = ephemeral.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    key = _key(ephemeral.exchange(X25519PublicKey.from_public_bytes(recipient)), public, recipient)
    nonce = os.urandom(12)
    return bytes([SEAL_VERSION]) + public + nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def unseal(sealed: bytes, private: X25519PrivateKey, aad: bytes) -> bytes:
    """The plaintext of :func:`seal`, or UpdateError if it was sealed for another key or other data."""
    if len(sealed) < 1 + 32 + 12 + 16 or sealed[0] != SEAL_VERSION:
        raise UpdateError("the sealed update is malformed or of an unknown version")
    ephemeral, nonce, ciphertext = sealed[1:33], sealed[33:45], sealed[45:]
    recipient = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    key = _key(private.exchange(X25519PublicKey.from_public_bytes(ephemeral)), ephemeral, recipient)
    try:
        return AESGCM(key).decrypt(nonce, ciphertext, aad)
    except InvalidTag:
        raise UpdateError(
            "the sealed update does not open here: it was sealed for another round, attempt, site or "
            "aggregator (replayed, relabelled or altered on the way)"
        ) from None


def pack_update(update: Update) -> bytes:
    """The update as the enclave reads it: a JSON header (site, round, examples, sums, metrics) and the
    vector's float32 bytes."""
    if update.vector is None:
        raise UpdateError(f"site {update.site!r}: the enclave layer needs the update's vector")
    header = json.dumps(
        {
            "site": update.site,
            "round": update.round,
            "num_examples": update.num_examples,
            "model_version": update.model_version,
            "sums": update.sums,
            "metrics": update.metrics,
        }
    ).encode()
    vector = np.ascontiguousarray(update.vector, dtype="<f4")
    return struct.pack("!I", len(header)) + header + vector.tobytes()


def unpack_update(data: bytes) -> Update:
    try:
        (size,) = struct.unpack("!I", data[:4])
        header = json.loads(data[4 : 4 + size])
        body = data[4 + size :]
        if len(body) % 4:
            raise ValueError("the vector's bytes are not whole float32 values")
        return Update(
            site=str(header["site"]),
            round=int(header["round"]),
            num_examples=int(header["num_examples"]),
            vector=np.frombuffer(body, dtype="<f4").astype(np.float32),
            model_version=int(header["model_version"]),
            metrics={str(k): float(v) for k, v in header["metrics"].items()},
            sums={str(k): float(v) for k, v in header["sums"].items()},
        )
    except (ValueError, KeyError, TypeError, AttributeError, struct.error) as e:
        raise UpdateError(f"the opened update is malformed: {e}") from None


SIGNATURE_BYTES = keys.SIGNATURE_BYTES


def update_statement(run: str, round: int, site: str, packed: bytes) -> bytes:
    """What a site signs with its enrolled identity: this packed update is its own, for this run and round."""
    return keys.frame(b"confide/enclave/v1", "update", run, round, site, hashlib.sha256(packed).digest())


def sign_update(update: Update, identity: Ed25519PrivateKey, run: str) -> bytes:
    """The update packed and signed by its site: what the site seals to the enclave. The signature is inside
    the sealed bytes, so only the enclave sees it, and it keeps a server (which knows the enclave's public
    key and could seal anything) from making up updates in another site's name."""
    packed = pack_update(update)
    return packed + keys.sign(identity, update_statement(run, update.round, update.site, packed))


# -- the aggregator inside -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EnclaveSettings:
    """Everything that decides what the enclave computes: all of it enters the measurement, so a site that
    approves a measurement approves these values."""

    platform: str
    run: str
    update_size: int
    aggregator: str
    """``server.aggregator``, run inside."""
    defence: Any
    """The [defence] options (the robust aggregators' parameters), a dataclass."""
    central_dp: tuple[float, float, float] | None = None
    """Central DP: (clip norm C, noise multiplier z, expected sites per round); None without."""
    validate: bool = True
    """Refuse updates of the wrong shape or with non-finite values."""
    min_updates: int = 2
    """The fewest updates it releases an aggregate of."""
    identity_ca: str = ""
    """SHA-256 of the CA certificate the sites' enrolled identities are checked against (`confide aggregator
    --ca`); empty in a simulation, whose identities are made in its own process."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)  # the [defence] dataclass too, recursively

    def measurement(self) -> str:
        return measurement(self.as_dict())


def build_inside(settings: EnclaveSettings) -> Aggregator:
    """The aggregator the enclave runs, built as :func:`confide.runtime.stack.build_aggregator` builds it on a
    server that reads updates: the robust one named, or the mean (equal weights under DP), with central DP's
    noise around it."""
    noise = CentralNoise(*settings.central_dp[:2]) if settings.central_dp is not None else None
    if settings.aggregator == "mean":
        if settings.central_dp is not None:
            inner: Aggregator = EqualMean(expected_sites=settings.central_dp[2])
        else:
            inner = AGGREGATORS.load("mean")()
    else:
        inner = AGGREGATORS.load(settings.aggregator).from_defence(settings.defence)
    return CentralDP(inner, noise) if noise is not None else inner


@dataclass(frozen=True)
class Summary:
    """What the enclave tells the server of a closed round: no update, only who and the sums."""

    round: int
    accepted: tuple[str, ...]
    refused: tuple[tuple[str, str], ...]
    sums: dict[str, float]


@dataclass
class _Attempt:
    round: int
    report: bytes
    state: Any
    seen: set[str] = field(default_factory=set)
    accepted: list[str] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)
    sums: dict[str, float] = field(default_factory=dict)
    closed: bool = False


@dataclass(frozen=True)
class _Size:
    size: int


@dataclass(frozen=True)
class _Shape:
    """What :class:`confide.server.validate.ValidateLayer` reads of a round: the update's size."""

    weights: _Size
    shared: None = None


class Enclave:
    """The attested aggregator's core: key pair, reports, and one round at a time."""

    def __init__(
        self,
        settings: EnclaveSettings,
        platform: Platform,
        aggregator: Aggregator | None = None,
        registry: Mapping[str, bytes] | None = None,
    ):
        if settings.min_updates < 2:
            raise ValueError("an enclave releases no aggregate of fewer than 2 updates")
        self.settings = settings
        self.platform = platform
        self._key = X25519PrivateKey.generate()  # fresh per process, from the OS's randomness
        self.public_key = self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.measurement = settings.measurement()
        self.aggregator = aggregator if aggregator is not None else build_inside(settings)
        self._validator = LAYERS.load("validate")() if settings.validate else None
        self._attempt: _Attempt | None = None
        self._released = 0
        """The last round released: no round up to it opens again."""
        self._lock = threading.Lock()
        self.registry: Mapping[str, bytes] = registry if registry is not None else {}
        """Each site's enrolled Ed25519 identity: an update counts only if its site signed it."""
        if platform.insecure:
            log.warning("the aggregator runs on the %s", INSECURE_LABEL)

    def open(self, round: int) -> bytes:
        """Start (or restart) ``round``: a fresh report, and whatever an unreleased earlier attempt held is
        dropped. A released round never opens again."""
        with self._lock:
            if round <= self._released:
                raise RoundAbandoned(
                    f"the enclave already released round {self._released}; it opens no round up to it again"
                )
            nonce = fresh_nonce(self.settings.run, round)
            report = self.platform.attest(self.measurement, self.public_key, nonce)
            self._attempt = _Attempt(round, report, self.aggregator.init(self.settings.update_size))
            return report

    def submit(self, round: int, site: str, sealed: bytes) -> None:
        """Open, check and fold in one site's sealed update (UpdateError, recorded as refused, if not)."""
        with self._lock:
            attempt = self._current(round)
            if site in attempt.seen:
                raise UpdateError(f"site {site!r} already has an update in round {round}")
            try:
                update = self._open(attempt, site, sealed)
                attempt.seen.add(site)  # only the site's own update: a forgery must not lock it out
                self.aggregator.add(attempt.state, update)
            except UpdateError as e:
                attempt.refused.append((site, str(e)))
                raise
            attempt.accepted.append(site)
            for key, value in {EXAMPLES: float(update.num_examples), **update.sums}.items():
                attempt.sums[key] = attempt.sums.get(key, 0.0) + value

    def register(self, registry: Mapping[str, bytes]) -> None:
        """Take the sites' identities (checked against the CA by whoever calls: `confide aggregator`)."""
        with self._lock:
            self.registry = {**self.registry, **registry}

    def _open(self, attempt: _Attempt, site: str, sealed: bytes) -> Update:
        aad = associated_data(self.settings.run, attempt.round, site, attempt.report)
        signed = unseal(sealed, self._key, aad)
        packed, signature = signed[:-SIGNATURE_BYTES], signed[-SIGNATURE_BYTES:]
        public = self.registry.get(site)
        if public is None:
            raise UpdateError(f"site {site!r} is not among the enrolled sites the enclave knows")
        try:
            keys.verify(public, signature, update_statement(self.settings.run, attempt.round, site, packed))
        except (InvalidSignature, ValueError):
            raise UpdateError(
                f"the update sealed in the name of site {site!r} is not signed by its enrolled identity: "
                "someone else (the server, which knows the enclave's key) made it"
            ) from None
        update = unpack_update(packed)
        if update.site != site or update.round != attempt.round:
            raise UpdateError(
                f"the update sealed by {site!r} names site {update.site!r}, round {update.round}"
            )
        if self._validator is not None:
            self._validator.decode(update, _Shape(_Size(self.settings.update_size)))
        else:
            update.readable(self.settings.update_size)
        if self.settings.central_dp is not None and update.vector is not None:
            # The sensitivity bound must not rest on the sites' good will: clip again, inside.
            clip(update.vector, self.settings.central_dp[0], out=update.vector)
        return update

    def close(self, round: int) -> Summary:
        """No more updates this round: who is in and the sums, or RoundAbandoned (nothing kept) with fewer
        than the minimum."""
        with self._lock:
            attempt = self._current(round)
            count = len(attempt.accepted)
            if count < self.settings.min_updates:
                self._attempt = None
                raise RoundAbandoned(
                    f"the enclave holds {count} valid updates; it releases no aggregate of fewer than "
                    f"{self.settings.min_updates}"
                )
            attempt.closed = True
            return Summary(round, tuple(attempt.accepted), tuple(attempt.refused), dict(attempt.sums))

    def release(self, round: int) -> Vector:
        """The closed round's aggregate (central DP's noise drawn inside from secret randomness), once."""
        with self._lock:
            attempt = self._attempt
            if attempt is None or attempt.round != round or not attempt.closed:
                raise RoundAbandoned(f"the enclave has no closed round {round} to release")
            result = np.array(self.aggregator.result(attempt.state, SecretRandomness()), dtype=np.float32)
            self._attempt = None
            self._released = round
            return result

    def _current(self, round: int) -> _Attempt:
        attempt = self._attempt
        if attempt is None or attempt.round != round:
            raise UpdateError(f"the enclave has no open round {round} (it must be opened first)")
        if attempt.closed:
            raise UpdateError(f"round {round} is closed in the enclave; it takes no more updates")
        return attempt
