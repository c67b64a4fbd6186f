"""The messages of a secure aggregation round, and their binary encoding.

A round is six steps; in each, the server sends every remaining site one message and each site answers with
one (Bonawitz et al. 2017, Fig. 4, with the consistency check of the active protocol, step 5 here; step 1
commits the sites to their share of the session randomness before anyone reveals it, see ``session``):

================  ===========================================  ==============================================
step              server -> site                               site -> server
================  ===========================================  ==============================================
1 commit          Setup (parameters, sites, nonce)             Commitment (hash of a fresh contribution)
2 advertise keys  CommitmentBroadcast (digest of them all)     AdvertiseKeys (two X25519 keys, contribution)
3 share keys      KeyBroadcast (contributions, neighbours'     ShareKeys (encrypted shares, one each)
                  keys)
4 masked input    ShareBroadcast (shares for it)               MaskedInput (the masked vector)
5 consistency     ConsistencyRequest (the survivor set)        ConsistencyResponse (signature over the set)
6 unmasking       UnmaskRequest (the set, t signatures on it)  UnmaskResponse (the shares it implies)
================  ===========================================  ==============================================

Every message is a frozen dataclass with ``sender``, ``round`` and ``step``. On the wire: the magic ``CSA``,
a version byte, a type byte, then the fields in order: integers little-endian of fixed width, text and bytes
with a length prefix, lists with a count, and the masked vector packed at exactly b bits per value (the
bits, the count, then ceil(count b / 8) bytes: :mod:`.packing`). Decoding checks every length against what
is left and against the limits below before it allocates anything, and refuses trailing bytes, so a
malformed or hostile message raises :class:`MalformedMessage` rather than anything else. No pickle:
decoding never runs code.

Over ~400 lines because every message of the protocol has its strict codec here, each checked the same way.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, fields
from enum import IntEnum
from typing import Any, ClassVar, TypeVar

import numpy as np

from confide.privacy.secagg import packing
from confide.privacy.secagg.errors import MalformedMessage
from confide.privacy.secagg.keys import KEY_BYTES, SIGNATURE_BYTES

MAGIC = b"CSA"
VERSION = 3
"""3: the Setup names the quantization (bits, rotation) and masked vectors travel packed at b bits."""
SERVER = "@server"
"""The sender id of the server; no site may take it."""

MAX_TEXT_BYTES = 256
MAX_ITEMS = 1 << 20
MAX_BLOB_BYTES = 1 << 16
MAX_VECTOR_SIZE = (1 << 32) - 1


class Step(IntEnum):
    """The steps of a round, in order."""

    COMMIT = 1
    ADVERTISE_KEYS = 2
    SHARE_KEYS = 3
    MASKED_INPUT = 4
    CONSISTENCY = 5
    UNMASKING = 6

    @property
    def label(self) -> str:
        return f"step {int(self)} ({self.name.lower().replace('_', ' ')})"


# --- the wire format: one reader and one writer per field kind ----------------------------------------------


class _Reader:
    def __init__(self, data: bytes | bytearray | memoryview, offset: int, what: str) -> None:
        self.view = memoryview(data).cast("B")
        self.offset = offset
        self.what = what

    def fail(self, reason: str) -> MalformedMessage:
        return MalformedMessage(f"malformed {self.what}: {reason}")

    def take(self, count: int, field: str) -> memoryview:
        if count > len(self.view) - self.offset:
            raise self.fail(
                f"field {field!r} needs {count} bytes but only {len(self.view) - self.offset} are left "
                "(truncated?)"
            )
        out = self.view[self.offset : self.offset + count]
        self.offset += count
        return out

    def unpack(self, fmt: str, field: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), field))[0]

    def count(self, field: str, limit: int, item_bytes: int) -> int:
        n = self.unpack("<I", field)
        if n > limit:
            raise self.fail(f"field {field!r} has {n} entries, more than the limit {limit}")
        if n * item_bytes > len(self.view) - self.offset:
            raise self.fail(f"field {field!r} claims {n} entries but the message is too short for them")
        return int(n)

    def done(self) -> None:
        if self.offset != len(self.view):
            raise self.fail(f"{len(self.view) - self.offset} unexpected bytes after the last field")


Parts = list[bytes | memoryview]
Codec = tuple[Callable[[Parts, Any], None], Callable[[_Reader, str], Any]]


def _write_uint(fmt: str) -> Callable[[Parts, Any], None]:
    def write(out: Parts, value: Any) -> None:
        out.append(struct.pack(fmt, value))

    return write


def _read_uint(fmt: str) -> Callable[[_Reader, str], Any]:
    def read(reader: _Reader, field: str) -> Any:
        return int(reader.unpack(fmt, field))

    return read


def _write_text(out: Parts, value: str) -> None:
    data = value.encode()
    if not data or len(data) > MAX_TEXT_BYTES:
        raise ValueError(f"text fields hold 1 to {MAX_TEXT_BYTES} bytes of UTF-8, got {len(data)}")
    out.append(struct.pack("<H", len(data)) + data)


def _read_text(reader: _Reader, field: str) -> str:
    n = reader.unpack("<H", field)
    if not 1 <= n <= MAX_TEXT_BYTES:
        raise reader.fail(f"field {field!r} is a text of {n} bytes; 1 to {MAX_TEXT_BYTES} are allowed")
    try:
        return bytes(reader.take(n, field)).decode()
    except UnicodeDecodeError as e:
        raise reader.fail(f"field {field!r} is not UTF-8 ({e.reason})") from None


def _write_blob(out: Parts, value: bytes) -> None:
    if len(value) > MAX_BLOB_BYTES:
        raise ValueError(f"byte fields hold at most {MAX_BLOB_BYTES} bytes, got {len(value)}")
    out.append(struct.pack("<I", len(value)) + value)


def _read_blob(reader: _Reader, field: str) -> bytes:
    n = reader.unpack("<I", field)
    if n > MAX_BLOB_BYTES:
        raise reader.fail(f"field {field!r} holds {n} bytes, more than the limit {MAX_BLOB_BYTES}")
    return bytes(reader.take(n, field))


def _fixed_blob(*sizes: int) -> Codec:
    def read(reader: _Reader, field: str) -> bytes:
        data = _read_blob(reader, field)
        if len(data) not in sizes:
            allowed = " or ".join(str(s) for s in sizes)
            raise reader.fail(f"field {field!r} must hold {allowed} bytes, got {len(data)}")
        return data

    return _write_blob, read


def _write_float(out: Parts, value: float) -> None:
    out.append(struct.pack("<d", value))


def _read_float(reader: _Reader, field: str) -> float:
    value = float(reader.unpack("<d", field))
    if not math.isfinite(value):
        raise reader.fail(f"field {field!r} is not a finite number")
    return value


def _write_bool(out: Parts, value: bool) -> None:
    out.append(b"\x01" if value else b"\x00")


def _read_bool(reader: _Reader, field: str) -> bool:
    value = reader.unpack("<B", field)
    if value not in (0, 1):
        raise reader.fail(f"field {field!r} is a flag and must be 0 or 1, got {value}")
    return bool(value)


def _read_step(reader: _Reader, field: str) -> Step:
    value = reader.unpack("<B", field)
    try:
        return Step(value)
    except ValueError:
        raise reader.fail(f"there is no step {value}") from None


def _list(item: Codec, min_item_bytes: int) -> Codec:
    write_item, read_item = item

    def write(out: Parts, values: tuple[Any, ...]) -> None:
        out.append(struct.pack("<I", len(values)))
        for v in values:
            write_item(out, v)

    def read(reader: _Reader, field: str) -> tuple[Any, ...]:
        return tuple(read_item(reader, field) for _ in range(reader.count(field, MAX_ITEMS, min_item_bytes)))

    return write, read


def _pair(first: Codec, second: Codec) -> Codec:
    def write(out: Parts, value: tuple[Any, Any]) -> None:
        first[0](out, value[0])
        second[0](out, value[1])

    def read(reader: _Reader, field: str) -> tuple[Any, Any]:
        return first[1](reader, field), second[1](reader, field)

    return write, read


def _write_vector(out: Parts, value: tuple[int, np.ndarray]) -> None:
    bits, vector = value
    if vector.ndim != 1 or vector.dtype.kind != "u" or vector.dtype.itemsize not in (4, 8):
        raise ValueError(
            f"a masked vector is a flat uint32 or uint64 array, got {vector.dtype} {vector.shape}"
        )
    out.append(struct.pack("<BI", bits, vector.size))
    out.append(packing.pack(vector, bits))


def _read_vector(reader: _Reader, field: str) -> tuple[int, np.ndarray]:
    bits = reader.unpack("<B", field)
    if not 1 <= bits <= 64:
        raise reader.fail(f"field {field!r} packs values of {bits} bits; 1 to 64 are allowed")
    size = reader.unpack("<I", field)
    nbytes = packing.packed_size(size, bits)
    if nbytes > len(reader.view) - reader.offset:
        raise reader.fail(
            f"field {field!r} claims {size} values of {bits} bits ({nbytes} bytes), but only "
            f"{len(reader.view) - reader.offset} bytes are left (truncated?)"
        )
    try:
        return bits, packing.unpack(reader.take(nbytes, field), bits, size)
    except ValueError as e:
        raise reader.fail(f"field {field!r}: {e}") from None


UINT8: Codec = (_write_uint("<B"), _read_uint("<B"))
UINT32: Codec = (_write_uint("<I"), _read_uint("<I"))
UINT64: Codec = (_write_uint("<Q"), _read_uint("<Q"))
FLOAT: Codec = (_write_float, _read_float)
BOOL: Codec = (_write_bool, _read_bool)
TEXT: Codec = (_write_text, _read_text)
BLOB: Codec = (_write_blob, _read_blob)
KEY: Codec = _fixed_blob(KEY_BYTES)
SIGNATURE: Codec = _fixed_blob(0, SIGNATURE_BYTES)
"""A signature, or nothing in the unauthenticated mode."""
REQUIRED_SIGNATURE: Codec = _fixed_blob(SIGNATURE_BYTES)
STEP: Codec = (_write_uint("<B"), _read_step)
VECTOR: Codec = (_write_vector, _read_vector)
TEXTS: Codec = _list(TEXT, 3)
ADDRESSED_BLOBS: Codec = _list(_pair(TEXT, BLOB), 7)
ADDRESSED_KEYS: Codec = _list(_pair(TEXT, KEY), 3 + 4 + KEY_BYTES)
ADDRESSED_SIGNATURES: Codec = _list(_pair(TEXT, REQUIRED_SIGNATURE), 3 + 4 + SIGNATURE_BYTES)
HEADER: tuple[tuple[str, Codec], ...] = (("sender", TEXT), ("round", UINT64), ("step", STEP))


# --- the messages -----------------------------------------------------------------------------------------


M = TypeVar("M", bound="Message")
_TYPES: dict[int, type[Message]] = {}


@dataclass(frozen=True, kw_only=True)
class Message:
    """Base of every message: who sent it, for which round, in which step."""

    sender: str
    round: int
    step: Step

    TAG: ClassVar[int] = 0
    STEP: ClassVar[Step]
    BODY: ClassVar[tuple[tuple[str, Codec], ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.TAG in _TYPES:
            raise TypeError(f"message tag {cls.TAG} is taken by {_TYPES[cls.TAG].__name__}")
        _TYPES[cls.TAG] = cls

    def to_bytes(self) -> bytes:
        out: Parts = [MAGIC, struct.pack("<BB", VERSION, self.TAG)]
        for name, (write, _) in HEADER + self.BODY:
            write(out, getattr(self, name))
        return b"".join(out)

    @classmethod
    def from_fields(cls: type[M], values: dict[str, Any]) -> M:
        """The message of the decoded wire fields (a message whose wire fields differ from its dataclass
        fields overrides this)."""
        return cls(**values)

    @classmethod
    def from_bytes(cls: type[M], data: bytes) -> M:
        """The message of type ``cls`` that ``data`` encodes; MalformedMessage for anything else."""
        message = decode(data)
        if not isinstance(message, cls):
            raise MalformedMessage(f"expected a {cls.__name__} message, got a {type(message).__name__}")
        return message

    @property
    def nbytes(self) -> int:
        """Bytes on the wire."""
        return len(self.to_bytes())


def decode(data: bytes) -> Message:
    """The message that ``data`` encodes, whatever its type."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MalformedMessage(f"a message is bytes, got {type(data).__name__}")
    if len(data) < len(MAGIC) + 2 or bytes(data[: len(MAGIC)]) != MAGIC:
        raise MalformedMessage("not a secure aggregation message (wrong magic bytes)")
    version, tag = data[len(MAGIC)], data[len(MAGIC) + 1]
    if version != VERSION:
        raise MalformedMessage(f"secure aggregation message of version {version}; this side speaks {VERSION}")
    cls = _TYPES.get(tag)
    if cls is None:
        raise MalformedMessage(f"unknown secure aggregation message type {tag}")
    reader = _Reader(data, len(MAGIC) + 2, f"{cls.__name__} message")
    values = {name: read(reader, name) for name, (_, read) in HEADER + cls.BODY}
    reader.done()
    try:
        return cls.from_fields(values)
    except ValueError as e:
        raise MalformedMessage(f"malformed {cls.__name__} message: {e}") from None


@dataclass(frozen=True, kw_only=True)
class Setup(Message):
    """Server -> every site, step 1: the round's parameters, its sites and its public nonce."""

    step: Step = Step.COMMIT
    nonce: bytes
    """32 public bytes of the server's choosing that name this attempt at the round. They do not fix the
    neighbour graph: the session value that does is drawn jointly in steps 1 to 3 (see ``session``)."""
    sites: tuple[str, ...]
    vector_size: int
    neighbours: int
    threshold: int
    clip_range: float
    fractional_bits: int
    authenticated: bool
    quantize_bits: int = 0
    """0: the fixed-point encoding; 1 to 16: stochastic quantization to that many bits (see
    :class:`~confide.privacy.secagg.params.SecAggParams`)."""
    rotated: bool = False

    TAG = 1
    STEP = Step.COMMIT
    BODY = (
        ("nonce", KEY),
        ("sites", TEXTS),
        ("vector_size", UINT64),
        ("neighbours", UINT32),
        ("threshold", UINT32),
        ("clip_range", FLOAT),
        ("fractional_bits", UINT8),
        ("authenticated", BOOL),
        ("quantize_bits", UINT8),
        ("rotated", BOOL),
    )


@dataclass(frozen=True, kw_only=True)
class Commitment(Message):
    """Site -> server, step 1: SHA-256 commitment to the site's fresh 32-byte session contribution."""

    step: Step = Step.COMMIT
    commitment: bytes

    TAG = 9
    STEP = Step.COMMIT
    BODY = (("commitment", KEY),)


@dataclass(frozen=True, kw_only=True)
class CommitmentBroadcast(Message):
    """Server -> every site, step 2: the digest of every (site, commitment) the server took in step 1. A site
    reveals its contribution only after this, so no contribution can be chosen after seeing another's."""

    step: Step = Step.ADVERTISE_KEYS
    digest: bytes

    TAG = 10
    STEP = Step.ADVERTISE_KEYS
    BODY = (("digest", KEY),)


@dataclass(frozen=True, kw_only=True)
class AdvertiseKeys(Message):
    """Site -> server, step 2: this round's public keys and the site's revealed session contribution, signed
    by the site's identity when authenticated."""

    step: Step = Step.ADVERTISE_KEYS
    cipher_key: bytes
    """X25519 public key c_u: agreed with a neighbour's to encrypt the shares between them."""
    mask_key: bytes
    """X25519 public key s_u: agreed with a neighbour's to seed their pairwise mask."""
    contribution: bytes
    """The 32 random bytes the site committed to in step 1."""
    signature: bytes = b""

    TAG = 2
    STEP = Step.ADVERTISE_KEYS
    BODY = (("cipher_key", KEY), ("mask_key", KEY), ("contribution", KEY), ("signature", SIGNATURE))


@dataclass(frozen=True)
class AdvertisedKeys:
    """One site's advertised keys, as the server passes them on (its contribution travels once, in the key
    broadcast's list of every site's contribution, where the signature's verifier finds it)."""

    site: str
    cipher_key: bytes
    mask_key: bytes
    signature: bytes = b""


def _write_advertised(out: Parts, value: AdvertisedKeys) -> None:
    _write_text(out, value.site)
    KEY[0](out, value.cipher_key)
    KEY[0](out, value.mask_key)
    SIGNATURE[0](out, value.signature)


def _read_advertised(reader: _Reader, field: str) -> AdvertisedKeys:
    return AdvertisedKeys(
        _read_text(reader, field), KEY[1](reader, field), KEY[1](reader, field), SIGNATURE[1](reader, field)
    )


ADVERTISED_LIST: Codec = _list((_write_advertised, _read_advertised), 3 + 2 * (4 + KEY_BYTES) + 4)


@dataclass(frozen=True, kw_only=True)
class KeyBroadcast(Message):
    """Server -> site, step 3: every committed site's revealed contribution (from which the site derives the
    session value and the neighbour graph itself) and the advertised keys of the site's neighbours."""

    step: Step = Step.SHARE_KEYS
    contributions: tuple[tuple[str, bytes], ...]
    keys: tuple[AdvertisedKeys, ...]

    TAG = 3
    STEP = Step.SHARE_KEYS
    BODY = (("contributions", ADDRESSED_KEYS), ("keys", ADVERTISED_LIST))


@dataclass(frozen=True, kw_only=True)
class ShareKeys(Message):
    """Site -> server, step 3: for each neighbour, (that neighbour, its encrypted shares of our secrets)."""

    step: Step = Step.SHARE_KEYS
    shares: tuple[tuple[str, bytes], ...]

    TAG = 4
    STEP = Step.SHARE_KEYS
    BODY = (("shares", ADDRESSED_BLOBS),)


@dataclass(frozen=True, kw_only=True)
class ShareBroadcast(Message):
    """Server -> site, step 4: (sender, ciphertext) for each neighbour that sent this site its shares."""

    step: Step = Step.MASKED_INPUT
    shares: tuple[tuple[str, bytes], ...]

    TAG = 5
    STEP = Step.MASKED_INPUT
    BODY = (("shares", ADDRESSED_BLOBS),)


@dataclass(frozen=True, kw_only=True, eq=False)
class MaskedInput(Message):
    """Site -> server, step 4: the site's encoded update plus its masks, in Z_(2^b), packed at b bits."""

    step: Step = Step.MASKED_INPUT
    vector: np.ndarray
    """The masked values, as uint32 (b <= 32) or uint64 words."""
    bits: int = 0
    """b: the bits each value is sent in; 0: the words' full width."""

    TAG = 6
    STEP = Step.MASKED_INPUT
    BODY = (("packed", VECTOR),)

    @property
    def packed(self) -> tuple[int, np.ndarray]:
        return self.width, self.vector

    @property
    def width(self) -> int:
        """The bits each value travels in."""
        return self.bits or self.vector.dtype.itemsize * 8

    @classmethod
    def from_fields(cls, values: dict[str, Any]) -> MaskedInput:
        bits, vector = values.pop("packed")
        return cls(**values, vector=vector, bits=bits)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MaskedInput):
            return NotImplemented
        return (self.sender, self.round, self.step, self.width) == (
            other.sender,
            other.round,
            other.step,
            other.width,
        ) and (self.vector.dtype == other.vector.dtype and np.array_equal(self.vector, other.vector))

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True, kw_only=True)
class ConsistencyRequest(Message):
    """Server -> each survivor, step 5: the set of sites whose masked inputs are in the sum (sorted)."""

    step: Step = Step.CONSISTENCY
    survivors: tuple[str, ...]

    TAG = 11
    STEP = Step.CONSISTENCY
    BODY = (("survivors", TEXTS),)


@dataclass(frozen=True, kw_only=True)
class ConsistencyResponse(Message):
    """Site -> server, step 5: the site's Ed25519 signature over (session, round, survivor set); empty in the
    unauthenticated mode, where the answer only says that the site took the set."""

    step: Step = Step.CONSISTENCY
    signature: bytes = b""

    TAG = 12
    STEP = Step.CONSISTENCY
    BODY = (("signature", SIGNATURE),)


@dataclass(frozen=True, kw_only=True)
class UnmaskRequest(Message):
    """Server -> site, step 6: the survivor set of step 5 again, with the signatures over it of the site's
    neighbours (and its own) that signed it. The site derives what to reveal from the set: the self-mask
    shares of the survivors among its neighbours and itself, the mask-key shares of its other neighbours."""

    step: Step = Step.UNMASKING
    survivors: tuple[str, ...]
    signatures: tuple[tuple[str, bytes], ...] = ()

    TAG = 7
    STEP = Step.UNMASKING
    BODY = (("survivors", TEXTS), ("signatures", ADDRESSED_SIGNATURES))


@dataclass(frozen=True, kw_only=True)
class UnmaskResponse(Message):
    """Site -> server, step 6: (site, share) of each survivor's self-mask seed and of each dropped site's
    mask key."""

    step: Step = Step.UNMASKING
    self_mask_shares: tuple[tuple[str, bytes], ...]
    mask_key_shares: tuple[tuple[str, bytes], ...]

    TAG = 8
    STEP = Step.UNMASKING
    BODY = (("self_mask_shares", ADDRESSED_BLOBS), ("mask_key_shares", ADDRESSED_BLOBS))


MESSAGE_TYPES: tuple[type[Message], ...] = tuple(_TYPES.values())


def field_names(cls: type[Message]) -> tuple[str, ...]:
    """The dataclass fields of a message type, in order (for tests and transports)."""
    return tuple(f.name for f in fields(cls))
