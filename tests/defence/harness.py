"""A test-only malicious site for whole runs: a backend wrapper that boosts one site's update, as a
model-replacement attacker does (Bagdasaryan et al. 2020: scale the update so it survives averaging)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from confide import config
from confide.core import Task, Update, Vector
from confide.runtime.federation import Backend
from confide.runtime.runner import Runner
from tests.conftest import LINES, tiny_config
from tests.relay import Relay

ATTACKER = "site0"


class Boosted(Relay):
    """Every backend call goes to ``inner``; the updates of ``attacker`` come back multiplied by ``boost``."""

    def __init__(self, inner: Backend, attacker: str = ATTACKER, boost: float = 30.0) -> None:
        super().__init__(inner)
        self.attacker = attacker
        self.boost = boost
        self.attacked_rounds: list[int] = []

    def train(self, weights: Vector, tasks: Sequence[Task]) -> Iterator[Update]:
        for update in self.inner.train(weights, tasks):
            if update.site == self.attacker and update.vector is not None:
                self.attacked_rounds.append(update.round)
                update = replace(update, vector=(update.vector * np.float32(self.boost)).astype(np.float32))
            yield update


def write_config(tmp: Path, corpus: Path, name: str) -> Path:
    path = tmp / f"{name}.toml"
    # FedAvg's plain server step (SGD, learning rate 1): an adaptive optimizer (the tiny config's Adam) caps
    # every coordinate's step, which hides how far an update moves the mean.
    text = tiny_config(
        corpus,
        tmp / "runs",
        run__rounds="2",
        server__sites_per_round="6",
        server__optimizer="'sgd'",
        server__learning_rate="1.0",
    )
    path.write_text(text.replace("name = 'tiny'", f"name = '{name}'"))
    return path


def clean_text(tmp: Path) -> Path:
    """A small clean text the server holds (validation or root data)."""
    path = tmp / "server.txt"
    path.write_text("\n".join(LINES * 3) + "\n")
    return path


def run(path: Path, overrides: Sequence[str], boost: float | None, **kwargs: Any) -> Runner:
    runner = Runner.start(config.load(path, list(overrides)))
    if boost is not None:
        runner.backend = Boosted(runner.backend, boost=boost, **kwargs)
    runner.run()
    return runner
