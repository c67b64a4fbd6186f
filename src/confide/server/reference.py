"""Data the server holds itself, for the defences that need it: a validation set to try each update on
(the screen's loss rule) and a root data set to train on for FLTrust's trust direction.

Both are small clean text files the operator provides; they never leave the server, and the server learns
nothing about the sites from them. The server trains and evaluates with the sites' own
:class:`~confide.client.trainer.Trainer`, on its own copy of the model.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
from torch import nn

from confide.client.trainer import ClientOptimizer, Trainer
from confide.core import Plan, Vector
from confide.data import DEFAULT_TOKENIZER
from confide.data.dataset import windows
from confide.errors import DataError


def read_windows(path: str | Path) -> np.ndarray:
    """The text file at ``path`` as training windows of the model's length."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"the server's data file {path} cannot be read as UTF-8 text: {e}") from e
    cut = windows(DEFAULT_TOKENIZER.encode(text))
    if not len(cut):
        raise DataError(f"the server's data file {path} holds no full window of text; give it more text")
    return cut


class ServerData:
    """The server's own model copy, trainer and data: the loss of a model, and the server's own update."""

    def __init__(
        self,
        model: nn.Module,
        data: np.ndarray,
        optimizer: ClientOptimizer | None = None,
        learning_rate: float = 0.1,
        batch_size: int = 10,
        steps: int = 5,
        seed: int = 0,
    ) -> None:
        self.trainer = Trainer(copy.deepcopy(model), optimizer)
        self.data = data
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.steps = steps
        self.seed = seed

    def loss(self, weights: Vector) -> float:
        """The mean loss per character of the model ``weights`` on the server's data."""
        scores = self.trainer.evaluate(weights, self.data)
        return float(scores[:, 0].sum() / max(scores[:, 2].sum(), 1.0))

    def update(self, weights: Vector, round: int) -> Vector:
        """The server's own delta from ``weights`` after ``steps`` local steps on its data (FLTrust's g0),
        trained exactly as a site trains (same optimizer, learning rate and batch size)."""
        plan = Plan(
            round=round,
            max_steps=self.steps,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            seed=self.seed + round,
        )
        return self.trainer.fit(weights, self.data, plan).delta
