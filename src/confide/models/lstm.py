"""The character LSTM of the FedAvg paper's Shakespeare experiment.

McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from Decentralized Data": each
character goes through an 8-dimensional embedding, then two LSTM layers of 256 units, then a linear layer to
one logit per character. It reads 80 characters and predicts the next one at every position.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from confide.models.common import check_generate_args, input_codes, masked_cross_entropy, sample_next
from confide.models.configs import LSTMConfig

__all__ = ["CharLSTM", "LSTMConfig", "State"]

State = tuple[Tensor, Tensor]
"""The LSTM's (h, c), each (layers, batch, hidden)."""


class CharLSTM(nn.Module):
    def __init__(self, config: LSTMConfig) -> None:
        super().__init__()
        self.config = config
        self.context = config.context
        self.embed = nn.Embedding(config.vocab_size, config.embedding)
        # PyTorch's default init (uniform in ±1/sqrt(hidden)) is kept: the paper states no other.
        self.lstm = nn.LSTM(config.embedding, config.hidden, num_layers=config.layers, batch_first=True)
        self.head = nn.Linear(config.hidden, config.vocab_size)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def _run(self, codes: Tensor, state: State | None) -> tuple[Tensor, State]:
        """Logits for every position of ``codes`` (B, T), starting from ``state`` (zeros when None)."""
        out, state = self.lstm(self.embed(codes), state)
        return self.head(out), state

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Logits (B, T, vocab) and the mean cross-entropy over non-PAD targets (None without targets)."""
        logits, _ = self._run(input_codes(idx), None)
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

        The prompt is read once, whole (however long: the recurrent state is the model's memory, and it has
        no positions to run out of); after that each new code is fed in alone with the carried (h, c), so a
        step costs the same however long the text has grown. Runs in eval mode and restores the mode after.
        """
        check_generate_args(idx, max_new_tokens, temperature, top_k)
        was_training = self.training
        self.eval()
        try:
            out = [idx.long()]
            logits, state = self._run(input_codes(idx), None)
            for step in range(max_new_tokens):
                code = sample_next(logits[:, -1, :], temperature, top_k, generator)
                out.append(code)
                if step + 1 < max_new_tokens:
                    logits, state = self._run(code, state)
            return torch.cat(out, dim=1)
        finally:
            self.train(was_training)
