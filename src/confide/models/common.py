"""Pieces both character models share: the masked loss over non-PAD targets, and sampling."""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from confide.data.tokenize import PAD

IGNORE_INDEX = -100
"""What PAD becomes before the loss: the value F.cross_entropy skips by default."""


@runtime_checkable
class CharModel(Protocol):
    """What every character model offers; both :class:`GPT` and :class:`CharLSTM` satisfy it."""

    context: int
    """The longest input the model is trained on (the GPT's block size; 80 characters for the LSTM)."""

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Logits (B, T, vocab) and the mean cross-entropy over non-PAD targets (None without targets)."""
        ...

    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``idx`` (B, T) followed by ``max_new_tokens`` sampled codes: (B, T + max_new_tokens)."""
        ...


def input_codes(idx: Tensor) -> Tensor:
    """Inputs as int64 codes an embedding can look up: PAD (only ever after a text's end) reads as 0."""
    if idx.dim() != 2:
        raise ValueError(f"inputs must have shape (batch, time), got {tuple(idx.shape)}")
    return idx.long().masked_fill(idx == PAD, 0)


def _loss_targets(logits: Tensor, targets: Tensor) -> Tensor:
    """Targets flattened to int64 with PAD replaced by IGNORE_INDEX, checked against the logits' shape."""
    if logits.dim() != 3 or tuple(targets.shape) != tuple(logits.shape[:2]):
        raise ValueError(
            f"targets of shape {tuple(targets.shape)} do not match logits of shape {tuple(logits.shape)}"
        )
    flat = targets.reshape(-1).long()
    return flat.masked_fill(flat == PAD, IGNORE_INDEX)


def masked_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy over the non-PAD targets.

    This equals ``F.cross_entropy(..., ignore_index=...)`` whenever some target is real, but a batch that is
    all padding gives 0 (with zero gradient) instead of 0/0 = NaN, which would poison the weights.
    """
    flat = _loss_targets(logits, targets)
    total = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), flat, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    count = (flat != IGNORE_INDEX).sum().clamp(min=1)
    return total / count


@torch.no_grad()
def loss_and_correct(logits: Tensor, targets: Tensor) -> tuple[float, int, int]:
    """Summed cross-entropy, number of argmax hits, and number of targets, all over non-PAD targets.

    Sums rather than means so that evaluation can add them up over batches of different padding and divide
    once at the end.
    """
    flat = _loss_targets(logits, targets)
    flat_logits = logits.reshape(-1, logits.size(-1)).float()
    keep = flat != IGNORE_INDEX
    losses = F.cross_entropy(flat_logits, flat, ignore_index=IGNORE_INDEX, reduction="none")
    # Summed in float64: a test set has millions of characters, and float32 sums drift at that size.
    sum_loss = float(losses.double().sum().item())
    correct = int(((flat_logits.argmax(dim=-1) == flat) & keep).sum().item())
    return sum_loss, correct, int(keep.sum().item())


def check_generate_args(idx: Tensor, max_new_tokens: int, temperature: float, top_k: int | None) -> None:
    if idx.dim() != 2 or idx.size(1) == 0:
        raise ValueError(f"the prompt must have shape (batch, time) with time >= 1, got {tuple(idx.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be at least 0, got {max_new_tokens}")
    if not temperature >= 0.0 or math.isinf(temperature):
        raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1 (or None for no limit), got {top_k}")


def sample_next(
    logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> Tensor:
    """One code per row of ``logits`` (B, vocab), as a (B, 1) int64 tensor.

    Temperature 0 is greedy argmax; otherwise the logits are divided by the temperature, cut to the ``top_k``
    most likely codes when asked, and sampled with ``generator`` (the global RNG when None).
    """
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)
