"""Attack: under secure aggregation, read what one site sent besides its masked vector: its number of
examples (which gives away its size), training loss, steps, record-level epsilon, clipping bit, and its
evaluation (loss, correct predictions and targets on its held-out text, the last of which gives away that
text's size). Before, all of these travelled in clear; now the messages a deployed site sends hold masked
bytes and nothing else about the site, and the server learns those values only summed over the round's (or
the evaluation's) sites."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from confide import config
from confide.core import Plan, SiteEvaluation, Task, Update, Vector
from confide.runtime.federation import Backend, summarize
from confide.runtime.grpc import wire
from confide.runtime.local import LocalBackend
from confide.runtime.runner import Runner
from tests.conftest import tiny_config
from tests.relay import Relay


class Eavesdrop(Relay):
    """The server's view: every update exactly as a deployed site would put it on the wire."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.headers: list[object] = []
        self.tensors: list[list[str]] = []
        self.evaluations: list[tuple[object, list[str]]] = []

    def train(self, weights: Vector, tasks: Sequence[Task]) -> Iterator[Update]:
        for update in self.inner.train(weights, tasks):
            header, tensors = wire.update_message(1, b"session", update)
            self.headers.append(header.update)
            self.tensors.append([name for name, _ in tensors])
            yield update

    def evaluate(
        self, weights: Vector, sites: Sequence[str], plan: Plan | None = None
    ) -> Iterator[SiteEvaluation]:
        for evaluation in self.inner.evaluate(weights, sites, plan):
            header, tensors = wire.evaluation_message(1, b"session", evaluation)
            self.evaluations.append((header.evaluation, [name for name, _ in tensors]))
            yield evaluation


@pytest.mark.parametrize("rounds", ["synchronous", "fedbuff"])
def test_a_masked_update_carries_nothing_about_its_site_in_clear(
    tmp_path: Path, text_corpus: Path, rounds: str
) -> None:
    path = tmp_path / "tiny.toml"
    path.write_text(tiny_config(text_corpus, tmp_path / "runs", run__rounds="2"))
    overrides = [
        "privacy.secure_aggregation=true",
        "privacy.dp=distributed",
        "privacy.record_dp=true",
        "server.sites_per_round=4",
        "server.optimizer=sgd",
    ]
    if rounds == "fedbuff":
        # A buffer's updates are released in a secure sum as a round's are: the site is hidden the same way.
        overrides.append("server.strategy=fedbuff")
    runner = Runner.start(config.load(path, overrides))
    spy = Eavesdrop(runner.backend)
    runner.backend = spy
    runner.run()
    assert len(spy.headers) >= 4
    for body, names in zip(spy.headers, spy.tensors, strict=True):
        assert body.num_examples == 0 and dict(body.metrics) == {}  # type: ignore[attr-defined]
        assert not body.has_vector and names == ["payload/masked_input"]  # type: ignore[attr-defined]
    # The round still reports its totals, learned only as sums.
    rounds = runner.store.rounds()
    total = sum(len(runner.dataset.by_name(s).train) for s in rounds[0]["sites"])  # type: ignore[union-attr]
    assert abs(rounds[0]["num_examples"] - total) <= 1
    assert np.isfinite(rounds[0]["train_loss"])


def test_a_secure_evaluation_carries_no_site_s_sums_and_sums_them_exactly(
    tmp_path: Path, text_corpus: Path
) -> None:
    path = tmp_path / "tiny.toml"
    path.write_text(tiny_config(text_corpus, tmp_path / "runs", run__rounds="2"))
    runner = Runner.start(config.load(path, ["privacy.secure_aggregation=true"]))
    local = runner.backend
    assert isinstance(local, LocalBackend)
    spy = Eavesdrop(local)
    runner.backend = spy
    runner.run()

    assert len(spy.evaluations) >= len(runner.eval_sites)
    for body, names in spy.evaluations:
        assert (body.loss_sum, body.correct, body.targets) == (0.0, 0, 0)  # type: ignore[attr-defined]
        assert names == [wire.MASKED_EVALUATION]
    evaluated = runner.store.evaluations()
    assert evaluated and all(runner.store.site_metrics(r) == [] for r, _ in evaluated)  # none is known
    # What the server reported is what the sites' own sums of the final model add up to, exactly (each sum
    # travels as integer digits; the loss in units of 2^-16 per site).
    last_round, reported = evaluated[-1]
    assert last_round == runner.state.round
    sums = [
        local.kit.trainer.evaluate(runner.state.weights, local.site(name).data.test, 64).sum(0)
        for name in runner.eval_sites
    ]
    clear = [
        SiteEvaluation(n, float(s[0]), int(s[1]), int(s[2]))
        for n, s in zip(runner.eval_sites, sums, strict=True)
    ]
    expected, per_site = summarize(clear)
    assert reported["eval_sites"] == len(clear) == len(per_site)
    assert reported["accuracy"] == expected["accuracy"]
    assert abs(reported["loss"] - expected["loss"]) <= len(clear) * 2**-16 / sum(e.targets for e in clear)
    assert np.isnan(reported["site_accuracy_p10"]) and np.isfinite(expected["site_accuracy_p10"])
