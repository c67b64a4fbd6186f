"""Hugging Face causal language models, optionally with LoRA adapters, behind confide's model interface.

:func:`build_hf` loads ``AutoModelForCausalLM`` from a local directory (``model.path``) or builds one with
random weights from a transformers config (``model.config``), then, with ``[adapter] kind = "lora"``, wraps it
with peft's LoRA (Hu et al. 2021) so that only the adapters require gradients. confide's flat vector holds a
model's *trainable* parameters (:meth:`confide.core.Layout.of_module`), so under LoRA the federation's vector
is the adapters alone: the base weights never leave a site and are never sent to one. Each site instead proves
it holds the same base with :func:`base_sha256`, a SHA-256 over the frozen weights.

:class:`HFCausalLM` speaks the character models' interface: ``forward(idx, targets) -> (logits, loss)``. Its
inputs are token ids with -1 where a row is padded (the attention mask is ``idx >= 0``) and its targets are
already shifted, with -100 (:data:`IGNORE_INDEX`) wherever no loss is taken: prompts of instruction data and
padding. transformers and peft are imported here only, so reading a config never needs them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from confide.errors import ConfideError, ConfigError
from confide.models.configs import HFConfig

if TYPE_CHECKING:
    from confide.config import AdapterConfig

IGNORE_INDEX = -100
"""A target without loss (the value F.cross_entropy and transformers skip)."""
NO_TOKEN = -1
"""An input position past the end of a row: masked out of attention."""

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "gemma": ("q_proj", "v_proj"),
    "gpt2": ("c_attn",),
    "gpt_neox": ("query_key_value",),
}
"""LoRA's target modules per architecture when adapter.target_modules is empty: the attention's query and
value projections, as in the LoRA paper (Section 7.1)."""


def device_of(config: HFConfig) -> torch.device:
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("model.device = 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)


def byte_tokenizer() -> Any:
    """A byte-level tokenizer with no merges: 256 byte tokens plus <pad>, <s> and </s>.

    The tokenizer of a model built from ``model.config`` when none is named: it needs no training and no
    download, and every site builds the very same one, so their token ids agree.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(sorted(alphabet))}
    for special in ("<pad>", "<s>", "</s>"):
        vocab[special] = len(vocab)
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    raw.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def model_directory(where: str, key: str = "model.path") -> Path:
    """The directory of a saved model: ``where`` itself, or the base a finished confide run wrote there."""
    directory = Path(where).expanduser()
    if (directory / "run.sqlite").exists():
        # A finished confide run of an 'hf' model without adapters keeps its final model here (save_base).
        if not (directory / "base").is_dir():
            raise ConfigError(
                f"{key} = {where!r} is a confide run without a base model: only a finished run that trains "
                "every weight (adapter.kind = 'none') writes one"
            )
        return directory / "base"
    if not directory.is_dir():
        raise ConfigError(
            f"{key} = {where!r} is not a directory; give a directory written by save_pretrained"
        )
    return directory


def load_tokenizer(config: HFConfig) -> Any:
    if not (config.tokenizer or config.path):
        return byte_tokenizer()
    from transformers import AutoTokenizer

    if config.tokenizer:
        directory = model_directory(config.tokenizer, "model.tokenizer")
    else:
        directory = model_directory(config.path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(
            f"no tokenizer could be loaded from {directory} ({type(e).__name__}: {str(e).splitlines()[0]}); "
            "save one there with tokenizer.save_pretrained, or name one with model.tokenizer"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_lm(config: HFConfig, adapter: AdapterConfig | None) -> Any:
    """The transformers model of ``config``, with one clear ConfigError for each way loading fails."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = DTYPES[config.dtype]
    if config.config is not None:
        table = dict(config.config)
        try:
            hf_config = AutoConfig.for_model(table.pop("model_type"), **table)
            return AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"model.config cannot build a causal language model: {e}") from None
    directory = model_directory(config.path)
    try:
        hf_config = AutoConfig.from_pretrained(str(directory))
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"{directory} holds no transformers model ({str(e).splitlines()[0]}); it needs the config.json "
            "and weights that save_pretrained writes"
        ) from None
    options: dict[str, Any] = {"dtype": dtype}
    if adapter is not None and adapter.quantize == "4bit":
        options["quantization_config"] = _four_bit(dtype)
    try:
        return AutoModelForCausalLM.from_pretrained(str(directory), **options)
    except ValueError as e:
        raise ConfigError(
            f"{directory} holds a {hf_config.model_type!r} model, which is not a causal language model "
            f"AutoModelForCausalLM can load ({str(e).splitlines()[0]})"
        ) from None
    except OSError as e:
        raise ConfigError(f"the weights in {directory} cannot be read: {str(e).splitlines()[0]}") from None


def _four_bit(dtype: torch.dtype) -> Any:
    """QLoRA's base (Dettmers et al. 2023): NF4 weights with double quantization, computing in ``dtype``."""
    if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            "adapter.quantize = '4bit' (QLoRA) needs a CUDA device and the bitsandbytes package "
            f"(CUDA available: {torch.cuda.is_available()}, bitsandbytes installed: "
            f"{importlib.util.find_spec('bitsandbytes') is not None}); set adapter.quantize = 'none'"
        )
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype if dtype != torch.float32 else torch.bfloat16,
    )


def _with_lora(lm: Any, adapter: AdapterConfig) -> Any:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    targets: list[str] | None = [t.strip() for t in adapter.target_modules.split(",") if t.strip()]
    if not targets:
        targets = list(DEFAULT_TARGETS.get(lm.config.model_type, ())) or None
    if adapter.quantize == "4bit":
        lm = prepare_model_for_kbit_training(lm, use_gradient_checkpointing=False)
    lora = LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=targets,
        fan_in_fan_out=lm.config.model_type == "gpt2",  # GPT-2 stores its projections transposed (Conv1D)
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(lm, lora)
    except ValueError as e:
        raise ConfigError(
            f"LoRA cannot be put on this {lm.config.model_type!r} model ({str(e).splitlines()[0]}); name its "
            "attention projections in adapter.target_modules"
        ) from None


class HFCausalLM(nn.Module):
    """A transformers causal LM (with or without LoRA) as confide's trainers, evaluators and samplers see
    it."""

    def __init__(self, lm: Any, tokenizer: Any, config: HFConfig, device: torch.device) -> None:
        super().__init__()
        self.lm = lm
        self.tokenizer = tokenizer
        self.config = config
        self.context = config.max_length
        self.device = device

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Logits (B, T, vocab) and the mean cross-entropy over targets that are not -100."""
        idx = idx.to(self.device)
        mask = idx >= 0
        logits = self.lm(input_ids=idx.clamp(min=0), attention_mask=mask.long()).logits
        if targets is None:
            return logits, None
        flat = targets.to(self.device).reshape(-1).long()
        total = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), flat, reduction="sum")
        # An all-ignored batch gives 0 rather than 0/0 (which would poison the weights).
        return logits, total / (flat != IGNORE_INDEX).sum().clamp(min=1)

    @torch.no_grad()
    def complete(
        self,
        prompts: list[str],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
    ) -> list[str]:
        """Each prompt's continuation (without the prompt): greedy at temperature 0, else sampled with
        ``top_k`` / ``top_p`` from a generator seeded by ``seed``."""
        tokenizer = self.tokenizer
        self.eval()
        out = []
        for prompt in prompts:
            ids = tokenizer(prompt or (tokenizer.bos_token or "\n"), return_tensors="pt").input_ids
            ids = ids[:, -self.context :].to(self.device)
            # No more tokens than the model has positions for (a small model's are few).
            room = getattr(self.lm.config, "max_position_embeddings", None) or 2**31
            new = max(0, min(max_new_tokens, room - ids.size(1)))
            options: dict[str, Any] = {"do_sample": temperature > 0, "max_new_tokens": new}
            if temperature > 0:
                options.update(temperature=temperature, top_k=top_k or 0, top_p=top_p or 1.0)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                generated = self.lm.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    **options,
                )
            out.append(tokenizer.decode(generated[0, ids.size(1) :], skip_special_tokens=True))
        return out

    def full_model_bytes(self) -> int:
        """Bytes of every weight as float32: what full fine-tuning would send each way per site and round."""
        return 4 * sum(_numel(p) for p in self.lm.parameters())


def _numel(p: Tensor) -> int:
    # A 4-bit bitsandbytes weight packs two values per byte and keeps its logical shape in quant_state.
    state = getattr(p, "quant_state", None)
    return math.prod(state.shape) if state is not None else p.numel()


def base_sha256(model: nn.Module) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of the weights that do not train (the base under
    LoRA), in name order: equal on two sites exactly when they hold the same base."""
    digest = hashlib.sha256()
    frozen = sorted((n, p) for n, p in model.named_parameters() if not p.requires_grad)
    for name, p in frozen:
        tensor = p.detach().contiguous().cpu()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}\n".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def check_base(site: str, model: nn.Module, expected: str) -> None:
    """ConfideError naming ``site`` unless its base weights hash to ``expected`` (empty: nothing to check)."""
    if not expected or not isinstance(model, HFCausalLM):
        return
    held = base_sha256(model)
    if held != expected:
        raise ConfideError(
            f"site {site!r} holds a different base model than the server (SHA-256 of its base weights "
            f"{held[:16]}..., the server's {expected[:16]}...): every site must load the same model.path"
        )


def build_hf(config: HFConfig, adapter: AdapterConfig | None = None) -> HFCausalLM:
    """The model of ``config`` on its device, with LoRA when ``adapter.kind == 'lora'``.

    Random weights (``model.config``) come from torch's global RNG: the caller seeds it (the run's seed).
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the library never prints; the CLI owns the display
    device = device_of(config)
    tokenizer = load_tokenizer(config)
    lm = _load_lm(config, adapter)
    if config.config is not None and getattr(lm.config, "vocab_size", 0) < len(tokenizer):
        raise ConfigError(
            f"model.config has vocab_size {lm.config.vocab_size}, but the tokenizer has {len(tokenizer)} "
            f"tokens: set model.config.vocab_size = {len(tokenizer)}"
        )
    if adapter is None or adapter.quantize != "4bit":
        lm = lm.to(device)
    lm.config.use_cache = False
    if config.gradient_checkpointing:
        lm.gradient_checkpointing_enable()
        lm.enable_input_require_grads()  # so checkpointed blocks see a grad-requiring input under LoRA
    if adapter is not None and adapter.kind == "lora":
        lm = _with_lora(lm, adapter)
    return HFCausalLM(lm, tokenizer, config, device)


def save_base(model: HFCausalLM, weights: Any, directory: Path) -> None:
    """Write ``model`` with the flat trainable ``weights`` merged in (LoRA folded into the base) as
    save_pretrained does, with its tokenizer: what a later run's ``model.path`` loads as its base."""
    from confide.core import Layout

    Layout.of_module(model).write(model, weights)
    lm = model.lm
    if hasattr(lm, "merge_and_unload"):
        import copy

        lm = copy.deepcopy(lm).merge_and_unload()
    lm.save_pretrained(str(directory))
    model.tokenizer.save_pretrained(str(directory))
