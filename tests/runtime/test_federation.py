"""The server side of a round against sites that misbehave, and the order of layers."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace

import numpy as np
import pytest

from confide.core import Traffic, Update, Vector
from confide.errors import ConfigError
from confide.pipeline import Layer, RoundAbandoned, RoundContext, Traits
from confide.runtime.federation import Federation, ServerState, SiteEvaluation, Task, summarize
from confide.server.strategy import Strategy

SITES = [f"s{i}" for i in range(5)]


class ScriptedSites:
    """Sites that answer each task with whatever ``answer`` makes of it: honest or hostile."""

    def __init__(self, answer: Callable[[Task, Vector], Update | list[Update]]) -> None:
        self.answer = answer
        self.moved = Traffic()

    def sites(self) -> Sequence[str]:
        return SITES

    def train(self, weights: Vector, tasks: Sequence[Task]) -> Iterator[Update]:
        for task in tasks:
            self.moved += Traffic(sent=weights.nbytes)
            out = self.answer(task, weights)
            for update in out if isinstance(out, list) else [out]:
                self.moved += Traffic(received=100)
                yield update

    def evaluate(self, weights: Vector, sites: Sequence[str]) -> Iterator[SiteEvaluation]:
        raise NotImplementedError

    def exchange(self, messages: object) -> Iterator[tuple[str, bytes]]:
        raise NotImplementedError

    def traffic(self) -> Traffic:
        return self.moved

    def now(self) -> float:
        return 0.0

    def close(self) -> None:
        pass


def honest(task: Task, weights: Vector) -> Update:
    value = float(task.site[1:]) + 1.0
    return Update(task.site, task.plan.round, int(value), np.full_like(weights, value), task.model_version)


def state() -> ServerState:
    return ServerState(round=0, weights=np.zeros(4, np.float32))


def test_honest_round_applies_weighted_mean() -> None:
    s = state()
    result = Federation(Strategy(sites_per_round=5)).round(s, ScriptedSites(honest))
    # site i sends value i+1 with weight i+1: mean = sum(v^2)/sum(v) = 55/15
    np.testing.assert_allclose(s.weights, np.full(4, 55 / 15), rtol=1e-6)
    assert result.round == s.round == 1 and result.num_examples == 15 and not result.rejected
    # The round reports what the backend counted while it ran.
    assert (result.bytes_sent, result.bytes_received) == (5 * 16, 5 * 100)


@pytest.mark.parametrize(
    ("attack", "reason"),
    [
        (lambda u: replace(u, vector=np.full(4, np.nan, np.float32)), "NaN or infinite"),
        (lambda u: replace(u, vector=np.zeros(7, np.float32)), "sent 7 values; the model has 4"),
        (lambda u: replace(u, round=99), "for round 99, not 1"),
        (lambda u: replace(u, site="intruder"), "which was not asked"),
        (lambda u: replace(u, num_examples=0), "at least one"),
        (lambda u: [u, u], "second update"),
    ],
)
def test_a_bad_update_is_refused_and_the_round_goes_on(
    attack: Callable[[Update], object], reason: str
) -> None:
    def answer(task: Task, weights: Vector) -> Update | list[Update]:
        update = honest(task, weights)
        return attack(update) if task.site == "s4" else update  # type: ignore[return-value]

    s = state()
    result = Federation(Strategy(sites_per_round=5)).round(s, ScriptedSites(answer))
    assert len(result.rejected) == 1 and reason in result.rejected[0][1]
    # Either s4's update never counted, or (duplicate) its first copy did.
    expected = 55 / 15 if reason == "second update" else 30 / 10
    np.testing.assert_allclose(s.weights, np.full(4, expected), rtol=1e-6)


def test_a_round_where_every_update_is_refused_leaves_the_model_unchanged() -> None:
    s = state()
    s.weights += 3
    result = Federation(Strategy(sites_per_round=3)).round(
        s, ScriptedSites(lambda t, w: replace(honest(t, w), round=5))
    )
    assert len(result.rejected) == 3 and result.num_examples == 0 and np.isnan(result.train_loss)
    np.testing.assert_array_equal(s.weights, np.full(4, 3, np.float32))


class Tag(Layer):
    """A layer that records the order in which its hooks run."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.tag, self.log = name, log

    def begin(self, round: RoundContext) -> None:
        self.log.append(f"begin {self.tag}")

    def decode(self, update: Update, round: RoundContext) -> Update | None:
        self.log.append(f"decode {self.tag}")
        return update

    def accept(self, update: Update, round: RoundContext) -> None:
        self.log.append(f"accept {self.tag}")

    def close(self, round: RoundContext) -> None:
        self.log.append(f"close {self.tag}")

    def finish(self, round: RoundContext) -> None:
        self.log.append(f"finish {self.tag}")


def test_server_runs_layers_in_stack_order_and_decodes_in_reverse() -> None:
    log: list[str] = []
    layers = [Tag("clip", log), Tag("protect", log)]
    Federation(Strategy(sites_per_round=1), layers).round(state(), ScriptedSites(honest))
    assert log == [
        "begin clip",
        "begin protect",
        "decode protect",
        "decode clip",
        "accept clip",
        "accept protect",
        "close protect",
        "close clip",
        "finish clip",
        "finish protect",
    ]


class Keep(Layer):
    """A layer that keeps every update and adds their sum in close(), as secure aggregation does."""

    name = "keep"
    traits = Traits(hides_updates=True)

    def __init__(self) -> None:
        self.kept: list[Update] = []

    def decode(self, update: Update, round: RoundContext) -> Update | None:
        self.kept.append(update)
        return None

    def close(self, round: RoundContext) -> None:
        total = np.sum([u.vector for u in self.kept], axis=0).astype(np.float32)
        round.add_sum(total, [u.site for u in self.kept], {"examples": 99.0})


def test_a_layer_that_keeps_updates_adds_only_their_sum_with_equal_weights() -> None:
    s = state()
    result = Federation(Strategy(sites_per_round=5), [Keep()]).round(s, ScriptedSites(honest))
    np.testing.assert_allclose(s.weights, np.full(4, 15 / 5), rtol=1e-6)  # (1 + ... + 5) / 5 sites
    assert result.participants == SITES and result.site_metrics == {} and result.num_examples == 99


class Abandon(Layer):
    name = "abandon"

    def close(self, round: RoundContext) -> None:
        raise RoundAbandoned("the protocol failed")


def test_a_layer_that_abandons_the_round_leaves_the_model_and_charges_nothing() -> None:
    s = state()
    charged: list[int] = []
    result = Federation(Strategy(sites_per_round=5), [Abandon()]).round(
        s, ScriptedSites(honest), charge=lambda r, sites: charged.append(r)
    )
    assert result.abandoned == "the protocol failed; the model is unchanged"
    assert charged == [] and s.round == 1
    np.testing.assert_array_equal(s.weights, np.zeros(4, np.float32))


def test_the_stack_check_names_the_layers_that_contradict_each_other() -> None:
    class Needy(Layer):
        name = "needy"
        traits = Traits(needs_individual_updates=True)

    class Fragile(Layer):
        name = "fragile"
        traits = Traits(needs_hidden_updates=True)

    with pytest.raises(ConfigError, match=r"'needy' must see each site's own update, but 'keep'"):
        Federation(Strategy(), [Needy(), Keep()])
    with pytest.raises(ConfigError, match=r"'fragile' is safe only if .* add secure aggregation"):
        Federation(Strategy(), [Fragile()])
    with pytest.raises(ConfigError, match=r"'fragile' is safe only if"):
        Federation(Strategy(), [Keep(), Fragile()])  # the hiding layer must come after it
    Federation(Strategy(), [Fragile(), Keep()])


def test_summary_pools_characters_and_reports_the_worst_decile() -> None:
    evaluations = [
        SiteEvaluation(f"s{i}", loss_sum=float(i + 1) * 10, correct=i, targets=10) for i in range(10)
    ]
    metrics, per_site = summarize(evaluations)
    assert metrics["accuracy"] == pytest.approx(45 / 100)
    assert metrics["loss"] == pytest.approx(550 / 100)
    assert metrics["perplexity"] == pytest.approx(np.exp(5.5))
    assert metrics["site_accuracy_p10"] == pytest.approx(np.percentile(np.arange(10) / 10, 10))
    assert metrics["site_loss_p90"] == pytest.approx(np.percentile(np.arange(1, 11), 90))
    assert per_site[3] == ("s3", 4.0, 0.3, 10)
