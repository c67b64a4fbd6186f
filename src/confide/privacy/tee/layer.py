"""The attested aggregator as a layer of the round: the site seals its update to the enclave, the server
relays it and gets back only the aggregate.

The round: in ``begin`` the server asks the enclave to open the round and carries its attestation report to
each site over the backend's exchange (as secure aggregation's setup travels); each site verifies the report
against its own root of trust and expected measurement (:class:`SiteTrust`) and answers that it accepts
it, so a site that refuses does not train for nothing. Each site then ``encode``s its update sealed to the
key the verified report binds, with nothing in clear (no metrics, no sums, no examples). The server's
``decode`` forwards the sealed bytes to the enclave and keeps nothing; ``close`` closes the round in the
enclave (the sums and who took part come back, never an update) and leaves the release of the aggregate to
the server's aggregator, :class:`EnclaveRelease`: the federation calls it after the privacy ledger is
charged, so a result is never released before it is accounted.

The config's aggregator (robust or the mean), validation and central DP all run inside the enclave; on the
server the aggregate passes unchanged through :class:`EnclaveRelease`. Evaluations travel in clear, as they
do without any layer: a site's evaluation sums (loss, correct predictions, targets on its held-out data)
reach the server one by one.

Threat model: see :mod:`confide.privacy.tee.enclave`. The site trusts only its own settings: the platform's
root of trust and the expected measurement never come from the server.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from confide.core import Update, Vector
from confide.errors import AttestationError, ConfigError, UpdateError
from confide.pipeline import Layer, RoundAbandoned, RoundContext, SiteContext, StackContext, Traits
from confide.privacy.secagg import keys
from confide.privacy.tee.attestation import (
    INSECURE_LABEL,
    SIMULATED,
    Evidence,
    Verifier,
    check,
    nonce_round,
    verifier,
)
from confide.privacy.tee.enclave import (
    Enclave,
    EnclaveSettings,
    SimulatedPlatform,
    Summary,
    associated_data,
    seal,
    sign_update,
)
from confide.randomness import Randomness

log = logging.getLogger(__name__)

SEALED = "sealed_update"
"""Name of the sealed update's bytes (a uint8 array) in an update's payload."""
_REPORT_TAG = b"confide-enclave-report\n"
_ACCEPTED = b"accepted"


class EnclaveLink(Protocol):
    """How the server reaches the enclave: in this process, or `confide aggregator` over gRPC. It carries
    bytes and summaries; it never holds an update."""

    def open(self, round: int) -> bytes: ...

    def submit(self, round: int, site: str, sealed: bytes) -> None: ...

    def close(self, round: int) -> Summary: ...

    def release(self, round: int) -> Vector: ...


class LocalLink:
    """The enclave in this process (a simulation)."""

    def __init__(self, enclave: Enclave) -> None:
        self.enclave = enclave

    def open(self, round: int) -> bytes:
        return self.enclave.open(round)

    def submit(self, round: int, site: str, sealed: bytes) -> None:
        self.enclave.submit(round, site, sealed)

    def close(self, round: int) -> Summary:
        return self.enclave.close(round)

    def release(self, round: int) -> Vector:
        return self.enclave.release(round)


@dataclass(frozen=True)
class SiteTrust:
    """What a site trusts, from its own settings: the platform's verifier (built from the root of trust its
    operator gave it), the measurement it expects, how old a report may be, and whether it accepts the
    INSECURE simulated platform."""

    verifier: Verifier
    measurement: str
    max_age: float = 600.0
    allow_simulated: bool = False

    @classmethod
    def from_files(
        cls,
        platform: str,
        root_of_trust: bytes,
        measurement: str,
        max_age: float = 600.0,
        allow_simulated: bool = False,
    ) -> SiteTrust:
        if platform == SIMULATED and not allow_simulated:
            raise ConfigError(
                f"the {INSECURE_LABEL} protects nothing, and this site does not accept it: pass "
                "--enclave-allow-insecure-simulation only to test a deployment"
            )
        return cls(verifier(platform, root_of_trust), measurement.strip().lower(), max_age, allow_simulated)


@dataclass(frozen=True)
class _Verified:
    """A site's verified report for one attempt at a round (kept in its sessions)."""

    round: int
    report: bytes
    evidence: Evidence


def enclave_settings(config: Any, dp: Any, update_size: int) -> EnclaveSettings:
    """The enclave's settings from a run's config and its site-level DP policy (None without DP)."""
    p = config.privacy
    central = None
    if dp is not None and dp.central is not None:
        central = (dp.central.clip_norm, dp.central.noise_multiplier, float(dp.sites_per_round))
    return EnclaveSettings(
        platform=p.enclave,
        run=config.run.name,
        update_size=update_size,
        aggregator=config.server.aggregator,
        defence=config.defence,
        central_dp=central,
        validate=True,
        min_updates=max(2, p.enclave_min_updates),
    )


class EnclaveLayer(Layer):
    """The last layer under the attested aggregator: each update leaves the site sealed to the enclave."""

    name = "enclave"
    traits: ClassVar[Traits] = Traits(hides_updates=True, reads_updates_inside=True)

    @classmethod
    def from_config(cls, stack: StackContext) -> Layer | None:
        p = stack.config.privacy
        if getattr(p, "enclave", "none") == "none":
            return None
        settings = enclave_settings(stack.config, stack.dp, stack.update_size)
        if p.enclave_address:
            # `confide aggregator` elsewhere: the runtime connects the link (confide.runtime.stack); a
            # deployed site gets its trust from its own command line, never from this config.
            return cls(settings, None, None, stack.identities)
        if p.enclave != SIMULATED:
            raise ConfigError(
                f"privacy.enclave = {p.enclave!r} runs in its own `confide aggregator` process on that "
                "platform: set privacy.enclave_address; only 'simulated' runs in this process"
            )
        # A simulation: the enclave in this process, and the sites' trust made here from it (never from a
        # server, which in a simulation is this same process).
        platform = SimulatedPlatform()
        registry = {site: keys.identity_public_bytes(key) for site, key in stack.identities.items()}
        enclave = Enclave(settings, platform, registry=registry)
        trust = SiteTrust(
            verifier(SIMULATED, platform.public_key()), enclave.measurement, p.enclave_max_age, True
        )
        return cls(settings, LocalLink(enclave), trust, stack.identities)

    def __init__(
        self,
        settings: EnclaveSettings,
        link: EnclaveLink | None,
        trust: SiteTrust | None,
        identities: Mapping[str, Ed25519PrivateKey] | None = None,
    ) -> None:
        self.settings = settings
        self.identities = dict(identities or {})
        """The signing keys of the sites this process plays (each signs its own update for the enclave)."""
        self.link = link
        """The server's way to the enclave (None on a deployed site, which never uses it)."""
        self.trust = trust
        """The site's trust anchors (None on a server, which never seals)."""
        self._warned = False

    def describe(self) -> str:
        platform = INSECURE_LABEL if self.settings.platform == SIMULATED else self.settings.platform
        where = "in this process" if isinstance(self.link, LocalLink) else "in `confide aggregator`"
        return (
            f"attested aggregator {where} on the {platform}: {self.settings.aggregator} aggregation"
            f"{', central DP' if self.settings.central_dp else ''} inside, measurement "
            f"{self.settings.measurement()[:16]}..."
        )

    # -- the site ------------------------------------------------------------------------------------------

    def answer(self, data: bytes, site: str, sessions: dict[str, object], state: object = None) -> bytes:
        """A site's answer to the aggregator's report: verified against its own trust, or AttestationError
        (the site then takes no part in the round)."""
        if not data.startswith(_REPORT_TAG):
            raise UpdateError(f"site {site!r} got a message for no enclave step")
        report = data[len(_REPORT_TAG) :]
        trust = self.trust
        if trust is None:
            raise AttestationError(
                f"site {site!r} has no trust anchors for the attested aggregator: start `confide client` "
                "with --enclave-platform-key and --enclave-measurement from its operator"
            )
        now = time.time()
        evidence = trust.verifier.verify(report, now=now)
        if evidence.insecure and not trust.allow_simulated:
            raise AttestationError(f"site {site!r} does not accept the {INSECURE_LABEL}")
        check(evidence, trust.measurement, trust.max_age, now)
        round = nonce_round(evidence.nonce, self.settings.run)
        if evidence.insecure and not self._warned:
            self._warned = True
            log.warning("sites seal their updates to an %s", INSECURE_LABEL)
        sessions[self.name] = _Verified(round, report, evidence)
        return _ACCEPTED

    def encode(self, update: Update, site: SiteContext) -> Update:
        verified = site.sessions.get(self.name)
        if not isinstance(verified, _Verified) or verified.round != update.round:
            raise UpdateError(
                f"site {update.site!r} verified no attestation of the aggregator for round {update.round}, "
                "so it sends no update"
            )
        identity = self.identities.get(update.site)
        if identity is None:
            raise UpdateError(
                f"site {update.site!r} has no identity key to sign its update for the attested aggregator: "
                "make its keys with `confide keys` and enroll it with --csr"
            )
        aad = associated_data(self.settings.run, update.round, update.site, verified.report)
        signed = sign_update(update, identity, self.settings.run)
        return update.sealed(SEALED, seal(signed, verified.evidence.public_key, aad))

    # -- the server ----------------------------------------------------------------------------------------

    def _link(self) -> EnclaveLink:
        if self.link is None:
            raise ConfigError("the enclave layer has no link to the aggregator (privacy.enclave_address)")
        return self.link

    def begin(self, round: RoundContext) -> None:
        report = self._link().open(round.round)
        if self.settings.platform == SIMULATED:
            log.warning("round %d is aggregated in an %s", round.round, INSECURE_LABEL)
        message = _REPORT_TAG + report
        accepted = {
            s for s, answer in round.exchange(dict.fromkeys(round.sites, message)) if answer == _ACCEPTED
        }
        for site in [s for s in round.sites if s not in accepted]:
            round.rejected.append((site, "the site did not accept the aggregator's attestation"))
            round.tasks.pop(site, None)
        round.sites[:] = [s for s in round.sites if s in accepted]
        if len(accepted) < self.settings.min_updates:
            raise RoundAbandoned(
                f"only {len(accepted)} sites accepted the aggregator's attestation; the enclave needs at "
                f"least {self.settings.min_updates}"
            )

    def decode(self, update: Update, round: RoundContext) -> Update | None:
        sealed = update.payload.get(SEALED)
        if not isinstance(sealed, np.ndarray) or sealed.dtype != np.uint8:
            raise UpdateError(f"site {update.site!r} sent no sealed update to the attested aggregator")
        self._link().submit(round.round, update.site, sealed.tobytes())
        return None  # only the enclave's release reaches the model

    def close(self, round: RoundContext) -> None:
        link = self._link()
        summary = link.close(round.round)
        state = round.aggregate
        if not isinstance(state, ReleaseState):
            raise ConfigError(
                "under the attested aggregator the server's aggregator must be its release (EnclaveRelease): "
                "the configured aggregator runs inside the enclave"
            )
        number = round.round
        state.release = lambda: link.release(number)
        known = {site for site, _ in round.rejected}
        round.rejected.extend((site, why) for site, why in summary.refused if site not in known)
        round.summed.extend(summary.accepted)
        round.add_sums(summary.sums)


@dataclass
class ReleaseState:
    """The server's aggregate under the enclave: nothing but the way to ask for the release."""

    size: int
    release: Callable[[], Vector] | None = None


class EnclaveRelease:
    """The server's aggregator when the enclave aggregates: the round's result is what the enclave releases,
    unchanged (its aggregator, validation and central DP ran inside). No update reaches it in clear."""

    traits = Traits()

    def __init__(self, inside: str = "mean") -> None:
        self.name = f"enclave({inside})"

    def init(self, size: int) -> ReleaseState:
        return ReleaseState(size)

    def add(self, state: ReleaseState, update: Update) -> None:
        raise UpdateError(
            f"site {update.site!r}'s update reached the server in clear, but under the attested aggregator "
            "only the enclave aggregates"
        )

    def add_sum(self, state: ReleaseState, total: Vector, count: int) -> None:
        raise UpdateError(
            "under the attested aggregator only the enclave aggregates; no sum comes to the server"
        )

    def result(self, state: ReleaseState, randomness: Randomness) -> Vector:
        if state.release is None:
            raise UpdateError("the enclave closed no round, so there is nothing to release")
        result = state.release()
        state.release = None
        if result.shape != (state.size,) or result.dtype != np.float32:
            raise UpdateError(f"the enclave released {result.size} values; the model has {state.size}")
        return result

    def sensitivity(self, clip_norm: float) -> float | None:
        return None  # central DP runs inside the enclave, around the aggregator there
