"""Record-level DP-SGD at one site (Abadi et al. 2016, "Deep Learning with Differential Privacy").

Each step samples the site's windows by Poisson sampling (each window independently, with rate
q = batch_size / windows), clips every window's gradient to L2 norm ``max_grad_norm``, sums them, adds
N(0, (noise_multiplier · max_grad_norm)²) and divides by the expected batch size q·n. Clipping and noise are
Opacus' ``DPOptimizer`` wrapped around the plain torch optimizer the site would use anyway (for the LSTM the
clipped sum comes in already computed, with Opacus' clip factor, and the optimizer adds the noise); each
site's (epsilon, delta) for its own records comes from a Poisson
:class:`~confide.privacy.accountant.PrivacyAccountant`.

The unit of privacy is one window (``WINDOW + 1`` characters), under add-or-remove neighbours: a person whose
text spans k windows is protected as a group of k, with a correspondingly larger epsilon.

Per-window gradients are exact for both models, computed two ways:

- The LSTM (:class:`~confide.models.lstm.CharLSTM`): by a hand-written backward pass over the whole batch
  (:mod:`confide.client.lstm_grads`), which takes each window's gradient norm and the clipped sum straight
  from the gate gradients and the layers' inputs, without materializing per-window gradients. torch.func
  has no vmap rule for the fused LSTM kernel and looped over the windows (with a "performance drop"
  warning): 10-38x the time of a plain step on the demo's LSTM, now about 2x on one thread.
- Every other model (the GPT): ``torch.func`` (``vmap`` of ``grad`` over the whole model), with attention
  written out (:func:`~confide.models.gpt.unfused_attention`), since vmap has no rule for the fused attention
  kernel either. Not Opacus' ``GradSampleModule``: it computes per-sample gradients layer by layer from hooks
  that take the first dimension of every layer's input as the batch; the GPT looks up its position embedding
  with a (T,) index that has no batch dimension, so GradSampleModule returns (T, ...) "per-sample" gradients
  for it, silently wrong. It also refuses ``nn.LSTM`` (it needs Opacus' DPLSTM, whose parameters are named
  and laid out differently, which would break the shared flat Layout). Differentiating the whole model per
  window is exact, tied weights included: about 1.3x a plain step on the transformer example's GPT.

``benchmarks/dpsgd_speed.py`` measures both against a plain step (RESULTS.md section 19); ``per_window =
"vmap"`` selects the old path for every model, for comparison.

Threat model: the update leaving the site is DP for the site's records only if the batch sampling and the
noise are unknown to the receiver. Both are drawn from the site's secret randomness
(:class:`~confide.randomness.SecretRandomness`), never from the plan's seed, which the server chooses; Opacus'
own noise generator is replaced by it (see :func:`_dp_optimizer`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from confide.client.lstm_grads import LSTMWindowGradients
from confide.client.trainer import ClientOptimizer, FitResult, seed_dropout, split_window
from confide.core import Layout, Plan, Vector
from confide.errors import ConfigError
from confide.models.gpt import unfused_attention
from confide.models.lstm import CharLSTM
from confide.privacy.accountant import PrivacyAccountant
from confide.randomness import Randomness

if TYPE_CHECKING:
    from opacus.optimizers import DPOptimizer


def _dp_optimizer(
    optimizer: torch.optim.Optimizer, noise_multiplier: float, max_grad_norm: float
) -> DPOptimizer:
    # Importing Opacus calls logging.basicConfig(), which gives the root logger a stderr handler before the
    # command line can set up its own (and makes the CLI's own basicConfig a no-op). confide never configures
    # logging, so the import is undone here, where Opacus is first needed.
    handlers = list(logging.root.handlers)
    from opacus.optimizers import DPOptimizer
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    logging.root.handlers[:] = handlers

    class SecretNoiseDPOptimizer(DPOptimizer):
        """Opacus' DP optimizer with its noise drawn from confide's randomness. Opacus draws from a torch
        generator, whose state a seed determines; its secure mode needs torchcsprng, which no longer
        builds. The clipping, accumulation and scaling stay Opacus' own."""

        randomness: Randomness | None = None
        clipped_sums: list[Tensor] | None = None
        """The clipped sum of the batch's per-window gradients, one per parameter, when the step's caller
        computed it exactly without per-window gradients (the LSTM's path); None: clip ``grad_sample``."""

        def pre_step(self, closure: Callable[[], float] | None = None) -> bool | None:
            if self.clipped_sums is None:
                return super().pre_step(closure)
            # What clip_and_accumulate would store, then the rest of Opacus' step as it is: noise, then the
            # division by the expected batch size (one batch a step, no accumulation).
            for p, clipped in zip(self.params, self.clipped_sums, strict=True):
                p.summed_grad = clipped.view_as(p)
            self.clipped_sums = None
            self.add_noise()
            for p in self.params:  # scale_grad's "mean" reduction, for one batch (it counts grad_samples)
                p.grad /= self.expected_batch_size
            self._is_last_step_skipped = False
            return True

        def add_noise(self) -> None:
            assert self.randomness is not None, "set the optimizer's randomness before a step"
            std = self.noise_multiplier * self.max_grad_norm
            for p in self.params:
                _check_processed_flag(p.summed_grad)
                noise = self.randomness.normal(p.summed_grad.numel(), std)
                p.grad = (p.summed_grad + torch.from_numpy(noise).view_as(p.summed_grad)).view_as(p)
                _mark_as_processed(p.summed_grad)

    # loss_reduction="mean": the noised sum of clipped gradients is divided by the *expected* batch size,
    # which Poisson sampling needs (the actual size is random, and dividing by it would leak it).
    return SecretNoiseDPOptimizer(
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=1,
        loss_reduction="mean",
    )


PER_WINDOW = ("auto", "vmap")
"""How per-window gradients are computed: ``auto``, by hand for the LSTM and by vmap for other models;
``vmap``, by vmap for every model (the old path, kept for comparison)."""


class PerSampleGradients:
    """The gradient of every window's own loss, for a model, in one vectorised call.

    Built once per model (it holds the vmapped function, not copies of the weights): each call reads the
    model's current parameters. A window's loss is its mean cross-entropy over its non-PAD targets, as the
    model computes it for a batch of one. ``chunk_size`` bounds vmap's memory: windows are processed that many
    at a time (None: all at once; the gradients of a batch take batch × parameters floats either way).
    ``method``: one of :data:`PER_WINDOW`.
    """

    def __init__(self, model: nn.Module, chunk_size: int | None = None, method: str = "auto") -> None:
        if method not in PER_WINDOW:
            raise ValueError(f"method must be one of {PER_WINDOW}, got {method!r}")
        self.model = model
        self.names = tuple(n for n, p in model.named_parameters() if p.requires_grad)
        self.lstm: LSTMWindowGradients | None = None
        # The LSTM's own path clips over all of its parameters: a frozen one would count in the norms.
        trains_all = all(p.requires_grad for p in model.parameters())
        if method == "auto" and isinstance(model, CharLSTM) and trains_all:
            self.lstm = LSTMWindowGradients(model)

        def window_loss(params: dict[str, Tensor], inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
            _, loss = functional_call(model, params, (inputs.unsqueeze(0), targets.unsqueeze(0)))
            return loss, loss.detach()

        self._gradients = vmap(
            grad(window_loss, has_aux=True),
            in_dims=(None, 0, 0),
            randomness="different",
            chunk_size=chunk_size,
        )

    @property
    def clips_exactly(self) -> bool:
        """Whether :meth:`clipped_sum` can clip without materializing per-window gradients."""
        return self.lstm is not None

    def __call__(self, inputs: Tensor, targets: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """Per-window gradients {name: (B, *shape)} and per-window losses (B,) for a batch (B, T)."""
        if self.lstm is not None:
            gradients, losses = self.lstm.gradients(inputs, targets)
            return {n: gradients[n] for n in self.names}, losses
        parameters = dict(self.model.named_parameters())
        params = {n: parameters[n].detach() for n in self.names}
        with unfused_attention():
            gradients, losses = self._gradients(params, inputs, targets)
        return gradients, losses

    def clipped_sum(
        self, inputs: Tensor, targets: Tensor, max_grad_norm: float
    ) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """The sum of the per-window gradients, each clipped to ``max_grad_norm`` as Opacus clips, computed
        without them; with the per-window norms (B,) and losses (B,). Only where :attr:`clips_exactly`."""
        if self.lstm is None:
            raise ValueError("clipped_sum needs the LSTM's exact path; use the per-window gradients instead")
        sums, norms, losses = self.lstm.clipped_sum(inputs, targets, max_grad_norm)
        return {n: sums[n] for n in self.names}, norms, losses


def record_accountant(num_records: int, delta: float, method: str = "rdp") -> PrivacyAccountant:
    """A site's accountant for its own records under DP-SGD's Poisson sampling (add-or-remove one window)."""
    return PrivacyAccountant(method, "poisson", num_records, delta)


@dataclass(frozen=True)
class DPFitResult(FitResult):
    sampling_rate: float
    """q: the probability of each window to be in a step's batch."""
    noise_multiplier: float
    epsilon: float | None
    """The site's epsilon for its records after this fit, when an accountant was given."""


class DPSGD:
    """Local training with DP-SGD on one reusable model: the :class:`~confide.client.trainer.Trainer` of a
    site whose records must stay private from whoever sees its update.

    Like the Trainer, it is built once and reused for every round (and every simulated site): the per-window
    gradient function, the optimizer and its DP wrapper are made here, and weights move through the Layout.
    """

    def __init__(
        self,
        model: nn.Module,
        max_grad_norm: float,
        noise_multiplier: float,
        optimizer: ClientOptimizer | None = None,
        chunk_size: int | None = None,
        per_window: str = "auto",
    ) -> None:
        if not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
            raise ConfigError(f"client.max_grad_norm must be a finite number > 0 (got {max_grad_norm})")
        if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
            raise ConfigError(
                f"client.noise_multiplier must be a finite number >= 0 (got {noise_multiplier})"
            )
        self.model = model
        self.max_grad_norm = float(max_grad_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.layout = Layout.of_module(model)
        self.gradients = PerSampleGradients(model, chunk_size, per_window)
        parameters = dict(model.named_parameters())
        self.params = [parameters[n] for n in self.gradients.names]
        self.optimizer = (optimizer or ClientOptimizer()).build(self.params)
        self.dp_optimizer = _dp_optimizer(self.optimizer, self.noise_multiplier, self.max_grad_norm)
        self._local = self.layout.zeros()

    def step_batch(
        self, inputs: Tensor, targets: Tensor, expected_batch_size: float, randomness: Randomness
    ) -> Tensor:
        """One DP-SGD step on a sampled batch (B, T), which may be empty; the per-window losses (B,).

        ``randomness`` draws the noise; ``expected_batch_size`` (q·n) divides the noised sum.
        """
        if len(inputs) > 0 and self.gradients.clips_exactly:
            sums, _, losses = self.gradients.clipped_sum(inputs, targets, self.max_grad_norm)
            self.dp_optimizer.clipped_sums = [sums[n] for n in self.gradients.names]
            self._step(expected_batch_size, randomness)
            return losses
        if len(inputs) > 0:
            gradients, losses = self.gradients(inputs, targets)
        else:
            gradients = {
                n: p.new_zeros((0, *p.shape)) for n, p in zip(self.gradients.names, self.params, strict=True)
            }
            losses = torch.zeros(0)
        seen: set[int] = set()
        for name, param in zip(self.gradients.names, self.params, strict=True):
            sample = gradients[name]
            # Autograd may hand out one tensor for two parameters with equal gradients (the LSTM's two
            # biases); Opacus marks each as processed, so each parameter needs its own.
            if id(sample) in seen:
                sample = sample.clone()
            seen.add(id(sample))
            param.grad_sample = sample  # type: ignore[attr-defined]
        self._step(expected_batch_size, randomness)
        return losses

    def _step(self, expected_batch_size: float, randomness: Randomness) -> None:
        self.dp_optimizer.expected_batch_size = expected_batch_size
        self.dp_optimizer.randomness = randomness
        self.dp_optimizer.step()
        self.dp_optimizer.zero_grad(set_to_none=True)

    def fit(
        self,
        weights: Vector,
        windows: np.ndarray,
        plan: Plan,
        randomness: Randomness,
        accountant: PrivacyAccountant | None = None,
    ) -> DPFitResult:
        """Train from ``weights`` on ``windows`` (N, T+1) with DP-SGD; return local − global and the privacy.

        As many steps as the Trainer would take (``epochs`` × ceil(N / batch_size), at most ``max_steps``),
        each on a Poisson sample of expected size ``batch_size``. The steps are spent on ``accountant`` (a
        site's :func:`record_accountant`, kept across rounds) when one is given. Dropout follows the plan's
        seed; batch sampling and noise come from ``randomness`` (the site's secret randomness).
        """
        if accountant is not None and accountant.sampling != "poisson":
            raise ConfigError(
                "DP-SGD samples a site's windows by Poisson sampling: its accountant must use sampling = "
                f"'poisson' (got {accountant.sampling!r}); make it with record_accountant()"
            )
        n = len(windows)
        rate = min(1.0, plan.batch_size / n) if n else 1.0
        steps = plan.local_steps(n)

        self.layout.write(self.model, weights)
        self.optimizer.state.clear()
        for group in self.optimizer.param_groups:
            group["lr"] = plan.learning_rate
        self.model.train()
        loss_total, counted = 0.0, 0
        started = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            seed_dropout(plan.seed, self.params)  # dropout draws from the global generator: scope it
            for _ in range(steps):
                chosen = randomness.uniform(n) < rate
                inputs, targets = split_window(windows[chosen])
                losses = self.step_batch(inputs, targets, rate * n, randomness)
                loss_total += float(losses.sum())
                counted += len(losses)
        seconds = time.perf_counter() - started
        delta = self.layout.read(self.model, self._local) - weights
        epsilon = None
        if accountant is not None and steps > 0:
            accountant.spend(self.noise_multiplier, rate, steps)
        if accountant is not None:
            epsilon = accountant.epsilon()
        return DPFitResult(
            delta=delta,
            num_examples=n,
            steps=steps,
            loss=loss_total / max(counted, 1),
            seconds=seconds,
            sampling_rate=rate,
            noise_multiplier=self.noise_multiplier,
            epsilon=epsilon,
        )
