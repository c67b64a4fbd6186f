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

A site's evaluation (its sums of loss, correct predictions and targets on its held-out data) is summed the
same way, in a secure sum of its own: the layer runs the protocol's exchanges before the sites evaluate, each
site answers its evaluation work with a masked input instead of its sums, and the server unmasks only their
total, so it reports the pooled loss, accuracy and perplexity but no site's own. The sums are exact: each is
an integer (the loss in units of 2^-16) cut into 8-bit digits, one digit per coordinate, which the
fixed-point encoding carries without rounding and whose sums the server recombines. Every exchange message
starts with one byte naming its secure sum (training, or evaluation of the global or personalized model),
so that a site keeps one protocol state per sum.

With ``[compression] kind = "quantize"`` the layer quantizes into the protocol's ring instead of encoding in
fixed point (no separate quantize layer runs): each coordinate, after clipping and any DP noise, is clipped
to [-R, R] and rounded stochastically to 2^(bits-1) - 1 levels each side of zero, with the site's secret
randomness as dither, so the decoded sum is unbiased and the masked vector takes b = bit_length(n L) + 1
bits a value; ``compression.rotate`` rotates every site's update alike first
(see :mod:`confide.privacy.quantized`).
Masked vectors travel packed at b bits in either encoding.

Over ~400 lines because the training sum, the evaluation sums and their two encodings share one protocol
driver here.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from confide.compress.quantize import padded_size
from confide.core import EXAMPLES, LOSS_SUM, SUMMED, SiteEvaluation, Update
from confide.errors import UpdateError
from confide.pipeline import (
    GLOBAL_EVALUATION,
    PERSONAL_EVALUATION,
    EvaluationContext,
    Exchange,
    Layer,
    RoundAbandoned,
    RoundContext,
    SiteContext,
    StackContext,
    Traits,
)
from confide.privacy.dp import UNCLIPPED
from confide.privacy.quantized import Digits, rotate, rotated_range, rotation_signs, unrotate
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
    SecAggResult,
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
CHANNELS = ("train", GLOBAL_EVALUATION, PERSONAL_EVALUATION)
"""The secure sums a round may run, by the byte that starts each of their exchange messages."""
DIGIT_BITS = 8
"""Evaluation sums travel as digits of this many bits, one per coordinate (each digit d as d / 2^8, which the
encoding with R = 1 and 8 fractional bits carries exactly)."""
LOSS_UNIT_BITS = 16
"""A site's evaluation loss sum travels as an integer number of 2^-16 units."""
EVALUATION_DIGITS = (("targets", 5), ("correct", 5), ("loss", 7), ("nonfinite", 1))
"""Each evaluation sum and its digits: up to 2^40 targets (and correct ones) per site, a loss sum up to
2^40, and a bit for a loss that is not finite (a diverged model), so that the total shows it."""
EVALUATION_SIZE = sum(digits for _, digits in EVALUATION_DIGITS)
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
    quantize_bits: int = 0
    """0: the fixed-point encoding; 1 to 16: each coordinate quantized to that many bits into the ring
    (``[compression] kind = "quantize"``, see :meth:`with_compression`)."""
    rotate: bool = False
    """Under quantization: every site rotates its update alike before encoding (``compression.rotate``)."""

    def params(self, sites: int) -> SecAggParams:
        return self.expectation(1, "").params(sites)

    def for_evaluation(self) -> SecureAggregation:
        """The settings of an evaluation's secure sum: the same sites and threshold rule, with the encoding
        of digits (R = 1, 8 fractional bits, no quantization) that carries its integer sums exactly."""
        return replace(self, clip_range=1.0, fractional_bits=DIGIT_BITS, quantize_bits=0, rotate=False)

    def with_compression(
        self, compression: Any, dp: Any = None, configured_range: float = 0.0
    ) -> SecureAggregation:
        """These settings with the run's ``[compression]`` folded in: quantization into the ring for
        ``kind = "quantize"`` (the only compression that runs with secure aggregation), else unchanged.

        With the rotation, and R left to its default (``configured_range`` = privacy.secagg_range = 0) under
        site-level DP, R becomes :func:`~confide.privacy.quantized.rotated_range` of the clip norm and the
        noise share instead of the clip norm itself: a rotated coordinate is about C / 32, and R = C would
        spend all but a few of the levels on values that never occur."""
        if compression.kind != "quantize":
            return self
        clip_range = self.clip_range
        if compression.rotate and not configured_range and dp is not None:
            distributed = dp.placement == "distributed"
            spread = dp.update_noise / math.sqrt(dp.share_sites) if distributed else 0.0
            clip_range = rotated_range(dp.clip_norm, spread)
        return replace(self, clip_range=clip_range, quantize_bits=compression.bits, rotate=compression.rotate)

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
            quantize_bits=self.quantize_bits,
            rotated=self.rotate,
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

    def mask(self, vector: np.ndarray, dither: np.ndarray | None = None) -> bytes:
        """The masked input for ``vector`` (with the quantized encoding's ``dither``), once the shares have
        been forwarded."""
        client = self._client()
        if self.forwarded is None:
            raise UpdateError(
                f"site {self.site!r} has no forwarded shares for this round, so it cannot mask its update"
            )
        return client.masked_input(SERVER, self.forwarded, vector, dither).to_bytes()

    def rotation(self, size: int) -> np.ndarray:
        """The signs of the round's common rotation, from its session value (known once the keys are
        shared) and round number, which the server holds too."""
        client = self._client()
        if client.session is None:
            raise UpdateError(f"site {self.site!r} has no session value yet: the keys were not shared")
        return rotation_signs(client.session, client.round, size)

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
        p = stack.config.privacy
        settings = stack.secure.with_compression(stack.config.compression, stack.dp, p.secagg_range)
        return cls(settings, stack.update_size, sums, stack.config.run.name, stack.identities)

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
        self.update_size = update_size
        self.model_size = padded_size(update_size) if settings.rotate else update_size
        """The update's values in the masked vector: padded to whole rotation blocks when rotated."""
        self.encoding = settings.params(2).fixed_point
        """The encoding's scale and levels (its ring depends on each round's size)."""
        self.digits: Digits | None = None
        if settings.quantize_bits:
            bounds = {key: _bound(key) for key in self.sum_keys}
            self.digits = Digits(self.sum_keys, bounds, self.encoding)
        extras = self.digits.size if self.digits is not None else len(self.sum_keys)
        self.vector_size = self.model_size + extras
        self.run = run
        self.identities = dict(identities or {})
        """The long-term signing keys of the sites this process plays (all of them in a simulation, its
        own in a deployment)."""

    # -- the site ------------------------------------------------------------------------------------------

    def answer(self, data: bytes, site: str, sessions: dict[str, object], state: object = None) -> bytes:
        """A site's answer to one protocol message of the server (its first byte names the secure sum it
        belongs to). ``state`` is the site's own store; a durable one (a deployed site's) keeps the survivor
        sets it agreed to across restarts."""
        if not data or data[0] >= len(CHANNELS):
            raise UpdateError(f"site {site!r} got a secure-aggregation message for no known secure sum")
        channel = CHANNELS[data[0]]
        key = self._session(channel)
        secure = sessions.get(key)
        if not isinstance(secure, SecureSite):
            run = getattr(state, "run", "") or self.run
            durable = getattr(state, "survivor_store", None)
            if channel == "train":
                expect = self.settings.expectation(self.vector_size, run)
            else:  # its own survivor sets: an evaluation never unmasks under a training round's agreement
                expect = self.settings.for_evaluation().expectation(EVALUATION_SIZE, f"{run}#{channel}")
            secure = SecureSite(
                site,
                expect,
                self.identities.get(site),
                self.settings.registry,
                durable(site) if durable is not None else None,
            )
            sessions[key] = secure
        return secure.answer(data[1:])

    def encode(self, update: Update, site: SiteContext) -> Update:
        if update.vector is None:
            raise UpdateError(f"site {update.site!r}: secure aggregation needs the update's vector")
        state = site.sessions.get(self._session("train"))
        if not isinstance(state, SecureSite):
            raise UpdateError(f"site {update.site!r} took no part in this round's key exchange")
        bound = self.settings.clip_range
        vector = update.vector
        if self.settings.rotate:
            vector = rotate(vector, state.rotation(self.model_size)).astype(np.float32)
        outside = int(np.count_nonzero(np.abs(vector) > bound))
        sums = dict(update.sums)
        examples = sums[EXAMPLES] = float(update.num_examples)
        sums[MEAN_LOSS] = sums.pop(LOSS_SUM, 0.0) / examples if examples else 0.0
        sums[SECAGG_CLIPPED] = float(outside > 0)
        if self.digits is None:
            extra = np.array(
                [_scale(sums.get(key, 0.0), _bound(key), bound) for key in self.sum_keys], dtype=np.float32
            )
            masked = state.mask(np.concatenate([vector, extra]))  # the site checks the vector's size
            return update.sealed(MASKED, masked)
        extra = self.digits.encode(sums, {key: _bound(key) for key in self.sum_keys})
        # The update's coordinates rounded stochastically with the site's secret coins; the digits of its
        # sums to nearest (u = 1/2), which carries them exactly.
        dither = np.concatenate([site.randomness.uniform(vector.size), np.full(extra.size, 0.5)])
        masked = state.mask(np.concatenate([vector, extra]), dither)
        return update.sealed(MASKED, masked)

    def encode_evaluation(
        self, evaluation: SiteEvaluation, kind: str, sessions: dict[str, object]
    ) -> SiteEvaluation:
        state = sessions.get(self._session(kind))
        if not isinstance(state, SecureSite):
            raise UpdateError(f"site {evaluation.site!r} took no part in this evaluation's key exchange")
        masked = state.mask(evaluation_digits(evaluation))
        return SiteEvaluation(evaluation.site, 0.0, 0, 0, masked=np.frombuffer(masked, dtype=np.uint8))

    def _session(self, channel: str) -> str:
        return self.name if channel == "train" else f"{self.name}#{channel}"

    # -- the server: training ------------------------------------------------------------------------------

    def begin(self, round: RoundContext) -> None:
        server = self._start(round.round, round.sites, self.settings, self.vector_size)
        round.scratch[self.name] = _Round(server)
        self._open(round.exchange, round.rejected, server, "train")

    def decode(self, update: Update, round: RoundContext) -> Update | None:
        state: _Round = round.scratch[self.name]
        state.take(update.site, update.payload.get(MASKED))
        return None  # only the sum will reach the aggregate, in close()

    def close(self, round: RoundContext) -> None:
        state: _Round = round.scratch[self.name]
        total = self._unmask(round.exchange, round.rejected, state, "train", max(round.min_updates, 1))
        count = len(total.survivors)
        if self.digits is None:
            model = total.vector[: self.model_size]
            sums = {
                key: _unscale(float(value), _bound(key), self.settings.clip_range)
                for key, value in zip(self.sum_keys, total.vector[self.model_size :], strict=True)
            }
        else:
            integers = state.server.fixed_point.signed(total.encoded_sum)
            model = integers[: self.model_size].astype(np.float64) / self.encoding.scale
            sums = self.digits.decode(integers[self.model_size :], count)
        if self.settings.rotate:
            server = state.server
            assert server.session is not None  # known since step 2
            signs = rotation_signs(server.session, server.round, self.model_size)
            model = unrotate(np.asarray(model, dtype=np.float64), signs, self.update_size)
        sums[LOSS_SUM] = sums.pop(MEAN_LOSS) / count * sums[EXAMPLES] if count else 0.0
        round.add_sum(np.ascontiguousarray(model, dtype=np.float32), list(total.survivors), sums)

    # -- the server: evaluation ----------------------------------------------------------------------------

    def begin_evaluation(self, evaluation: EvaluationContext) -> None:
        settings = self.settings.for_evaluation()
        server = self._start(evaluation.round, evaluation.sites, settings, EVALUATION_SIZE)
        evaluation.scratch[self.name] = _Round(server)
        self._open(evaluation.exchange, evaluation.rejected, server, evaluation.kind)

    def decode_evaluation(
        self, evaluation: SiteEvaluation, context: EvaluationContext
    ) -> SiteEvaluation | None:
        state: _Round = context.scratch[self.name]
        state.take(evaluation.site, evaluation.masked)
        return None

    def close_evaluation(self, evaluation: EvaluationContext) -> None:
        state: _Round = evaluation.scratch[self.name]
        # An honest server unmasks no fewer evaluations than a site agrees to (each site also refuses it).
        least = max(2, self.settings.min_sites)
        total = self._unmask(evaluation.exchange, evaluation.rejected, state, evaluation.kind, least)
        evaluation.total = evaluation_total(total.vector, len(total.survivors))
        evaluation.summed = list(total.survivors)

    # -- the protocol's steps --------------------------------------------------------------------------------

    def _start(self, round: int, sites: list[str], settings: SecureAggregation, size: int) -> SecAggServer:
        if len(sites) < max(2, settings.min_sites):
            raise RoundAbandoned(
                f"secure aggregation needs at least {max(2, settings.min_sites)} sites and the round "
                f"drew {len(sites)}"
            )
        # A fresh nonce names this attempt; the session value (and so the graph) is drawn with the sites.
        return SecAggServer(
            settings.params(len(sites)),
            sites,
            round,
            size,
            nonce=os.urandom(32),
            registry=settings.registry,
        )

    def _open(
        self, exchange: Exchange, rejected: list[tuple[str, str]], server: SecAggServer, channel: str
    ) -> None:
        """The steps before the sites' inputs: setup, commitments, keys, shares."""
        try:
            _step(exchange, rejected, server, dict.fromkeys(server.sites, server.setup()), channel)
            _step(exchange, rejected, server, server.broadcast_commitments(), channel)
            _step(exchange, rejected, server, server.broadcast_keys(), channel)
            _step(exchange, rejected, server, server.forward_shares(), channel)
        except SecAggAbort as e:
            raise RoundAbandoned(str(e)) from None

    def _unmask(
        self,
        exchange: Exchange,
        rejected: list[tuple[str, str]],
        state: _Round,
        channel: str,
        least: int,
    ) -> SecAggResult:
        """The steps after the sites' inputs: consistency and unmasking, once ``least`` inputs are in."""
        server, inputs = state.server, state.inputs
        if inputs < least:
            # Decided before anything is unmasked: a round retried after an unmasking could be compared
            # with this one, and the two sums would give away the sites that differ.
            raise RoundAbandoned(
                f"only {inputs} of {len(server.sites)} sites sent a masked input; at least {least} are needed"
            )
        try:
            _step(exchange, rejected, server, server.request_consistency(), channel)
            _step(exchange, rejected, server, server.request_unmasking(), channel)
            return server.finish()
        except SumOutOfRange as e:
            raise RoundAbandoned(
                f"the unmasked sum was refused: {e} (a site sent an input that is not a clipped update)"
            ) from None
        except SecAggAbort as e:
            raise RoundAbandoned(str(e)) from None


def _step(
    exchange: Exchange,
    rejected: list[tuple[str, str]],
    server: SecAggServer,
    messages: Mapping[str, Message],
    channel: str,
) -> None:
    """One step over the backend. A site whose answer is refused counts as dropped from that step on; the
    protocol decides if the round survives."""
    tag = bytes([CHANNELS.index(channel)])
    for site, answer in exchange({site: tag + m.to_bytes() for site, m in messages.items()}):
        try:
            server.receive(site, decode(answer))
        except MessageError as e:
            rejected.append((site, str(e)))


def evaluation_digits(evaluation: SiteEvaluation) -> np.ndarray:
    """A site's evaluation sums as the digits its secure sum carries (see :data:`EVALUATION_DIGITS`)."""
    loss = evaluation.loss_sum
    finite = math.isfinite(loss)
    values = {
        "targets": evaluation.targets,
        "correct": evaluation.correct,
        "loss": round(max(loss, 0.0) * 2**LOSS_UNIT_BITS) if finite else 0,
        "nonfinite": 0 if finite else 1,
    }
    digits: list[float] = []
    for key, count in EVALUATION_DIGITS:
        value = min(max(int(values[key]), 0), (1 << (DIGIT_BITS * count)) - 1)
        digits.extend(((value >> (DIGIT_BITS * i)) & 0xFF) / 2**DIGIT_BITS for i in range(count))
    return np.array(digits, dtype=np.float32)


def evaluation_total(vector: np.ndarray, sites: int) -> SiteEvaluation:
    """The sum of ``sites`` evaluations from the sum of their digits: each coordinate's sum is an exact
    integer (at most 255 per site), recombined in Python's unbounded integers."""
    sums = np.rint(vector.astype(np.float64) * 2**DIGIT_BITS).astype(np.int64)
    values: dict[str, int] = {}
    position = 0
    for key, count in EVALUATION_DIGITS:
        values[key] = sum(int(sums[position + i]) << (DIGIT_BITS * i) for i in range(count))
        position += count
    loss = values["loss"] / 2**LOSS_UNIT_BITS if values["nonfinite"] == 0 else math.inf
    return SiteEvaluation(f"the sum of {sites} sites", loss, values["correct"], values["targets"])


@dataclass
class _Round:
    """The server's protocol state in one secure sum, and how many masked inputs it has taken."""

    server: SecAggServer
    inputs: int = 0

    def take(self, site: str, masked: object) -> None:
        """One site's masked input (uint8 bytes), or an UpdateError that costs the site this sum."""
        if not isinstance(masked, np.ndarray):
            raise UpdateError(f"site {site!r} sent no masked input under secure aggregation")
        try:
            self.server.receive(site, decode(masked.tobytes()))
        except MessageError as e:
            raise UpdateError(str(e)) from None
        except SecAggAbort as e:
            raise RoundAbandoned(str(e)) from None
        self.inputs += 1


def _bound(key: str) -> float:
    return SUM_BOUNDS.get(key, 1.0)


def _scale(value: float, bound: float, clip_range: float) -> float:
    if not math.isfinite(value):
        value = 0.0
    return max(-bound, min(bound, value)) * (clip_range / bound)


def _unscale(value: float, bound: float, clip_range: float) -> float:
    return value * (bound / clip_range)
