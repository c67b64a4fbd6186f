"""A coordinate subset common to the round under secure aggregation: both sides draw the same values, error
feedback sends every value eventually, what leaves a site stays within the clip norm, and whole runs send
the masked subset only and learn."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from confide.client.state import MemorySiteState
from confide.compress.subset import RESIDUAL_KEY, SubsetLayer, subset, subset_size
from confide.core import Plan, Update
from confide.privacy.dp import l2_norm
from confide.privacy.secure import SecAggLayer
from confide.runtime.runner import Runner
from tests.compress import helpers
from tests.compress.helpers import module_config, round_context, site_context


def test_both_sides_draw_the_same_subset_of_the_right_size_and_a_new_one_each_round() -> None:
    a, b = subset(7, 3, 1000, 0.25), subset(7, 3, 1000, 0.25)
    np.testing.assert_array_equal(a, b)
    assert a.size == subset_size(1000, 0.25) == 250 and np.all(np.diff(a) > 0) and a[-1] < 1000
    assert not np.array_equal(a, subset(7, 4, 1000, 0.25))
    assert not np.array_equal(a, subset(8, 3, 1000, 0.25))


def test_error_feedback_sends_every_value_eventually() -> None:
    layer = SubsetLayer(0.25, seed=1)
    state = MemorySiteState()
    rng = np.random.default_rng(0)
    vector = rng.normal(size=400).astype(np.float32)
    total = np.zeros(400, np.float64)
    for r in range(1, 13):
        site = site_context(Plan(round=r, seed=r), state)
        update = layer.encode(Update("site0", r, 1, vector.copy(), r - 1), site)
        positions = subset(1, r, 400, 0.25)
        assert update.vector is not None and update.vector.shape == (100,)
        total[positions] += update.vector
    residual = state.get("site0", RESIDUAL_KEY)
    assert residual is not None
    # What was sent plus what is still kept is what the site had, twelve times over: nothing is lost.
    np.testing.assert_allclose(total + residual, 12 * vector, rtol=1e-4, atol=1e-4)


def test_what_leaves_a_site_is_clipped_to_the_clip_norm_and_the_rest_is_kept() -> None:
    layer = SubsetLayer(0.5, seed=2, clip_norm=1.0)
    state = MemorySiteState()
    vector = np.full(64, 1.0, np.float32)  # norm 8; its half on the subset has norm sqrt(32)
    update = layer.encode(Update("site0", 1, 1, vector.copy(), 0), site_context(Plan(round=1), state))
    assert update.vector is not None and l2_norm(update.vector) == pytest.approx(1.0, rel=1e-6)
    residual = state.get("site0", RESIDUAL_KEY)
    positions = subset(2, 1, 64, 0.5)
    full = np.zeros(64, np.float32)
    full[positions] = update.vector
    np.testing.assert_allclose(full + residual, vector, rtol=1e-6)
    # The plan's clip norm (adaptive clipping moves it) wins over the layer's own.
    update = layer.encode(Update("site0", 2, 1, vector.copy(), 1), site_context(Plan(round=2, clip_norm=0.5)))
    assert update.vector is not None and l2_norm(update.vector) == pytest.approx(0.5, rel=1e-6)


def test_the_server_aggregates_and_steps_on_the_round_s_subset() -> None:
    layer = SubsetLayer(0.25, seed=3)
    round = round_context(1000, Plan(round=5))
    layer.begin(round)
    assert round.shared is not None
    np.testing.assert_array_equal(round.shared, subset(3, 5, 1000, 0.25))


# -- whole runs under secure aggregation -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return module_config(tmp_path_factory, "subset")


QUANTIZED = ("privacy.secure_aggregation=true", "compression.kind=quantize", "compression.bits=4")


def run(path: Path, *overrides: str) -> tuple[Runner, list[dict[str, Any]]]:
    return helpers.run(path, *QUANTIZED, "compression.rotate=true", "privacy.secagg_range=0.1", *overrides)


def secagg(runner: Runner) -> SecAggLayer:
    (layer,) = [layer for layer in runner.federation.layers if isinstance(layer, SecAggLayer)]
    return layer


def masked_bytes(runner: Runner) -> int:
    """One masked input's packed values: ceil(V b / 8), V the masked vector's values (update and sums)."""
    layer = secagg(runner)
    return math.ceil(layer.vector_size * layer.settings.params(3).fixed_point.modulus_bits / 8)


def test_a_secure_run_on_a_common_half_sends_half_the_values_and_learns(tiny: Path) -> None:
    whole, whole_rows = run(tiny, "run.name=whole")
    half, rows = run(tiny, "compression.subset=0.5", "run.name=half")
    # The masked vector holds the round's half of the values, then the sums' digits, as before.
    size = half.layout.size
    assert secagg(half).vector_size - subset_size(size, 0.5) == secagg(whole).vector_size - size
    for before, after in zip(whole_rows, rows, strict=True):
        # The masked inputs are the only messages whose size differs (3 sites a round).
        sent_before = before["bytes_received"] - before["eval_bytes_received"]
        sent_after = after["bytes_received"] - after["eval_bytes_received"]
        assert abs((sent_before - sent_after) - 3 * (masked_bytes(whole) - masked_bytes(half))) <= 3 * 16
    assert rows[-1]["loss"] < rows[0]["loss"]
    # The model moves on each round's subset only, and every value moves over the run.
    assert not np.array_equal(half.state.weights, whole.state.weights)


def test_distributed_dp_on_a_common_subset_is_accounted_as_without_it(tiny: Path) -> None:
    dp = ("privacy.dp=distributed", "privacy.noise_multiplier=0.8", "privacy.clip_norm=0.5")
    _, plain = run(tiny, *dp, "run.name=dp_whole")
    _, rows = run(tiny, *dp, "compression.subset=0.25", "run.name=dp_quarter")
    assert [r["epsilon"] for r in rows] == [r["epsilon"] for r in plain]
    assert all(np.isfinite(r["loss"]) for r in rows)
