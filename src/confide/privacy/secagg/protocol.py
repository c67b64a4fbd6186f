"""Secure aggregation as two state machines: SecAggClient (one per site) and SecAggServer.

The protocol is Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning" (CCS
2017, Fig. 4), over the sparse neighbour graph of Bell et al. (CCS 2020, "SecAgg+"). Each site u

1. advertises two fresh X25519 public keys: c_u (to encrypt shares) and s_u (for masks);
2. draws a self-mask seed b_u, Shamir-shares b_u and its mask private key s_u with threshold t among its
   neighbours N(u) and itself, and sends each neighbour its shares, encrypted with AES-GCM under a key agreed
   from c_u and the neighbour's c_v;
3. sends y_u = x_u + PRG(b_u) + sum_{v in N(u) alive in step 2} sign(u, v) * PRG(s_uv) in Z_(2^b), where
   x_u is its fixed-point encoded update, s_uv the seed agreed from s_u and s_v, and sign(u, v) = +1 if u
   comes before v in the sorted site list and -1 otherwise, so that the pairwise masks cancel in the sum;
4. for each neighbour v, returns either its share of b_v (v's masked input arrived) or its share of s_v (v
   dropped after step 2), never both for the same v.

The server sums the y_u as they arrive, then removes PRG(b_u) for every survivor and, for every site that
dropped after sharing, the masks it had agreed with its surviving neighbours (from s_u, reconstructed). The
sum comes out exactly if each survivor, and each dropped site with surviving neighbours, has at least t
holders of its shares answering in step 4; otherwise the round is abandoned (SecAggAbort) before anything is
reconstructed.

Threat model. What each party can learn:

- The server learns the sum of the surviving sites' clipped, fixed-point updates, the list of who survived
  each step, and the message sizes; nothing about any one site's update beyond what that sum says. This
  holds for an honest-but-curious server colluding with fewer than t sites of any neighbourhood, with the
  surviving honest sites connected in the neighbour graph (so the sum cannot be split into smaller sums).
- A site learns its neighbours' public keys, and shares of their secrets that are useless below t; the
  masked vectors never reach the sites. A coalition of sites without the server learns nothing.
- A server that deviates: it cannot get both shares of one site from an honest holder (the holder refuses),
  nor make a site accept a threshold of half its neighbourhood or less (sites check the Setup; they do not
  compare Setups with each other, so a site that expects particular parameters should check them). By
  lying about who dropped to different holders it could collect b_u from some and s_u from others; that
  needs 2t <= (k + 1) + c with c holders colluding with it, which a majority threshold rules out for c = 0
  and a threshold of two thirds for c < (k + 1) / 3. Without the authenticated mode it can substitute keys
  (a man in the middle between sites) and so unmask anyone; the authenticated mode (Ed25519 signatures over
  the keys, checked against a registry of identities the sites trust) stops that. Not covered: the
  consistency-check round of Bonawitz et al. (step 3 of their active protocol), a server that chooses the
  public session value after seeing the sites (it could grind for a graph where a victim's neighbours are
  its sybils: derive the session from public randomness when that matters), and sites that send wrong
  shares or a wrong input (they can spoil the sum, as any site can with a bad update, but learn nothing).

Each party's methods take the sender as the transport authenticated it, separately from the message; a message
whose ``sender`` field disagrees is refused, as is one for another round or step, a second one from the same
party in a step, and anything malformed. Nothing here does I/O, reads a clock or keeps global state.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from confide.errors import ConfigError, UpdateError
from confide.privacy.secagg import keys, prg, shamir
from confide.privacy.secagg.errors import MessageError, SecAggAbort, UnmaskRefused
from confide.privacy.secagg.graph import neighbour_graph
from confide.privacy.secagg.messages import (
    MAX_TEXT_BYTES,
    SERVER,
    AdvertisedKeys,
    AdvertiseKeys,
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

SECRET_BYTES = 32
"""Both shared secrets are 32 bytes: the X25519 mask private key s_u and the self-mask seed b_u."""
SHARE_BYTES = shamir.share_bytes_for(SECRET_BYTES)
SHARE_PLAINTEXT_BYTES = 2 * SHARE_BYTES
SHARE_CIPHERTEXT_BYTES = keys.sealed_size(SHARE_PLAINTEXT_BYTES)


# --- what server and sites derive the same way --------------------------------------------------------------


def share_associated_data(session: bytes, round: int, sender: str, receiver: str) -> bytes:
    return keys.frame(keys.PROTOCOL, "share", session, round, sender, receiver)


def share_key(shared: bytes, session: bytes, round: int, sender: str, receiver: str) -> bytes:
    """The AES-GCM key for shares from ``sender`` to ``receiver`` (one per direction)."""
    return keys.derive(shared, "share encryption", (session, round, sender, receiver))


def mask_seed(shared: bytes, session: bytes, round: int, a: str, b: str) -> bytes:
    """The seed of the pairwise mask of sites a and b (the same from either side)."""
    first, second = sorted((a, b))
    return keys.derive(shared, "pairwise mask", (session, round, first, second))


def check_site_ids(sites: Iterable[str]) -> tuple[str, ...]:
    """The sites sorted, after checking that they can be named in messages."""
    ordered = tuple(sorted(sites))
    if len(set(ordered)) != len(ordered):
        raise ConfigError("the sites of a secure aggregation round must be distinct")
    for site in ordered:
        if not isinstance(site, str) or not 1 <= len(site.encode()) <= MAX_TEXT_BYTES or site == SERVER:
            raise ConfigError(
                f"site ids must be 1 to {MAX_TEXT_BYTES} bytes of text other than {SERVER!r} (got {site!r})"
            )
    return ordered


def params_of(setup: Setup) -> SecAggParams:
    """The parameters a Setup announces, checked as the server's own would be."""
    params = SecAggParams(
        sites=len(setup.sites),
        neighbours=setup.neighbours,
        threshold=setup.threshold,
        clip_range=setup.clip_range,
        fractional_bits=setup.fractional_bits,
        authenticated=setup.authenticated,
    )
    if (params.neighbours, params.threshold) != (setup.neighbours, setup.threshold):
        raise ConfigError(
            f"the setup announces {setup.neighbours} neighbours and threshold {setup.threshold}, which "
            f"resolve to {params.neighbours} and {params.threshold}"
        )
    return params


def _check_envelope(
    sender: str, message: Message, expected: type[Message], round: int, step: Step, who: str
) -> None:
    """The checks every receiver makes before it reads a message's content."""
    if message.sender != sender:
        raise MessageError(
            f"{who} sent a message that claims to come from {message.sender!r}; refused (a party may only "
            "speak for itself)",
            sender,
        )
    if message.round != round:
        raise MessageError(
            f"{who} sent a message for round {message.round}, but this is round {round} (a replay?)", sender
        )
    if not isinstance(message, expected):
        raise MessageError(
            f"{who} sent a {type(message).__name__} at {step.label}, where a {expected.__name__} is expected "
            "(out of order)",
            sender,
        )
    if message.step != step:
        raise MessageError(
            f"{who} sent a {type(message).__name__} marked {Step(message.step).label}, but the round is at "
            f"{step.label} (out of order or replayed)",
            sender,
        )


def _distinct(items: Sequence[str], what: str, sender: str) -> set[str]:
    unique = set(items)
    if len(unique) != len(items):
        raise MessageError(f"{what} names a site more than once", sender)
    return unique


@dataclass(frozen=True)
class SecAggResult:
    """What the server learns at the end of a round."""

    vector: np.ndarray
    """The sum of the surviving sites' updates (clipped to [-R, R] and rounded to multiples of 2^-f)."""
    encoded_sum: np.ndarray
    """The same sum in Z_(2^b), as the fixed-point integers add up."""
    survivors: tuple[str, ...]
    """The sites whose updates are in the sum."""
    dropped: tuple[str, ...]
    """The sites that started the round but are not in the sum."""


class _Stage(Enum):
    ADVERTISE = "advertise keys"
    SHARE = "share keys"
    MASK = "masked input"
    UNMASK = "unmasking"
    DONE = "done"
    FAILED = "failed"


_STEP = {
    _Stage.ADVERTISE: Step.ADVERTISE_KEYS,
    _Stage.SHARE: Step.SHARE_KEYS,
    _Stage.MASK: Step.MASKED_INPUT,
    _Stage.UNMASK: Step.UNMASKING,
}
_NEXT = {
    _Stage.ADVERTISE: _Stage.SHARE,
    _Stage.SHARE: _Stage.MASK,
    _Stage.MASK: _Stage.UNMASK,
    _Stage.UNMASK: _Stage.DONE,
}


# --- the site ---------------------------------------------------------------------------------------------


class SecAggClient:
    """One site's side of a round: ``advertise_keys`` → ``share_keys`` → ``masked_input`` → ``unmask``.

    Each method takes the server's message of that step (with the sender the transport authenticated) and
    returns the site's answer. A refused message raises MessageError (or SecAggAbort when the round cannot
    succeed) and the site takes no further part in the round.
    """

    def __init__(
        self,
        site: str,
        sender: str,
        setup: Setup,
        *,
        identity: Ed25519PrivateKey | None = None,
        registry: Mapping[str, bytes] | None = None,
        expected_round: int | None = None,
    ) -> None:
        """``identity`` and ``registry`` (site -> Ed25519 public key, from a source the site trusts rather
        than from the server) switch on authentication; a site that has them refuses an unauthenticated
        round, so the server cannot downgrade it."""
        self.site = site
        if sender != SERVER:
            raise MessageError(f"a round setup came from {sender!r}, not from the server", sender)
        _check_envelope(sender, setup, Setup, setup.round, Step.ADVERTISE_KEYS, "the server")
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
        if setup.vector_size < 1:
            raise MessageError("refusing the round's setup: the vector size must be at least 1", sender)
        if registry is not None or identity is not None:
            if identity is None or registry is None:
                raise ConfigError(
                    "authenticated secure aggregation needs both the site's identity and the registry"
                )
            if not setup.authenticated:
                raise MessageError(
                    "the server proposed an unauthenticated round, but this site authenticates its keys; "
                    "refusing (a downgrade would let the server substitute keys)",
                    sender,
                )
        elif setup.authenticated:
            raise ConfigError(
                "this round is authenticated: give the site its Ed25519 identity and the registry of the "
                "sites' identity keys"
            )
        self.setup = setup
        self.round = setup.round
        self.session = setup.session
        self.fixed_point = self.params.fixed_point
        self.neighbours = neighbour_graph(setup.sites, self.params.neighbours, setup.session)[site]
        self._index = {s: i + 1 for i, s in enumerate(setup.sites)}
        self._identity = identity
        self._registry = registry
        self._stage = _Stage.ADVERTISE
        self._cipher_key = keys.generate()
        self._mask_key: X25519PrivateKey | None = keys.generate()
        self._peers: dict[str, AdvertisedKeys] = {}
        self._cipher_shared: dict[str, bytes] = {}
        self._mask_seeds: dict[str, bytes] = {}
        self._self_seed = b""
        self._own_shares: tuple[np.ndarray, np.ndarray] | None = None
        self._held: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._asked_self: set[str] = set()
        self._asked_key: set[str] = set()
        self.clipped = 0
        """How many coordinates of this site's update lay outside [-R, R] and were clipped."""

    # The four steps.

    def advertise_keys(self) -> AdvertiseKeys:
        """Step 1: this round's two public keys (signed in the authenticated mode)."""
        if self._stage is not _Stage.ADVERTISE:
            raise MessageError(
                f"site {self.site!r} already advertised its keys for round {self.round} (now at the "
                f"{self._stage.value} stage)",
                SERVER,
            )
        self._stage = _Stage.SHARE
        cipher_key = keys.public_bytes(self._cipher_key)
        mask_key = keys.public_bytes(self._mask_private())
        signature = b""
        if self._identity is not None:
            statement = keys.key_statement(self.session, self.round, self.site, cipher_key, mask_key)
            signature = keys.sign(self._identity, statement)
        return AdvertiseKeys(
            sender=self.site, round=self.round, cipher_key=cipher_key, mask_key=mask_key, signature=signature
        )

    def share_keys(self, sender: str, broadcast: KeyBroadcast) -> ShareKeys:
        """Step 2: check the neighbours' keys, share our secrets among them, and send each its shares."""
        self._receive(sender, broadcast, KeyBroadcast, _Stage.SHARE)
        try:
            peers = self._check_peers(sender, broadcast.keys)
            cipher_shared: dict[str, bytes] = {}
            mask_seeds: dict[str, bytes] = {}
            for v, advertised in peers.items():
                try:
                    cipher_shared[v] = keys.agree(self._cipher_key, advertised.cipher_key)
                    mask_shared = keys.agree(self._mask_private(), advertised.mask_key)
                except ValueError:
                    raise MessageError(
                        f"site {v!r} advertised an invalid X25519 public key", sender
                    ) from None
                mask_seeds[v] = mask_seed(mask_shared, self.session, self.round, self.site, v)
            holders = [*sorted(peers), self.site]
            points = [self._index[h] for h in holders]
            self._self_seed = os.urandom(prg.SEED_BYTES)
            key_shares = shamir.split(keys.private_bytes(self._mask_private()), points, self.params.threshold)
            seed_shares = shamir.split(self._self_seed, points, self.params.threshold)
        except (MessageError, SecAggAbort):
            self._stage = _Stage.FAILED
            raise
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

    def masked_input(self, sender: str, forwarded: ShareBroadcast, vector: np.ndarray) -> MaskedInput:
        """Step 3: keep the neighbours' shares, and send the update masked with the self mask and the
        pairwise masks of every neighbour that shared."""
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
        self._receive(sender, forwarded, ShareBroadcast, _Stage.MASK)
        try:
            held = self._open_shares(sender, forwarded.shares)
        except (MessageError, SecAggAbort):
            self._stage = _Stage.FAILED
            raise
        self._held = held
        self.clipped = int(np.count_nonzero(np.abs(vector) > self.params.clip_range))
        masked = self.fixed_point.encode(vector)
        partners = sorted(held)
        prg.add_masks(
            masked,
            [self._self_seed] + [self._mask_seeds[v] for v in partners],
            [1] + [self._sign(v) for v in partners],
        )
        masked &= masked.dtype.type(self.fixed_point.mask)
        return MaskedInput(sender=self.site, round=self.round, vector=masked)

    def unmask(self, sender: str, request: UnmaskRequest) -> UnmaskResponse:
        """Step 4: the shares the server asks for, after checking that the request cannot unmask anyone."""
        self._receive(sender, request, UnmaskRequest, _Stage.UNMASK)
        try:
            self._check_request(sender, request)
        except MessageError:
            self._stage = _Stage.FAILED
            raise
        assert self._own_shares is not None
        self_shares = []
        for v in sorted(request.survivors):
            share = self._own_shares[1] if v == self.site else self._held[v][1]
            self_shares.append((v, shamir.share_to_bytes(share)))
        key_shares = [(v, shamir.share_to_bytes(self._held[v][0])) for v in sorted(request.dropped)]
        self._stage = _Stage.DONE
        return UnmaskResponse(
            sender=self.site,
            round=self.round,
            self_mask_shares=tuple(self_shares),
            mask_key_shares=tuple(key_shares),
        )

    # Checks.

    def _mask_private(self) -> X25519PrivateKey:
        assert self._mask_key is not None, "the mask key is dropped once it is shared"
        return self._mask_key

    def _receive(self, sender: str, message: Message, expected: type[Message], stage: _Stage) -> None:
        """Envelope checks; the stage moves on only once they pass (the content is checked after)."""
        if sender != SERVER:
            raise MessageError(f"site {self.site!r} got a server message from {sender!r}; refused", sender)
        if self._stage is not stage:
            raise MessageError(
                f"site {self.site!r} got a {type(message).__name__} while at the {self._stage.value} stage "
                "(out of order or replayed)",
                sender,
            )
        _check_envelope(sender, message, expected, self.round, _STEP[stage], "the server")
        self._stage = _NEXT[stage]

    def _check_peers(self, sender: str, advertised: Sequence[AdvertisedKeys]) -> dict[str, AdvertisedKeys]:
        names = _distinct([a.site for a in advertised], "the key broadcast", sender)
        strangers = names - self.neighbours
        if strangers:
            raise MessageError(
                f"the key broadcast holds keys of {sorted(strangers)}, which are not neighbours of "
                f"{self.site!r}",
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
                self._verify(sender, a)
        if len(advertised) + 1 < self.params.threshold:
            raise SecAggAbort(
                f"round {self.round} cannot complete: only {len(advertised)} of the {len(self.neighbours)} "
                f"neighbours of site {self.site!r} advertised keys, and unmasking it needs "
                f"{self.params.threshold} holders of its shares (itself included)"
            )
        return {a.site: a for a in advertised}

    def _verify(self, sender: str, advertised: AdvertisedKeys) -> None:
        assert self._registry is not None
        identity = self._registry.get(advertised.site)
        if identity is None:
            raise MessageError(f"site {advertised.site!r} has no identity in this site's registry", sender)
        statement = keys.key_statement(
            self.session, self.round, advertised.site, advertised.cipher_key, advertised.mask_key
        )
        try:
            keys.verify(identity, advertised.signature, statement)
        except (InvalidSignature, ValueError):
            raise MessageError(
                f"the keys advertised for site {advertised.site!r} do not carry its signature for this "
                "round: they were substituted (by the server or on the way); refusing the round",
                sender,
            ) from None

    def _open_shares(
        self, sender: str, forwarded: Sequence[tuple[str, bytes]]
    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        names = _distinct([v for v, _ in forwarded], "the forwarded shares", sender)
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

    def _check_request(self, sender: str, request: UnmaskRequest) -> None:
        survivors = _distinct(request.survivors, "the unmasking request's survivors", sender)
        dropped = _distinct(request.dropped, "the unmasking request's dropped sites", sender)
        both = (survivors | self._asked_self) & (dropped | self._asked_key)
        self._asked_self |= survivors
        self._asked_key |= dropped
        if both:
            raise UnmaskRefused(
                f"site {self.site!r} refuses to unmask: the server asked for both the self-mask share and "
                f"the mask-key share of {sorted(both)}, which together would reveal that input",
                sender,
            )
        if self.site not in survivors:
            raise UnmaskRefused(
                f"site {self.site!r} refuses to unmask: the request does not count it among the survivors",
                sender,
            )
        unknown = (survivors | dropped) - set(self._held) - {self.site}
        if unknown:
            raise MessageError(
                f"the server asked site {self.site!r} for shares of {sorted(unknown)}, which it does not "
                "hold",
                sender,
            )
        if len(survivors) < self.params.threshold:
            raise UnmaskRefused(
                f"site {self.site!r} refuses to unmask: only {len(survivors)} of its neighbourhood are said "
                f"to survive, fewer than the threshold {self.params.threshold}, so the sum cannot be "
                "unmasked and answering would only hand out shares",
                sender,
            )

    def _sign(self, v: str) -> int:
        return 1 if self._index[self.site] < self._index[v] else -1


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"an array of dtype {value.dtype} and shape {value.shape}"
    return type(value).__name__


# --- the server -------------------------------------------------------------------------------------------


class SecAggServer:
    """The server's side of a round.

    For each step: ``setup`` (or the previous step's closing call) gives the messages to send; ``collect_*``
    takes each site's answer as it arrives (raising MessageError for one it refuses, which leaves that site
    out); the closing call (``broadcast_keys``, ``forward_shares``, ``request_unmasking``, ``finish``) ends
    the step: whoever has not answered by then has dropped. ``receive`` dispatches any site message to the
    right ``collect_*``.
    """

    def __init__(
        self,
        params: SecAggParams,
        sites: Sequence[str],
        round: int,
        vector_size: int,
        *,
        session: bytes | None = None,
        registry: Mapping[str, bytes] | None = None,
    ) -> None:
        """``session``: 32 public random bytes for this round (drawn from the OS when None).
        ``registry``: the sites' Ed25519 identity keys, required in the authenticated mode."""
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
        self.session = os.urandom(32) if session is None else session
        if len(self.session) != 32:
            raise ConfigError(f"the session value has 32 bytes, got {len(self.session)}")
        self.registry = registry
        self.fixed_point = params.fixed_point
        self.graph = neighbour_graph(self.sites, params.neighbours, self.session)
        self._index = {s: i + 1 for i, s in enumerate(self.sites)}
        self._stage = _Stage.ADVERTISE
        self._advertised: dict[str, AdvertiseKeys] = {}
        self._keys_in_use: set[bytes] = set()
        self._ciphertexts: dict[str, dict[str, bytes]] = {}
        self._shared: set[str] = set()
        self._masked: set[str] = set()
        self._total: np.ndarray | None = None
        self._requests: dict[str, UnmaskRequest] = {}
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
            session=self.session,
            sites=self.sites,
            vector_size=self.vector_size,
            neighbours=p.neighbours,
            threshold=p.threshold,
            clip_range=p.clip_range,
            fractional_bits=p.fractional_bits,
            authenticated=p.authenticated,
        )

    def receive(self, sender: str, message: Message) -> None:
        """Take any site message: the collect method of its type (which checks that it is the right step)."""
        if isinstance(message, AdvertiseKeys):
            self.collect_advertise(sender, message)
        elif isinstance(message, ShareKeys):
            self.collect_shares(sender, message)
        elif isinstance(message, MaskedInput):
            self.collect_masked_input(sender, message)
        elif isinstance(message, UnmaskResponse):
            self.collect_unmask(sender, message)
        else:
            raise MessageError(
                f"{sender!r} sent a {type(message).__name__}, which only the server sends", sender
            )

    # Step 1.

    def collect_advertise(self, sender: str, message: AdvertiseKeys) -> None:
        self._accept(sender, message, AdvertiseKeys, _Stage.ADVERTISE, self._advertised, set(self.sites))
        if self.params.authenticated:
            assert self.registry is not None
            identity = self.registry.get(sender)
            statement = keys.key_statement(
                self.session, self.round, sender, message.cipher_key, message.mask_key
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
        """End step 1: each site that advertised gets its advertising neighbours' keys."""
        self._close(_Stage.ADVERTISE, _Stage.SHARE)
        alive = set(self._advertised)
        self._require(Step.ADVERTISE_KEYS, alive, set(), alive)
        out = {}
        entries = {
            v: AdvertisedKeys(v, m.cipher_key, m.mask_key, m.signature) for v, m in self._advertised.items()
        }
        for u in sorted(alive):
            neighbours = tuple(entries[v] for v in sorted(self.graph[u] & alive))
            out[u] = KeyBroadcast(sender=SERVER, round=self.round, keys=neighbours)
        return out

    # Step 2.

    def collect_shares(self, sender: str, message: ShareKeys) -> None:
        self._accept(sender, message, ShareKeys, _Stage.SHARE, self._ciphertexts, set(self._advertised))
        receivers = _distinct([v for v, _ in message.shares], f"the shares of site {sender!r}", sender)
        expected = self.graph[sender] & set(self._advertised)
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
        """End step 2: each site that shared gets the shares its sharing neighbours encrypted for it."""
        self._close(_Stage.SHARE, _Stage.MASK)
        self._shared = set(self._ciphertexts)
        alive = self._shared
        self._require(Step.SHARE_KEYS, alive, set(), alive)
        out = {}
        for v in sorted(alive):
            forwarded = tuple((u, self._ciphertexts[u][v]) for u in sorted(self.graph[v] & alive))
            out[v] = ShareBroadcast(sender=SERVER, round=self.round, shares=forwarded)
        self._ciphertexts = {}
        return out

    # Step 3.

    def collect_masked_input(self, sender: str, message: MaskedInput) -> None:
        self._accept(sender, message, MaskedInput, _Stage.MASK, self._masked, self._shared)
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
        # The sum grows as inputs arrive: the server holds one vector, however many sites report.
        if self._total is None:
            self._total = np.zeros(self.vector_size, dtype=self.fixed_point.dtype.newbyteorder("="))
        np.add(self._total, vector, out=self._total)
        self._masked.add(sender)

    def request_unmasking(self) -> dict[str, UnmaskRequest]:
        """End step 3: ask each site whose input arrived for the shares that remove the masks."""
        self._close(_Stage.MASK, _Stage.UNMASK)
        survivors = self._masked
        self._require(Step.MASKED_INPUT, survivors, self._shared - survivors, survivors)
        out = {}
        for v in sorted(survivors):
            out[v] = UnmaskRequest(
                sender=SERVER,
                round=self.round,
                survivors=tuple(sorted((self.graph[v] | {v}) & survivors)),
                dropped=tuple(sorted((self.graph[v] & self._shared) - survivors)),
            )
        self._requests = out
        return dict(out)

    # Step 4.

    def collect_unmask(self, sender: str, message: UnmaskResponse) -> None:
        self._accept(sender, message, UnmaskResponse, _Stage.UNMASK, self._answered, self._masked)
        request = self._requests[sender]
        parsed: list[dict[str, np.ndarray]] = []
        for shares, asked, what in (
            (message.self_mask_shares, request.survivors, "self-mask"),
            (message.mask_key_shares, request.dropped, "mask-key"),
        ):
            names = [v for v, _ in shares]
            if len(set(names)) != len(names) or set(names) != set(asked):
                raise MessageError(
                    f"site {sender!r} sent {what} shares for {sorted(names)}; it was asked for "
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
        """End step 4: reconstruct what is needed, remove every mask, and return the sum."""
        self._close(_Stage.UNMASK, _Stage.DONE)
        survivors = self._masked
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
                shared = keys.agree(private, self._advertised[v].mask_key)
                seeds.append(mask_seed(shared, self.session, self.round, u, v))
                # v added sign(v, u) * PRG(s_uv); take it away.
                signs.append(-1 if self._index[v] < self._index[u] else 1)
        total = self._total
        prg.add_masks(total, seeds, signs)
        total &= total.dtype.type(self.fixed_point.mask)
        self._total = None
        return SecAggResult(
            vector=self.fixed_point.decode(total),
            encoded_sum=total,
            survivors=tuple(sorted(survivors)),
            dropped=tuple(sorted(set(self.sites) - survivors)),
        )

    # Checks.

    def _accept(
        self,
        sender: str,
        message: Message,
        expected: type[Message],
        stage: _Stage,
        done: Iterable[str],
        eligible: set[str],
    ) -> None:
        if self._stage is _Stage.FAILED:
            raise SecAggAbort(f"round {self.round} was abandoned; no further messages are taken")
        who = f"site {sender!r}"
        if sender not in self._index:
            raise MessageError(
                f"a message came from {sender!r}, which is not a site of round {self.round}", sender
            )
        step = _STEP[stage]
        if self._stage is not stage:
            current = self._stage.value
            raise MessageError(
                f"{who} sent a {type(message).__name__} for {step.label}, but the round is at the {current} "
                "stage (out of order or too late)",
                sender,
            )
        _check_envelope(sender, message, expected, self.round, step, who)
        if sender in done:
            raise MessageError(
                f"{who} already sent its message for {step.label}; a second one is refused", sender
            )
        if sender not in eligible:
            raise MessageError(f"{who} dropped out before {step.label}, so it cannot take part in it", sender)

    def _close(self, stage: _Stage, following: _Stage) -> None:
        if self._stage is _Stage.FAILED:
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
        self._stage = _Stage.FAILED
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
