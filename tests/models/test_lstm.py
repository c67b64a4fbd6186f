from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from confide.core import Layout
from confide.errors import ConfigError
from confide.models import PAD, CharLSTM, LSTMConfig

TEXT = "to be, or not to be: that is the question. " * 8
VOCAB = sorted(set(TEXT))


def small(**overrides: object) -> CharLSTM:
    torch.manual_seed(0)
    options: dict[str, object] = dict(vocab_size=len(VOCAB), hidden=64)
    options.update(overrides)
    return CharLSTM(LSTMConfig(**options))  # type: ignore[arg-type]


def random_codes(batch: int, length: int, vocab: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


def test_shapes() -> None:
    model = small()
    idx = random_codes(3, 80, len(VOCAB))
    logits, loss = model(idx)
    assert logits.shape == (3, 80, len(VOCAB))
    assert loss is None
    # No positions to run out of: longer inputs than the training context are read too.
    logits, _ = model(random_codes(1, 120, len(VOCAB)))
    assert logits.shape == (1, 120, len(VOCAB))


def test_loss_is_cross_entropy() -> None:
    model = small()
    idx, targets = random_codes(2, 12, len(VOCAB)), random_codes(2, 12, len(VOCAB), seed=2)
    logits, loss = model(idx, targets)
    assert loss is not None
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, len(VOCAB)), targets.reshape(-1)))


def test_pad_targets_are_left_out() -> None:
    model = small()
    idx, targets = random_codes(2, 12, len(VOCAB)), random_codes(2, 12, len(VOCAB), seed=2)
    _, unpadded = model(idx[:, :7], targets[:, :7])
    padded_targets = targets.clone()
    padded_targets[:, 7:] = PAD
    padded_idx = idx.clone()
    padded_idx[:, 8:] = PAD
    _, padded = model(padded_idx, padded_targets)
    assert padded is not None and unpadded is not None
    torch.testing.assert_close(padded, unpadded)


def test_causal() -> None:
    model = small()
    idx = random_codes(2, 20, len(VOCAB))
    changed = idx.clone()
    changed[:, 9] = (changed[:, 9] + 1) % len(VOCAB)
    before, _ = model(idx)
    after, _ = model(changed)
    torch.testing.assert_close(before[:, :9], after[:, :9])
    assert not torch.allclose(before[:, 9:], after[:, 9:])


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


def test_training_lowers_loss() -> None:
    model = small()
    codes = torch.tensor([VOCAB.index(c) for c in TEXT])
    starts = torch.arange(0, len(codes) - 41, 7)
    x = torch.stack([codes[s : s + 40] for s in starts])
    y = torch.stack([codes[s + 1 : s + 41] for s in starts])
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    losses = []
    for _ in range(30):
        _, loss = model(x, y)
        assert loss is not None
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_generate_length_and_determinism() -> None:
    model = small()
    prompt = random_codes(2, 5, len(VOCAB))
    a = model.generate(prompt, 20, generator=torch.Generator().manual_seed(7))
    b = model.generate(prompt, 20, generator=torch.Generator().manual_seed(7))
    assert a.shape == (2, 25)
    assert torch.equal(a[:, :5], prompt)
    assert torch.equal(a, b)
    assert model.generate(prompt, 0).shape == (2, 5)


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


def test_top_k_one_is_greedy() -> None:
    model = small()
    prompt = random_codes(2, 3, len(VOCAB))
    greedy = model.generate(prompt, 12, temperature=0.0)
    top1 = model.generate(prompt, 12, temperature=1.5, top_k=1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(greedy, top1)


def test_generate_from_prompts_longer_than_the_context() -> None:
    model = small()
    model.train()
    prompt = random_codes(1, 100, len(VOCAB))
    out = model.generate(prompt, 10, generator=torch.Generator().manual_seed(2))
    assert out.shape == (1, 110)
    assert model.training


def test_layout_round_trip() -> None:
    model = small()
    layout = Layout.of_module(model)
    first = layout.read(model)
    changed = first * 2.0 + 1.0
    layout.write(model, changed)
    np.testing.assert_array_equal(layout.read(model), changed)
    idx = random_codes(1, 10, len(VOCAB))
    layout.write(model, first)
    np.testing.assert_array_equal(layout.read(model), first)
    torch.manual_seed(5)
    other = CharLSTM(model.config)
    layout.write(other, first)
    torch.testing.assert_close(other(idx)[0], model(idx)[0])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"hidden": 0}, r"model.hidden \(0\) must be at least 1"),
        ({"layers": -1}, r"model.layers \(-1\) must be at least 1"),
        ({"embedding": 8.0}, r"model.embedding must be an integer"),
        ({"vocab_size": 256}, r"model.vocab_size \(256\) must be at most 255"),
    ],
)
def test_config_errors(options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        LSTMConfig(**options)  # type: ignore[arg-type]
