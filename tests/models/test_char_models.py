"""One test matrix for what every character model promises (the CharModel interface); what only one model
does is tested in its own file (test_gpt.py, test_lstm.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from confide.core import Layout
from confide.errors import ConfigError
from confide.models import PAD, CharModel, build_model
from confide.registry import MODELS
from tests.models.common import VOCAB, random_codes, text_windows

SMALL: dict[str, dict[str, Any]] = {
    "gpt": {"context": 16, "layers": 2, "heads": 2, "width": 32},
    "lstm": {"hidden": 64},
}
"""Options of a model small enough to test quickly, per kind."""

TRAINING: dict[str, dict[str, Any]] = {
    "gpt": {"options": {"width": 64}, "length": 16, "stride": 3, "lr": 3e-3},
    "lstm": {"options": {}, "length": 40, "stride": 7, "lr": 2e-2},
}
"""How each kind learns TEXT in 30 Adam steps: its window length (the GPT's context is 16) and rate."""


CHAR_KINDS = tuple(k for k in MODELS.names() if k != "hf")
"""The character models; 'hf' models read token ids in their own tokenizer (tests/llm covers them)."""


@pytest.fixture(params=CHAR_KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def small(kind: str, **overrides: Any) -> Any:
    """A ``kind`` model (an nn.Module that is a CharModel; typed Any, since no one type says both)."""
    torch.manual_seed(0)
    return build_model(kind, len(VOCAB), **{**SMALL[kind], **overrides})


def test_every_registered_kind_is_in_the_matrix() -> None:
    assert set(SMALL) == set(TRAINING) == set(CHAR_KINDS)


def test_shapes(kind: str) -> None:
    model = small(kind)
    assert isinstance(build_model(kind, len(VOCAB), **SMALL[kind]), CharModel)
    idx = random_codes(3, 16)
    logits, loss = model(idx)
    assert logits.shape == (3, 16, len(VOCAB))
    assert loss is None
    logits, loss = model(idx[:, :5], idx[:, 1:6])
    assert logits.shape == (3, 5, len(VOCAB))
    assert loss is not None and loss.dim() == 0


def test_loss_is_cross_entropy(kind: str) -> None:
    model = small(kind)
    idx, targets = random_codes(2, 12), random_codes(2, 12, seed=2)
    logits, loss = model(idx, targets)
    assert loss is not None
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, len(VOCAB)), targets.reshape(-1)))


def test_pad_targets_and_inputs_are_left_out(kind: str) -> None:
    model = small(kind)
    idx, targets = random_codes(2, 12), random_codes(2, 12, seed=2)
    _, unpadded = model(idx[:, :7], targets[:, :7])
    padded_targets = targets.clone()
    padded_targets[:, 7:] = PAD
    _, padded = model(idx, padded_targets)
    assert padded is not None and unpadded is not None
    torch.testing.assert_close(padded, unpadded)
    # Inputs may carry PAD after the end too; being causal, the model's earlier predictions do not see it.
    padded_idx = idx.clone()
    padded_idx[:, 8:] = PAD
    _, with_pad_inputs = model(padded_idx, padded_targets)
    assert with_pad_inputs is not None
    torch.testing.assert_close(with_pad_inputs, unpadded)


def test_all_pad_batch_gives_zero_loss_not_nan(kind: str) -> None:
    model = small(kind)
    idx = random_codes(2, 8)
    _, loss = model(idx, torch.full_like(idx, PAD))
    assert loss is not None and loss.item() == 0.0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_causal(kind: str) -> None:
    model = small(kind)
    idx = random_codes(2, 16)
    changed = idx.clone()
    changed[:, 9] = (changed[:, 9] + 1) % len(VOCAB)
    before, _ = model(idx)
    after, _ = model(changed)
    torch.testing.assert_close(before[:, :9], after[:, :9])
    assert not torch.allclose(before[:, 9:], after[:, 9:])


def test_training_lowers_loss(kind: str) -> None:
    spec = TRAINING[kind]
    model = small(kind, **spec["options"])
    x, y = text_windows(spec["length"], spec["stride"])
    optimizer = torch.optim.Adam(model.parameters(), lr=spec["lr"])
    losses = []
    for _ in range(30):
        _, loss = model(x, y)
        assert loss is not None
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_generate_length_and_determinism(kind: str) -> None:
    model = small(kind)
    prompt = random_codes(2, 5)
    a = model.generate(prompt, 20, generator=torch.Generator().manual_seed(7))
    b = model.generate(prompt, 20, generator=torch.Generator().manual_seed(7))
    assert a.shape == (2, 25)
    assert torch.equal(a[:, :5], prompt)
    assert torch.equal(a, b)
    assert int(a.max()) < len(VOCAB)
    assert model.generate(prompt, 0).shape == (2, 5)


def test_generate_restores_training_mode(kind: str) -> None:
    model = small(kind)
    model.train()
    model.generate(random_codes(1, 4), 5, generator=torch.Generator().manual_seed(3))
    assert model.training
    model.eval()
    model.generate(random_codes(1, 4), 5, generator=torch.Generator().manual_seed(3))
    assert not model.training


def test_top_k_one_is_greedy(kind: str) -> None:
    model = small(kind)
    prompt = random_codes(2, 3)
    greedy = model.generate(prompt, 12, temperature=0.0)
    top1 = model.generate(prompt, 12, temperature=1.5, top_k=1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(greedy, top1)


def test_generate_argument_checks(kind: str) -> None:
    model = small(kind)
    prompt = random_codes(1, 3)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt, 2, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(prompt, 2, top_k=0)
    with pytest.raises(ValueError, match="prompt"):
        model.generate(prompt[:, :0], 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(prompt, -1)


def test_layout_round_trip_and_a_fresh_model_computes_the_same(kind: str) -> None:
    model = small(kind)
    layout = Layout.of_module(model)
    first = layout.read(model)
    changed = first * 2.0 + 1.0
    layout.write(model, changed)
    np.testing.assert_array_equal(layout.read(model), changed)
    layout.write(model, first)
    np.testing.assert_array_equal(layout.read(model), first)
    torch.manual_seed(5)
    other = build_model(kind, len(VOCAB), **SMALL[kind])
    assert not np.array_equal(Layout.of_module(other).read(other), first)
    layout.write(other, first)
    idx = random_codes(2, 10)
    torch.testing.assert_close(other(idx)[0], model(idx)[0])


@pytest.mark.parametrize(
    ("model_kind", "options", "message"),
    [
        ("gpt", {"width": 130, "heads": 4}, r"model.width \(130\) must be divisible by model.heads \(4\)"),
        ("gpt", {"layers": 0}, r"model.layers \(0\) must be at least 1"),
        ("gpt", {"heads": -2}, r"model.heads \(-2\) must be at least 1"),
        ("gpt", {"context": 0}, r"model.context \(0\) must be at least 1"),
        ("gpt", {"width": "128"}, r"model.width must be an integer"),
        ("gpt", {"layers": True}, r"model.layers must be an integer"),
        ("gpt", {"dropout": 1.0}, r"model.dropout \(1.0\) must be at least 0 and below 1"),
        ("gpt", {"dropout": -0.1}, r"model.dropout"),
        ("gpt", {"dropout": "0.1"}, r"model.dropout must be a number"),
        ("gpt", {"vocab_size": 300}, r"model.vocab_size \(300\) must be at most 255"),
        ("gpt", {"bias": 1}, r"model.bias must be true or false"),
        ("lstm", {"hidden": 0}, r"model.hidden \(0\) must be at least 1"),
        ("lstm", {"layers": -1}, r"model.layers \(-1\) must be at least 1"),
        ("lstm", {"embedding": 8.0}, r"model.embedding must be an integer"),
        ("lstm", {"vocab_size": 256}, r"model.vocab_size \(256\) must be at most 255"),
    ],
)
def test_config_errors(model_kind: str, options: dict[str, Any], message: str) -> None:
    config_class = MODELS.load_options(model_kind)
    assert config_class is not None
    with pytest.raises(ConfigError, match=message):
        config_class(**options)
