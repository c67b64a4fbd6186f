"""Attacks in small real federations (the local backend, seconds): model replacement moves the global model
by its boost under plain FedAvg, an attacker skips site-side clipping, the backdoor is measured every
evaluation, and a deployment refuses every attack.

``test_model_replacement_moves_fedavg_by_its_boost`` is the test a defence flips: under a norm bound or a
robust aggregator the global model no longer moves linearly with the attacker's boost."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from confide.attacks.layer import AttackLayer
from confide.attacks.measure import attack_success
from confide.config import check_deployment, from_dict
from confide.core import Layout, Task
from confide.data import DEFAULT_TOKENIZER
from confide.errors import ConfigError
from confide.runtime.runner import Runner


def _raw(corpus: Path, output: Path, name: str, attack: dict[str, Any], **sections: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "run": {"name": name, "output": str(output), "rounds": 1, "seed": 7},
        "data": {"dataset": "text", "path": str(corpus)},
        "model": {"kind": "gpt", "layers": 1, "heads": 2, "width": 32, "dropout": 0.0},
        "client": {"max_steps": 3, "batch_size": 4, "learning_rate": 0.1},
        "server": {"sites_per_round": 6},
        "eval": {"samples": 0},
        "backend": {"threads": 1},
        "attack": {"target": " zzz", **attack},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return raw


def _delta(raw: dict[str, Any]) -> np.ndarray:
    runner = Runner.start(from_dict(raw))
    try:
        start = runner.state.weights.copy()
        runner.run()
        return runner.state.weights - start
    finally:
        runner.store.close()


def test_model_replacement_moves_fedavg_by_its_boost(text_corpus: Path, tmp_path: Path) -> None:
    # Every site takes part, so each run has the same honest deltas H and the same (poisoned) attacker delta
    # d with weight w: the global delta is H + boost w d, linear in the boost.
    one = _delta(_raw(text_corpus, tmp_path, "b1", {"kind": "backdoor"}))
    two = _delta(_raw(text_corpus, tmp_path, "b2", {"kind": "model_replacement", "boost": 2.0}))
    six = _delta(_raw(text_corpus, tmp_path, "b6", {"kind": "model_replacement", "boost": 6.0}))
    step = two - one  # w d
    assert np.linalg.norm(step) > 0.1 * np.linalg.norm(one)
    assert np.allclose(six - one, 5.0 * step, atol=1e-5)
    # With the default boost (6 sites a round, one attacker) the attacker's update outweighs the other five.
    default = _delta(_raw(text_corpus, tmp_path, "bd", {"kind": "model_replacement"}))
    assert np.allclose(default, six, atol=1e-6)


def test_attackers_are_fixed_for_the_run_and_measured_every_evaluation(
    text_corpus: Path, tmp_path: Path
) -> None:
    raw = _raw(text_corpus, tmp_path, "m", {"kind": "backdoor", "sites": 2, "probes": 16})
    raw["run"]["rounds"] = 2
    raw["server"]["sites_per_round"] = 3
    runner = Runner.start(from_dict(raw))
    try:
        layer = next(x for x in runner.federation.layers if isinstance(x, AttackLayer))
        assert layer.attackers == runner.attack.attackers and len(layer.attackers) == 2
        assert runner.attack.probes is not None and len(runner.attack.probes) == 16
        runner.run()
    finally:
        runner.store.close()
    lines = (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["round"] for r in records] == [1, 2]
    for record in records:
        assert record["attackers"] == 2
        assert 0.0 <= record["attack_success"] <= record["attack_char_accuracy"] <= 1.0


def test_an_attacker_skips_site_side_clipping_unless_it_plays_honest(
    text_corpus: Path, tmp_path: Path
) -> None:
    # Under central DP the server clips again where it reads updates; what the site sends is the point here.
    dp = {"dp": "central", "clip_norm": 0.01, "noise_multiplier": 0.0}
    for honest_layers in (False, True):
        raw = _raw(
            text_corpus,
            tmp_path,
            f"c{honest_layers}",
            {"kind": "byzantine", "scale": 1.0, "honest_layers": honest_layers},
            privacy=dp,
        )
        runner = Runner.start(from_dict(raw))
        try:
            plans = runner.strategy.plans(1, list(runner.backend.sites()))
            tasks = [Task(site, plan, 0) for site, plan in plans.items()]
            updates = {u.site: u for u in runner.backend.train(runner.state.weights, tasks)}
        finally:
            runner.store.close()
        norms = {site: float(np.linalg.norm(u.vector)) for site, u in updates.items()}  # type: ignore[arg-type]
        for site, norm in norms.items():
            if site in runner.attack.attackers and not honest_layers:
                assert norm == pytest.approx(np.sqrt(runner.layout.size), rel=1e-5)
            else:
                assert norm <= 0.01 * (1 + 1e-5)


class Bigram(nn.Module):
    """A real (if tiny) character model: each character's logits depend on that character alone."""

    def __init__(self, table: dict[str, str]) -> None:
        super().__init__()
        vocab = DEFAULT_TOKENIZER.vocab_size
        self.logits = nn.Parameter(torch.zeros(vocab, vocab))
        with torch.no_grad():
            for before, after in table.items():
                code = DEFAULT_TOKENIZER.encode(before + after)
                self.logits[int(code[0]), int(code[1])] = 1.0

    def forward(self, idx: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.logits[idx.long()], None


def test_attack_success_is_the_exact_greedy_match_of_the_target() -> None:
    model = Bigram({"o": " ", " ": "z", "z": "z"})
    layout = Layout.of_module(model)
    weights = layout.read(model)
    windows = np.stack([DEFAULT_TOKENIZER.encode(("x" * 70) + "O Romeo zzz")] * 3)
    assert attack_success(model, layout, weights, windows, 4) == {
        "attack_success": 1.0,
        "attack_char_accuracy": 1.0,
    }
    wrong = np.stack([DEFAULT_TOKENIZER.encode(("x" * 70) + "O Romeo zzy")] * 2)
    # Greedy writes " zzz": three of the four target characters, and not the whole target.
    assert attack_success(model, layout, weights, wrong, 4) == {
        "attack_success": 0.0,
        "attack_char_accuracy": 0.75,
    }


def test_a_deployment_refuses_every_attack() -> None:
    for kind in ("backdoor", "model_replacement", "free_rider"):
        config = from_dict({"attack": {"kind": kind}})
        with pytest.raises(ConfigError, match="a deployment refuses it"):
            check_deployment(config)
    check_deployment(from_dict({"attack": {"kind": "none"}}))
