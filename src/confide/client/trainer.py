"""The site's local loop: global weights + local windows + plan → delta and metrics.

A Trainer owns one model and one optimizer, built once and reused for every round (and, in simulation, for
every site it plays): weights come in and go out through the Layout as whole-tensor copies. Randomness
(shuffling, dropout) is drawn from the plan's seed, so a round computed twice gives the same delta bit for
bit: this is what makes a resumed run identical to an uninterrupted one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from confide.core import Layout, Plan, Vector
from confide.errors import ConfigError
from confide.models import PAD

CLIENT_OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class ClientOptimizer:
    """The optimizer a site trains with. Its state starts fresh every round, as in Reddi et al. 2021."""

    name: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in CLIENT_OPTIMIZERS:
            accepted = ", ".join(repr(o) for o in CLIENT_OPTIMIZERS)
            raise ConfigError(f"client.optimizer must be one of {accepted} (got {self.name!r})")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"client.momentum must be in [0, 1) (got {self.momentum})")
        if self.weight_decay < 0:
            raise ConfigError(f"client.weight_decay must be >= 0 (got {self.weight_decay})")

    def build(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        if self.name == "adam":
            return torch.optim.Adam(params, lr=1e-3, weight_decay=self.weight_decay)
        return torch.optim.SGD(params, lr=0.1, momentum=self.momentum, weight_decay=self.weight_decay)


def split_window(batch: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-character targets of a batch of (B, T+1) uint8 windows.

    Padding after the end of a text becomes a valid input code (0) and the PAD target, which the loss ignores;
    because attention is causal, padded inputs never influence a real target before them.
    """
    windows = torch.from_numpy(batch.astype(np.int64, copy=False))
    inputs = windows[:, :-1].masked_fill(windows[:, :-1] == PAD, 0)
    return inputs, windows[:, 1:]


@dataclass(frozen=True)
class FitResult:
    delta: Vector
    num_examples: int
    steps: int
    loss: float
    seconds: float
    """Time spent in forward, backward and optimizer steps: the work any framework must do."""


@dataclass(frozen=True)
class EvalResult:
    """Sums over a set of windows, so that results of many sites add up exactly."""

    loss_sum: float
    correct: int
    targets: int


class Trainer:
    """Local training and evaluation on one reusable model."""

    def __init__(self, model: nn.Module, optimizer: ClientOptimizer | None = None) -> None:
        self.model = model
        self.layout = Layout.of_module(model)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = (optimizer or ClientOptimizer()).build(self.params)
        self._local = self.layout.zeros()

    def fit(self, weights: Vector, windows: np.ndarray, plan: Plan) -> FitResult:
        """Train from ``weights`` on ``windows`` (N, T+1) as ``plan`` says; return local − global."""
        self.layout.write(self.model, weights)
        self.optimizer.state.clear()
        for group in self.optimizer.param_groups:
            group["lr"] = plan.learning_rate
        self.model.train()
        n = len(windows)
        generator = torch.Generator().manual_seed(plan.seed)
        steps, loss_total = 0, 0.0
        started = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(plan.seed)  # dropout draws from the global generator: scope it to this fit
            for _ in range(plan.epochs):
                order = torch.randperm(n, generator=generator).numpy()
                for start in range(0, n, plan.batch_size):
                    if plan.max_steps is not None and steps >= plan.max_steps:
                        break
                    inputs, targets = split_window(windows[order[start : start + plan.batch_size]])
                    _, loss = self.model(inputs, targets)
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    self.optimizer.step()
                    loss_total += loss.item()
                    steps += 1
        seconds = time.perf_counter() - started
        delta = self.layout.read(self.model, self._local) - weights
        return FitResult(
            delta=delta, num_examples=n, steps=steps, loss=loss_total / max(steps, 1), seconds=seconds
        )

    @torch.no_grad()
    def evaluate(self, weights: Vector, windows: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Per-window (loss sum, correct, targets) of the model ``weights`` on ``windows``, shape (N, 3)."""
        self.layout.write(self.model, weights)
        self.model.eval()
        out = np.zeros((len(windows), 3), dtype=np.float64)
        for start in range(0, len(windows), batch_size):
            inputs, targets = split_window(windows[start : start + batch_size])
            logits, _ = self.model(inputs)
            out[start : start + len(inputs)] = per_window_scores(logits, targets)
        return out


def per_window_scores(logits: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    """(loss sum, correct, targets) for each row of a batch, ignoring PAD targets."""
    valid = targets != PAD
    safe = targets.masked_fill(~valid, 0)
    losses = nn.functional.cross_entropy(logits.transpose(1, 2), safe, reduction="none") * valid
    correct = (logits.argmax(-1) == safe) & valid
    return torch.stack([losses.sum(1), correct.sum(1).double(), valid.sum(1).double()], 1).double().numpy()
