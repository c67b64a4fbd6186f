from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from confide.errors import ConfigError
from confide.models import (
    GPT,
    PAD,
    CharLSTM,
    CharModel,
    GPTConfig,
    LSTMConfig,
    build_model,
    loss_and_correct,
    masked_cross_entropy,
    model_options,
)


def test_build_gpt_with_options() -> None:
    model = build_model("gpt", 50, layers=1, heads=2, width=16, context=12, dropout=0.1)
    assert isinstance(model, GPT)
    assert model.config == GPTConfig(vocab_size=50, context=12, layers=1, heads=2, width=16, dropout=0.1)
    assert model.context == 12
    assert isinstance(model, CharModel)


def test_build_lstm_defaults_are_the_papers() -> None:
    model = build_model("lstm", 97)
    assert isinstance(model, CharLSTM)
    assert model.config == LSTMConfig(vocab_size=97, embedding=8, hidden=256, layers=2, context=80)
    assert model.context == 80
    assert isinstance(model, CharModel)


def test_unknown_kind() -> None:
    with pytest.raises(ConfigError, match=r"model.kind must be one of 'gpt', 'lstm', 'hf' \(got 'rnn'\)"):
        build_model("rnn", 97)


def test_unknown_option_names_it_and_lists_the_accepted() -> None:
    with pytest.raises(
        ConfigError,
        match=r"model.foo is not an option of the 'gpt' model; accepted: bias, context, dropout, heads, "
        r"layers, width$",
    ):
        build_model("gpt", 97, foo=1)
    with pytest.raises(ConfigError, match=r"model.width is not an option of the 'lstm' model; accepted: "):
        build_model("lstm", 97, width=128)
    assert model_options("lstm") == ("context", "embedding", "hidden", "layers")


def test_bad_option_values_reach_the_config_checks() -> None:
    with pytest.raises(ConfigError, match=r"model.width \(130\) must be divisible by model.heads \(4\)"):
        build_model("gpt", 97, width=130)
    with pytest.raises(ConfigError, match=r"model.hidden must be an integer"):
        build_model("lstm", 97, hidden="256")
    with pytest.raises(ConfigError, match=r"model.vocab_size"):
        build_model("lstm", 1)


def test_loss_and_correct_hand_built() -> None:
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 5.0]]])
    targets = torch.tensor([[0, 2, PAD]])
    sum_loss, correct, count = loss_and_correct(logits, targets)
    # Position 0: target 0 has the top logit 2 of (2, 0, 0); position 1: target 2 has logit 0 of (0, 1, 0).
    expected = (-2.0 + math.log(math.exp(2) + 2)) + (0.0 + math.log(2 + math.e))
    assert sum_loss == pytest.approx(expected, rel=1e-6)
    assert (correct, count) == (1, 2)
    mean = masked_cross_entropy(logits, targets)
    assert mean.item() == pytest.approx(expected / 2, rel=1e-6)
    torch.testing.assert_close(mean, F.cross_entropy(logits[0, :2], targets[0, :2]))


def test_loss_and_correct_adds_up_over_batches() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 10, 7, generator=g)
    targets = torch.randint(0, 7, (4, 10), generator=g)
    targets[1, 6:] = PAD
    targets[3, 2:] = PAD
    total, correct, count = loss_and_correct(logits, targets)
    halves = [loss_and_correct(logits[i : i + 2], targets[i : i + 2]) for i in (0, 2)]
    assert total == pytest.approx(sum(h[0] for h in halves), rel=1e-9)
    assert correct == sum(h[1] for h in halves)
    assert count == sum(h[2] for h in halves) == 40 - 4 - 8
    assert total / count == pytest.approx(masked_cross_entropy(logits, targets).item(), rel=1e-5)


def test_uint8_targets_are_accepted() -> None:
    logits = torch.zeros(1, 3, 4)
    targets = torch.tensor([[1, 2, PAD]], dtype=torch.uint8)
    assert masked_cross_entropy(logits, targets).item() == pytest.approx(math.log(4))
    assert loss_and_correct(logits, targets)[2] == 2


def test_shape_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match="do not match"):
        masked_cross_entropy(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))
