from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from confide.core import Layout
from confide.errors import ConfigError
from confide.models import GPT, PAD, GPTConfig

TEXT = "to be, or not to be: that is the question. " * 8
VOCAB = sorted(set(TEXT))


def tiny(**overrides: object) -> GPT:
    torch.manual_seed(0)
    options: dict[str, object] = dict(vocab_size=len(VOCAB), context=16, layers=2, heads=2, width=32)
    options.update(overrides)
    return GPT(GPTConfig(**options))  # type: ignore[arg-type]


def random_codes(batch: int, length: int, vocab: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


def test_shapes() -> None:
    model = tiny()
    idx = random_codes(3, 16, len(VOCAB))
    logits, loss = model(idx)
    assert logits.shape == (3, 16, len(VOCAB))
    assert loss is None
    logits, loss = model(idx[:, :5], idx[:, 1:6])
    assert logits.shape == (3, 5, len(VOCAB))
    assert loss is not None and loss.dim() == 0


def test_loss_is_cross_entropy() -> None:
    model = tiny()
    idx, targets = random_codes(2, 12, len(VOCAB)), random_codes(2, 12, len(VOCAB), seed=2)
    logits, loss = model(idx, targets)
    assert loss is not None
    expected = F.cross_entropy(logits.reshape(-1, len(VOCAB)), targets.reshape(-1))
    torch.testing.assert_close(loss, expected)


def test_pad_targets_are_left_out() -> None:
    model = tiny()
    idx, targets = random_codes(2, 12, len(VOCAB)), random_codes(2, 12, len(VOCAB), seed=2)
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


def test_all_pad_batch_gives_zero_loss_not_nan() -> None:
    model = tiny()
    idx = random_codes(2, 8, len(VOCAB))
    _, loss = model(idx, torch.full_like(idx, PAD))
    assert loss is not None and loss.item() == 0.0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_causal() -> None:
    model = tiny()
    idx = random_codes(2, 16, len(VOCAB))
    changed = idx.clone()
    changed[:, 9] = (changed[:, 9] + 1) % len(VOCAB)
    before, _ = model(idx)
    after, _ = model(changed)
    torch.testing.assert_close(before[:, :9], after[:, :9])
    assert not torch.allclose(before[:, 9:], after[:, 9:])


def test_input_longer_than_context_is_refused() -> None:
    model = tiny()
    with pytest.raises(ValueError, match="context of 16"):
        model(random_codes(1, 17, len(VOCAB)))


def test_training_lowers_loss() -> None:
    model = tiny(width=64)
    codes = torch.tensor([VOCAB.index(c) for c in TEXT])
    starts = torch.arange(0, len(codes) - 17, 3)
    x = torch.stack([codes[s : s + 16] for s in starts])
    y = torch.stack([codes[s + 1 : s + 17] for s in starts])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
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
    model = tiny()
    prompt = random_codes(2, 5, len(VOCAB))
    a = model.generate(prompt, 20, generator=torch.Generator().manual_seed(7))
    b = model.generate(prompt, 20, generator=torch.Generator().manual_seed(7))
    assert a.shape == (2, 25)
    assert torch.equal(a[:, :5], prompt)
    assert torch.equal(a, b)
    assert int(a.max()) < len(VOCAB)
    assert model.generate(prompt, 0).shape == (2, 5)


def test_generate_restores_training_mode_and_ignores_dropout() -> None:
    model = tiny(dropout=0.5)
    model.train()
    prompt = random_codes(1, 4, len(VOCAB))
    a = model.generate(prompt, 10, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(123)  # dropout would draw from the global RNG; in eval mode it does not
    b = model.generate(prompt, 10, generator=torch.Generator().manual_seed(3))
    assert model.training
    assert torch.equal(a, b)


def test_top_k_one_is_greedy() -> None:
    model = tiny()
    prompt = random_codes(2, 3, len(VOCAB))
    greedy = model.generate(prompt, 12, temperature=0.0)
    top1 = model.generate(prompt, 12, temperature=0.8, top_k=1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(greedy, top1)


def test_generate_crops_long_prompts_to_the_context() -> None:
    model = tiny()
    prompt = random_codes(2, 40, len(VOCAB))
    long = model.generate(prompt, 30, generator=torch.Generator().manual_seed(5))
    cropped = model.generate(prompt[:, -16:], 30, generator=torch.Generator().manual_seed(5))
    assert long.shape == (2, 70)
    assert torch.equal(long[:, 40:], cropped[:, 16:])


def test_generate_argument_checks() -> None:
    model = tiny()
    prompt = random_codes(1, 3, len(VOCAB))
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt, 2, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(prompt, 2, top_k=0)
    with pytest.raises(ValueError, match="prompt"):
        model.generate(prompt[:, :0], 2)


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


def test_layout_round_trip() -> None:
    model = tiny()
    layout = Layout.of_module(model)
    first = layout.read(model)
    changed = first * 2.0 + 1.0
    layout.write(model, changed)
    np.testing.assert_array_equal(layout.read(model), changed)
    layout.write(model, first)
    np.testing.assert_array_equal(layout.read(model), first)


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


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"width": 130, "heads": 4}, r"model.width \(130\) must be divisible by model.heads \(4\)"),
        ({"layers": 0}, r"model.layers \(0\) must be at least 1"),
        ({"heads": -2}, r"model.heads \(-2\) must be at least 1"),
        ({"context": 0}, r"model.context \(0\) must be at least 1"),
        ({"width": "128"}, r"model.width must be an integer"),
        ({"layers": True}, r"model.layers must be an integer"),
        ({"dropout": 1.0}, r"model.dropout \(1.0\) must be at least 0 and below 1"),
        ({"dropout": -0.1}, r"model.dropout"),
        ({"dropout": "0.1"}, r"model.dropout must be a number"),
        ({"vocab_size": 300}, r"model.vocab_size \(300\) must be at most 255"),
        ({"bias": 1}, r"model.bias must be true or false"),
    ],
)
def test_config_errors(options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        GPTConfig(**options)  # type: ignore[arg-type]
