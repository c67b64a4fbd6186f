"""Secure aggregation as a layer of the round: the site masks its update, the server learns only the sum.

A round with secure aggregation has its exchanges (see :mod:`confide.privacy.secagg`): keys and encrypted
shares go round in ``begin``, before the sites train (they do not depend on the update; if too few sites
take part, the round ends before anyone trains for nothing); the masked update then travels as the site's
update; unmasking runs in ``close``, once every update is in. :class:`SecureSite` keeps one site's protocol
state between the exchanges and turns each server message (bytes) into its answer (bytes), so any backend
can carry them.

What the server sees of a site (threat model: an honest-but-curious server, and see
:mod:`confide.privacy.secagg.protocol` for a malicious one): its name, that it took part in each step, the
sizes of its messages, and its masked vector, which is uniform noise without the other sites' masks. Nothing
else about the site travels in clear: its number of examples, training loss, steps, computing time and
clipping bit (:data:`confide.core.SUMMED` and the layers' own sums) are appended to the vector before it is
masked, so the server learns them only summed over the round's survivors. The encoding scales each sum into
the fixed-point range, which bounds it per site (:data:`SUM_BOUNDS`) and rounds it to 2^-f times its bound
over R; the training loss goes in as the site's mean, so the round reports the sites' unweighted mean loss.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from confide.core import EXAMPLES, LOSS_SUM, SUMMED, Update
from confide.errors import UpdateError
from confide.pipeline import Layer, RoundAbandoned, RoundContext, SiteContext, StackContext, Traits
from confide.privacy.dp import UNCLIPPED
from confide.privacy.secagg import (
    SERVER,
    CommitmentBroadcast,
    ConsistencyRequest,
    KeyBroadcast,
    MemorySurvivorStore,
    MessageError,
    SecAggAbort,
    SecAggClient,
    SecAggExpectation,
    SecAggParams,
    SecAggServer,
    Setup,
    ShareBroadcast,
    SumOutOfRange,
    SurvivorStore,
    UnmaskRequest,
    decode,
)
from confide.privacy.secagg.messages import Message

log = logging.getLogger(__name__)

MASKED = "masked_input"
"""Name of the masked update's bytes (a uint8 array) in an update's payload."""
MEAN_LOSS = "loss"
"""Under secure aggregation the site's mean training loss is summed instead of its loss times examples."""
SUM_BOUNDS: dict[str, float] = {
    EXAMPLES: 2.0**20,
    MEAN_LOSS: 64.0,
    "steps": 2.0**20,
    "compute_seconds": 2.0**16,
}
"""The largest value one site may contribute to each sum (larger ones are cut to it); any other sum (a
layer's bit) is bounded by 1."""
SECAGG_CLIPPED = "secagg_clipped"
"""Sum key: 1 for a site whose update had coordinates outside [-R, R], which the fixed-point encoding clipped
(a bit, so that it survives even a tiny R: a count would be rounded away)."""


@dataclass(frozen=True)
class SecureAggregation:
    """Secure aggregation's settings for every round (see :class:`~confide.privacy.secagg.SecAggParams`)."""

    neighbours: int = 0
    threshold: int = 0
    """0: :func:`~confide.privacy.secagg.default_threshold`, two thirds of a site's k + 1 share holders."""
    clip_range: float = 1.0
    fractional_bits: int = 20
    authenticated: bool = False
    registry: Mapping[str, bytes] | None = None
    """The sites' Ed25519 public keys (authenticated mode), from a source the sites trust: the simulation's
    own, or in a deployment the registry each site verifies against the deployment CA."""
    min_sites: int = 2
    """The fewest sites a round may start with or unmask a sum of: a site refuses a smaller round."""

    def params(self, sites: int) -> SecAggParams:
        return self.expectation(1, "").params(sites)

    def expectation(self, vector_size: int, run: str) -> SecAggExpectation:
        """What a site checks every Setup against: these settings, from its own copy of the config."""
        return SecAggExpectation(
            self.clip_range,
            self.fractional_bits,
            vector_size,
            self.authenticated,
            self.neighbours,
            self.threshold,
            min_sites=self.min_sites,
            run=run,
        )


class SecureSite:
    """One site's protocol state for the current round, driven by the server's messages."""

    def __init__(
        self,
        site: str,
        expect: SecAggExpectation,
        identity: Ed25519PrivateKey | None = None,
        registry: Mapping[str, bytes] | None = None,
        store: SurvivorStore | None = None,
    ) -> None:
        self.site = site
        self.expect = expect
        self.identity = identity
        self.registry = registry
        self.store: SurvivorStore = store if store is not None else MemorySurvivorStore()
        """The survivor set this site agreed to per (run, round): it never unmasks a round for another."""
        self.client: SecAggClient | None = None
        self.forwarded: ShareBroadcast | None = None

    def answer(self, data: bytes) -> bytes:
        """The answer to a server message; empty bytes when the message needs none (the forwarded shares,
        which the site keeps until its update is ready)."""
        message = decode(data)
        if isinstance(message, Setup):
            self.client = SecAggClient(
                self.site,
                SERVER,
                message,
                expect=self.expect,
                identity=self.identity,
                registry=self.registry,
                store=self.store,
            )
            self.forwarded = None
            return self.client.commit().to_bytes()
        client = self._client()
        if isinstance(message, CommitmentBroadcast):
            return client.advertise_keys(SERVER, message).to_bytes()
        if isinstance(message, KeyBroadcast):
            return client.share_keys(SERVER, message).to_bytes()
        if isinstance(message, ShareBroadcast):
            self.forwarded = message
            return b""
        if isinstance(message, ConsistencyRequest):
            return client.confirm_survivors(SERVER, message).to_bytes()
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
        return client.masked_input(SERVER, self.forwarded, vector).to_bytes()

    def _client(self) -> SecAggClient:
        if self.client is None:
            raise UpdateError(f"site {self.site!r} got a secure-aggregation message before the round's setup")
        return self.client


class SecAggLayer(Layer):
    """The last layer under secure aggregation: the update leaves the site only masked, with its sums inside
    the masked vector, and the server unmasks only the sum of the survivors' vectors."""

    name = "secagg"
    traits = Traits(hides_updates=True)

    @classmethod
    def from_config(cls, stack: StackContext) -> Layer | None:
        if stack.secure is None:
            return None
        sums = SUMMED + ((UNCLIPPED,) if stack.dp is not None else ())
        return cls(stack.secure, stack.update_size, sums, stack.config.run.name, stack.identities)

    def __init__(
        self,
        settings: SecureAggregation,
        update_size: int,
        sum_keys: tuple[str, ...] = SUMMED,
        run: str = "",
        identities: Mapping[str, Ed25519PrivateKey] | None = None,
    ) -> None:
        """``update_size``: the values of a site's update (the model's, or its shared part); ``run``: the
        run's name, under which a site remembers the survivor sets it agreed to."""
        self.settings = settings
        self.sum_keys = (*(MEAN_LOSS if key == LOSS_SUM else key for key in sum_keys), SECAGG_CLIPPED)
        self.vector_size = update_size + len(self.sum_keys)
        self.run = run
        self.identities = dict(identities or {})
        """The long-term signing keys of the sites this process plays (all of them in a simulation, its
        own in a deployment)."""

    # -- the site ------------------------------------------------------------------------------------------

    def answer(self, data: bytes, site: str, sessions: dict[str, object], state: object = None) -> bytes:
        """A site's answer to one protocol message of the server. ``state`` is the site's own store; a
        durable one (a deployed site's) keeps the survivor sets it agreed to across restarts."""
        secure = sessions.get(self.name)
        if not isinstance(secure, SecureSite):
            run = getattr(state, "run", "") or self.run
            durable = getattr(state, "survivor_store", None)
            secure = SecureSite(
                site,
                self.settings.expectation(self.vector_size, run),
                self.identities.get(site),
                self.settings.registry,
                durable(site) if durable is not None else None,
            )
            sessions[self.name] = secure
        return secure.answer(data)

    def encode(self, update: Update, site: SiteContext) -> Update:
        if update.vector is None:
            raise UpdateError(f"site {update.site!r}: secure aggregation needs the update's vector")
        state = site.sessions.get(self.name)
        if not isinstance(state, SecureSite):
            raise UpdateError(f"site {update.site!r} took no part in this round's key exchange")
        bound = self.settings.clip_range
        outside = int(np.count_nonzero(np.abs(update.vector) > bound))
        sums = dict(update.sums)
        examples = sums[EXAMPLES] = float(update.num_examples)
        sums[MEAN_LOSS] = sums.pop(LOSS_SUM, 0.0) / examples if examples else 0.0
        sums[SECAGG_CLIPPED] = float(outside > 0)
        extra = np.array(
            [_scale(sums.get(key, 0.0), _bound(key), bound) for key in self.sum_keys], dtype=np.float32
        )
        masked = state.mask(np.concatenate([update.vector, extra]))  # the site checks the vector's size
        return Update(
            site=update.site,
            round=update.round,
            num_examples=0,
            vector=None,
            model_version=update.model_version,
            payload={MASKED: np.frombuffer(masked, dtype=np.uint8)},
        )

    # -- the server ----------------------------------------------------------------------------------------

    def begin(self, round: RoundContext) -> None:
        sites = round.sites
        if len(sites) < max(2, self.settings.min_sites):
            raise RoundAbandoned(
                f"secure aggregation needs at least {max(2, self.settings.min_sites)} sites and the round "
                f"drew {len(sites)}"
            )
        # A fresh nonce names this attempt; the session value (and so the graph) is drawn with the sites.
        server = SecAggServer(
            self.settings.params(len(sites)),
            sites,
            round.round,
            self.vector_size,
            nonce=os.urandom(32),
            registry=self.settings.registry,
        )
        round.scratch[self.name] = _Round(server)
        try:
            self._exchange(round, server, dict.fromkeys(sites, server.setup().to_bytes()))
            self._exchange(round, server, _bytes(server.broadcast_commitments()))
            self._exchange(round, server, _bytes(server.broadcast_keys()))
            self._exchange(round, server, _bytes(server.forward_shares()))
        except SecAggAbort as e:
            raise RoundAbandoned(str(e)) from None

    def decode(self, update: Update, round: RoundContext) -> Update | None:
        state: _Round = round.scratch[self.name]
        masked = update.payload.get(MASKED)
        if not isinstance(masked, np.ndarray):
            raise UpdateError(f"site {update.site!r} sent no masked input under secure aggregation")
        try:
            state.server.receive(update.site, decode(masked.tobytes()))
        except MessageError as e:
            raise UpdateError(str(e)) from None
        except SecAggAbort as e:
            raise RoundAbandoned(str(e)) from None
        state.inputs += 1
        return None  # only the sum will reach the aggregate, in close()

    def close(self, round: RoundContext) -> None:
        state: _Round = round.scratch[self.name]
        server, inputs = state.server, state.inputs
        if inputs < max(round.min_updates, 1):
            # Decided before anything is unmasked: a round retried after an unmasking could be compared
            # with this one, and the two sums would give away the sites that differ.
            raise RoundAbandoned(
                f"only {inputs} of {len(round.sites)} sites sent a masked update; a round needs at least "
                f"{max(round.min_updates, 1)}"
            )
        try:
            self._exchange(round, server, _bytes(server.request_consistency()))
            self._exchange(round, server, _bytes(server.request_unmasking()))
            total = server.finish()
        except SumOutOfRange as e:
            raise RoundAbandoned(
                f"the unmasked sum was refused: {e} (a site sent an input that is not a clipped update)"
            ) from None
        except SecAggAbort as e:
            raise RoundAbandoned(str(e)) from None
        model = total.vector[: -len(self.sum_keys)]
        extra = total.vector[-len(self.sum_keys) :]
        count = len(total.survivors)
        sums = {
            key: _unscale(float(value), _bound(key), self.settings.clip_range)
            for key, value in zip(self.sum_keys, extra, strict=True)
        }
        sums[LOSS_SUM] = sums.pop(MEAN_LOSS) / count * sums[EXAMPLES] if count else 0.0
        round.add_sum(np.ascontiguousarray(model), list(total.survivors), sums)

    def _exchange(self, round: RoundContext, server: SecAggServer, messages: Mapping[str, bytes]) -> None:
        """One step over the backend. A site whose answer is refused counts as dropped from that step on; the
        protocol decides if the round survives."""
        for site, answer in round.exchange(messages):
            try:
                server.receive(site, decode(answer))
            except MessageError as e:
                round.rejected.append((site, str(e)))


@dataclass
class _Round:
    """The server's protocol state in one round, and how many masked inputs it has taken."""

    server: SecAggServer
    inputs: int = 0


def _bound(key: str) -> float:
    return SUM_BOUNDS.get(key, 1.0)


def _scale(value: float, bound: float, clip_range: float) -> float:
    if not math.isfinite(value):
        value = 0.0
    return max(-bound, min(bound, value)) * (clip_range / bound)


def _unscale(value: float, bound: float, clip_range: float) -> float:
    return value * (bound / clip_range)


def _bytes(messages: Mapping[str, Message]) -> dict[str, bytes]:
    return {site: m.to_bytes() for site, m in messages.items()}
