"""What the two sides of the protocol derive and check the same way: key derivations, envelope checks, the
stages of a round and its result. See :mod:`~confide.privacy.secagg.protocol` for the protocol itself."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np

from confide.errors import ConfigError
from confide.privacy.secagg import keys, shamir
from confide.privacy.secagg.errors import MessageError
from confide.privacy.secagg.messages import MAX_TEXT_BYTES, SERVER, Message, Setup, Step
from confide.privacy.secagg.params import SecAggParams

SECRET_BYTES = 32
"""Both shared secrets are 32 bytes: the X25519 mask private key s_u and the self-mask seed b_u."""
SHARE_BYTES = shamir.share_bytes_for(SECRET_BYTES)
SHARE_PLAINTEXT_BYTES = 2 * SHARE_BYTES
SHARE_CIPHERTEXT_BYTES = keys.sealed_size(SHARE_PLAINTEXT_BYTES)


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
        quantize_bits=setup.quantize_bits,
        rotated=setup.rotated,
    )
    if (params.neighbours, params.threshold) != (setup.neighbours, setup.threshold):
        raise ConfigError(
            f"the setup announces {setup.neighbours} neighbours and threshold {setup.threshold}, which "
            f"resolve to {params.neighbours} and {params.threshold}"
        )
    return params


def check_envelope(
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


def distinct(items: Sequence[str], what: str, sender: str) -> set[str]:
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


class Stage(Enum):
    """Where a party is in a round: the step whose message it waits for (or DONE, or FAILED)."""

    COMMIT = "commit"
    ADVERTISE = "advertise keys"
    SHARE = "share keys"
    MASK = "masked input"
    CONSISTENCY = "consistency"
    UNMASK = "unmasking"
    DONE = "done"
    FAILED = "failed"


STEP = {
    Stage.COMMIT: Step.COMMIT,
    Stage.ADVERTISE: Step.ADVERTISE_KEYS,
    Stage.SHARE: Step.SHARE_KEYS,
    Stage.MASK: Step.MASKED_INPUT,
    Stage.CONSISTENCY: Step.CONSISTENCY,
    Stage.UNMASK: Step.UNMASKING,
}
NEXT = {
    Stage.COMMIT: Stage.ADVERTISE,
    Stage.ADVERTISE: Stage.SHARE,
    Stage.SHARE: Stage.MASK,
    Stage.MASK: Stage.CONSISTENCY,
    Stage.CONSISTENCY: Stage.UNMASK,
    Stage.UNMASK: Stage.DONE,
}
