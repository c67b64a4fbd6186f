"""The models' config dataclasses and their checks, apart from the models so that they import no torch.

Loading a run configuration checks the ``[model]`` table against these dataclasses (names, types, ranges,
width divisible by heads) without building a model: reading a config stays quick, and works where torch is
not installed (``confide report``, a server's config check). :mod:`confide.models.gpt` and
:mod:`confide.models.lstm` re-export them. Errors speak of the run configuration's ``[model]`` table.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from confide.data.tokenize import DEFAULT_TOKENIZER, PAD
from confide.errors import ConfigError
from confide.registry import MODELS

DEFAULT_VOCAB_SIZE = DEFAULT_TOKENIZER.vocab_size
"""The size of confide's fixed character vocabulary (97 characters); the configs' default."""


def check_int(name: str, value: Any, minimum: int = 1, maximum: int | None = None) -> None:
    # bool is an int in Python, but `layers = true` in a config file is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"model.{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"model.{name} ({value}) must be at least {minimum}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"model.{name} ({value}) must be at most {maximum}")


def check_vocab_size(value: Any) -> None:
    check_int("vocab_size", value, minimum=2)
    if value > PAD:
        raise ConfigError(
            f"model.vocab_size ({value}) must be at most {PAD}: code {PAD} is PAD, which marks positions "
            "without a target, so it cannot also be a character"
        )


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = DEFAULT_VOCAB_SIZE
    context: int = 80
    """Block size: the longest input, and the number of learned positions."""
    layers: int = 4
    heads: int = 4
    width: int = 128
    dropout: float = 0.0
    bias: bool = True
    """Biases in the Linear and LayerNorm layers (GPT-2 has them; without is a little smaller and faster)."""

    def __post_init__(self) -> None:
        check_vocab_size(self.vocab_size)
        for name in ("context", "layers", "heads", "width"):
            check_int(name, getattr(self, name))
        if self.width % self.heads != 0:
            raise ConfigError(
                f"model.width ({self.width}) must be divisible by model.heads ({self.heads}), "
                "since each head takes an equal slice of the width"
            )
        dropout: Any = self.dropout
        if isinstance(dropout, bool) or not isinstance(dropout, int | float):
            raise ConfigError(f"model.dropout must be a number, got {dropout!r}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"model.dropout ({dropout}) must be at least 0 and below 1")
        if not isinstance(self.bias, bool):
            raise ConfigError(f"model.bias must be true or false, got {self.bias!r}")


@dataclass(frozen=True)
class LSTMConfig:
    vocab_size: int = DEFAULT_VOCAB_SIZE
    embedding: int = 8
    hidden: int = 256
    layers: int = 2
    context: int = 80
    """The length of the training windows. The LSTM itself reads inputs of any length."""

    def __post_init__(self) -> None:
        check_vocab_size(self.vocab_size)
        for name in ("embedding", "hidden", "layers", "context"):
            check_int(name, getattr(self, name))


HF_DTYPES = ("float32", "bfloat16", "float16")
HF_DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class HFConfig:
    """A Hugging Face causal language model: loaded from ``path`` or built with random weights from
    ``config`` (a transformers config as a table, with its ``model_type``). Checked here without importing
    transformers; :mod:`confide.models.hf` loads it."""

    vocab_size: int = 0
    """Unused: the model's own tokenizer decides its vocabulary."""
    path: str = ""
    """A local directory as ``save_pretrained`` writes it (config, weights, tokenizer), or the directory of a
    finished confide run of an 'hf' model, whose last checkpoint becomes the base."""
    config: dict[str, Any] | None = None
    """A transformers config (``model_type`` plus its fields) for a model with fresh random weights."""
    tokenizer: str = ""
    """A tokenizer directory; empty: the one in ``path``, or (for ``config``) a byte-level tokenizer."""
    dtype: str = "float32"
    device: str = "auto"
    """'auto': CUDA when present, else the CPU."""
    gradient_checkpointing: bool = False
    max_length: int = 128
    """Tokens per training sequence: longer texts are cut into pieces, longer examples truncated."""
    base_sha256: str = ""
    """SHA-256 of the base weights every site must hold (filled in by the server); empty: not checked."""

    def __post_init__(self) -> None:
        if bool(self.path) == (self.config is not None):
            raise ConfigError(
                "model.kind = 'hf' needs exactly one of model.path (a directory written by save_pretrained) "
                "and model.config (a transformers config table with model_type, for random weights)"
            )
        if self.config is not None and not (
            isinstance(self.config, dict) and isinstance(self.config.get("model_type"), str)
        ):
            raise ConfigError(
                "model.config must be a table with a model_type such as 'llama' or 'gpt2' "
                f"(got {self.config!r})"
            )
        for name, accepted in (("dtype", HF_DTYPES), ("device", HF_DEVICES)):
            if getattr(self, name) not in accepted:
                raise ConfigError(
                    f"model.{name} must be one of {', '.join(map(repr, accepted))} "
                    f"(got {getattr(self, name)!r})"
                )
        check_int("max_length", self.max_length, minimum=2)
        if not isinstance(self.gradient_checkpointing, bool):
            raise ConfigError(
                f"model.gradient_checkpointing must be true or false (got {self.gradient_checkpointing!r})"
            )


ModelConfig = GPTConfig | LSTMConfig | HFConfig


def _config_class(kind: str) -> type[ModelConfig]:
    cls = MODELS.load_options(kind)  # ConfigError naming model.kind and the accepted kinds
    assert cls is not None, f"the model kind {kind!r} is registered without its config dataclass"
    return cls


def model_options(kind: str) -> tuple[str, ...]:
    """The options the ``[model]`` table accepts for ``kind``: its config fields other than vocab_size."""
    return tuple(sorted(f.name for f in fields(_config_class(kind)) if f.name != "vocab_size"))


def model_config(kind: str, vocab_size: int = DEFAULT_VOCAB_SIZE, **options: Any) -> ModelConfig:
    """The checked config of a ``kind`` model: every option name known, every value of the right type and
    range (ConfigError otherwise). Builds no model, so it needs no torch."""
    cls = _config_class(kind)
    accepted = model_options(kind)
    for name in sorted(options):
        if name not in accepted:
            raise ConfigError(
                f"model.{name} is not an option of the {kind!r} model; accepted: {', '.join(accepted)}"
            )
    return cls(vocab_size=vocab_size, **options)


def describe_models() -> list[str]:
    """One line per model kind with its options and their defaults, for ``confide config``."""
    lines = []
    for plugin in MODELS:
        cls = _config_class(plugin.name)
        defaults = ", ".join(f"{f.name} = {f.default!r}" for f in fields(cls) if f.name != "vocab_size")
        lines.append(f"kind = {plugin.name!r}: {plugin.help}; options: {defaults}")
    return lines
