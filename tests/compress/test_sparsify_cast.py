"""Top-k with error feedback, and half-precision transport: what is sent, what is kept, what is refused."""

from __future__ import annotations

import numpy as np
import pytest

from confide.client.state import MemorySiteState
from confide.compress.cast import CastLayer, from_bfloat16, to_bfloat16
from confide.compress.sparsify import RESIDUAL_KEY, TopKLayer, kept
from confide.core import Plan
from confide.errors import ConfigError, UpdateError
from tests.compress.helpers import SITE, round_context, round_trip, update

RNG = np.random.default_rng(16)


def test_topk_sends_the_largest_values_and_keeps_exactly_the_rest_across_rounds() -> None:
    state = MemorySiteState()
    layer = TopKLayer(0.1)
    first = RNG.standard_normal(1000).astype(np.float32)
    sent, decoded = round_trip(layer, first, Plan(round=1, seed=1), state)
    top = np.argsort(-np.abs(first))[:100]
    assert set(np.flatnonzero(decoded)) == set(top)
    assert np.array_equal(decoded[top], first[top])
    residual = state.get(SITE, RESIDUAL_KEY)
    assert residual is not None
    assert np.array_equal(decoded + residual, first)  # nothing lost, nothing counted twice
    assert sum(a.nbytes for a in sent.payload.values()) == 100 * 8

    # Round 2: the site sends the top of its new update plus what it kept; it keeps what is left of both.
    second = RNG.standard_normal(1000).astype(np.float32)
    _, decoded2 = round_trip(layer, second, Plan(round=2, seed=2), state)
    total = second + residual
    top2 = np.argsort(-np.abs(total))[:100]
    assert np.array_equal(decoded2[top2], total[top2])
    assert np.array_equal(decoded2 + state.get(SITE, RESIDUAL_KEY), total)  # type: ignore[operator]
    # Over the two rounds the server received everything the site had, less what it still keeps.
    assert np.allclose(decoded + decoded2 + state.get(SITE, RESIDUAL_KEY), first + second, atol=1e-6)


def test_without_error_feedback_topk_forgets_the_rest() -> None:
    state = MemorySiteState()
    vector = RNG.standard_normal(200).astype(np.float32)
    _, decoded = round_trip(TopKLayer(0.05, error_feedback=False), vector, state=state)
    assert np.count_nonzero(decoded) == kept(200, 0.05) == 10
    assert state.get(SITE, RESIDUAL_KEY) is None


def test_a_residual_of_another_size_is_not_added() -> None:
    state = MemorySiteState()
    state.put(SITE, RESIDUAL_KEY, 0, np.ones(7, dtype=np.float32))
    vector = RNG.standard_normal(50).astype(np.float32)
    _, decoded = round_trip(TopKLayer(1.0), vector, state=state)
    assert np.array_equal(decoded, vector)


def test_malformed_topk_payloads_are_refused() -> None:
    layer = TopKLayer(0.1)
    vector = RNG.standard_normal(100).astype(np.float32)
    sent, _ = round_trip(layer, vector, state=MemorySiteState())

    def refused(**payload: np.ndarray) -> str:
        bad = update(vector)
        bad.vector, bad.payload = None, {**sent.payload, **payload}
        with pytest.raises(UpdateError) as info:
            layer.decode(bad, round_context(vector.size))
        return str(info.value)

    def indices(*values: int) -> np.ndarray:
        return np.array(values, dtype="<u4").view(np.uint8)

    assert "bytes of top-k indices" in refused(compressed_indices=indices(1, 2))
    assert "out of range" in refused(compressed_indices=indices(*range(9), 100))
    assert "repeated" in refused(compressed_indices=indices(*range(9), 8))
    assert "out of order" in refused(compressed_indices=indices(*range(1, 10), 0))
    assert "10 float32" in refused(compressed_values=np.zeros(10, np.float64))
    assert "NaN" in refused(compressed_values=np.full(10, np.nan, np.float32))


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5, True])
def test_a_fraction_outside_0_1_is_refused(fraction: object) -> None:
    with pytest.raises(ConfigError, match=r"compression\.fraction"):
        TopKLayer(fraction)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["float16", "bfloat16"])
def test_half_precision_halves_the_bytes_within_its_rounding(kind: str) -> None:
    vector = (RNG.standard_normal(999) * 0.1).astype(np.float32)
    sent, decoded = round_trip(CastLayer(kind), vector)
    assert sent.vector is None and sum(a.nbytes for a in sent.payload.values()) == 999 * 2
    relative = 2.0**-11 if kind == "float16" else 2.0**-8
    assert np.all(np.abs(decoded - vector) <= np.abs(vector) * relative + 1e-7)
    expected = vector.astype(np.float16).astype(np.float32) if kind == "float16" else None
    if expected is not None:
        assert np.array_equal(decoded, expected)


def test_bfloat16_rounds_to_nearest_even_as_torch_does() -> None:
    torch = pytest.importorskip("torch")
    vector = np.concatenate(
        [RNG.standard_normal(5000).astype(np.float32) * 10.0 ** RNG.integers(-30, 30, 5000), [0.0, -0.0]]
    ).astype(np.float32)
    ours = from_bfloat16(to_bfloat16(vector))
    theirs = torch.from_numpy(vector).to(torch.bfloat16).to(torch.float32).numpy()
    assert np.array_equal(ours, theirs)


def test_half_precision_refusals() -> None:
    with pytest.raises(UpdateError, match="bfloat16"):
        round_trip(CastLayer("float16"), np.array([1e5], dtype=np.float32))
    big = np.array([1e5, -3e20], dtype=np.float32)
    assert np.allclose(round_trip(CastLayer("bfloat16"), big)[1], big, rtol=2**-8)
    layer = CastLayer("float16")
    bad = update(np.ones(4))
    bad.vector, bad.payload = None, {"compressed_float16": np.zeros(6, np.uint8)}
    with pytest.raises(UpdateError, match="holds 6 bytes of float16 values; 8 were expected"):
        layer.decode(bad, round_context(4))
    bad.payload = {"compressed_float16": np.full(4, 0x7C00, "<u2").view(np.uint8)}  # float16 infinity
    with pytest.raises(UpdateError, match="NaN or infinite"):
        layer.decode(bad, round_context(4))
    with pytest.raises(ConfigError, match="float16"):
        CastLayer("float8")


def test_each_layer_says_what_it_sends_for_the_run_display() -> None:
    from confide.compress.quantize import QuantizeLayer

    line = QuantizeLayer(2, rotate=True).describe()
    assert "2 bits per value after a random Hadamard rotation, 0.258 bytes" in line
    assert "10.00% largest values sent, the rest kept" in TopKLayer(0.1).describe()
    assert "bfloat16, 2 bytes" in CastLayer("bfloat16").describe()


@pytest.mark.parametrize(
    "layer_name", ["quantize 3 bits", "quantize 16 bits rotated", "topk", "float16", "bfloat16"]
)
def test_every_kind_crosses_the_deployments_wire_and_decodes_the_same(layer_name: str) -> None:
    from confide.client.state import MemorySiteState
    from confide.compress.quantize import QuantizeLayer
    from confide.runtime.grpc import wire
    from tests.compress.helpers import site_context

    layers = {
        "quantize 3 bits": QuantizeLayer(3),
        "quantize 16 bits rotated": QuantizeLayer(16, rotate=True),
        "topk": TopKLayer(0.05),
        "float16": CastLayer("float16"),
        "bfloat16": CastLayer("bfloat16"),
    }
    layer = layers[layer_name]
    vector = RNG.standard_normal(3000).astype(np.float32)
    encoded = layer.encode(update(vector), site_context(state=MemorySiteState()))
    header, tensors = wire.update_message(1, b"s", encoded)
    assert all(array.dtype in (np.uint8, np.float32) for _, array in tensors)
    received = wire.read_update(wire.assemble(list(wire.chunks(header, tensors)), 64 << 20))
    assert received.vector is None
    local = layer.decode(encoded, round_context(vector.size))
    remote = layer.decode(received, round_context(vector.size))
    assert local is not None and remote is not None
    assert np.array_equal(local.vector, remote.vector)  # type: ignore[arg-type]
