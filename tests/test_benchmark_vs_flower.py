"""benchmarks/vs_flower.py compares like with like: its plain loop draws the sites and seeds that confide's
Strategy draws, and on a tiny run ends with confide's weights bit for bit (so the benchmark times the same
work). Flower itself is not needed here."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from confide.config import from_dict
from confide.core import Layout
from confide.data import DEFAULT_TOKENIZER
from confide.runtime.stack import build_model_for, build_strategy

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import vs_flower  # noqa: E402  (a benchmark script, importable once its folder is on the path)


def tiny(corpus: Path, sites_per_round: int, steps: int) -> dict[str, Any]:
    return {
        "run": {"seed": 3, "rounds": 3, "checkpoint_every": 1_000_000},
        "data": {"dataset": "text", "path": str(corpus)},
        "model": {"kind": "lstm", "embedding": 4, "hidden": 8, "layers": 2},
        "client": {
            "optimizer": "sgd",
            "learning_rate": 0.5,
            "batch_size": 4,
            "epochs": steps,
            "max_steps": steps,
        },
        "server": {"sites_per_round": sites_per_round, "optimizer": "sgd", "learning_rate": 1.0},
        "eval": {"every": 1_000_000, "sites": 1, "samples": 0},
        "backend": {"threads": 1},
    }


def test_the_draw_is_the_strategys(text_corpus: Path) -> None:
    config = from_dict(tiny(text_corpus, 4, 2))
    strategy = build_strategy(config)
    names = [f"site{i}" for i in range(6)]
    for round in range(1, 6):
        chosen, seeds = vs_flower.draw(config, round, len(names))
        selected = strategy.select(round, names)
        plans = strategy.plans(round, selected)
        assert [names[i] for i in chosen] == selected
        assert [int(s) for s in seeds] == [plans[name].seed for name in selected]


@pytest.mark.parametrize(("sites_per_round", "steps"), [(2, 5), (5, 1)])
def test_the_plain_loop_ends_where_confide_does(
    text_corpus: Path, tmp_path: Path, sites_per_round: int, steps: int
) -> None:
    raw = tiny(text_corpus, sites_per_round, steps)
    plain = vs_flower.run_plain(raw, tmp_path)
    confide = vs_flower.run_confide(raw, tmp_path)
    assert len(plain["rounds"]) == len(confide["rounds"]) == 3
    start = Layout.of_module(model := build_model_for(from_dict(raw), DEFAULT_TOKENIZER.vocab_size)).read(
        model
    )
    assert not np.array_equal(plain["weights"], start)  # they trained
    np.testing.assert_array_equal(plain["weights"], confide["weights"])
    assert plain["train_loss"] == pytest.approx(confide["train_loss"], rel=1e-12)
