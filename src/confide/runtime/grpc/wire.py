"""Messages on the wire: a protobuf Header that names its tensors, then their raw bytes in chunks.

gRPC refuses single messages above a few MB, and a model of hundreds of MB must still travel; so every message
that can be large is a stream of Chunks: first the Header (version, ticket, body, and each tensor's
name, dtype and shape), then the tensors' little-endian bytes, in order, cut into pieces of at most
``CHUNK_BYTES``. The receiver (:func:`assemble`) checks the version, the dtypes and the total size the header
declares against its limit before it reads a data byte, allocates exactly that once, and refuses a stream
that sends more or less than it declared. Nothing is ever unpickled; every value is checked before it is used.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, fields

import numpy as np

from confide.core import Plan, Update
from confide.errors import WireError
from confide.runtime.federation import SiteEvaluation, Task
from confide.runtime.grpc import confide_pb2 as pb

VERSION = 1
"""The wire version this code speaks; a peer that sends another is refused with a message saying both."""

CHUNK_BYTES = 4 << 20
GRPC_FRAME = 5
"""Bytes gRPC puts before every message on the wire: a compressed flag and a 4-byte length (the
Length-Prefixed-Message of gRPC over HTTP/2). Counted with each message, as it travels."""
"""Bytes of tensor data per chunk: half the message limit both sides set (GRPC_MESSAGE_LIMIT)."""

GRPC_MESSAGE_LIMIT = 8 << 20
"""What either side lets one gRPC message (a chunk, or a header with its metrics) be."""

DTYPES = {"float32": np.float32, "float64": np.float64, "int64": np.int64, "uint8": np.uint8}
"""The only element types that travel."""

PAYLOAD = "payload/"
"""Prefix of an update's payload arrays among its tensors."""
MASKED_EVALUATION = "masked"
"""The tensor of an evaluation that travels only as a masked input to a secure sum."""

PLAN_FIELDS = tuple(f.name for f in fields(Plan))


@dataclass
class Message:
    """One message as received: its header and its tensors (views of one buffer), by name."""

    header: pb.Header
    tensors: dict[str, np.ndarray]

    @property
    def kind(self) -> str:
        return self.header.WhichOneof("body") or ""

    def tensor(self, name: str, dtype: type, size: int | None = None) -> np.ndarray:
        """The named tensor, checked to be one-dimensional of ``dtype`` (and ``size`` values, when given)."""
        array = self.tensors.get(name)
        if array is None:
            raise WireError(f"a {self.kind or 'message'} message must carry a tensor {name!r}")
        if array.dtype != dtype or array.ndim != 1 or (size is not None and array.size != size):
            expected = (
                f"{size} values of {np.dtype(dtype).name}" if size is not None else np.dtype(dtype).name
            )
            raise WireError(
                f"tensor {name!r} must be a flat array of {expected}, got {array.dtype} {array.shape}"
            )
        return array


_DATA_TAG = b"\x12"  # Chunk field 2 (data), wire type 2 (length-delimited)


class DataChunk:
    """A data chunk without the protobuf runtime: on the way out its encoding is built with one copy of the
    tensor's bytes, and on the way in ``data`` is a view of the received buffer. Encoded, it is exactly the
    ``Chunk`` message with ``data`` set, so either side may use the generated protobuf classes instead."""

    __slots__ = ("data",)

    def __init__(self, data: memoryview | bytes) -> None:
        self.data = data

    def WhichOneof(self, group: str) -> str:
        return "data"

    def encode(self) -> bytes:
        n = len(self.data)
        prefix = bytearray(_DATA_TAG)
        while n >= 0x80:
            prefix.append((n & 0x7F) | 0x80)
            n >>= 7
        prefix.append(n)
        return b"".join((prefix, self.data))


Part = pb.Chunk | DataChunk


def encode_chunk(chunk: Part) -> bytes:
    """A chunk's bytes on the wire (the serializer both sides give gRPC)."""
    return chunk.encode() if isinstance(chunk, DataChunk) else chunk.SerializeToString()


def decode_chunk(raw: bytes) -> Part:
    """The chunk in ``raw``: a data chunk as a view of ``raw``, anything else through protobuf."""
    if raw[:1] == _DATA_TAG:
        n, shift, i = 0, 0, 1
        while i < len(raw) and i <= 10:
            byte = raw[i]
            n |= (byte & 0x7F) << shift
            i += 1
            if not byte & 0x80:
                if i + n == len(raw):
                    return DataChunk(memoryview(raw)[i:])
                break
            shift += 7
    try:
        return pb.Chunk.FromString(raw)
    except Exception as e:  # protobuf's DecodeError, or worse: the message is not a Chunk
        raise WireError(f"a chunk that is not a valid protobuf Chunk message ({len(raw)} bytes)") from e


def chunks(header: pb.Header, tensors: Sequence[tuple[str, np.ndarray]] = ()) -> Iterator[Part]:
    """``header`` (with the version and the tensors' descriptions filled in) and then the tensors' bytes."""
    header.version = VERSION
    del header.tensors[:]
    arrays = []
    for name, array in tensors:
        dtype = np.dtype(array.dtype).newbyteorder("<")
        if dtype.name not in DTYPES:
            raise WireError(f"tensor {name!r} has dtype {array.dtype}, which does not travel (use {DTYPES})")
        header.tensors.add(name=name, dtype=dtype.name, shape=list(array.shape))
        arrays.append(np.ascontiguousarray(array, dtype=dtype))
    yield pb.Chunk(header=header)
    for array in arrays:
        data = memoryview(array.reshape(-1).view(np.uint8).data)  # copied once, when a chunk is encoded
        for start in range(0, len(data), CHUNK_BYTES):
            yield DataChunk(data[start : start + CHUNK_BYTES])


def message_bytes(header: pb.Header, tensors: Sequence[tuple[str, np.ndarray]] = ()) -> int:
    """The bytes :func:`chunks` puts on the wire for this message, each chunk with gRPC's message prefix,
    counted without copying a tensor: what the local backend counts for the work it carries, so that a
    simulation reports the bytes a deployment moves for the same work (less its polls and heartbeats)."""
    total = 0
    for part in chunks(header, tensors):
        if isinstance(part, DataChunk):
            n = len(part.data)
            total += len(_DATA_TAG) + max(1, (n.bit_length() + 6) // 7) + n
        else:
            total += part.ByteSize()
        total += GRPC_FRAME
    return total


def declared_bytes(header: pb.Header) -> int:
    """The bytes of tensor data ``header`` promises, after checking each tensor's description."""
    total = 0
    names = set()
    for info in header.tensors:
        if info.dtype not in DTYPES:
            raise WireError(f"tensor {info.name!r} has dtype {info.dtype!r}; accepted: {', '.join(DTYPES)}")
        if info.name in names:
            raise WireError(f"tensor {info.name!r} appears twice in one message")
        if len(info.shape) > 8:
            raise WireError(f"tensor {info.name!r} has {len(info.shape)} dimensions; at most 8 travel")
        names.add(info.name)
        # Shapes are unsigned 64-bit: the product of a few of them can be astronomically large, which is
        # exactly what the limit below must catch before anything is allocated.
        total += math.prod(int(d) for d in info.shape) * np.dtype(DTYPES[info.dtype]).itemsize
    return total


def assemble(
    stream: Iterable[Part], limit: int, on_header: Callable[[pb.Header], None] | None = None
) -> Message:
    """Read one message from ``stream``: a header, then exactly the data it declares, at most ``limit`` bytes.

    Raises :class:`WireError` for anything else: no header, a second header, another wire version, an unknown
    dtype, a declared size above ``limit``, more data than declared, or a stream that ends early.
    ``on_header`` sees the checked header before any data is read (and may block: until it returns, gRPC's
    flow control holds the sender back, which is how a receiver bounds the memory its messages take).
    """
    iterator = iter(stream)
    first = next(iterator, None)
    if first is None:
        raise WireError("the message is empty: it must start with a header")
    if first.WhichOneof("part") != "header" or not isinstance(first, pb.Chunk):
        raise WireError("the message must start with a header, not with data")
    header = first.header
    try:
        return _read_body(header, iterator, limit, on_header)
    except WireError as e:
        e.header = header  # type: ignore[attr-defined]  # lets the server end the sender's open work at once
        raise


def _read_body(
    header: pb.Header,
    iterator: Iterator[Part],
    limit: int,
    on_header: Callable[[pb.Header], None] | None,
) -> Message:
    if header.version != VERSION:
        raise WireError(f"the message is of wire version {header.version}; this side speaks {VERSION}")
    total = declared_bytes(header)
    if total > limit:
        raise WireError(
            f"the message declares {total:,} bytes of tensors; the limit is {limit:,} "
            "(raise deploy.max_message_mb on both sides if the model really is this large)"
        )
    if on_header is not None:
        on_header(header)
    buffer = np.empty(total, dtype=np.uint8)
    filled = 0
    for chunk in iterator:
        if chunk.WhichOneof("part") != "data":
            raise WireError("a message has one header; a second one arrived")
        data = chunk.data
        n = len(data)
        if filled + n > total:
            raise WireError(f"the message sends more than the {total:,} bytes its header declares")
        buffer[filled : filled + n] = np.frombuffer(data, dtype=np.uint8)
        filled += n
    if filled != total:
        raise WireError(f"the message is truncated: {filled:,} of the {total:,} bytes it declares arrived")
    tensors: dict[str, np.ndarray] = {}
    offset = 0
    for info in header.tensors:
        dtype = np.dtype(DTYPES[info.dtype]).newbyteorder("<")
        shape = tuple(int(d) for d in info.shape)
        n = math.prod(shape) * dtype.itemsize
        tensors[info.name] = buffer[offset : offset + n].view(dtype).reshape(shape)
        offset += n
    return Message(header, tensors)


# -- the plan ---------------------------------------------------------------------------------------------


def plan_to_proto(plan: Plan) -> pb.Plan:
    values = {name: getattr(plan, name) for name in PLAN_FIELDS}
    values["max_steps"] = values["max_steps"] or 0
    return pb.Plan(**values)


def plan_from_proto(message: pb.Plan) -> Plan:
    values = {name: getattr(message, name) for name in PLAN_FIELDS}
    values["max_steps"] = values["max_steps"] or None
    for name in ("epochs", "batch_size"):
        if values[name] < 1:
            raise WireError(f"the plan's {name} must be at least 1, got {values[name]}")
    rates = ("learning_rate", "work", "mu", "personal_learning_rate", "clip_norm")
    for name in (*rates, "record_clip", "record_noise"):
        if not math.isfinite(values[name]) or values[name] < 0:
            raise WireError(f"the plan's {name} must be a finite number >= 0, got {values[name]}")
    if not 0 < values["staleness_weight"] <= 1:
        raise WireError(f"the plan's staleness_weight must be in (0, 1], got {values['staleness_weight']}")
    if values["hold"] and values["release"]:
        raise WireError("a plan may hold a new update or release the held one, not both")
    return Plan(**values)


# -- server to site ---------------------------------------------------------------------------------------


def train_message(
    ticket: int, task: Task, weights: np.ndarray
) -> tuple[pb.Header, list[tuple[str, np.ndarray]]]:
    header = pb.Header(
        ticket=ticket, train=pb.Train(plan=plan_to_proto(task.plan), model_version=task.model_version)
    )
    tensors = [("weights", weights), *((name, vector) for name, vector in task.extras.items())]
    return header, tensors


def evaluate_message(
    ticket: int, weights: np.ndarray, plan: Plan | None
) -> tuple[pb.Header, list[tuple[str, np.ndarray]]]:
    body = pb.Evaluate(personal=plan is not None)
    if plan is not None:
        body.plan.CopyFrom(plan_to_proto(plan))
    return pb.Header(ticket=ticket, evaluate=body), [("weights", weights)]


def exchange_message(ticket: int, data: bytes) -> tuple[pb.Header, list[tuple[str, np.ndarray]]]:
    return pb.Header(ticket=ticket, exchange=pb.Exchange()), [("message", np.frombuffer(data, np.uint8))]


# -- site to server ---------------------------------------------------------------------------------------


def update_message(
    ticket: int, session: bytes, update: Update
) -> tuple[pb.Header, list[tuple[str, np.ndarray]]]:
    body = pb.UpdateResult(
        site=update.site,
        round=update.round,
        num_examples=update.num_examples,
        model_version=update.model_version,
        metrics={k: float(v) for k, v in update.metrics.items()},
        has_vector=update.vector is not None,
        sums={k: float(v) for k, v in update.sums.items()},
    )
    tensors: list[tuple[str, np.ndarray]] = []
    if update.vector is not None:
        tensors.append(("vector", update.vector))
    for name, value in update.payload.items():
        if not isinstance(value, np.ndarray):
            raise WireError(f"the update's payload {name!r} is a {type(value).__name__}; only arrays travel")
        tensors.append((PAYLOAD + name, value))
    return pb.Header(ticket=ticket, session=session, update=body), tensors


def read_update(message: Message) -> Update:
    body = message.header.update
    vector = None
    if body.has_vector:
        vector = message.tensor("vector", np.float32)
    payload = {
        name[len(PAYLOAD) :]: array for name, array in message.tensors.items() if name.startswith(PAYLOAD)
    }
    unknown = set(message.tensors) - {"vector"} - {PAYLOAD + n for n in payload}
    if unknown:
        raise WireError(f"an update carries tensors it has no use for: {', '.join(sorted(unknown))}")
    if body.num_examples < 0:
        raise WireError(f"an update claims {body.num_examples} examples")
    return Update(
        site=body.site,
        round=body.round,
        num_examples=body.num_examples,
        vector=vector,
        model_version=body.model_version,
        metrics=dict(body.metrics),
        payload=payload,
        sums=dict(body.sums),
    )


def evaluation_message(
    ticket: int, session: bytes, evaluation: SiteEvaluation
) -> tuple[pb.Header, list[tuple[str, np.ndarray]]]:
    """An evaluation: its sums in the header, or under secure aggregation only its masked input."""
    body = pb.EvaluationResult(
        site=evaluation.site,
        loss_sum=evaluation.loss_sum,
        correct=evaluation.correct,
        targets=evaluation.targets,
    )
    tensors = [] if evaluation.masked is None else [(MASKED_EVALUATION, evaluation.masked)]
    return pb.Header(ticket=ticket, session=session, evaluation=body), tensors


def read_evaluation(message: Message) -> SiteEvaluation:
    body = message.header.evaluation
    if (
        body.correct < 0
        or body.targets < 0
        or body.correct > body.targets
        or not math.isfinite(body.loss_sum)
    ):
        raise WireError(
            f"an evaluation must have 0 <= correct <= targets and a finite loss, got correct {body.correct}, "
            f"targets {body.targets}, loss {body.loss_sum}"
        )
    unknown = set(message.tensors) - {MASKED_EVALUATION}
    if unknown:
        raise WireError(f"an evaluation carries tensors it has no use for: {', '.join(sorted(unknown))}")
    masked = message.tensor(MASKED_EVALUATION, np.uint8) if message.tensors else None
    if masked is not None and (body.loss_sum or body.correct or body.targets):
        raise WireError("a masked evaluation must not carry its sums in clear as well")
    return SiteEvaluation(body.site, body.loss_sum, body.correct, body.targets, masked)


def answer_message(
    ticket: int, session: bytes, answer: bytes
) -> tuple[pb.Header, list[tuple[str, np.ndarray]]]:
    tensors = [("message", np.frombuffer(answer, np.uint8))] if answer else []
    return pb.Header(ticket=ticket, session=session, answer=pb.AnswerResult()), tensors


def read_answer(message: Message) -> bytes:
    if "message" not in message.tensors:
        return b""
    return message.tensor("message", np.uint8).tobytes()


def failure_message(ticket: int, session: bytes, reason: str) -> pb.Header:
    return pb.Header(ticket=ticket, session=session, failure=pb.Failure(reason=reason[:2000]))
