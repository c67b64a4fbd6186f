"""The wire format: every message survives to_bytes/from_bytes, and anything malformed is refused clearly."""

from __future__ import annotations

import contextlib
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from confide.privacy.secagg import (
    SERVER,
    AdvertisedKeys,
    AdvertiseKeys,
    Commitment,
    CommitmentBroadcast,
    ConsistencyRequest,
    ConsistencyResponse,
    KeyBroadcast,
    MalformedMessage,
    MaskedInput,
    Message,
    Setup,
    ShareBroadcast,
    ShareKeys,
    Step,
    UnmaskRequest,
    UnmaskResponse,
    decode,
)
from confide.privacy.secagg.messages import MAGIC, VERSION

NAMES = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=20)
KEYS = st.binary(min_size=32, max_size=32)
ROUNDS = st.integers(0, 2**64 - 1)


def examples() -> list[Message]:
    key = bytes(range(32))
    return [
        Setup(
            sender=SERVER,
            round=4,
            nonce=b"s" * 32,
            sites=("a", "b", "c"),
            vector_size=10,
            neighbours=2,
            threshold=2,
            clip_range=1.5,
            fractional_bits=16,
            authenticated=True,
        ),
        Commitment(sender="a", round=4, commitment=key),
        CommitmentBroadcast(sender=SERVER, round=4, digest=key[::-1]),
        AdvertiseKeys(
            sender="a", round=4, cipher_key=key, mask_key=key[::-1], contribution=key, signature=b"g" * 64
        ),
        KeyBroadcast(
            sender=SERVER,
            round=4,
            contributions=(("a", key), ("b", key[::-1])),
            keys=(AdvertisedKeys("b", key, key[::-1]),),
        ),
        ShareKeys(sender="a", round=4, shares=(("b", b"x" * 100), ("c", b"y" * 100))),
        ShareBroadcast(sender=SERVER, round=4, shares=(("b", b"x" * 100),)),
        MaskedInput(sender="a", round=4, vector=np.arange(10, dtype=np.uint32)),
        MaskedInput(sender="a", round=4, vector=np.arange(3, dtype=np.uint64) << np.uint64(60)),
        ConsistencyRequest(sender=SERVER, round=4, survivors=("a", "b")),
        ConsistencyResponse(sender="a", round=4, signature=b"q" * 64),
        ConsistencyResponse(sender="a", round=4),
        UnmaskRequest(sender=SERVER, round=4, survivors=("a", "b"), signatures=(("a", b"q" * 64),)),
        UnmaskRequest(sender=SERVER, round=4, survivors=("a", "b")),
        UnmaskResponse(sender="a", round=4, self_mask_shares=(("a", b"1" * 36),), mask_key_shares=()),
    ]


@pytest.mark.parametrize("message", examples(), ids=lambda m: type(m).__name__)
def test_every_message_round_trips(message: Message) -> None:
    data = message.to_bytes()
    assert data[:3] == MAGIC and data[3] == VERSION
    assert type(message).from_bytes(data) == message
    assert decode(data) == message
    assert message.step == type(message).STEP


@settings(max_examples=40, deadline=None)
@given(
    sender=NAMES,
    round=ROUNDS,
    keys=st.lists(st.tuples(NAMES, KEYS, KEYS, st.sampled_from([b"", b"z" * 64])), max_size=5),
)
def test_key_broadcasts_round_trip(
    sender: str, round: int, keys: list[tuple[str, bytes, bytes, bytes]]
) -> None:
    message = KeyBroadcast(
        sender=sender,
        round=round,
        contributions=tuple((k[0], k[1]) for k in keys),
        keys=tuple(AdvertisedKeys(*k) for k in keys),
    )
    assert KeyBroadcast.from_bytes(message.to_bytes()) == message


@settings(max_examples=40, deadline=None)
@given(sender=NAMES, round=ROUNDS, values=st.lists(st.integers(0, 2**32 - 1), max_size=50))
def test_masked_inputs_round_trip(sender: str, round: int, values: list[int]) -> None:
    message = MaskedInput(sender=sender, round=round, vector=np.array(values, dtype=np.uint32))
    assert MaskedInput.from_bytes(message.to_bytes()) == message


@pytest.mark.parametrize("message", examples(), ids=lambda m: type(m).__name__)
def test_every_truncation_and_any_trailing_byte_is_refused(message: Message) -> None:
    data = message.to_bytes()
    for cut in range(len(data)):
        with pytest.raises(MalformedMessage):
            decode(data[:cut])
    with pytest.raises(MalformedMessage, match="unexpected bytes after the last field"):
        decode(data + b"\x00")


def test_wrong_magic_version_type_and_kind_are_refused() -> None:
    data = examples()[3].to_bytes()
    with pytest.raises(MalformedMessage, match="magic"):
        decode(b"XYZ" + data[3:])
    with pytest.raises(MalformedMessage, match="version 1"):
        decode(data[:3] + bytes([1]) + data[4:])
    with pytest.raises(MalformedMessage, match=r"unknown .* type 99"):
        decode(data[:4] + bytes([99]) + data[5:])
    with pytest.raises(MalformedMessage, match="expected a MaskedInput message, got a AdvertiseKeys"):
        MaskedInput.from_bytes(data)
    with pytest.raises(MalformedMessage, match="is bytes"):
        decode("not bytes")  # type: ignore[arg-type]


def header(tag: int, sender: bytes = b"a", round: int = 4, step: int = 1) -> bytes:
    return (
        MAGIC
        + bytes([VERSION, tag])
        + struct.pack("<H", len(sender))
        + sender
        + struct.pack("<QB", round, step)
    )


def test_bad_field_contents_are_refused_with_the_field_named() -> None:
    key = struct.pack("<I", 32) + bytes(32)
    no_signature = struct.pack("<I", 0)
    # A key of 31 bytes.
    with pytest.raises(MalformedMessage, match="'cipher_key' must hold 32 bytes, got 31"):
        decode(header(2) + struct.pack("<I", 31) + bytes(31) + key + no_signature)
    # A signature of 10 bytes, a contribution of 0, and a signature in an unmasking request of 0.
    with pytest.raises(MalformedMessage, match="'signature' must hold 0 or 64 bytes"):
        decode(header(2, step=2) + key + key + key + struct.pack("<I", 10) + bytes(10))
    with pytest.raises(MalformedMessage, match="'contribution' must hold 32 bytes, got 0"):
        decode(header(2, step=2) + key + key + struct.pack("<I", 0) + no_signature)
    survivors = struct.pack("<IH", 1, 1) + b"a"
    with pytest.raises(MalformedMessage, match="'signatures' must hold 64 bytes, got 0"):
        entry = struct.pack("<IH", 1, 1) + b"a" + struct.pack("<I", 0) + bytes(64)
        decode(header(7, sender=b"@server", step=6) + survivors + entry)
    # A list of signatures that claims more entries than the message could hold.
    with pytest.raises(MalformedMessage, match="too short"):
        decode(header(7, step=6) + survivors + struct.pack("<I", 1000))
    # A step that does not exist.
    with pytest.raises(MalformedMessage, match="no step 9"):
        decode(header(2, step=9) + key + key + no_signature)
    # A sender that is not UTF-8, and an empty sender.
    with pytest.raises(MalformedMessage, match="not UTF-8"):
        decode(header(2, sender=b"\xff\xfe") + key + key + no_signature)
    with pytest.raises(MalformedMessage, match="1 to 256 are allowed"):
        decode(header(2, sender=b"") + key + key + no_signature)
    # A list that claims more entries than the message could hold (nothing is allocated for them).
    with pytest.raises(MalformedMessage, match="too short"):
        decode(header(4, step=2) + struct.pack("<I", 1_000_000))
    with pytest.raises(MalformedMessage, match="more than the limit"):
        decode(header(4, step=2) + struct.pack("<I", 2**31))
    # Values packed at 0 or 65 bits, a vector longer than its bytes, and non-zero padding bits.
    with pytest.raises(MalformedMessage, match="values of 0 bits; 1 to 64 are allowed"):
        decode(header(6, step=4) + struct.pack("<BI", 0, 4) + bytes(8))
    with pytest.raises(MalformedMessage, match="values of 65 bits"):
        decode(header(6, step=4) + struct.pack("<BI", 65, 1) + bytes(9))
    with pytest.raises(MalformedMessage, match=r"5 values of 25 bits \(16 bytes\).*truncated"):
        decode(header(6, step=4) + struct.pack("<BI", 25, 5) + bytes(15))
    with pytest.raises(MalformedMessage, match="padding bits after the last value are not zero"):
        decode(header(6, step=4) + struct.pack("<BI", 25, 5) + bytes(15) + b"\x80")
    padded = header(6, step=4) + struct.pack("<BI", 25, 5) + bytes(15) + b"\x01"  # 125 bits: 3 spare
    assert MaskedInput.from_bytes(padded).bits == 25
    # A flag that is neither 0 nor 1, and a clip range that is not finite.
    setup = examples()[0].to_bytes()
    with pytest.raises(MalformedMessage, match="'authenticated' is a flag"):
        decode(setup[:-3] + b"\x02" + setup[-2:])
    with pytest.raises(MalformedMessage, match="'rotated' is a flag"):
        decode(setup[:-1] + b"\x02")
    nan = setup.replace(struct.pack("<d", 1.5), struct.pack("<d", float("nan")))
    with pytest.raises(MalformedMessage, match="'clip_range' is not a finite number"):
        decode(nan)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_raise_anything_but_malformed_message(data: bytes) -> None:
    for prefix in (b"", *(MAGIC + bytes([VERSION, tag]) for tag in range(1, 14))):
        with contextlib.suppress(MalformedMessage):
            decode(prefix + data)


def test_a_message_cannot_be_built_with_fields_the_wire_cannot_carry() -> None:
    with pytest.raises(ValueError, match="1 to 256 bytes"):
        AdvertiseKeys(
            sender="x" * 300, round=1, cipher_key=bytes(32), mask_key=bytes(32), contribution=bytes(32)
        ).to_bytes()
    with pytest.raises(ValueError, match="uint32 or uint64"):
        MaskedInput(sender="a", round=1, vector=np.zeros(3, dtype=np.float32)).to_bytes()
    assert Step.MASKED_INPUT.label == "step 4 (masked input)"
    assert [s.label for s in (Step.COMMIT, Step.CONSISTENCY)] == ["step 1 (commit)", "step 5 (consistency)"]
