"""Each screening rule refuses a crafted update, records its score, and leaves the round to the others."""

from __future__ import annotations

import numpy as np
import pytest

from confide.core import Update, Vector
from confide.errors import ConfigError
from confide.pipeline import check_stack
from confide.privacy.secure import SecAggLayer
from confide.runtime.federation import Federation, ServerState, Task
from confide.server.robust import CoordinateMedian
from confide.server.screen import (
    COSINE_MEDIAN,
    COSINE_PREVIOUS,
    LOSS_INCREASE,
    NORM,
    PREVIOUS_KEY,
    REFUSED,
    ScreenLayer,
)
from confide.server.strategy import Strategy
from confide.server.validate import ValidateLayer
from tests.runtime.test_federation import ScriptedSites

DIRECTION = np.array([1.0, 2.0, -1.0, 0.5], dtype=np.float32)


def sites_with(attacker: str, attack: Vector) -> ScriptedSites:
    """Five sites: honest ones send DIRECTION with a little noise each; ``attacker`` sends ``attack``."""

    def answer(task: Task, weights: Vector) -> Update:
        i = int(task.site[1:])
        wobble = np.random.default_rng(i).normal(0, 0.05, size=4).astype(np.float32)
        vector = attack.copy() if task.site == attacker else DIRECTION + wobble
        return Update(task.site, task.plan.round, 10, vector, task.model_version)

    return ScriptedSites(answer)


def federation(screen: ScreenLayer) -> Federation:
    return Federation(Strategy(sites_per_round=5), [screen, ValidateLayer()])


def fresh(federation: Federation) -> ServerState:
    return ServerState(round=0, weights=np.zeros(4, np.float32), optimizer_state=federation.init_state(4))


def test_norm_bound_refuses_a_boosted_update_with_its_score() -> None:
    fed = federation(ScreenLayer(norm_bound=5.0))
    result = fed.round(fresh(fed), sites_with("s2", DIRECTION * 30))
    assert [site for site, _ in result.rejected] == ["s2"]
    reason = result.rejected[0][1]
    score = result.scores["s2"][NORM]
    assert score == pytest.approx(float(np.linalg.norm(DIRECTION * 30)), rel=1e-6)
    assert "defence.norm_bound = 5" in reason and f"{score:.4g}" in reason
    assert result.scores["s2"][REFUSED] == 1.0
    assert sorted(result.participants) == ["s0", "s1", "s3", "s4"]


def test_norm_bound_clips_when_told_to_and_refuses_nobody() -> None:
    fed = federation(ScreenLayer(norm_bound=5.0, norm_action="clip"))
    s = fresh(fed)
    result = fed.round(s, sites_with("s2", DIRECTION * 30))
    assert result.rejected == [] and len(result.participants) == 5
    # The mean moved by at most the honest mean plus a fifth of the bound (equal examples).
    assert np.linalg.norm(s.weights) <= np.linalg.norm(DIRECTION) * 1.1 + 5.0 / 5


def test_cosine_to_the_rounds_median_refuses_a_sign_flip() -> None:
    fed = federation(ScreenLayer(min_cosine=0.0))
    result = fed.round(fresh(fed), sites_with("s4", -DIRECTION))
    assert [site for site, _ in result.rejected] == ["s4"]
    assert result.scores["s4"][COSINE_MEDIAN] == pytest.approx(-1.0, abs=0.01)
    assert COSINE_PREVIOUS not in result.scores["s4"]  # the first round has no previous global update
    assert "the round's median update" in result.rejected[0][1]
    assert all(result.scores[s][COSINE_MEDIAN] > 0.99 for s in ("s0", "s1", "s2", "s3"))


def test_cosine_to_the_previous_global_update_refuses_what_turns_back() -> None:
    fed = Federation(Strategy(sites_per_round=2), [ScreenLayer(min_cosine=0.0), ValidateLayer()])
    s = fresh(fed)
    fed.round(s, sites_with("none", DIRECTION))  # two honest sites: too few for a median
    assert np.allclose(s.optimizer_state[PREVIOUS_KEY], DIRECTION, atol=0.1)
    chosen = Strategy(sites_per_round=2).select(2, [f"s{i}" for i in range(5)])
    result = fed.round(s, sites_with(chosen[0], -DIRECTION))
    assert [site for site, _ in result.rejected] == [chosen[0]]
    assert result.scores[chosen[0]][COSINE_PREVIOUS] == pytest.approx(-1.0, abs=0.01)
    assert "the previous global update" in result.rejected[0][1]


def test_validation_loss_refuses_an_update_that_alone_spoils_the_model() -> None:
    target = DIRECTION

    def loss(weights: Vector) -> float:  # a server-held "validation set" whose best model is DIRECTION
        return float(np.sum((weights - target) ** 2))

    fed = federation(ScreenLayer(max_loss_increase=1.0, validation=loss))
    result = fed.round(fresh(fed), sites_with("s1", np.array([0, 0, 9, 0], np.float32)))
    assert [site for site, _ in result.rejected] == ["s1"]
    # From w = 0: loss(0) = 6.25; loss(w + attack) = 1 + 4 + 100 + 0.25; increase 99.
    assert result.scores["s1"][LOSS_INCREASE] == pytest.approx(99.0, rel=1e-5)
    assert "defence.max_loss_increase = 1" in result.rejected[0][1]
    assert all(result.scores[s][LOSS_INCREASE] < 0 for s in ("s0", "s2", "s3", "s4"))


def test_the_screen_and_a_robust_aggregator_work_together() -> None:
    fed = Federation(
        Strategy(sites_per_round=5), [ScreenLayer(norm_bound=5.0), ValidateLayer()], CoordinateMedian()
    )
    s = fresh(fed)
    result = fed.round(s, sites_with("s0", DIRECTION * 30))
    assert [site for site, _ in result.rejected] == ["s0"]
    assert np.allclose(s.weights, DIRECTION, atol=0.1)


@pytest.mark.parametrize(
    ("layer", "aggregator"), [(ScreenLayer(norm_bound=1.0), None), (None, CoordinateMedian())]
)
def test_secure_aggregation_refuses_the_screen_and_robust_aggregators_naming_the_options(
    layer: ScreenLayer | None, aggregator: CoordinateMedian | None
) -> None:
    secagg = SecAggLayer.__new__(SecAggLayer)  # only its declared traits matter to the stack check
    layers = [layer, secagg] if layer is not None else [secagg]
    with pytest.raises(ConfigError) as caught:
        check_stack(layers, aggregator)
    message = str(caught.value)
    what = "layer 'screen'" if layer is not None else "aggregator 'median'"
    assert what in message
    assert "attested aggregator" in message
    assert "privacy.clip_norm" in message and "privacy.secagg_range" in message
    assert "sum checked for range" in message
