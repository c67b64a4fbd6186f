"""Stochastic quantization and the Hadamard rotation: unbiased, bounded error, exact packing, refusals."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from confide.compress.quantize import (
    BLOCK,
    QuantizeLayer,
    hadamard,
    pack,
    packed_bytes,
    rotation_signs,
    unpack,
)
from confide.core import Plan
from confide.errors import ConfigError, UpdateError
from tests.compress.helpers import SITE, round_context, round_trip, update

RNG = np.random.default_rng(2026)


@given(bits=st.integers(1, 16), count=st.integers(1, 300), seed=st.integers(0, 2**32 - 1))
@settings(max_examples=60, deadline=None)
def test_packing_round_trips_every_width(bits: int, count: int, seed: int) -> None:
    levels = np.random.default_rng(seed).integers(0, 1 << bits, size=count).astype(np.uint16)
    data = pack(levels, bits)
    assert data.dtype == np.uint8 and data.size == packed_bytes(count, bits)
    assert np.array_equal(unpack(data, bits, count), levels)


def test_hadamard_is_orthonormal_and_its_own_inverse() -> None:
    n = 64
    matrix = hadamard(np.eye(n))
    assert np.allclose(matrix @ matrix.T, np.eye(n), atol=1e-12)
    assert np.allclose(matrix, matrix.T)
    blocks = RNG.standard_normal((5, BLOCK))
    assert np.allclose(hadamard(hadamard(blocks)), blocks, atol=1e-12)
    assert np.allclose(np.linalg.norm(hadamard(blocks), axis=1), np.linalg.norm(blocks, axis=1))
    # Against the Sylvester construction H_2n = [[H, H], [H, -H]].
    sylvester = np.ones((1, 1))
    while sylvester.shape[0] < n:
        sylvester = np.block([[sylvester, sylvester], [sylvester, -sylvester]])
    assert np.allclose(matrix, sylvester / np.sqrt(n))
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard(np.ones((1, 12)))


def variance(vector: np.ndarray, bits: int, rotate: bool, plan: Plan) -> np.ndarray:
    """Each decoded value's variance, from the quantizer's definition: a value y = k + p levels up
    (0 <= p < 1) rounds up with probability p, so its variance is p (1 - p) steps squared; a rotation
    spreads each block's variance evenly over its values (H D is orthonormal with entries +-1/sqrt(n))."""
    padded = np.zeros(-(-vector.size // BLOCK) * BLOCK)
    padded[: vector.size] = vector
    blocks = padded.reshape(-1, BLOCK)
    if rotate:
        blocks = hadamard(blocks * rotation_signs(plan, SITE, padded.size).reshape(-1, BLOCK))
    lo = blocks.min(axis=1, keepdims=True)
    step = (blocks.max(axis=1, keepdims=True) - lo) / ((1 << bits) - 1)
    p = np.mod((blocks - lo) / step, 1.0)
    each = p * (1 - p) * step**2
    if rotate:
        each = np.broadcast_to(each.mean(axis=1, keepdims=True), each.shape)
    return each.reshape(-1)[: vector.size]


@pytest.mark.parametrize("rotate", [False, True])
def test_the_mean_of_many_quantizations_is_the_vector(rotate: bool) -> None:
    vector = RNG.standard_normal(1500).astype(np.float32)
    vector[7] = 9.0
    plan = Plan(round=1, seed=11)
    layer = QuantizeLayer(2, rotate=rotate)
    draws = 400
    mean = np.mean([round_trip(layer, vector, plan)[1] for _ in range(draws)], axis=0, dtype=np.float64)
    error = np.sqrt(variance(vector, 2, rotate, plan) / draws)
    # Each coordinate within 5.5 standard errors (a biased quantizer at 2 bits, rounding to nearest, is off
    # by far more), and the standardised deviations look like N(0, 1) on average. Values that land on a
    # level exactly (a block's extremes) must come back exactly.
    exact = error < 1e-7
    assert np.abs(mean - vector)[exact].max(initial=0.0) < 1e-5
    z = (mean - vector)[~exact] / error[~exact]
    assert np.abs(z).max() < 5.5
    assert abs(float(z.mean())) < 0.15 and 0.8 < float(z.std()) < 1.2


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 6, 8, 12, 16])
def test_each_value_is_off_by_less_than_one_step_of_its_block(bits: int) -> None:
    vector = (RNG.standard_normal(3 * BLOCK + 77) * 0.01).astype(np.float32)
    _, decoded = round_trip(QuantizeLayer(bits), vector)
    padded = np.zeros(4 * BLOCK, dtype=np.float64)
    padded[: vector.size] = vector
    blocks = padded.reshape(-1, BLOCK)
    step = (blocks.max(axis=1) - blocks.min(axis=1)) / ((1 << bits) - 1)
    bound = np.repeat(step, BLOCK)[: vector.size] * (1 + 1e-5) + 1e-9
    assert (np.abs(decoded - vector) <= bound).all()
    assert decoded.dtype == np.float32 and decoded.shape == vector.shape


def test_more_bits_give_a_smaller_error() -> None:
    vector = RNG.standard_normal(4 * BLOCK).astype(np.float32)
    errors = [float(np.linalg.norm(round_trip(QuantizeLayer(b), vector)[1] - vector)) for b in (1, 2, 4, 8)]
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < errors[0] / 50


def test_the_rotation_shrinks_the_error_on_a_spiky_vector() -> None:
    # A few huge coordinates set the range of their block for the plain quantizer; rotated, every
    # coordinate of the block shares them, and the range shrinks by about sqrt(BLOCK / log BLOCK).
    vector = (RNG.standard_normal(8 * BLOCK) * 0.01).astype(np.float32)
    vector[RNG.choice(vector.size, 8, replace=False)] = 5.0

    def errors(layer: QuantizeLayer) -> list[float]:
        return [float(np.linalg.norm(round_trip(layer, vector)[1] - vector)) for _ in range(5)]

    plain, rotated = errors(QuantizeLayer(4)), errors(QuantizeLayer(4, rotate=True))
    assert max(rotated) < min(plain) / 3


def test_the_rotation_is_undone_only_with_the_sites_plan() -> None:
    vector = RNG.standard_normal(BLOCK).astype(np.float32)
    layer = QuantizeLayer(16, rotate=True)
    encoded, decoded = round_trip(layer, vector, plan=Plan(round=1, seed=3))
    assert np.allclose(decoded, vector, atol=1e-3)
    wrong = layer.decode(encoded, round_context(vector.size, Plan(round=1, seed=4)))
    assert wrong is not None and not np.allclose(wrong.vector, vector, atol=0.1)  # type: ignore[arg-type]


@pytest.mark.parametrize("bits", [1, 4, 8, 16])
def test_the_payload_is_bits_per_value_plus_a_range_per_block(bits: int) -> None:
    size = 5 * BLOCK
    encoded, _ = round_trip(QuantizeLayer(bits), RNG.standard_normal(size).astype(np.float32))
    assert encoded.vector is None
    assert sum(a.nbytes for a in encoded.payload.values()) == size * bits // 8 + 5 * 8


def test_a_malformed_payload_is_refused_with_an_update_error() -> None:
    layer = QuantizeLayer(4)
    vector = RNG.standard_normal(2 * BLOCK).astype(np.float32)
    encoded, _ = round_trip(layer, vector)

    def refused(**payload: np.ndarray) -> str:
        bad = update(vector)
        bad.vector = None
        bad.payload = {**encoded.payload, **payload}
        with pytest.raises(UpdateError) as info:
            layer.decode(bad, round_context(vector.size))
        return str(info.value)

    assert "bytes of 4-bit levels" in refused(compressed_levels=np.zeros(3, np.uint8))
    assert "lacks 4-bit levels" in refused(compressed_levels=np.zeros(BLOCK, np.float32))
    assert "block ranges" in refused(compressed_ranges=np.zeros(3, np.float32))
    assert "NaN or infinite" in refused(compressed_ranges=np.full(4, np.inf, np.float32))
    assert "negative step" in refused(compressed_ranges=np.array([0, -1, 0, 1], np.float32))
    bad = update(vector)
    bad.vector, bad.payload = None, {}
    with pytest.raises(UpdateError, match="lacks"):
        layer.decode(bad, round_context(vector.size))
    with pytest.raises(UpdateError, match="plain vector"):
        layer.decode(update(vector), round_context(vector.size))
    with pytest.raises(UpdateError, match="bytes of 4-bit levels"):  # a model of another size
        layer.decode(round_trip(layer, vector)[0], round_context(3 * BLOCK))


def test_a_site_whose_update_diverged_sends_nothing() -> None:
    vector = np.ones(10, dtype=np.float32)
    vector[3] = np.nan
    with pytest.raises(UpdateError, match="NaN"):
        round_trip(QuantizeLayer(8), vector)


@pytest.mark.parametrize("bits", [0, 17, 2.5, True])
def test_bits_out_of_range_are_refused(bits: object) -> None:
    with pytest.raises(ConfigError, match=r"compression\.bits"):
        QuantizeLayer(bits)  # type: ignore[arg-type]
