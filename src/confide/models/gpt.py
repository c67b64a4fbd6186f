"""A small GPT over characters, in the shape of GPT-2 (Radford et al. 2019) and nanoGPT.

Token and learned position embeddings, a stack of pre-LayerNorm blocks (causal self-attention, then a 4x GELU
MLP, each added back to the residual stream), a final LayerNorm, and an output head that shares its weights
with the token embedding.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from confide.models.common import check_generate_args, input_codes, masked_cross_entropy, sample_next
from confide.models.configs import GPTConfig

__all__ = ["GPT", "GPTConfig", "unfused_attention"]

_local = threading.local()


@contextlib.contextmanager
def unfused_attention() -> Iterator[None]:
    """Attention written out (scores, causal mask, softmax, weighted sum) instead of the fused kernel, in this
    thread while the context lasts. ``torch.func.vmap`` has no batching rule for the fused kernel and would
    loop over the batch (with a warning); DP-SGD's per-window gradients run under it. The same function, to
    float rounding."""
    before = getattr(_local, "unfused", False)
    _local.unfused = True
    try:
        yield
    finally:
        _local.unfused = before


def _attention(q: Tensor, k: Tensor, v: Tensor, dropout: float) -> Tensor:
    """Causal attention from its definition: what the fused kernel computes."""
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))
    length = q.size(-2)
    future = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
    weights = F.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    return F.dropout(weights, dropout) @ v if dropout > 0 else weights @ v


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.dropout = config.dropout
        # Queries, keys and values of all heads in one matmul.
        self.qkv = nn.Linear(config.width, 3 * config.width, bias=config.bias)
        self.proj = nn.Linear(config.width, config.width, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # (B, T, C) -> (B, heads, T, head width): each head attends on its own slice.
        q = q.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        k = k.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        v = v.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        dropout = self.dropout if self.training else 0.0
        if getattr(_local, "unfused", False):
            y = _attention(q, k, v, dropout)
        else:
            # The fused kernel applies the causal mask itself, so no (T, T) mask buffer is kept.
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.width, 4 * config.width, bias=config.bias)
        self.gelu = nn.GELU()
        self.proj = nn.Linear(4 * config.width, config.width, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.proj(self.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        # Pre-LayerNorm (normalise the input of each sublayer, not the residual stream) trains stably without
        # learning-rate warmup (Xiong et al. 2020), which suits short local rounds that may restart the
        # optimizer each time.
        self.ln1 = nn.LayerNorm(config.width, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.width, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.context = config.context
        self.tok = nn.Embedding(config.vocab_size, config.width)
        self.pos = nn.Embedding(config.context, config.width)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.ln_f = nn.LayerNorm(config.width, bias=config.bias)
        self.head = nn.Linear(config.width, config.vocab_size, bias=False)
        # Weight tying (Press & Wolf 2017): reading a character and predicting it use one matrix. That saves
        # vocab x width parameters (fewer to send each round) and gives the rarely seen characters' embeddings
        # the gradient of every prediction, where they would otherwise learn only when they appear in input.
        # named_parameters() lists the shared tensor once, as tok.weight, so the flat Layout holds it once.
        self.head.weight = self.tok.weight

        self.apply(self._init_weights)
        # GPT-2: each block adds two projections to the residual stream, so scale their init by
        # 1/sqrt(2 * layers) to keep the stream's variance from growing with depth.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self) -> int:
        """Trainable parameters, the tied embedding counted once (as the flat Layout holds it)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Logits (B, T, vocab) and the mean cross-entropy over non-PAD targets (None without targets)."""
        codes = input_codes(idx)
        length = codes.size(1)
        if length > self.context:
            raise ValueError(
                f"input of {length} positions is longer than the model's context of {self.context}"
            )
        pos = torch.arange(length, device=codes.device)
        x = self.drop(self.tok(codes) + self.pos(pos))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        loss = None if targets is None else masked_cross_entropy(logits, targets)
        return logits, loss

    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``idx`` (B, T) followed by ``max_new_tokens`` sampled codes: (B, T + max_new_tokens).

        Each step conditions on the last ``context`` codes only, since the model has no positions beyond.
        Runs in eval mode (no dropout, so the only randomness is ``generator``) and restores the mode after.
        """
        check_generate_args(idx, max_new_tokens, temperature, top_k)
        was_training = self.training
        self.eval()
        try:
            out = idx.long()
            for _ in range(max_new_tokens):
                logits, _ = self(out[:, -self.context :])
                out = torch.cat([out, sample_next(logits[:, -1, :], temperature, top_k, generator)], dim=1)
            return out
        finally:
            self.train(was_training)
