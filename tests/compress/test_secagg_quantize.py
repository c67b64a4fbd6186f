"""Quantization into secure aggregation's ring: real SecAgg rounds (key agreement, shares, masks, unmasking)
between the layer's server half and its sites' halves, in this process. The decoded sum is unbiased and
within one step per site, exact on the grid, never wraps; the masked input is packed at b bits and a
malformed one is refused; a site refuses a Setup with other quantization settings; and whole runs learn with
the upload shrunk by the factor b predicts, with DP's epsilon unchanged."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from confide.compress.quantize import QuantizeLayer
from confide.core import Plan, Task, Update
from confide.errors import UpdateError
from confide.pipeline import RoundAbandoned, RoundContext, SiteContext
from confide.privacy.quantized import rotated_range
from confide.privacy.secagg import (
    SERVER,
    MaskedInput,
    MessageError,
    SecAggClient,
    SecAggExpectation,
    SecAggParams,
    SecAggServer,
)
from confide.privacy.secure import MASKED, SecAggLayer, SecureAggregation
from confide.randomness import SecretRandomness
from confide.runtime.runner import Runner
from tests.compress import helpers
from tests.compress.helpers import module_config

SITES = ("site0", "site1", "site2")


class SumOnly:
    """An aggregator that keeps the one sum secure aggregation hands over (what the server learns)."""

    name = "sum"

    def init(self, size: int) -> dict[str, Any]:
        return {}

    def add(self, state: dict[str, Any], update: Update) -> None:
        raise AssertionError("secure aggregation handed over a single update")

    def add_sum(self, state: dict[str, Any], total: np.ndarray, count: int) -> None:
        state["total"], state["count"] = total.astype(np.float64), count


Tamper = Callable[[str, Update], Update]


def secure_sum(
    layer: SecAggLayer, vectors: Mapping[str, np.ndarray], tamper: Tamper | None = None, number: int = 1
) -> RoundContext:
    """One round of the layer over ``vectors`` (site -> update): the protocol's exchanges run between the
    layer's server half and each site's half; ``tamper`` may change an encoded update on its way."""
    sites = sorted(vectors)
    sessions: dict[str, dict[str, object]] = {s: {} for s in sites}

    def exchange(messages: Mapping[str, bytes]) -> Iterator[tuple[str, bytes]]:
        for site, data in messages.items():
            answer = layer.answer(data, site, sessions[site])
            if answer:
                yield site, answer

    size = next(iter(vectors.values())).size
    plan = Plan(round=number, seed=1)
    aggregator = SumOnly()
    round = RoundContext(
        round=number,
        sites=sites,
        tasks={s: Task(s, plan, 0) for s in sites},
        weights=np.zeros(size, dtype=np.float32),
        server_state={},
        exchange=exchange,
        min_updates=1,
        randomness=SecretRandomness(),
        population=len(sites),
        aggregator=aggregator,  # type: ignore[arg-type]
        aggregate=aggregator.init(size),
    )
    layer.begin(round)
    for site in sites:
        sums = {"loss_sum": 25.0, "steps": 3.0}
        update = Update(site, number, 10, np.asarray(vectors[site], dtype=np.float32), 0, sums=sums)
        encoded = layer.encode(update, SiteContext(site, plan, SecretRandomness(), sessions[site]))
        layer.decode(tamper(site, encoded) if tamper else encoded, round)
    layer.close(round)
    return round


def quantized(bits: int, clip_range: float = 1.0, rotate: bool = False, size: int = 1024) -> SecAggLayer:
    return SecAggLayer(SecureAggregation(clip_range=clip_range, quantize_bits=bits, rotate=rotate), size)


def gap(bits: int, clip_range: float) -> float:
    """The distance between neighbouring levels: R / L, or 2R between the one-bit levels -R and +R."""
    return 2 * clip_range if bits == 1 else clip_range / (2 ** (bits - 1) - 1)


@pytest.mark.parametrize(("bits", "rotate"), [(1, False), (2, False), (8, False), (4, True)])
def test_the_decoded_sum_is_unbiased_and_off_by_less_than_a_step_per_site(bits: int, rotate: bool) -> None:
    clip_range, repeats = (0.25, 30) if rotate else (1.0, 30)
    rng = np.random.default_rng(4)
    scale = 0.02 if rotate else 0.9  # rotated, a coordinate is about the block's norm / 32
    vectors = {s: rng.uniform(-scale, scale, 1024).astype(np.float32) for s in SITES}
    truth = sum(v.astype(np.float64) for v in vectors.values())
    layer = quantized(bits, clip_range, rotate)
    errors = []
    for number in range(1, repeats + 1):
        round = secure_sum(layer, vectors, number=number)
        assert round.aggregate["count"] == 3 and round.summed == list(SITES)
        assert round.sums["examples"] == 30.0 and round.sums["loss_sum"] == 75.0  # exact, in digits
        errors.append(round.aggregate["total"] - truth)
    error = np.array(errors)
    step = gap(bits, clip_range)
    if not rotate:  # each site's value lands on a neighbouring level: off by less than one step
        assert np.abs(error).max() < 3 * step
    # Each site's rounding has variance at most step^2 / 4 per coordinate (the rotation keeps the total).
    spread = math.sqrt(3 * step**2 / 4)
    assert np.sqrt((error**2).mean()) <= spread
    # Unbiased: the mean error over the repeats is within 6 standard errors, per coordinate and overall.
    assert np.abs(error.mean(axis=0)).max() < 6 * spread / math.sqrt(repeats)
    assert abs(error.mean()) < 6 * spread / math.sqrt(repeats * error.shape[1])


def test_values_on_the_grid_sum_exactly() -> None:
    # R = 7 with 4 bits: L = 7 levels each side, one unit apart, so integers are on the grid.
    rng = np.random.default_rng(1)
    vectors = {s: rng.integers(-7, 8, 1500).astype(np.float32) for s in SITES}
    round = secure_sum(quantized(4, clip_range=7.0, size=1500), vectors)
    np.testing.assert_array_equal(
        round.aggregate["total"], sum(v.astype(np.float64) for v in vectors.values())
    )


@pytest.mark.parametrize("bits", [1, 2, 8, 16])
def test_the_sum_never_wraps_at_the_extremes(bits: int) -> None:
    layer = quantized(bits, clip_range=0.5)
    levels = max(1, 2 ** (bits - 1) - 1)
    ring = layer.settings.params(3).fixed_point.modulus_bits
    assert ring == (3 * levels).bit_length() + 1
    assert 3 * levels >= 2 ** (ring - 2)  # one bit fewer and the extremes would wrap around
    for sign in (1.0, -1.0):
        # Beyond R on every coordinate: every site is clipped to the extreme level.
        vectors = {s: np.full(1024, sign * 0.75, dtype=np.float32) for s in SITES}
        round = secure_sum(layer, vectors)
        np.testing.assert_array_equal(round.aggregate["total"], np.full(1024, sign * 1.5))
        assert round.sums["secagg_clipped"] == 3.0


def test_a_site_that_pushes_the_small_ring_to_wrap_loses_the_round() -> None:
    """A hostile site adds 2^(b-1) - 1 to one masked value (b = 10: 511, more than the 3 L = 381 that three
    sites' levels can add up to): the sum leaves [-3L, 3L], and the server refuses the whole sum instead of
    decoding a wrong one. (What stays within the range, a site's level pushed to L, no check can tell from an
    honest update: the range bounds a poisoned update, it does not detect one.)"""
    layer = quantized(8)
    bits = layer.settings.params(3).fixed_point.modulus_bits

    def push(site: str, update: Update) -> Update:
        if site != "site1":
            return update
        message = MaskedInput.from_bytes(update.payload[MASKED].tobytes())
        vector = message.vector.copy()
        vector[7] = (int(vector[7]) + (1 << (bits - 1)) - 1) % (1 << bits)
        hostile = replace(message, vector=vector)
        return replace(update, payload={MASKED: np.frombuffer(hostile.to_bytes(), dtype=np.uint8)})

    with pytest.raises(RoundAbandoned, match=r"unmasked sum was refused.*on 1 of"):
        secure_sum(layer, {s: np.zeros(1024, dtype=np.float32) for s in SITES}, push)


def masked_header(bits: int) -> int:
    return MaskedInput(sender="site0", round=1, vector=np.zeros(0, dtype=np.uint32), bits=bits).nbytes


def test_the_masked_input_is_packed_at_b_bits_and_a_malformed_one_is_refused() -> None:
    layer = quantized(8, size=5000)
    bits = layer.settings.params(3).fixed_point.modulus_bits
    assert bits == (3 * 127).bit_length() + 1 == 10
    sizes: dict[str, int] = {}

    def measure(site: str, update: Update) -> Update:
        sizes[site] = update.payload[MASKED].size
        return update

    vectors = {s: np.zeros(5000, dtype=np.float32) for s in SITES}
    secure_sum(layer, vectors, measure)
    assert sizes == dict.fromkeys(SITES, masked_header(bits) + math.ceil(layer.vector_size * bits / 8))

    def cut(site: str, update: Update) -> Update:
        data = update.payload[MASKED]
        if site == "site1":
            return replace(update, payload={MASKED: data[:-1]})
        if site == "site2":
            return replace(update, payload={MASKED: np.concatenate([data, np.zeros(1, np.uint8)])})
        return update

    with pytest.raises(UpdateError, match="truncated"):
        secure_sum(layer, vectors, lambda site, update: cut(site, update) if site == "site1" else update)
    with pytest.raises(UpdateError, match="1 unexpected bytes after the last field"):
        secure_sum(layer, vectors, lambda site, update: cut(site, update) if site == "site2" else update)


def test_the_server_refuses_a_masked_input_packed_at_another_width() -> None:
    layer = quantized(8)
    bits = layer.settings.params(3).fixed_point.modulus_bits

    def widen(site: str, update: Update) -> Update:
        message = MaskedInput.from_bytes(update.payload[MASKED].tobytes())
        wide = replace(message, bits=32)  # the same values, each in a whole word
        return replace(update, payload={MASKED: np.frombuffer(wide.to_bytes(), dtype=np.uint8)})

    with pytest.raises(
        UpdateError, match=f"packed at 32 bits per value; this round's ring Z_\\(2\\^b\\) has b = {bits}"
    ):
        secure_sum(layer, {s: np.zeros(1024, dtype=np.float32) for s in SITES}, widen)


@pytest.mark.parametrize(
    ("proposed", "named"),
    [
        ({"quantize_bits": 4}, "quantization bits 4"),  # coarser than the site's 8
        ({"quantize_bits": 0}, "quantization bits 0"),  # the fixed point instead
        ({"rotated": False}, "rotation False"),
    ],
)
def test_a_site_refuses_a_setup_with_other_quantization_settings(
    proposed: dict[str, Any], named: str
) -> None:
    own = SecAggParams(sites=3, quantize_bits=8, rotated=True)
    server = SecAggServer(replace(own, **proposed), SITES, 1, 100)
    expect = SecAggExpectation.of(own, 100)
    with pytest.raises(
        MessageError, match=f"server proposed {named} for 3 sites, but this site's configuration"
    ):
        SecAggClient("site0", SERVER, server.setup(), expect=expect)
    SecAggClient("site0", SERVER, SecAggServer(own, SITES, 1, 100).setup(), expect=expect)  # the same: taken


def test_the_rotated_default_range_follows_the_clip_norm_and_the_noise() -> None:
    assert rotated_range(1.0) == pytest.approx(6 / 32)
    assert rotated_range(2.0, 0.5) == pytest.approx(12 * math.sqrt(1 / 1024 + 0.25))


# -- whole runs ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return module_config(tmp_path_factory, "secagg_quantize")


def run(path: Path, *overrides: str) -> tuple[Runner, list[dict[str, Any]]]:
    return helpers.run(path, "privacy.secure_aggregation=true", *overrides)


@pytest.fixture(scope="module")
def plain(tiny: Path) -> tuple[Runner, list[dict[str, Any]]]:
    """The same run with secure aggregation and no compression."""
    return run(tiny, "run.name=secagg")


def secagg_layer(runner: Runner) -> SecAggLayer:
    layers = runner.federation.layers
    assert not any(isinstance(layer, QuantizeLayer) for layer in layers)  # SecAgg quantizes, nobody else
    (layer,) = [layer for layer in layers if isinstance(layer, SecAggLayer)]
    return layer


def masked_bytes(layer: SecAggLayer, sites: int) -> int:
    """One masked input's packed values: ceil(V b / 8), with V the masked vector's values."""
    return math.ceil(layer.vector_size * layer.settings.params(sites).fixed_point.modulus_bits / 8)


def upload(rows: list[dict[str, Any]]) -> list[int]:
    """Bytes the sites sent each round for training (the masked inputs and their protocol answers)."""
    return [r["bytes_received"] - r["eval_bytes_received"] for r in rows]


@pytest.mark.parametrize(
    "overrides",
    [
        ("compression.bits=8",),
        ("compression.bits=4", "compression.rotate=true", "privacy.secagg_range=0.1"),
    ],
    ids=["8 bits", "4 bits rotated"],
)
def test_a_quantized_secure_run_learns_with_the_upload_shrunk_by_the_ring_ratio(
    tiny: Path, plain: tuple[Runner, list[dict[str, Any]]], overrides: tuple[str, ...]
) -> None:
    plain_runner, plain_rows = plain
    name = f"run.name=quantized_{len(overrides)}"
    runner, rows = run(tiny, "compression.kind=quantize", *overrides, name)
    plain_masked, masked = masked_bytes(secagg_layer(plain_runner), 3), masked_bytes(secagg_layer(runner), 3)
    # 3 sites of 18432 values: the fixed point's ring has bit_length(3 * 2^20) + 1 = 23 bits; 8-bit levels
    # need bit_length(3 * 127) + 1 = 10, 4-bit ones bit_length(3 * 7) + 1 = 6.
    expected = plain_masked / masked
    assert expected > (2.2 if "compression.bits=8" in overrides else 3.6)
    for before, after in zip(upload(plain_rows), upload(rows), strict=True):
        # Every other protocol message is the same size in both runs: the difference is the masked inputs'
        # (a few bytes of the wire's headers aside), and the protocol's overhead keeps the ratio near b's.
        assert abs((before - after) - 3 * (plain_masked - masked)) <= 3 * 16
        assert before / after > 0.9 * expected
    assert rows[-1]["loss"] < rows[0]["loss"]  # it learns
    # Close to uncompressed secure aggregation (measured: within 0.5%; the dither is secret, so not exact).
    assert abs(rows[-1]["loss"] - plain_rows[-1]["loss"]) < 0.05 * plain_rows[-1]["loss"]


def test_distributed_dp_with_quantized_secure_aggregation_reports_the_same_epsilon(tiny: Path) -> None:
    dp = ("privacy.dp=distributed", "privacy.noise_multiplier=0.8", "privacy.clip_norm=0.5")
    _, plain = run(tiny, *dp, "run.name=dp_secagg")
    runner, rows = run(tiny, *dp, "compression.kind=quantize", "compression.rotate=true", "run.name=dp_q")
    assert len(rows) == len(plain) == 4 and all(np.isfinite(r["loss"]) for r in rows)
    assert [r["epsilon"] for r in rows] == [r["epsilon"] for r in plain]
    # R was left at 0: with the rotation it defaults to six standard deviations of a rotated coordinate.
    layer = secagg_layer(runner)
    dp_policy = runner.dp
    assert dp_policy is not None
    spread = dp_policy.update_noise / math.sqrt(dp_policy.share_sites)
    assert layer.settings.clip_range == pytest.approx(rotated_range(0.5, spread))
