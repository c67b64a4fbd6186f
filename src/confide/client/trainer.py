"""The site's local loop: global weights + local windows + plan → delta and metrics.

A Trainer owns one model and one optimizer, built once and reused for every round (and, in simulation, for
every site it plays): weights come in and go out through the Layout as whole-tensor copies. Randomness
(shuffling, dropout) is drawn from the plan's seed, so a round computed twice gives the same delta bit for
bit: this is what makes a resumed run identical to an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from torch import nn

from confide.core import Layout, Plan, Vector
from confide.errors import ConfigError
from confide.models import PAD
from confide.models.common import IGNORE_INDEX

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
    if batch.ndim == 3:
        # A language model's token rows (confide.data.llm): ids (-1 after the end) and labels (-100: none).
        rows = torch.from_numpy(batch.astype(np.int64, copy=False))
        return rows[:, 0, :-1], rows[:, 1, 1:]
    windows = torch.from_numpy(batch.astype(np.int64, copy=False))
    inputs = windows[:, :-1].masked_fill(windows[:, :-1] == PAD, 0)
    return inputs, windows[:, 1:]


@dataclass(frozen=True)
class Objective:
    """What a site optimizes besides its data loss, and which parameters it may change.

    The default is plain local training (FedAvg). Each field is one algorithm's addition:

    - ``prox_mu`` (FedProx, Li et al. 2020): the term mu/2 * ||w - anchor||^2, added as its gradient
      mu * (w - anchor) to every step's gradient;
    - ``correction`` (SCAFFOLD, Karimireddy et al. 2020): the drift correction c - c_i, added to every
      step's gradient;
    - ``prox_lambda`` (Ditto, Li et al. 2021): after every step, the proximal map of
      lambda/2 * ||w - anchor||^2 with the step's learning rate, w <- (w + lr*lambda*a) / (1 + lr*lambda).
      Unlike a gradient term it is stable for any lambda, and lambda = inf pins w to the anchor exactly;
    - ``frozen``: parameters (by name) that this fit leaves unchanged (FedRep trains head and body in turn).

    ``anchor`` defaults to the weights the fit starts from.
    """

    prox_mu: float = 0.0
    prox_lambda: float = 0.0
    anchor: Vector | None = None
    correction: Vector | None = None
    frozen: frozenset[str] = frozenset()


PLAIN = Objective()


@dataclass(frozen=True)
class FitResult:
    delta: Vector
    """Local weights after training minus the weights training started from."""
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


def seed_dropout(seed: int, params: Sequence[torch.Tensor]) -> None:
    """Seed the global generator dropout draws from: the CPU's only, unless the model is on a GPU.
    ``torch.manual_seed`` also queues a seed for every accelerator, recording a stack trace each time when
    none is in use: half a millisecond a site, as long as a small model's training step."""
    if any(p.device.type != "cpu" for p in params[:1]):
        torch.manual_seed(seed)
    else:
        torch.random.default_generator.manual_seed(seed)


class Trainer:
    """Local training and evaluation on one reusable model."""

    def __init__(self, model: nn.Module, optimizer: ClientOptimizer | None = None) -> None:
        self.model = model
        self.layout = Layout.of_module(model)
        self.names = self.layout.names
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.config = optimizer or ClientOptimizer()
        self.optimizer = self.config.build(self.params)
        self._local = self.layout.zeros()

    def fit(
        self, weights: Vector, windows: np.ndarray, plan: Plan, objective: Objective = PLAIN
    ) -> FitResult:
        """Train from ``weights`` on ``windows`` (N, T+1) as ``plan`` says; return local − start weights."""
        self.layout.write(self.model, weights)
        self.optimizer.state.clear()
        for group in self.optimizer.param_groups:
            group["lr"] = plan.learning_rate
        self.model.train()
        n = len(windows)
        total = plan.local_steps(n)
        terms = self._terms(weights, objective)
        generator = torch.Generator().manual_seed(plan.seed)
        steps, loss_total = 0, 0.0
        started = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            seed_dropout(plan.seed, self.params)  # dropout draws from the global generator: scope it
            while steps < total:
                order = torch.randperm(n, generator=generator).numpy()
                for start in range(0, n, plan.batch_size):
                    if steps >= total:
                        break
                    batch = windows[order[start : start + plan.batch_size]]
                    loss = self._backward(batch, objective, terms)
                    self.optimizer.step()
                    if objective.prox_lambda > 0:
                        self._proximal_step(objective.prox_lambda * plan.learning_rate, terms, objective)
                    loss_total += loss
                    steps += 1
        seconds = time.perf_counter() - started
        delta = self.layout.read(self.model, self._local) - weights
        return FitResult(
            delta=delta, num_examples=n, steps=steps, loss=loss_total / max(steps, 1), seconds=seconds
        )

    def gradient(self, weights: Vector, batch: np.ndarray, objective: Objective = PLAIN) -> Vector:
        """The gradient one local step of ``fit`` would take at ``weights`` on ``batch`` (dropout off)."""
        self.layout.write(self.model, weights)
        self.model.eval()
        self._backward(batch, objective, self._terms(weights, objective))
        grads = {
            name: (p.grad if p.grad is not None else torch.zeros_like(p))
            for name, p in zip(self.names, self.params, strict=True)
        }
        return self.layout.flatten(grads)

    def _terms(self, weights: Vector, objective: Objective) -> dict[str, list[torch.Tensor]]:
        """Per-parameter views of the objective's vectors, made once per fit (no copies)."""
        terms: dict[str, list[torch.Tensor]] = {}
        if objective.prox_mu > 0 or objective.prox_lambda > 0:
            anchor = weights if objective.anchor is None else objective.anchor
            terms["anchor"] = list(self.layout.unflatten(anchor).values())
        if objective.correction is not None:
            terms["correction"] = list(self.layout.unflatten(objective.correction).values())
        if self.params and self.params[0].device.type != "cpu":  # a model on a GPU: its terms go there
            params = self.params
            terms = {k: [t.to(p.device) for t, p in zip(v, params, strict=True)] for k, v in terms.items()}
        return terms

    def _backward(
        self, batch: np.ndarray, objective: Objective, terms: dict[str, list[torch.Tensor]]
    ) -> float:
        inputs, targets = split_window(batch)
        _, loss = self.model(inputs, targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if objective.prox_mu > 0 or "correction" in terms:
            for p in self.params:  # a parameter the loss does not reach still gets the added terms
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            grads: list[torch.Tensor] = [cast(torch.Tensor, p.grad) for p in self.params]
            with torch.no_grad():
                if objective.prox_mu > 0:  # d/dw mu/2 ||w - anchor||^2 = mu (w - anchor)
                    diff = torch._foreach_sub([p.detach() for p in self.params], terms["anchor"])
                    torch._foreach_add_(grads, diff, alpha=objective.prox_mu)
                if "correction" in terms:
                    torch._foreach_add_(grads, terms["correction"], alpha=1.0)
        if objective.frozen:
            # A parameter with no gradient is skipped by the optimizer (no step, no weight decay, no state).
            for name, p in zip(self.names, self.params, strict=True):
                if name in objective.frozen:
                    p.grad = None
        return float(loss.item())

    @torch.no_grad()
    def _proximal_step(
        self, strength: float, terms: dict[str, list[torch.Tensor]], objective: Objective
    ) -> None:
        pairs = [
            (p, a)
            for name, p, a in zip(self.names, self.params, terms["anchor"], strict=True)
            if name not in objective.frozen
        ]
        params: list[torch.Tensor] = [p for p, _ in pairs]
        anchors = [a for _, a in pairs]
        if math.isinf(strength):
            torch._foreach_copy_(params, anchors)
            return
        # prox of lambda/2 ||w - a||^2 with step lr: w <- (w + lr*lambda*a) / (1 + lr*lambda)
        torch._foreach_add_(params, anchors, alpha=strength)
        torch._foreach_div_(params, 1.0 + strength)

    @torch.no_grad()
    def evaluate(self, weights: Vector, windows: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Per-window (loss sum, correct, targets) of the model ``weights`` on ``windows``, shape (N, 3)."""
        self.layout.write(self.model, weights)
        self.model.eval()
        out = np.zeros((len(windows), 3), dtype=np.float64)
        for start in range(0, len(windows), batch_size):
            inputs, targets = split_window(windows[start : start + batch_size])
            logits, _ = self.model(inputs)
            ignore = IGNORE_INDEX if windows.ndim == 3 else PAD
            out[start : start + len(inputs)] = per_window_scores(logits, targets, ignore)
        return out


def per_window_scores(logits: torch.Tensor, targets: torch.Tensor, ignore: int = PAD) -> np.ndarray:
    """(loss sum, correct, targets) for each row of a batch, ignoring targets equal to ``ignore``."""
    targets = targets.to(logits.device)
    valid = targets != ignore
    safe = targets.masked_fill(~valid, 0)
    losses = nn.functional.cross_entropy(logits.float().transpose(1, 2), safe, reduction="none") * valid
    correct = (logits.argmax(-1) == safe) & valid
    scores = torch.stack([losses.sum(1), correct.sum(1).double(), valid.sum(1).double()], 1)
    return scores.double().cpu().numpy()
