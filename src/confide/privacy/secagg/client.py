"""One site's side of a round of secure aggregation (the threat model is in :mod:`.protocol`).

Over ~400 lines because a site's checks are the protection against a malicious server, and they read best
beside the steps they guard.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from confide.errors import ConfigError, UpdateError
from confide.privacy.secagg import keys, prg, session, shamir
from confide.privacy.secagg.common import (
    NEXT,
    SECRET_BYTES,
    SHARE_BYTES,
    SHARE_PLAINTEXT_BYTES,
    STEP,
    Stage,
    check_envelope,
    check_site_ids,
    distinct,
    mask_seed,
    params_of,
    share_associated_data,
    share_key,
)
from confide.privacy.secagg.errors import MessageError, SecAggAbort, UnmaskRefused
from confide.privacy.secagg.graph import neighbour_graph
from confide.privacy.secagg.history import MemorySurvivorStore, SurvivorStore
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
    UnmaskRequest,
    UnmaskResponse,
)
from confide.privacy.secagg.params import SecAggExpectation, SecAggParams
from confide.randomness import SecretRandomness


class SecAggClient:
    """One site's side of a round: ``commit`` → ``advertise_keys`` → ``share_keys`` → ``masked_input`` →
    ``confirm_survivors`` → ``unmask``.

    Each method after ``commit`` takes the server's message of that step (with the sender the transport
    authenticated) and returns the site's answer. A refused message raises MessageError (UnmaskRefused for a
    request that could reveal an input, SecAggAbort when the round cannot succeed) and the site takes no
    further part in the round.
    """

    def __init__(
        self,
        site: str,
        sender: str,
        setup: Setup,
        *,
        expect: SecAggExpectation,
        identity: Ed25519PrivateKey | None = None,
        registry: Mapping[str, bytes] | None = None,
        store: SurvivorStore | None = None,
        expected_round: int | None = None,
    ) -> None:
        """``expect``: what the site's own configuration says the round must be; any other Setup is refused.
        ``identity`` and ``registry`` (site -> Ed25519 public key, from a source the site trusts, never from
        the server) switch on authentication; a site that has them refuses an unauthenticated round, so the
        server cannot downgrade it. ``store`` remembers the survivor set the site agreed to per (run, round)
        across attempts and restarts (a deployed site passes its durable one; default: this client only)."""
        self.site = site
        if sender != SERVER:
            raise MessageError(f"a round setup came from {sender!r}, not from the server", sender)
        check_envelope(sender, setup, Setup, setup.round, STEP[Stage.COMMIT], "the server")
        if expected_round is not None and setup.round != expected_round:
            raise MessageError(
                f"the server set up round {setup.round}, but this site expects round {expected_round}", sender
            )
        if tuple(sorted(set(setup.sites))) != setup.sites or site not in setup.sites:
            raise MessageError(
                f"the setup's site list must be sorted, without repeats, and include this site {site!r}",
                sender,
            )
        try:
            check_site_ids(setup.sites)
            self.params = params_of(setup)
        except ConfigError as e:
            raise MessageError(f"refusing the round's setup: {e}", sender) from None
        _check_authentication(setup, identity, registry)
        _check_expectation(setup, self.params, expect)
        self.setup = setup
        self.expect = expect
        self.round = setup.round
        self.nonce = setup.nonce
        self.session: bytes | None = None
        """The jointly drawn session value, known from step 3 on."""
        self.neighbours: frozenset[str] = frozenset()
        """This site's neighbours in the graph the session value gives, known from step 3 on."""
        self.fixed_point = self.params.fixed_point
        self._index = {s: i + 1 for i, s in enumerate(setup.sites)}
        self._identity = identity
        self._registry = registry
        self._store: SurvivorStore = store if store is not None else MemorySurvivorStore()
        self._stage = Stage.COMMIT
        self._contribution = os.urandom(session.CONTRIBUTION_BYTES)
        self._digest = b""
        self._contributions: dict[str, bytes] = {}
        self._cipher_key = keys.generate()
        self._mask_key: X25519PrivateKey | None = keys.generate()
        self._peers: dict[str, AdvertisedKeys] = {}
        self._cipher_shared: dict[str, bytes] = {}
        self._mask_seeds: dict[str, bytes] = {}
        self._self_seed = b""
        self._own_shares: tuple[np.ndarray, np.ndarray] | None = None
        self._held: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._survivors: tuple[str, ...] | None = None
        self.clipped = 0
        """How many coordinates of this site's update lay outside [-R, R] and were clipped."""

    # The six steps.

    def commit(self) -> Commitment:
        """Step 1: a commitment to this site's fresh share of the session randomness."""
        if self._stage is not Stage.COMMIT:
            raise MessageError(
                f"site {self.site!r} already committed for round {self.round} (now at the "
                f"{self._stage.value} stage)",
                SERVER,
            )
        self._stage = Stage.ADVERTISE
        value = session.commitment(self.nonce, self.round, self.site, self._contribution)
        return Commitment(sender=self.site, round=self.round, commitment=value)

    def advertise_keys(self, sender: str, broadcast: CommitmentBroadcast) -> AdvertiseKeys:
        """Step 2: now that every commitment is fixed (in the digest), this round's two public keys and the
        revealed contribution (signed, with the digest, in the authenticated mode)."""
        self._receive(sender, broadcast, CommitmentBroadcast, Stage.ADVERTISE)
        self._digest = broadcast.digest
        cipher_key = keys.public_bytes(self._cipher_key)
        mask_key = keys.public_bytes(self._mask_private())
        signature = b""
        if self._identity is not None:
            statement = keys.key_statement(
                self.nonce, self.round, self._digest, self.site, cipher_key, mask_key, self._contribution
            )
            signature = keys.sign(self._identity, statement)
        return AdvertiseKeys(
            sender=self.site,
            round=self.round,
            cipher_key=cipher_key,
            mask_key=mask_key,
            contribution=self._contribution,
            signature=signature,
        )

    def share_keys(self, sender: str, broadcast: KeyBroadcast) -> ShareKeys:
        """Step 3: derive the session value and the graph from every revealed contribution, check the
        neighbours' keys, share our secrets among them, and send each its shares."""
        self._receive(sender, broadcast, KeyBroadcast, Stage.SHARE)
        try:
            self._derive_session(sender, broadcast.contributions)
            peers = self._check_peers(sender, broadcast.keys)
            cipher_shared, mask_seeds = self._agree(sender, peers)
            holders = [*sorted(peers), self.site]
            points = [self._index[h] for h in holders]
            self._self_seed = os.urandom(prg.SEED_BYTES)
            key_shares = shamir.split(keys.private_bytes(self._mask_private()), points, self.params.threshold)
            seed_shares = shamir.split(self._self_seed, points, self.params.threshold)
        except (MessageError, SecAggAbort):
            self._stage = Stage.FAILED
            raise
        assert self.session is not None
        ciphertexts = []
        for row, v in enumerate(holders[:-1]):
            plaintext = shamir.share_to_bytes(key_shares[row]) + shamir.share_to_bytes(seed_shares[row])
            key = share_key(cipher_shared[v], self.session, self.round, self.site, v)
            associated = share_associated_data(self.session, self.round, self.site, v)
            ciphertexts.append((v, keys.seal(key, plaintext, associated)))
        self._own_shares = (key_shares[-1], seed_shares[-1])
        self._peers, self._cipher_shared, self._mask_seeds = peers, cipher_shared, mask_seeds
        # The mask private key is needed no more: its shares and the pairwise seeds stand in for it.
        self._mask_key = None
        return ShareKeys(sender=self.site, round=self.round, shares=tuple(ciphertexts))

    def masked_input(
        self, sender: str, forwarded: ShareBroadcast, vector: np.ndarray, dither: np.ndarray | None = None
    ) -> MaskedInput:
        """Step 4: keep the neighbours' shares, and send the update masked with the self mask and the
        pairwise masks of every neighbour that shared, packed at b bits per value.

        ``dither``: under quantization, the u of each coordinate's stochastic rounding, from the site's
        secret randomness (default: drawn here from the OS); 1/2 rounds a coordinate to nearest, which carries
        a value on the grid exactly. Refused under the fixed point, which rounds to nearest."""
        if not isinstance(vector, np.ndarray) or vector.dtype != np.float32 or vector.ndim != 1:
            raise UpdateError(f"secure aggregation masks a flat float32 vector, got {_describe(vector)}")
        if vector.size != self.setup.vector_size:
            raise UpdateError(
                f"this round aggregates vectors of {self.setup.vector_size} values; the update has "
                f"{vector.size}"
            )
        if not np.isfinite(vector).all():
            raise UpdateError(
                f"the update of site {self.site!r} holds NaN or infinite values; they have no fixed-point "
                "value (and after masking nobody could see them)"
            )
        dither = self._dither(vector, dither)
        self._receive(sender, forwarded, ShareBroadcast, Stage.MASK)
        try:
            held = self._open_shares(sender, forwarded.shares)
        except (MessageError, SecAggAbort):
            self._stage = Stage.FAILED
            raise
        self._held = held
        self.clipped = int(np.count_nonzero(np.abs(vector) > self.params.clip_range))
        masked = self.fixed_point.encode(vector, dither)
        partners = sorted(held)
        prg.add_masks(
            masked,
            [self._self_seed] + [self._mask_seeds[v] for v in partners],
            [1] + [self._sign(v) for v in partners],
        )
        masked &= masked.dtype.type(self.fixed_point.mask)
        return MaskedInput(
            sender=self.site, round=self.round, vector=masked, bits=self.fixed_point.modulus_bits
        )

    def _dither(self, vector: np.ndarray, dither: np.ndarray | None) -> np.ndarray | None:
        if not self.fixed_point.quantized:
            if dither is not None:
                raise UpdateError("this round encodes in fixed point, which takes no dither")
            return None
        if dither is None:
            return SecretRandomness().uniform(vector.size)
        if dither.shape != vector.shape or not ((dither >= 0) & (dither < 1)).all():
            raise UpdateError(
                f"the dither of a quantized update is one value in [0, 1) per coordinate ({vector.size}), "
                f"got {_describe(dither)}"
            )
        return dither

    def confirm_survivors(self, sender: str, request: ConsistencyRequest) -> ConsistencyResponse:
        """Step 5 (the consistency check of Bonawitz et al. 2017): agree to one survivor set for this round,
        and sign it in the authenticated mode. The site will reveal shares for this set only, and refuses any
        other set for this round of this run, now or in a later attempt."""
        self._receive(sender, request, ConsistencyRequest, Stage.CONSISTENCY)
        try:
            survivors = self._check_survivors(sender, request.survivors)
            self._remember(sender, survivors)
        except MessageError:
            self._stage = Stage.FAILED
            raise
        self._survivors = survivors
        signature = b""
        if self._identity is not None:
            assert self.session is not None
            signature = keys.sign(
                self._identity, keys.consistency_statement(self.session, self.round, survivors)
            )
        return ConsistencyResponse(sender=self.site, round=self.round, signature=signature)

    def unmask(self, sender: str, request: UnmaskRequest) -> UnmaskResponse:
        """Step 6: for the survivor set this site agreed to, and only with t signatures over it from its
        neighbourhood, the self-mask shares of its surviving neighbours (and its own) and the mask-key
        shares of its neighbours that dropped after sharing."""
        self._receive(sender, request, UnmaskRequest, Stage.UNMASK)
        try:
            self._check_unmask_request(sender, request)
        except MessageError:
            self._stage = Stage.FAILED
            raise
        assert self._own_shares is not None and self._survivors is not None
        survivors = set(self._survivors)
        self_shares = [(self.site, shamir.share_to_bytes(self._own_shares[1]))]
        self_shares += [(v, shamir.share_to_bytes(self._held[v][1])) for v in self._held if v in survivors]
        key_shares = [(v, shamir.share_to_bytes(self._held[v][0])) for v in self._held if v not in survivors]
        self._stage = Stage.DONE
        return UnmaskResponse(
            sender=self.site,
            round=self.round,
            self_mask_shares=tuple(sorted(self_shares)),
            mask_key_shares=tuple(sorted(key_shares)),
        )

    # Checks.

    def _mask_private(self) -> X25519PrivateKey:
        assert self._mask_key is not None, "the mask key is dropped once it is shared"
        return self._mask_key

    def _receive(self, sender: str, message: Message, expected: type[Message], stage: Stage) -> None:
        """Envelope checks; the stage moves on only once they pass (the content is checked after)."""
        if sender != SERVER:
            raise MessageError(f"site {self.site!r} got a server message from {sender!r}; refused", sender)
        if self._stage is not stage:
            raise MessageError(
                f"site {self.site!r} got a {type(message).__name__} while at the {self._stage.value} stage "
                "(out of order or replayed)",
                sender,
            )
        check_envelope(sender, message, expected, self.round, STEP[stage], "the server")
        self._stage = NEXT[stage]

    def _derive_session(self, sender: str, revealed: Sequence[tuple[str, bytes]]) -> None:
        """Check every revealed contribution against the commitment digest this site saw before it revealed
        its own, then compute the session value and the graph here, not taking them from the server."""
        contributions = dict(revealed)
        names = distinct([s for s, _ in revealed], "the revealed contributions", sender)
        if not names <= set(self.setup.sites):
            raise MessageError(
                f"the key broadcast reveals contributions of {sorted(names - set(self.setup.sites))}, which "
                "are not sites of this round",
                sender,
            )
        if contributions.get(self.site) != self._contribution:
            raise MessageError(
                f"the key broadcast does not carry site {self.site!r}'s own session contribution; refusing "
                "(the server would choose the session value)",
                sender,
            )
        if len(names) < self.expect.min_sites:
            raise MessageError(
                f"only {len(names)} sites are left in round {self.round}, fewer than the "
                f"{self.expect.min_sites} this site's configuration requires",
                sender,
            )
        commitments = {s: session.commitment(self.nonce, self.round, s, c) for s, c in contributions.items()}
        if session.commitments_digest(self.nonce, self.round, commitments) != self._digest:
            raise MessageError(
                "the revealed contributions do not match the commitments whose digest the server sent before "
                "this site revealed its own: a contribution was changed or a site was left out after the "
                "reveal; refusing (that would let a party steer the neighbour graph)",
                sender,
            )
        self.session = session.derive_session(self.nonce, self.round, self._digest, contributions)
        self._contributions = contributions
        graph = neighbour_graph(sorted(names), self.params.neighbours, self.session)
        self.neighbours = graph[self.site]

    def _check_peers(self, sender: str, advertised: Sequence[AdvertisedKeys]) -> dict[str, AdvertisedKeys]:
        names = distinct([a.site for a in advertised], "the key broadcast", sender)
        if names != self.neighbours:
            raise MessageError(
                f"the key broadcast holds keys of {sorted(names)}, but the neighbours of {self.site!r} in "
                f"this round's graph are {sorted(self.neighbours)} (every committed site revealed its keys)",
                sender,
            )
        own = {keys.public_bytes(self._cipher_key), keys.public_bytes(self._mask_private())}
        seen = set(own)
        for a in advertised:
            if a.cipher_key in seen or a.mask_key in seen or a.cipher_key == a.mask_key:
                raise MessageError(
                    f"the key broadcast reuses a public key for site {a.site!r}; every key must be distinct",
                    sender,
                )
            seen |= {a.cipher_key, a.mask_key}
            if self._registry is not None:
                self._verify_keys(sender, a)
        if len(advertised) + 1 < self.params.threshold:
            raise SecAggAbort(
                f"round {self.round} cannot complete: site {self.site!r} has {len(advertised)} neighbours, "
                f"and unmasking it needs {self.params.threshold} holders of its shares (itself included)"
            )
        return {a.site: a for a in advertised}

    def _verify_keys(self, sender: str, advertised: AdvertisedKeys) -> None:
        assert self._registry is not None
        identity = self._registry.get(advertised.site)
        if identity is None:
            raise MessageError(f"site {advertised.site!r} has no identity in this site's registry", sender)
        statement = keys.key_statement(
            self.nonce,
            self.round,
            self._digest,
            advertised.site,
            advertised.cipher_key,
            advertised.mask_key,
            self._contributions[advertised.site],
        )
        try:
            keys.verify(identity, advertised.signature, statement)
        except (InvalidSignature, ValueError):
            raise MessageError(
                f"the keys advertised for site {advertised.site!r} do not carry its signature for this "
                "round: they were substituted (by the server or on the way); refusing the round",
                sender,
            ) from None

    def _agree(
        self, sender: str, peers: Mapping[str, AdvertisedKeys]
    ) -> tuple[dict[str, bytes], dict[str, bytes]]:
        assert self.session is not None
        cipher_shared: dict[str, bytes] = {}
        mask_seeds: dict[str, bytes] = {}
        for v, advertised in peers.items():
            try:
                cipher_shared[v] = keys.agree(self._cipher_key, advertised.cipher_key)
                mask_shared = keys.agree(self._mask_private(), advertised.mask_key)
            except ValueError:
                raise MessageError(f"site {v!r} advertised an invalid X25519 public key", sender) from None
            mask_seeds[v] = mask_seed(mask_shared, self.session, self.round, self.site, v)
        return cipher_shared, mask_seeds

    def _open_shares(
        self, sender: str, forwarded: Sequence[tuple[str, bytes]]
    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        assert self.session is not None
        names = distinct([v for v, _ in forwarded], "the forwarded shares", sender)
        strangers = names - set(self._peers)
        if strangers:
            raise MessageError(
                f"shares were forwarded from {sorted(strangers)}, whose keys site {self.site!r} never "
                "received",
                sender,
            )
        held = {}
        for v, sealed in forwarded:
            key = share_key(self._cipher_shared[v], self.session, self.round, v, self.site)
            try:
                plaintext = keys.unseal(
                    key, sealed, share_associated_data(self.session, self.round, v, self.site)
                )
            except InvalidTag:
                raise MessageError(
                    f"the shares from site {v!r} failed authentication (AES-GCM tag): they were altered on "
                    f"the way or not encrypted for site {self.site!r} in this round; refusing",
                    sender,
                ) from None
            if len(plaintext) != SHARE_PLAINTEXT_BYTES:
                raise MessageError(
                    f"the shares from site {v!r} hold {len(plaintext)} bytes, not {SHARE_PLAINTEXT_BYTES}",
                    sender,
                )
            try:
                held[v] = (
                    shamir.share_from_bytes(plaintext[:SHARE_BYTES], SECRET_BYTES),
                    shamir.share_from_bytes(plaintext[SHARE_BYTES:], SECRET_BYTES),
                )
            except ValueError as e:
                raise MessageError(f"the shares from site {v!r} are malformed: {e}", sender) from None
        if len(held) + 1 < self.params.threshold:
            raise SecAggAbort(
                f"round {self.round} cannot complete: only {len(held)} neighbours of site {self.site!r} sent "
                f"their shares, and unmasking needs {self.params.threshold} holders (itself included)"
            )
        return held

    def _check_survivors(self, sender: str, listed: tuple[str, ...]) -> tuple[str, ...]:
        survivors = distinct(listed, "the survivor set", sender)
        if tuple(sorted(survivors)) != listed:
            raise MessageError("the survivor set must be sorted", sender)
        if self.site not in survivors:
            raise UnmaskRefused(
                f"site {self.site!r} refuses the survivor set: it does not count this site, whose masked "
                "input was sent",
                sender,
            )
        strangers = survivors - set(self._contributions)
        if strangers:
            raise MessageError(f"the survivor set names {sorted(strangers)}, not sites of this round", sender)
        unknown = (survivors & self.neighbours) - set(self._held)
        if unknown:
            raise MessageError(
                f"the survivor set counts neighbours {sorted(unknown)}, whose shares site {self.site!r} "
                "never received, so their masked inputs cannot be in the sum",
                sender,
            )
        holders = len(survivors & (set(self._held) | {self.site}))
        if holders < self.params.threshold:
            raise UnmaskRefused(
                f"site {self.site!r} refuses to unmask: only {holders} of its neighbourhood are said to "
                f"survive, fewer than the threshold {self.params.threshold}, so the sum cannot be unmasked "
                "and answering would only hand out shares",
                sender,
            )
        if len(survivors) < self.expect.min_sites:
            raise UnmaskRefused(
                f"site {self.site!r} refuses to unmask a sum of {len(survivors)} inputs; this site's "
                f"configuration requires at least {self.expect.min_sites}",
                sender,
            )
        return listed

    def _remember(self, sender: str, survivors: tuple[str, ...]) -> None:
        """Agree to ``survivors`` for this round of the run, unless another set was agreed to before."""
        run = self.expect.run
        if self._store.get(run, self.round) is None:
            self._store.put(run, self.round, survivors)
        agreed = self._store.get(run, self.round)
        if agreed != survivors:
            extra = sorted(set(agreed or ()) ^ set(survivors))
            raise UnmaskRefused(
                f"site {self.site!r} refuses to unmask round {self.round} of run {run!r} a second time over "
                f"a different survivor set (the sets differ in {extra}): the difference of the two sums "
                "would reveal those sites' inputs",
                sender,
            )

    def _check_unmask_request(self, sender: str, request: UnmaskRequest) -> None:
        assert self._survivors is not None and self.session is not None
        if request.survivors != self._survivors:
            raise UnmaskRefused(
                f"site {self.site!r} refuses to unmask: the request's survivor set is not the one this site "
                "agreed to in the consistency step",
                sender,
            )
        if self._store.get(self.expect.run, self.round) != self._survivors:
            raise UnmaskRefused(
                f"site {self.site!r} refuses to unmask: it has agreed to another survivor set for round "
                f"{self.round} since",
                sender,
            )
        if self._registry is None:
            if request.signatures:
                raise MessageError("an unauthenticated round's unmasking request carries signatures", sender)
            return
        signers = distinct([s for s, _ in request.signatures], "the request's signatures", sender)
        neighbourhood = (self.neighbours | {self.site}) & set(self._survivors)
        if not signers <= neighbourhood:
            raise MessageError(
                f"the request carries signatures of {sorted(signers - neighbourhood)}, which are not "
                f"surviving neighbours of {self.site!r}",
                sender,
            )
        statement = keys.consistency_statement(self.session, self.round, self._survivors)
        for signer, signature in request.signatures:
            try:
                keys.verify(self._registry[signer], signature, statement)
            except (InvalidSignature, ValueError, KeyError):
                raise MessageError(
                    f"the signature of {signer!r} on the survivor set does not verify against its "
                    "registered identity: the server showed sites different sets, or forged it; refusing",
                    sender,
                ) from None
        if len(signers) < self.params.threshold:
            raise UnmaskRefused(
                f"site {self.site!r} refuses to unmask: only {len(signers)} of its neighbourhood signed the "
                f"survivor set, fewer than the threshold {self.params.threshold}",
                sender,
            )

    def _sign(self, v: str) -> int:
        return 1 if self._index[self.site] < self._index[v] else -1


def _check_expectation(setup: Setup, params: SecAggParams, expect: SecAggExpectation) -> None:
    """Refuse a Setup whose parameters are not the ones the site's own configuration gives."""
    if len(setup.sites) < expect.min_sites:
        raise MessageError(
            f"refusing the round's setup: it has {len(setup.sites)} sites, and this site's configuration "
            f"requires at least {expect.min_sites}",
            SERVER,
        )
    wanted = expect.params(len(setup.sites))
    proposed = {
        "clip range": params.clip_range,
        "fractional bits": params.fractional_bits,
        "neighbours": params.neighbours,
        "threshold": params.threshold,
        "authenticated": params.authenticated,
        "vector size": setup.vector_size,
        "quantization bits": params.quantize_bits,
        "rotation": params.rotated,
    }
    expected = {
        "clip range": wanted.clip_range,
        "fractional bits": wanted.fractional_bits,
        "neighbours": wanted.neighbours,
        "threshold": wanted.threshold,
        "authenticated": wanted.authenticated,
        "vector size": expect.vector_size,
        "quantization bits": wanted.quantize_bits,
        "rotation": wanted.rotated,
    }
    for name, value in proposed.items():
        if value != expected[name]:
            raise MessageError(
                f"refusing the round's setup: the server proposed {name} {value!r} for {len(setup.sites)} "
                f"sites, but this site's configuration gives {expected[name]!r} (a server must not change "
                "the parameters that protect the sites)",
                SERVER,
            )


def _check_authentication(
    setup: Setup, identity: Ed25519PrivateKey | None, registry: Mapping[str, bytes] | None
) -> None:
    if registry is not None or identity is not None:
        if identity is None or registry is None:
            raise ConfigError(
                "authenticated secure aggregation needs both the site's identity and the registry"
            )
        if not setup.authenticated:
            raise MessageError(
                "the server proposed an unauthenticated round, but this site authenticates its keys; "
                "refusing (a downgrade would let the server substitute keys)",
                SERVER,
            )
    elif setup.authenticated:
        raise ConfigError(
            "this round is authenticated: give the site its Ed25519 identity and the registry of the "
            "sites' identity keys"
        )


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"an array of dtype {value.dtype} and shape {value.shape}"
    return type(value).__name__
