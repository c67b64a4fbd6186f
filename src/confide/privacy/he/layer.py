"""``privacy.encryption = "ckks"``: the sites encrypt their updates, the server adds ciphertexts into an
encrypted global model, and only the sites can decrypt it.

What happens in a round:

* A site decrypts the global model it receives (:meth:`CKKSLayer.open_model`), trains, clips and noises its
  update as the stack says, multiplies it by its fixed weight ``server.learning_rate / m`` (m: the sites a
  round asks, the fixed denominator of DP-FedAvg, McMahan et al. 2018), and encrypts it.
* The server adds each site's ciphertexts into a running encrypted sum as they arrive, and at the round's end
  adds that sum to the encrypted model (:meth:`CKKSLayer.apply`): one plain SGD step, done homomorphically.
  Under central DP it first adds its Gaussian noise, encrypted with the public key.

The weights are fixed by the config, which both sides build, and applied at the site in clear: the server
cannot weigh one site more than the others. A site that drops out adds nothing, so that round's step is
smaller (the fixed-denominator estimator); the server never divides, so it never needs a multiplication,
and the ciphertexts keep their one level (see :mod:`confide.privacy.he.ckks`).

The key ceremony (:mod:`confide.privacy.he.ceremony`) runs over the backend's exchange before a site first
trains: the first key holder makes the key, and each site that joins gets it from a site that holds it,
sealed to that site's own key, which it signed with its enrolled identity, so the server that relays
everything cannot read or replace it. The server receives only the public key.

Threat model, against whom:

* An honest-but-curious or malicious server sees no update, no sum and no global model in clear: only
  ciphertexts, the public key, and what sites report in clear (examples, training loss sums, and their
  evaluations of the model they decrypt). It can drop updates, or have a site evaluate a ciphertext of its
  choosing and learn that model's loss on the site's held-out data.
* Every site holds the secret key: a site that colludes with the server can decrypt every update it relays.
  A site that intercepts another site's ciphertext can decrypt it too (TLS keeps it off the wire).
* Sites see each global model, hence each round's aggregate (as in plain FedAvg): DP is what protects a site
  against the other sites.
* The server cannot check an encrypted update's norm: a malicious site's update reaches the model unchecked.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, ClassVar

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from confide.core import EXAMPLES, Update, Vector, is_encrypted, round_size
from confide.errors import UpdateError
from confide.pipeline import EvaluationContext, Layer, RoundContext, SiteContext, StackContext, Traits
from confide.privacy.he import ceremony
from confide.privacy.he.ckks import PARAMS, EncryptedVector, PublicKey, SecretKey

PAYLOAD = "ckks"
"""The update's payload entry that carries its ciphertexts."""


class CKKSLayer(Layer):
    name: ClassVar[str] = "ckks"
    traits: ClassVar[Traits] = Traits(hides_updates=True, hides_model=True)

    @classmethod
    def from_config(cls, stack: StackContext) -> Layer | None:
        config = stack.config
        if config.privacy.encryption != "ckks":
            return None
        asked = round_size(config.server.sites_per_round, stack.population)
        noise = 0.0
        if stack.dp is not None and stack.dp.central is not None:
            noise = stack.dp.central.noise_multiplier * stack.dp.central.clip_norm
        return cls(
            weight=config.server.learning_rate / max(asked, 1),
            size=stack.update_size,
            central_noise=noise,
            holder=config.privacy.ckks_key_holder,
            identities=stack.identities,
            registry=stack.registry,
        )

    def __init__(
        self,
        weight: float,
        size: int,
        central_noise: float = 0.0,
        holder: str = "",
        identities: Mapping[str, Ed25519PrivateKey] | None = None,
        registry: Mapping[str, bytes] | None = None,
    ) -> None:
        self.weight = weight
        """What each site multiplies its update by before it encrypts it: server.learning_rate / m."""
        self.size = size
        self.central_noise = central_noise
        """Standard deviation of central DP's noise on the sum of clipped updates (0: none)."""
        self.ceremony = ceremony.Ceremony(holder, dict(identities or {}), registry)
        self._opened: tuple[bytes, np.ndarray] | None = None
        self._server_state: dict[str, Any] | None = None
        """The server state of the last round (where the ceremony keeps the public key and who holds the
        key), for the ceremony that precedes an evaluation."""

    def describe(self) -> str:
        holder = repr(self.ceremony.holder) if self.ceremony.holder else "the first site of the first round"
        return (
            f"homomorphic encryption ({PARAMS.describe()}): each site encrypts its update times "
            f"{self.weight:.4g} (server.learning_rate / sites per round); the server adds ciphertexts into "
            f"an encrypted model it cannot read. The key is made by {holder} and reaches the other sites "
            "sealed to their signed keys."
        )

    # -- the site -------------------------------------------------------------------------------------------

    def open_model(self, weights: Vector, site: str, sessions: dict[str, Any], state: Any) -> Vector:
        """The global model in clear: decrypted with the site's key when the server holds it encrypted (the
        initial model is public, and arrives in clear until the first round's aggregate touches it)."""
        if not is_encrypted(weights):
            return weights
        data = weights.tobytes()
        digest = hashlib.sha256(data).digest()
        if self._opened is not None and self._opened[0] == digest:  # simulated sites share one process
            return self._opened[1].copy()
        key = self.ceremony.secret_key(site, state)
        clear = key.decrypt(data, self.size).astype(np.float32)
        self._opened = (digest, clear)
        return clear.copy()

    def encode(self, update: Update, site: SiteContext) -> Update:
        if update.vector is None:
            raise UpdateError(f"site {site.site!r} has no clear update to encrypt")
        key = self.ceremony.secret_key(site.site, site.state)
        scaled = update.vector.astype(np.float64) * self.weight
        data = key.encrypt(scaled).to_bytes()
        payload = {**update.payload, PAYLOAD: np.frombuffer(data, dtype=np.uint8)}
        return replace(update, vector=None, payload=payload, metrics={})

    def accepts(self, data: bytes) -> bool:
        return ceremony.is_message(data)

    def answer(self, data: bytes, site: str, sessions: dict[str, Any], state: Any = None) -> bytes:
        return self.ceremony.answer(data, site, sessions, state)

    # -- the server -----------------------------------------------------------------------------------------

    def begin(self, round: RoundContext) -> None:
        self._server_state = round.server_state
        self.ceremony.run(round.round, round.sites, round.exchange, round.server_state)

    def begin_evaluation(self, evaluation: EvaluationContext) -> None:
        # Sites that have not trained yet need the key to decrypt the model they evaluate.
        if self._server_state is not None:
            self.ceremony.run(evaluation.round, evaluation.sites, evaluation.exchange, self._server_state)

    def decode(self, update: Update, round: RoundContext) -> Update | None:
        data = update.payload.get(PAYLOAD)
        if data is None or data.dtype != np.uint8:
            raise UpdateError(f"site {update.site!r} sent an update that is not CKKS-encrypted")
        key = self.ceremony.server_key(round.server_state)
        encrypted = key.load(data.tobytes(), self.size)
        total: EncryptedVector | None = round.scratch.get(self.name)
        if total is None:
            round.scratch[self.name] = encrypted
        else:
            add_or_undo(total, encrypted)
        round.summed.append(update.site)
        round.add_sums({EXAMPLES: float(update.num_examples), **update.sums})
        return None

    def apply(self, round: RoundContext, weights: Vector) -> Vector | None:
        total: EncryptedVector | None = round.scratch.get(self.name)
        if total is None:
            return None
        key = self.ceremony.server_key(round.server_state)
        if self.central_noise > 0:
            noise = round.randomness.normal(self.size, self.central_noise * self.weight)
            total += key.encrypt(noise)
        model = key.load(weights.tobytes(), self.size) if is_encrypted(weights) else key.encrypt(weights)
        model += total
        return np.frombuffer(model.to_bytes(), dtype=np.uint8).copy()


def add_or_undo(total: EncryptedVector, other: EncryptedVector) -> None:
    """``total += other``, or, if a ciphertext cannot be added (another scale or level: a malicious site),
    ``total`` as it was and UpdateError. Ciphertext addition is exact modular arithmetic, so subtracting what
    was already added restores ``total`` bit for bit."""
    if other.size != total.size:
        raise UpdateError(f"an encrypted update of {other.size} values, not {total.size}")
    done = 0
    try:
        for mine, theirs in zip(total.parts, other.parts, strict=True):
            mine += theirs
            done += 1
    except Exception as e:
        for mine, theirs in zip(total.parts[:done], other.parts[:done], strict=True):
            mine -= theirs
        raise UpdateError(f"ciphertext {done} of the update cannot be added to the sum ({e})") from None


__all__ = ["PARAMS", "CKKSLayer", "PublicKey", "SecretKey"]
