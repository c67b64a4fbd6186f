"""Tiny language models made in the test: a tokenizer trained with `tokenizers` and a Llama or GPT-2 model of
a few hundred thousand parameters, written with save_pretrained and loaded back by path (no hub download).

:func:`tiny_hf_model` is also what other tests (the exports) use to get a saved model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import LINES

CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }}\n"
    "{% else %}A: {{ m['content'] }}</s>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}A: {% endif %}"
)
"""A small chat template for tokenizers that have none (the tiny one here)."""


def tiny_tokenizer(texts: list[str] | None = None, vocab_size: int = 320) -> Any:
    """A byte-level BPE tokenizer trained on ``texts`` (the shared test lines), with <pad>, <s> and </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(texts or LINES * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


TINY_LLAMA = {
    "model_type": "llama",
    "vocab_size": 259,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 64,
}
"""A transformers config of a tiny Llama over bytes (259 ids: 256 bytes and 3 special tokens)."""


def tiny_hf_model(path: Path, arch: str = "llama", chat_template: bool = False, seed: int = 0) -> Path:
    """A tiny causal LM (``arch`` 'llama' or 'gpt2') and its tokenizer saved to ``path``; returns ``path``."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    tokenizer = tiny_tokenizer()
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    ids = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if arch == "llama":
        config: Any = LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            **ids,
        )
    elif arch == "gpt2":
        config = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, **ids)
    else:
        raise ValueError(f"unknown arch {arch!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def instruction_file(path: Path, sites: int = 3, per_site: int = 10) -> Path:
    """Instruction examples: prompt = a line, response = the next; each site walks the lines from its own
    starting point with its own step, so the sites' examples differ (non-IID)."""
    with path.open("w", encoding="utf-8") as f:
        for s in range(sites):
            for k in range(per_site):
                i = (s + k * (s + 1)) % len(LINES)
                record = {
                    "site": f"site{s}",
                    "prompt": LINES[i][:40],
                    "response": LINES[(i + 1) % len(LINES)][:30],
                }
                f.write(json.dumps(record) + "\n")
    return path


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_hf_model(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_hf_model(tmp_path_factory.mktemp("gpt2"), "gpt2")


@pytest.fixture
def instructions(tmp_path: Path) -> Path:
    return instruction_file(tmp_path / "instructions.jsonl")


def llm_config(model: dict[str, Any], data: Path, output: Path, **sections: dict[str, Any]) -> Any:
    """A run config of an 'hf' model on ``data`` that trains for two short rounds."""
    from confide.config import from_dict

    raw: dict[str, Any] = {
        "run": {"name": "llm", "output": str(output), "rounds": 2, "checkpoint_every": 1, "seed": 3},
        "data": {"dataset": "text", "path": str(data)},
        "model": {"kind": "hf", "max_length": 32, **model},
        "adapter": {"kind": "lora", "r": 4},
        "client": {"max_steps": 2, "batch_size": 4, "optimizer": "adam", "learning_rate": 0.01},
        "server": {"sites_per_round": 3},
        "eval": {"rouge_samples": 2, "max_new_tokens": 4},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return from_dict(raw)
