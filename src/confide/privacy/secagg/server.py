"""The server's side of a round of secure aggregation (the threat model is in :mod:`.protocol`).

Over ~400 lines because it is one state machine of six steps, each a collect and a close beside its checks.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from cryptography.exceptions import InvalidSignature

from confide.errors import ConfigError
from confide.privacy.secagg import keys, prg, session, shamir
from confide.privacy.secagg.common import (
    SECRET_BYTES,
    SHARE_CIPHERTEXT_BYTES,
    STEP,
    SecAggResult,
    Stage,
    check_envelope,
    check_site_ids,
    distinct,
    mask_seed,
)
from confide.privacy.secagg.errors import MessageError, SecAggAbort, SumOutOfRange
from confide.privacy.secagg.graph import neighbour_graph
from confide.privacy.secagg.messages import (
    SERVER,
    AdvertisedKeys,
    AdvertiseKeys,
    Commitment,
    CommitmentBroadcast,
    ConsistencyRequest,
    ConsistencyResponse,
    KeyBroadcast,
    MaskedInput,
    Message,
    Setup,
    ShareBroadcast,
    ShareKeys,
    Step,
    UnmaskRequest,
    UnmaskResponse,
)
from confide.privacy.secagg.params import SecAggParams


class SecAggServer:
    """The server's side of a round.

    For each step: ``setup`` (or the previous step's closing call) gives the messages to send; ``collect_*``
    takes each site's answer as it arrives (raising MessageError for one it refuses, which leaves that site
    out); the closing call (``broadcast_commitments``, ``broadcast_keys``, ``forward_shares``,
    ``request_consistency``, ``request_unmasking``, ``finish``) ends the step: whoever has not answered by
    then has dropped. ``receive`` dispatches any site message to the right ``collect_*``.
    """

    def __init__(
        self,
        params: SecAggParams,
        sites: Sequence[str],
        round: int,
        vector_size: int,
        *,
        nonce: bytes | None = None,
        registry: Mapping[str, bytes] | None = None,
    ) -> None:
        """``nonce``: 32 public bytes naming this attempt at the round (drawn from the OS when None); any
        value will do, since the session value is drawn jointly with the sites. ``registry``: the sites'
        Ed25519 identity keys, required in the authenticated mode."""
        self.params = params
        self.sites = check_site_ids(sites)
        if len(self.sites) != params.sites:
            raise ConfigError(
                f"the parameters are for {params.sites} sites, but {len(self.sites)} were given"
            )
        if vector_size < 1:
            raise ConfigError(f"the vector size must be at least 1 (got {vector_size})")
        if params.authenticated and registry is None:
            raise ConfigError(
                "authenticated secure aggregation needs the registry of the sites' identity keys"
            )
        self.round = round
        self.vector_size = vector_size
        self.nonce = os.urandom(32) if nonce is None else nonce
        if len(self.nonce) != 32:
            raise ConfigError(f"the nonce has 32 bytes, got {len(self.nonce)}")
        self.registry = registry
        self.fixed_point = params.fixed_point
        self.session: bytes | None = None
        """The jointly drawn session value, known once step 2 closes."""
        self.graph: Mapping[str, frozenset[str]] = {}
        """The neighbour graph of the committed sites, known once step 2 closes."""
        self._index = {s: i + 1 for i, s in enumerate(self.sites)}
        self._stage = Stage.COMMIT
        self._commitments: dict[str, bytes] = {}
        self._digest = b""
        self._advertised: dict[str, AdvertiseKeys] = {}
        self._keys_in_use: set[bytes] = set()
        self._ciphertexts: dict[str, dict[str, bytes]] = {}
        self._shared: set[str] = set()
        self._masked: set[str] = set()
        self._total: np.ndarray | None = None
        self._survivors: tuple[str, ...] = ()
        self._signatures: dict[str, bytes] = {}
        self._requested: set[str] = set()
        self._self_shares: dict[str, dict[str, np.ndarray]] = {}
        self._key_shares: dict[str, dict[str, np.ndarray]] = {}
        self._answered: set[str] = set()

    @property
    def stage(self) -> str:
        return self._stage.value

    def setup(self) -> Setup:
        """The message that opens step 1, the same for every site."""
        p = self.params
        return Setup(
            sender=SERVER,
            round=self.round,
            nonce=self.nonce,
            sites=self.sites,
            vector_size=self.vector_size,
            neighbours=p.neighbours,
            threshold=p.threshold,
            clip_range=p.clip_range,
            fractional_bits=p.fractional_bits,
            authenticated=p.authenticated,
            quantize_bits=p.quantize_bits,
            rotated=p.rotated,
        )

    def receive(self, sender: str, message: Message) -> None:
        """Take any site message: the collect method of its type (which checks that it is the right step)."""
        if isinstance(message, Commitment):
            self.collect_commitment(sender, message)
        elif isinstance(message, AdvertiseKeys):
            self.collect_advertise(sender, message)
        elif isinstance(message, ShareKeys):
            self.collect_shares(sender, message)
        elif isinstance(message, MaskedInput):
            self.collect_masked_input(sender, message)
        elif isinstance(message, ConsistencyResponse):
            self.collect_consistency(sender, message)
        elif isinstance(message, UnmaskResponse):
            self.collect_unmask(sender, message)
        else:
            raise MessageError(
                f"{sender!r} sent a {type(message).__name__}, which only the server sends", sender
            )

    # Step 1.

    def collect_commitment(self, sender: str, message: Commitment) -> None:
        self._accept(sender, message, Commitment, Stage.COMMIT, self._commitments, set(self.sites))
        if message.commitment in self._commitments.values():
            raise MessageError(f"site {sender!r} sent another site's commitment", sender)
        self._commitments[sender] = message.commitment

    def broadcast_commitments(self) -> dict[str, CommitmentBroadcast]:
        """End step 1: every committed site gets the digest of all the commitments (the same for all)."""
        self._close(Stage.COMMIT, Stage.ADVERTISE)
        committed = len(self._commitments)
        holders = min(self.params.neighbours, committed - 1) + 1
        if committed < 2 or holders < self.params.threshold:
            self._abort(
                f"secure aggregation round {self.round} abandoned at {Step.COMMIT.label}: {committed} sites "
                f"committed, too few for the threshold t = {self.params.threshold}; nothing was revealed"
            )
        self._digest = session.commitments_digest(self.nonce, self.round, self._commitments)
        message = CommitmentBroadcast(sender=SERVER, round=self.round, digest=self._digest)
        return dict.fromkeys(sorted(self._commitments), message)

    # Step 2.

    def collect_advertise(self, sender: str, message: AdvertiseKeys) -> None:
        self._accept(
            sender, message, AdvertiseKeys, Stage.ADVERTISE, self._advertised, set(self._commitments)
        )
        if (
            session.commitment(self.nonce, self.round, sender, message.contribution)
            != self._commitments[sender]
        ):
            raise MessageError(
                f"site {sender!r} revealed a session contribution that does not match its commitment", sender
            )
        if self.params.authenticated:
            assert self.registry is not None
            identity = self.registry.get(sender)
            statement = keys.key_statement(
                self.nonce,
                self.round,
                self._digest,
                sender,
                message.cipher_key,
                message.mask_key,
                message.contribution,
            )
            try:
                if identity is None:
                    raise InvalidSignature
                keys.verify(identity, message.signature, statement)
            except (InvalidSignature, ValueError):
                raise MessageError(
                    f"the keys of site {sender!r} do not carry the signature of its registered identity",
                    sender,
                ) from None
        if (
            message.cipher_key == message.mask_key
            or {message.cipher_key, message.mask_key} & self._keys_in_use
        ):
            raise MessageError(f"site {sender!r} advertised a public key that is already in use", sender)
        try:
            keys.check_public(message.cipher_key)
            keys.check_public(message.mask_key)
        except ValueError:
            raise MessageError(f"site {sender!r} advertised an invalid X25519 public key", sender) from None
        self._advertised[sender] = message
        self._keys_in_use |= {message.cipher_key, message.mask_key}

    def broadcast_keys(self) -> dict[str, KeyBroadcast]:
        """End step 2: fix the session value and the graph from every revealed contribution; each site gets
        all the contributions and its neighbours' keys. Every committed site must have revealed."""
        self._close(Stage.ADVERTISE, Stage.SHARE)
        missing = sorted(set(self._commitments) - set(self._advertised))
        if missing:
            listed = ", ".join(repr(s) for s in missing[:5]) + (" and more" if len(missing) > 5 else "")
            self._abort(
                f"secure aggregation round {self.round} abandoned at {Step.ADVERTISE_KEYS.label}: {listed} "
                "committed to a session contribution but did not reveal it, and leaving a site out after the "
                "reveals would let the server choose among session values; nothing was revealed, start a new "
                "attempt"
            )
        contributions = {s: m.contribution for s, m in self._advertised.items()}
        self.session = session.derive_session(self.nonce, self.round, self._digest, contributions)
        self.graph = neighbour_graph(sorted(contributions), self.params.neighbours, self.session)
        alive = set(self._advertised)
        self._require(Step.ADVERTISE_KEYS, alive, set(), alive)
        revealed = tuple(sorted(contributions.items()))
        entries = {
            v: AdvertisedKeys(v, m.cipher_key, m.mask_key, m.signature) for v, m in self._advertised.items()
        }
        out = {}
        for u in sorted(alive):
            neighbours = tuple(entries[v] for v in sorted(self.graph[u]))
            out[u] = KeyBroadcast(sender=SERVER, round=self.round, contributions=revealed, keys=neighbours)
        return out

    # Step 3.

    def collect_shares(self, sender: str, message: ShareKeys) -> None:
        self._accept(sender, message, ShareKeys, Stage.SHARE, self._ciphertexts, set(self._advertised))
        receivers = distinct([v for v, _ in message.shares], f"the shares of site {sender!r}", sender)
        expected = set(self.graph[sender])
        if receivers != expected:
            raise MessageError(
                f"site {sender!r} sent shares for {sorted(receivers)}; its neighbours in this round are "
                f"{sorted(expected)}",
                sender,
            )
        for v, sealed in message.shares:
            if len(sealed) != SHARE_CIPHERTEXT_BYTES:
                raise MessageError(
                    f"site {sender!r} sent {len(sealed)} bytes of shares for {v!r}, not "
                    f"{SHARE_CIPHERTEXT_BYTES}",
                    sender,
                )
        self._ciphertexts[sender] = dict(message.shares)

    def forward_shares(self) -> dict[str, ShareBroadcast]:
        """End step 3: each site that shared gets the shares its sharing neighbours encrypted for it."""
        self._close(Stage.SHARE, Stage.MASK)
        self._shared = set(self._ciphertexts)
        alive = self._shared
        self._require(Step.SHARE_KEYS, alive, set(), alive)
        out = {}
        for v in sorted(alive):
            forwarded = tuple((u, self._ciphertexts[u][v]) for u in sorted(self.graph[v] & alive))
            out[v] = ShareBroadcast(sender=SERVER, round=self.round, shares=forwarded)
        self._ciphertexts = {}
        return out

    # Step 4.

    def collect_masked_input(self, sender: str, message: MaskedInput) -> None:
        self._accept(sender, message, MaskedInput, Stage.MASK, self._masked, self._shared)
        vector = message.vector
        if vector.ndim != 1 or vector.size != self.vector_size:
            raise MessageError(
                f"site {sender!r} sent a masked vector of {vector.size} values; this round's vectors have "
                f"{self.vector_size}",
                sender,
            )
        if vector.dtype.kind != "u" or vector.dtype.itemsize != self.fixed_point.dtype.itemsize:
            raise MessageError(
                f"site {sender!r} sent a masked vector of {vector.dtype}; this round's are "
                f"{self.fixed_point.dtype.itemsize * 8}-bit unsigned integers",
                sender,
            )
        if message.width != self.fixed_point.modulus_bits:
            raise MessageError(
                f"site {sender!r} sent its masked vector packed at {message.width} bits per value; this "
                f"round's ring Z_(2^b) has b = {self.fixed_point.modulus_bits}",
                sender,
            )
        # The sum grows as inputs arrive: the server holds one vector, however many sites report.
        if self._total is None:
            self._total = np.zeros(self.vector_size, dtype=self.fixed_point.dtype.newbyteorder("="))
        np.add(self._total, vector, out=self._total)
        self._masked.add(sender)

    def request_consistency(self) -> dict[str, ConsistencyRequest]:
        """End step 4: send every site whose input arrived the survivor set, for it to sign."""
        self._close(Stage.MASK, Stage.CONSISTENCY)
        survivors = self._masked
        self._require(Step.MASKED_INPUT, survivors, self._shared - survivors, survivors)
        self._survivors = tuple(sorted(survivors))
        message = ConsistencyRequest(sender=SERVER, round=self.round, survivors=self._survivors)
        return dict.fromkeys(self._survivors, message)

    # Step 5.

    def collect_consistency(self, sender: str, message: ConsistencyResponse) -> None:
        self._accept(
            sender, message, ConsistencyResponse, Stage.CONSISTENCY, self._signatures, set(self._survivors)
        )
        if self.params.authenticated:
            assert self.registry is not None and self.session is not None
            statement = keys.consistency_statement(self.session, self.round, self._survivors)
            try:
                keys.verify(self.registry[sender], message.signature, statement)
            except (InvalidSignature, ValueError, KeyError):
                raise MessageError(
                    f"site {sender!r} did not sign the survivor set with its registered identity", sender
                ) from None
        self._signatures[sender] = message.signature

    def request_unmasking(self) -> dict[str, UnmaskRequest]:
        """End step 5: ask each site that signed the survivor set for the shares that remove the masks,
        showing it the signatures of its neighbourhood."""
        if self._stage is Stage.MASK:
            raise MessageError(
                "the server must run the consistency step (request_consistency, then collect every "
                "ConsistencyResponse) before it asks for unmasking",
                SERVER,
            )
        self._close(Stage.CONSISTENCY, Stage.UNMASK)
        survivors = set(self._survivors)
        signers = set(self._signatures)
        self._require(Step.CONSISTENCY, survivors, self._shared - survivors, signers)
        out = {}
        for v in sorted(signers):
            shown = tuple((u, self._signatures[u]) for u in sorted((self.graph[v] | {v}) & signers))
            out[v] = UnmaskRequest(
                sender=SERVER,
                round=self.round,
                survivors=self._survivors,
                signatures=shown if self.params.authenticated else (),
            )
        self._requested = signers
        return out

    # Step 6.

    def collect_unmask(self, sender: str, message: UnmaskResponse) -> None:
        self._accept(sender, message, UnmaskResponse, Stage.UNMASK, self._answered, self._requested)
        held = self.graph[sender] & self._shared
        survivors = set(self._survivors)
        parsed: list[dict[str, np.ndarray]] = []
        for shares, asked, what in (
            (message.self_mask_shares, (held | {sender}) & survivors, "self-mask"),
            (message.mask_key_shares, held - survivors, "mask-key"),
        ):
            names = [v for v, _ in shares]
            if len(set(names)) != len(names) or set(names) != asked:
                raise MessageError(
                    f"site {sender!r} sent {what} shares for {sorted(names)}; the survivor set calls for "
                    f"{sorted(asked)}",
                    sender,
                )
            try:
                parsed.append({v: shamir.share_from_bytes(data, SECRET_BYTES) for v, data in shares})
            except ValueError as e:
                raise MessageError(f"site {sender!r} sent a malformed {what} share: {e}", sender) from None
        for v, share in parsed[0].items():
            self._self_shares.setdefault(v, {})[sender] = share
        for v, share in parsed[1].items():
            self._key_shares.setdefault(v, {})[sender] = share
        self._answered.add(sender)

    def finish(self) -> SecAggResult:
        """End step 6: reconstruct what is needed, remove every mask, check the sum's range, return it."""
        self._close(Stage.UNMASK, Stage.DONE)
        survivors = set(self._survivors)
        dropped = self._shared - survivors
        self._require(Step.UNMASKING, survivors, dropped, self._answered)
        assert self._total is not None
        t = self.params.threshold
        seeds: list[bytes] = []
        signs: list[int] = []
        for u in sorted(survivors):
            seeds.append(self._reconstruct(u, self._self_shares[u], t))
            signs.append(-1)
        for u in sorted(dropped):
            partners = sorted(self.graph[u] & survivors)
            if not partners:
                continue
            private = keys.private_from_bytes(self._reconstruct(u, self._key_shares[u], t))
            if keys.public_bytes(private) != self._advertised[u].mask_key:
                self._abort(
                    f"the mask key of dropped site {u!r}, rebuilt from its neighbours' shares, does not "
                    "match the key it advertised: a share holder sent a wrong share"
                )
            for v in partners:
                assert self.session is not None
                shared = keys.agree(private, self._advertised[v].mask_key)
                seeds.append(mask_seed(shared, self.session, self.round, u, v))
                # v added sign(v, u) * PRG(s_uv); take it away.
                signs.append(-1 if self._index[v] < self._index[u] else 1)
        total = self._total
        prg.add_masks(total, seeds, signs)
        total &= total.dtype.type(self.fixed_point.mask)
        self._total = None
        self._check_range(total, len(survivors))
        return SecAggResult(
            vector=self.fixed_point.decode(total),
            encoded_sum=total,
            survivors=self._survivors,
            dropped=tuple(sorted(set(self.sites) - survivors)),
        )

    # Checks.

    def _check_range(self, total: np.ndarray, survivors: int) -> None:
        """Refuse a sum that |S| clipped updates cannot add up to: |sum| <= |S| M on every coordinate, with
        M the largest encoded magnitude. A site that sends anything but a masked, clipped update (a
        coordinate of 2^(b-2), say) makes the sum leave that range or wrap around Z_(2^b), and the round is
        refused instead of yielding a wrong sum."""
        bound = survivors * self.fixed_point.max_magnitude
        values = self.fixed_point.signed(total)
        outside = (values > bound) | (values < -bound)
        count = int(np.count_nonzero(outside))
        if count:
            first = int(np.flatnonzero(outside)[0])
            self._stage = Stage.FAILED
            raise SumOutOfRange(
                f"secure aggregation round {self.round} refused: the unmasked sum lies outside "
                f"[-{survivors} R, {survivors} R] on {count} of {total.size} coordinates (the first at index "
                f"{first}), which the {survivors} surviving sites' clipped updates cannot add up to: a site "
                "sent a malformed or hostile masked input; the sum is discarded",
                count,
            )

    def _accept(
        self,
        sender: str,
        message: Message,
        expected: type[Message],
        stage: Stage,
        done: Iterable[str],
        eligible: set[str],
    ) -> None:
        if self._stage is Stage.FAILED:
            raise SecAggAbort(f"round {self.round} was abandoned; no further messages are taken")
        who = f"site {sender!r}"
        if sender not in self._index:
            raise MessageError(
                f"a message came from {sender!r}, which is not a site of round {self.round}", sender
            )
        step = STEP[stage]
        if self._stage is not stage:
            raise MessageError(
                f"{who} sent a {type(message).__name__} for {step.label}, but the round is at the "
                f"{self._stage.value} stage (out of order or too late)",
                sender,
            )
        check_envelope(sender, message, expected, self.round, step, who)
        if sender in done:
            raise MessageError(
                f"{who} already sent its message for {step.label}; a second one is refused", sender
            )
        if sender not in eligible:
            raise MessageError(f"{who} dropped out before {step.label}, so it cannot take part in it", sender)

    def _close(self, stage: Stage, following: Stage) -> None:
        if self._stage is Stage.FAILED:
            raise SecAggAbort(f"round {self.round} was abandoned")
        if self._stage is not stage:
            raise MessageError(
                f"the server is at the {self._stage.value} stage; it cannot close the {stage.value} step",
                SERVER,
            )
        self._stage = following

    def _require(self, step: Step, survivors: set[str], dropped: set[str], answering: set[str]) -> None:
        """Abandon the round unless every site that must be unmasked keeps t holders of its shares among
        ``answering``: each survivor among its neighbours and itself, each dropped site with surviving
        neighbours among its neighbours."""
        t = self.params.threshold
        if not survivors:
            self._abort(
                f"secure aggregation round {self.round} abandoned at {step.label}: no site is left in it; "
                "nothing was revealed"
            )
        short = []
        for u in sorted(survivors):
            holders = len((self.graph[u] | {u}) & answering)
            if holders < t:
                short.append(f"{u!r} ({holders} of {len(self.graph[u]) + 1})")
        for u in sorted(dropped):
            if self.graph[u] & survivors:
                holders = len(self.graph[u] & answering)
                if holders < t:
                    short.append(f"dropped {u!r} ({holders} of {len(self.graph[u])})")
        if short:
            listed = ", ".join(short[:5]) + (f" and {len(short) - 5} more" if len(short) > 5 else "")
            self._abort(
                f"secure aggregation round {self.round} abandoned at {step.label}: fewer than the threshold "
                f"t = {t} holders of the shares of {listed} are still in the round, so the sum cannot be "
                "unmasked; nothing was revealed. Fewer sites must drop out, or raise neighbours or lower "
                "threshold (it must stay above half of neighbours + 1)"
            )

    def _abort(self, reason: str) -> None:
        self._stage = Stage.FAILED
        self._total = None
        self._self_shares.clear()
        self._key_shares.clear()
        raise SecAggAbort(reason)

    def _reconstruct(self, site: str, shares: Mapping[str, np.ndarray], threshold: int) -> bytes:
        holders = sorted(shares, key=self._index.__getitem__)[:threshold]
        try:
            return shamir.reconstruct(
                [self._index[h] for h in holders], np.stack([shares[h] for h in holders]), SECRET_BYTES
            )
        except ValueError as e:
            self._abort(
                f"the shares of site {site!r} are inconsistent ({e}): a share holder sent a wrong share"
            )
            raise AssertionError("unreachable") from None
