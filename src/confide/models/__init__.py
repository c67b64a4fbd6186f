"""Character-level generative models: a small GPT and the LSTM of the FedAvg paper.

Both read int64 codes of shape (batch, time) over a vocabulary of ``vocab_size`` characters and predict the
next character at every position. They share the :class:`CharModel` interface, so training, evaluation and
sampling code never asks which one it holds, and :func:`build_model` makes either from the ``[model]`` table
of a run's configuration.

Targets may hold :data:`PAD` where a text has ended and there is nothing to predict; the loss leaves those
positions out. Inputs may hold PAD there too: both models are causal, so whatever stands at such a position
only shapes predictions whose targets are PAD as well, and the models read it as code 0 instead of failing the
embedding lookup.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from confide.data.tokenize import PAD
from confide.errors import ConfigError
from confide.models.configs import GPTConfig, LSTMConfig, model_config, model_options
from confide.registry import MODELS

if TYPE_CHECKING:
    from torch import nn

    from confide.models.common import IGNORE_INDEX, CharModel, loss_and_correct, masked_cross_entropy
    from confide.models.gpt import GPT
    from confide.models.lstm import CharLSTM

# The models import torch; the configs do not. So the torch-backed names are imported on first use (PEP 562),
# and `confide.models.configs` (which the run configuration checks against) can be imported without torch.
_LAZY = {
    "GPT": "confide.models.gpt",
    "CharLSTM": "confide.models.lstm",
    "IGNORE_INDEX": "confide.models.common",
    "CharModel": "confide.models.common",
    "loss_and_correct": "confide.models.common",
    "masked_cross_entropy": "confide.models.common",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_model(kind: str, vocab_size: int, **options: Any) -> nn.Module:
    """A freshly initialised model of ``kind`` (a name of :data:`confide.registry.MODELS`) with its config
    fields set from options.

    Weights come from torch's global RNG, as for any torch module: seed it first for a reproducible start.
    """
    config = model_config(kind, vocab_size, **options)
    model: nn.Module = MODELS.load(kind)(config)
    return model


def head_names(model: nn.Module, prefixes: Sequence[str] = ()) -> frozenset[str]:
    """Names of the parameters that form the model's "head" for FedRep-style personalization.

    With ``prefixes``, the trainable parameters whose names start with one of them. Without, the model's
    natural head: the LSTM's output layer; for the GPT, whose output matrix is tied to the input embedding,
    the last block and the final layer norm (making the tied matrix personal would make each site's reading
    of characters personal too, which is not a head).
    """
    from confide.models.gpt import GPT

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not prefixes:
        last = model.config.layers - 1 if isinstance(model, GPT) else 0
        prefixes = (f"blocks.{last}.", "ln_f.") if isinstance(model, GPT) else ("head.",)
    chosen = frozenset(n for n in names if any(n.startswith(p) for p in prefixes))
    if not chosen:
        raise ConfigError(
            f"client.personal_layers = {list(prefixes)!r} matches no parameter of the model; its parameters "
            f"start with: {', '.join(sorted({n.rsplit('.', 1)[0] for n in names}))}"
        )
    if len(chosen) == len(names):
        raise ConfigError(
            f"client.personal_layers = {list(prefixes)!r} covers every parameter, which would leave nothing "
            "to share; name only the head"
        )
    return chosen


__all__ = [
    "GPT",
    "IGNORE_INDEX",
    "PAD",
    "CharLSTM",
    "CharModel",
    "GPTConfig",
    "LSTMConfig",
    "build_model",
    "head_names",
    "loss_and_correct",
    "masked_cross_entropy",
    "model_config",
    "model_options",
]
