"""A small federation where one site boosts its update (model replacement): plain FedAvg is moved far, and
each defence keeps the model close to where the same defence goes without the attacker."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from confide.runtime.runner import Runner
from tests.defence.harness import ATTACKER, clean_text, run, write_config

BOOST = 30.0


def shift(tmp_path: Path, corpus: Path, overrides: list[str], name: str) -> tuple[float, Runner, Runner]:
    """How far the attacker moves the final model from where the same run goes without it."""
    path = write_config(tmp_path, corpus, name)
    honest = run(path, [*overrides, f"run.name={name}-honest"], None)
    attacked = run(path, [*overrides, f"run.name={name}-attacked"], BOOST)
    assert attacked.backend.attacked_rounds == [1, 2]  # type: ignore[attr-defined]
    return float(np.linalg.norm(honest.state.weights - attacked.state.weights)), honest, attacked


def refused(runner: Runner) -> list[tuple[int | None, str]]:
    return [(r, message) for _, r, kind, message in runner.store.events() if kind == "rejected"]


@pytest.fixture(scope="module")
def plain_shift(tmp_path_factory: pytest.TempPathFactory) -> float:
    from tests.conftest import LINES  # the corpus fixture is per test; build one here

    tmp = tmp_path_factory.mktemp("plain")
    corpus = tmp / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        picks = rng.choice(len(LINES), size=40, p=np.roll([0.5, 0.2, 0.1, 0.1, 0.05, 0.05], i))
        (corpus / f"site{i}.txt").write_text("\n".join(LINES[j] for j in picks) + "\n")
    moved, _, _ = shift(tmp, corpus, [], "plain")
    # The boosted update moves the mean by about (BOOST - 1) / 6 of the attacker's update: far more than a
    # round of honest training moves the model.
    assert moved > 1.0
    return moved


DEFENCES = {
    "median": ["server.aggregator=median"],
    "trimmed_mean": ["server.aggregator=trimmed_mean", "defence.trim=0.2"],
    "krum": ["server.aggregator=krum", "defence.byzantine=1"],
    "multikrum": ["server.aggregator=multikrum", "defence.byzantine=1"],
    "geometric_median": ["server.aggregator=geometric_median"],
    "flame": ["server.aggregator=flame"],
    # Honest updates of the tiny run have norms near 1.5; the boosted one near 45.
    "norm_bound": ["defence.norm_bound=5.0"],
    "norm_clip": ["defence.norm_bound=5.0", "defence.norm_action=clip"],
}


@pytest.mark.parametrize("defence", [*DEFENCES, "fltrust", "validation_loss"])
def test_the_defence_keeps_a_boosted_update_from_moving_the_model(
    defence: str, plain_shift: float, tmp_path: Path, text_corpus: Path
) -> None:
    if defence == "fltrust":
        overrides = ["server.aggregator=fltrust", f"defence.root_data={str(clean_text(tmp_path))!r}"]
    elif defence == "validation_loss":
        overrides = [
            f"defence.validation_data={str(clean_text(tmp_path))!r}",
            "defence.max_loss_increase=0.05",
        ]
    else:
        overrides = DEFENCES[defence]
    moved, honest, attacked = shift(tmp_path, text_corpus, overrides, defence)
    # The attacker moves plain FedAvg's model far; under the defence it moves it a small fraction of that.
    # Krum keeps one whole update, so with or without the attacker it may keep a different honest site's:
    # the two runs then differ by the spread between honest updates.
    assert moved < (0.3 if defence == "krum" else 0.2) * plain_shift, (defence, moved, plain_shift)
    if defence in ("norm_bound", "validation_loss"):
        assert refused(honest) == []
        assert [r for r, _ in refused(attacked)] == [1, 2]
        assert all(f"site {ATTACKER}" in m and "score" in m for _, m in refused(attacked))
