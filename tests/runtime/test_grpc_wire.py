"""The wire codec: headers and chunked tensors, and every way a message can be wrong."""

from __future__ import annotations

import contextlib
import math
from dataclasses import fields

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from confide.core import Plan, Update
from confide.errors import WireError
from confide.runtime.federation import SiteEvaluation, Task
from confide.runtime.grpc import confide_pb2 as pb
from confide.runtime.grpc import wire

LIMIT = 64 << 20


def roundtrip(header: pb.Header, tensors: list[tuple[str, np.ndarray]]) -> wire.Message:
    return wire.assemble(list(wire.chunks(header, tensors)), LIMIT)


def test_the_proto_plan_has_every_field_of_the_plan() -> None:
    assert {f.name for f in fields(Plan)} == set(pb.Plan.DESCRIPTOR.fields_by_name)


def test_a_plan_travels_unchanged() -> None:
    plan = Plan(
        round=7, epochs=2, max_steps=30, batch_size=8, learning_rate=0.25, seed=123456789, work=0.5,
        algorithm="scaffold", mu=0.01, personalization="ditto", personal_steps=3,
        personal_learning_rate=0.1, personal_lambda=math.inf, clip_norm=1.5,
        record_clip=0.7, record_noise=1.1,
    )  # fmt: skip
    assert wire.plan_from_proto(wire.plan_to_proto(plan)) == plan
    assert wire.plan_from_proto(wire.plan_to_proto(Plan(round=1))).max_steps is None


def test_a_plan_with_impossible_values_is_refused() -> None:
    message = wire.plan_to_proto(Plan(round=1))
    message.batch_size = 0
    with pytest.raises(WireError, match="batch_size"):
        wire.plan_from_proto(message)
    message = wire.plan_to_proto(Plan(round=1))
    message.learning_rate = float("nan")
    with pytest.raises(WireError, match="learning_rate"):
        wire.plan_from_proto(message)
    message = wire.plan_to_proto(Plan(round=1, record_clip=1.0, record_noise=0.8))
    message.record_noise = -0.8
    with pytest.raises(WireError, match="record_noise must be a finite number >= 0"):
        wire.plan_from_proto(message)


def test_a_large_tensor_is_cut_into_chunks_and_put_back_together() -> None:
    weights = np.random.default_rng(0).standard_normal(3 * wire.CHUNK_BYTES // 4 + 17).astype(np.float32)
    task = Task("a", Plan(round=3), model_version=2, extras={"control": np.ones(5, np.float32)})
    header, tensors = wire.train_message(9, task, weights)
    parts = list(wire.chunks(header, tensors))
    assert parts[0].WhichOneof("part") == "header"
    assert all(len(p.data) <= wire.CHUNK_BYTES for p in parts[1:])
    assert len(parts) >= 5
    message = wire.assemble(parts, LIMIT)
    assert message.kind == "train" and message.header.ticket == 9
    np.testing.assert_array_equal(message.tensor("weights", np.float32, weights.size), weights)
    np.testing.assert_array_equal(message.tensors["control"], np.ones(5, np.float32))
    assert wire.plan_from_proto(message.header.train.plan) == task.plan


def test_an_update_travels_with_its_payload_and_metrics() -> None:
    update = Update(
        "site-1", 4, 120, np.arange(10, dtype=np.float32), 3, {"train_loss": 1.5, "steps": 12.0},
        {"control_delta": np.full(10, 0.5, np.float32), "masked_input": np.arange(7, dtype=np.uint8)},
    )  # fmt: skip
    back = wire.read_update(roundtrip(*wire.update_message(1, b"s", update)))
    assert (back.site, back.round, back.num_examples, back.model_version) == ("site-1", 4, 120, 3)
    assert back.metrics == update.metrics
    np.testing.assert_array_equal(back.vector, update.vector)
    assert set(back.payload) == {"control_delta", "masked_input"}
    np.testing.assert_array_equal(back.payload["masked_input"], np.arange(7, dtype=np.uint8))
    masked = Update("s", 1, 5, None, 0, payload={"masked_input": np.zeros(3, np.uint8)})
    assert wire.read_update(roundtrip(*wire.update_message(1, b"s", masked))).vector is None


def test_an_evaluation_must_be_possible() -> None:
    header, _ = wire.evaluation_message(1, b"s", SiteEvaluation("a", 3.0, 5, 4))
    with pytest.raises(WireError, match="correct"):
        wire.read_evaluation(roundtrip(header, []))


def test_a_declared_size_above_the_limit_is_refused_before_any_data_is_read() -> None:
    header = pb.Header(ticket=1, idle=pb.Idle())
    header.version = wire.VERSION
    header.tensors.add(name="weights", dtype="float32", shape=[2**40, 2**20])

    def stream():
        yield pb.Chunk(header=header)
        raise AssertionError("the data must not be read")

    with pytest.raises(WireError, match="limit"):
        wire.assemble(stream(), LIMIT)


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda parts: parts[:-1], "truncated"),
        (lambda parts: [*parts, pb.Chunk(data=b"x")], "more than"),
        (lambda parts: [*parts[:2], parts[0], *parts[2:]], "second one"),
        (lambda parts: parts[1:], "start with a header"),
        (lambda parts: [], "empty"),
    ],
)
def test_a_damaged_stream_is_refused(damage, match) -> None:
    header, tensors = wire.exchange_message(1, bytes(range(256)) * 10)
    parts = list(wire.chunks(header, tensors))
    with pytest.raises(WireError, match=match):
        wire.assemble(damage(parts), LIMIT)


def test_another_version_and_unknown_dtypes_are_refused() -> None:
    parts = list(wire.chunks(pb.Header(idle=pb.Idle())))
    parts[0].header.version = wire.VERSION + 1
    with pytest.raises(WireError, match="version"):
        wire.assemble(parts, LIMIT)
    header = pb.Header(version=wire.VERSION, idle=pb.Idle())
    header.tensors.add(name="x", dtype="object", shape=[1])
    with pytest.raises(WireError, match="dtype"):
        wire.assemble([pb.Chunk(header=header), pb.Chunk(data=b"12345678")], LIMIT)
    with pytest.raises(WireError, match="does not travel"):
        list(wire.chunks(pb.Header(idle=pb.Idle()), [("x", np.zeros(2, np.complex64))]))


tensor = st.tuples(
    st.sampled_from(sorted(wire.DTYPES)),
    st.lists(st.integers(0, 40), min_size=0, max_size=3),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(tensor, max_size=4), st.integers(0, 2**63))
def test_any_set_of_tensors_round_trips(specs, ticket) -> None:
    rng = np.random.default_rng(1)
    tensors = [
        (f"t{i}", (rng.standard_normal(math.prod(shape)) * 100).astype(dtype).reshape(shape))
        for i, (dtype, shape) in enumerate(specs)
    ]
    message = roundtrip(pb.Header(ticket=ticket, exchange=pb.Exchange()), tensors)
    assert message.header.ticket == ticket
    for name, array in tensors:
        assert message.tensors[name].shape == array.shape
        np.testing.assert_array_equal(message.tensors[name], array)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=6))
def test_arbitrary_bytes_give_a_message_or_a_wire_error_and_nothing_else(blobs) -> None:
    parts = []
    for blob in blobs:
        try:
            parts.append(pb.Chunk.FromString(blob))
        except Exception:  # not a protobuf at all: gRPC itself would refuse it before us
            parts.append(pb.Chunk(data=blob))
    with contextlib.suppress(WireError):
        wire.assemble(parts, 1 << 16)


@settings(max_examples=100, deadline=None)
@given(st.one_of(st.binary(max_size=300), st.sampled_from([127, 128, 16383, 16384, 2**21]).map(bytes)))
def test_a_data_chunk_is_encoded_as_protobuf_would_and_read_back_without_a_copy(data) -> None:
    encoded = wire.encode_chunk(wire.DataChunk(memoryview(data)))
    assert encoded == pb.Chunk(data=data).SerializeToString()
    decoded = wire.decode_chunk(encoded)
    assert isinstance(decoded, wire.DataChunk) and bytes(decoded.data) == data
    assert decoded.data.obj is encoded  # a view of the received bytes


def test_other_chunks_go_through_protobuf_and_garbage_is_a_wire_error() -> None:
    header = pb.Chunk(header=pb.Header(version=wire.VERSION, ticket=3, idle=pb.Idle()))
    decoded = wire.decode_chunk(wire.encode_chunk(header))
    assert isinstance(decoded, pb.Chunk) and decoded.header.ticket == 3
    # A data field followed by more fields is not the fast path's shape: protobuf reads it.
    mixed = pb.Chunk(data=b"abc").SerializeToString() + pb.Chunk(data=b"de").SerializeToString()
    assert isinstance(wire.decode_chunk(mixed), pb.Chunk) and wire.decode_chunk(mixed).data == b"de"
    with pytest.raises(WireError, match="not a valid protobuf"):
        wire.decode_chunk(b"\x12\x05ab")  # declares 5 bytes, holds 2


def test_message_bytes_is_what_the_chunks_encode_to_without_copying() -> None:
    """The local backend counts a message's bytes with message_bytes: exactly the encoded chunks, each with
    gRPC's 5-byte prefix, for a tensor spread over several chunks and for one that fits in the header's."""
    from confide.core import Task

    weights = np.arange(1_500_000, dtype=np.float32)  # 6 MB: two data chunks
    task = Task("s", Plan(round=3, seed=9), 2, {"control": np.ones(10, np.float32)})
    header, tensors = wire.train_message(7, task, weights)
    encoded = [wire.encode_chunk(c) for c in wire.chunks(header, tensors)]
    assert len(encoded) == 4  # header, two chunks of the weights, the control variate
    header, tensors = wire.train_message(7, task, weights)
    assert wire.message_bytes(header, tensors) == sum(len(e) + wire.GRPC_FRAME for e in encoded)
    answer = wire.answer_message(1, b"session", b"")
    assert wire.message_bytes(*answer) == len(wire.encode_chunk(next(wire.chunks(*answer)))) + 5
