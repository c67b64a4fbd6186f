"""Attack: under secure aggregation, learn one site's evaluation (or update) by unmasking a sum of that site
alone. A malicious server keeps only the victim's masked input, claims the others dropped out, and asks the
sites to confirm the survivor set {victim} and unmask it. Each site refuses a survivor set smaller than its
own configuration allows (and one whose holders fall short of the threshold), so no share is handed out and
nothing is revealed. An honest server does not even ask: an evaluation with fewer masked inputs than two is
abandoned before unmasking. Evaluations run the very protocol client of training updates, with their own
expectation (:meth:`SecureAggregation.for_evaluation`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from confide import config
from confide.pipeline import EvaluationContext, RoundAbandoned
from confide.privacy.secagg import SERVER, MessageError
from confide.privacy.secure import SecAggLayer
from confide.runtime.local import LocalBackend
from confide.runtime.runner import Runner
from tests.conftest import tiny_config
from tests.privacy.secagg.conftest import Driver


def test_no_site_confirms_a_survivor_set_of_one() -> None:
    driver = Driver(5)
    requests = driver.mask(driver.share(driver.advertise()))
    victim = driver.sites[0]
    for site, request in requests.items():
        forged = dataclasses.replace(request, survivors=(victim,))
        with pytest.raises(MessageError, match="refuses"):
            driver.clients[site].confirm_survivors(SERVER, forged)


def test_an_honest_server_abandons_an_evaluation_of_one_site(tmp_path: Path, text_corpus: Path) -> None:
    path = tmp_path / "tiny.toml"
    path.write_text(tiny_config(text_corpus, tmp_path / "runs"))
    runner = Runner.start(config.load(path, ["privacy.secure_aggregation=true"]))
    backend = runner.backend
    assert isinstance(backend, LocalBackend)
    [layer] = [x for x in runner.federation.layers if isinstance(x, SecAggLayer)]
    ctx = EvaluationContext(1, list(runner.eval_sites), backend.exchange)
    layer.begin_evaluation(ctx)
    [only] = backend.evaluate(runner.state.weights, ctx.sites[:1])
    assert only.masked is not None and (only.loss_sum, only.correct, only.targets) == (0.0, 0, 0)
    layer.decode_evaluation(only, ctx)
    with pytest.raises(RoundAbandoned, match=r"only 1 of .* at least 2 are needed"):
        layer.close_evaluation(ctx)
    assert ctx.total is None
