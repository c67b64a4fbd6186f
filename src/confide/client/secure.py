"""The site's side of secure aggregation in a round: answer the protocol's messages, mask the update.

A round with secure aggregation has four exchanges (see :mod:`confide.privacy.secagg`). The first two (keys,
then encrypted shares) run before the sites train; the masked update then travels as the site's update, with
its vector replaced by the bytes of a :class:`~confide.privacy.secagg.MaskedInput`; the last exchange
(unmasking) runs after every update is in. :class:`SecureSite` keeps one site's protocol state between the
exchanges and turns each server message (bytes) into its answer (bytes), so any backend can carry them.
:class:`SecAggLayer` is the last site layer: it masks whatever the layers before it produced (the clipped,
noised update under distributed DP).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from confide.core import Update
from confide.errors import UpdateError
from confide.privacy.secagg import (
    SERVER,
    KeyBroadcast,
    SecAggClient,
    Setup,
    ShareBroadcast,
    UnmaskRequest,
    decode,
)

MASKED = "masked_input"
"""Name of the masked update's bytes (a uint8 array) in an update's payload."""


class SecureSite:
    """One site's protocol state for the current round, driven by the server's messages."""

    def __init__(
        self,
        site: str,
        identity: Ed25519PrivateKey | None = None,
        registry: Mapping[str, bytes] | None = None,
    ) -> None:
        self.site = site
        self.identity = identity
        self.registry = registry
        self.client: SecAggClient | None = None
        self.forwarded: ShareBroadcast | None = None
        self.clipped = 0

    def answer(self, data: bytes) -> bytes:
        """The answer to a server message; empty bytes when the message needs none (the forwarded shares,
        which the site keeps until its update is ready)."""
        message = decode(data)
        if isinstance(message, Setup):
            self.client = SecAggClient(
                self.site,
                SERVER,
                message,
                identity=self.identity,
                registry=self.registry,
            )
            self.forwarded = None
            return self.client.advertise_keys().to_bytes()
        client = self._client()
        if isinstance(message, KeyBroadcast):
            return client.share_keys(SERVER, message).to_bytes()
        if isinstance(message, ShareBroadcast):
            self.forwarded = message
            return b""
        if isinstance(message, UnmaskRequest):
            return client.unmask(SERVER, message).to_bytes()
        raise UpdateError(f"site {self.site!r} got a {type(message).__name__}, which no site answers")

    def mask(self, vector: np.ndarray) -> bytes:
        """The masked input for ``vector``, once the shares have been forwarded."""
        client = self._client()
        if self.forwarded is None:
            raise UpdateError(
                f"site {self.site!r} has no forwarded shares for this round, so it cannot mask its update"
            )
        message = client.masked_input(SERVER, self.forwarded, vector)
        self.clipped = client.clipped
        return message.to_bytes()

    def _client(self) -> SecAggClient:
        if self.client is None:
            raise UpdateError(f"site {self.site!r} got a secure-aggregation message before the round's setup")
        return self.client


class SecAggLayer:
    """The last site layer under secure aggregation: the update leaves the site only masked.

    ``sites`` maps each site this process plays to its protocol state (one entry in a deployed client, every
    simulated site in the local backend). The server cannot read the result; the federation hands the bytes
    to the secure-aggregation server, which reveals only the sum.
    """

    name = "secagg"
    reveals_individual_updates = False

    def __init__(self, sites: Mapping[str, SecureSite]) -> None:
        self.sites = sites

    def encode(self, update: Update, rng: np.random.Generator) -> Update:
        if update.vector is None:
            raise UpdateError(f"site {update.site!r}: secure aggregation needs the update's vector")
        state = self.sites.get(update.site)
        if state is None:
            raise UpdateError(f"site {update.site!r} took no part in this round's key exchange")
        masked = state.mask(update.vector)
        update.payload[MASKED] = np.frombuffer(masked, dtype=np.uint8)
        if state.clipped:
            update.metrics["secagg_clipped"] = float(state.clipped)
        update.vector = None
        return update

    def decode(self, update: Update) -> Update:
        return update  # only the sum can be unmasked, by the federation's secure-aggregation server
