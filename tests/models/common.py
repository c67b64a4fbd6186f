"""What the model tests share: a short text, its vocabulary, and random codes over it."""

from __future__ import annotations

import torch

TEXT = "to be, or not to be: that is the question. " * 8
VOCAB = sorted(set(TEXT))


def random_codes(batch: int, length: int, vocab: int = len(VOCAB), seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


def text_windows(length: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-character targets: windows of ``length`` over TEXT, every ``stride`` characters."""
    codes = torch.tensor([VOCAB.index(c) for c in TEXT])
    starts = torch.arange(0, len(codes) - length - 1, stride)
    x = torch.stack([codes[s : s + length] for s in starts])
    y = torch.stack([codes[s + 1 : s + length + 1] for s in starts])
    return x, y
