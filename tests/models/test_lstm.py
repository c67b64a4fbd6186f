"""What only the LSTM does; what every character model does is tested in test_char_models.py."""

from __future__ import annotations

import torch

from confide.core import Layout
from confide.models import CharLSTM, LSTMConfig
from tests.models.common import VOCAB, random_codes


def small(**overrides: object) -> CharLSTM:
    torch.manual_seed(0)
    options: dict[str, object] = dict(vocab_size=len(VOCAB), hidden=64)
    options.update(overrides)
    return CharLSTM(LSTMConfig(**options))  # type: ignore[arg-type]


def test_reads_inputs_at_and_beyond_its_training_context() -> None:
    model = small()
    idx = random_codes(3, 80, len(VOCAB))
    logits, loss = model(idx)
    assert logits.shape == (3, 80, len(VOCAB))
    assert loss is None
    # No positions to run out of: longer inputs than the training context are read too.
    logits, _ = model(random_codes(1, 120, len(VOCAB)))
    assert logits.shape == (1, 120, len(VOCAB))


def test_parameter_count_matches_the_paper_architecture() -> None:
    model = CharLSTM(LSTMConfig())
    vocab, emb, hidden = 97, 8, 256

    # An LSTM layer has 4 gates (input, forget, cell, output), each with input weights, recurrent weights and
    # a bias; PyTorch keeps two bias vectors per gate (b_ih and b_hh), hence 2 * hidden.
    def lstm_layer(inputs: int) -> int:
        return 4 * (inputs * hidden + hidden * hidden + 2 * hidden)

    expected = vocab * emb + lstm_layer(emb) + lstm_layer(hidden) + (hidden * vocab + vocab)
    assert expected == 824_425
    assert model.num_parameters() == expected
    assert Layout.of_module(model).size == expected
    assert model.context == 80


def test_generate_carries_state_like_a_full_rerun() -> None:
    model = small()
    prompt = random_codes(2, 6, len(VOCAB))
    fast = model.generate(prompt, 15, temperature=0.0)
    slow = prompt
    with torch.no_grad():
        for _ in range(15):
            logits, _ = model(slow)
            slow = torch.cat([slow, logits[:, -1, :].argmax(dim=-1, keepdim=True)], dim=1)
    assert torch.equal(fast, slow)


def test_generate_from_prompts_longer_than_the_context() -> None:
    model = small()
    model.train()
    prompt = random_codes(1, 100, len(VOCAB))
    out = model.generate(prompt, 10, generator=torch.Generator().manual_seed(2))
    assert out.shape == (1, 110)
    assert model.training
