"""What only the GPT does; what every character model does is tested in test_char_models.py."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from confide.core import Layout
from confide.models import GPT, GPTConfig
from tests.models.common import VOCAB, random_codes


def tiny(**overrides: object) -> GPT:
    torch.manual_seed(0)
    options: dict[str, object] = dict(vocab_size=len(VOCAB), context=16, layers=2, heads=2, width=32)
    options.update(overrides)
    return GPT(GPTConfig(**options))  # type: ignore[arg-type]


def test_input_longer_than_context_is_refused() -> None:
    model = tiny()
    with pytest.raises(ValueError, match="context of 16"):
        model(random_codes(1, 17, len(VOCAB)))


def test_generate_restores_training_mode_and_ignores_dropout() -> None:
    model = tiny(dropout=0.5)
    model.train()
    prompt = random_codes(1, 4, len(VOCAB))
    a = model.generate(prompt, 10, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(123)  # dropout would draw from the global RNG; in eval mode it does not
    b = model.generate(prompt, 10, generator=torch.Generator().manual_seed(3))
    assert model.training
    assert torch.equal(a, b)


def test_generate_crops_long_prompts_to_the_context() -> None:
    model = tiny()
    prompt = random_codes(2, 40, len(VOCAB))
    long = model.generate(prompt, 30, generator=torch.Generator().manual_seed(5))
    cropped = model.generate(prompt[:, -16:], 30, generator=torch.Generator().manual_seed(5))
    assert long.shape == (2, 70)
    assert torch.equal(long[:, 40:], cropped[:, 16:])


def test_weight_tying_and_layout() -> None:
    model = tiny()
    assert model.head.weight is model.tok.weight
    layout = Layout.of_module(model)
    unique = {id(p): p.numel() for p in model.parameters()}
    assert layout.size == sum(unique.values()) == model.num_parameters()
    assert "head.weight" not in layout.names and "tok.weight" in layout.names

    vector = layout.read(model)
    rng = np.random.default_rng(0)
    vector += rng.normal(0.0, 0.01, size=vector.shape).astype(np.float32)
    layout.write(model, vector)
    np.testing.assert_array_equal(layout.read(model), vector)
    # The head reads the written embedding: the tie survives the write.
    tok = layout.unflatten(vector)["tok.weight"]
    torch.testing.assert_close(model.head.weight.detach(), tok)
    logits, _ = model(random_codes(1, 8, len(VOCAB)))
    assert torch.isfinite(logits).all()

    # A fresh model with the written vector computes the same function.
    torch.manual_seed(99)
    other = GPT(model.config)
    layout.write(other, vector)
    idx = random_codes(2, 16, len(VOCAB))
    torch.testing.assert_close(other(idx)[0], model(idx)[0])

    clone = copy.deepcopy(model)
    assert clone.head.weight is clone.tok.weight


def test_init_scales_residual_projections() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(layers=8, width=128, heads=4))
    params = dict(model.named_parameters())
    proj = torch.cat([params[f"blocks.{i}.mlp.proj.weight"].flatten() for i in range(8)])
    fc = torch.cat([params[f"blocks.{i}.mlp.fc.weight"].flatten() for i in range(8)])
    assert abs(fc.std().item() - 0.02) < 0.002
    assert abs(proj.std().item() - 0.02 / 4.0) < 0.001


def test_default_size() -> None:
    model = GPT(GPTConfig())
    # Per block: 2 LayerNorms (2*2*128), qkv (128*384 + 384), proj (128*128 + 128), MLP (128*512 + 512 +
    # 512*128 + 128); plus token (97*128) and position (80*128) embeddings and the final LayerNorm.
    block = 2 * 2 * 128 + (128 * 384 + 384) + (128 * 128 + 128) + (128 * 512 + 512) + (512 * 128 + 128)
    assert model.num_parameters() == 97 * 128 + 80 * 128 + 4 * block + 2 * 128
    assert model.context == 80
