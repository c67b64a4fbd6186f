"""Loading Hugging Face causal LMs (by path, from a config) with LoRA, and the errors of loading that
fails."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from confide.config import AdapterConfig, from_dict
from confide.core import Layout
from confide.errors import ConfideError, ConfigError
from confide.models.configs import HFConfig, model_config
from confide.models.hf import base_sha256, build_hf, check_base
from tests.llm.conftest import TINY_LLAMA, llm_config, tiny_tokenizer

LORA = AdapterConfig(kind="lora", r=4)


@pytest.mark.parametrize(("arch", "targets"), [("llama", {"q_proj", "v_proj"}), ("gpt2", {"c_attn"})])
def test_a_saved_model_loads_by_path_with_adapters_on_its_attention(
    arch: str, targets: set[str], llama_dir: Path, gpt2_dir: Path
) -> None:
    path = llama_dir if arch == "llama" else gpt2_dir
    model = build_hf(HFConfig(path=str(path)), LORA)
    layout = Layout.of_module(model)
    # Only the adapters train, so only they are in the federation's vector.
    assert layout.names and all("lora_" in n for n in layout.names)
    assert {n.split(".")[-4] for n in layout.names} == targets
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert layout.size < 0.1 * frozen
    # The base is the saved model, unchanged: its logits equal plain transformers' (LoRA's B starts at 0).
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(str(path))
    ids = torch.tensor([[5, 9, 17, 3]])
    logits, _ = model(ids)
    torch.testing.assert_close(logits, plain(ids).logits)


def test_a_model_built_from_a_config_gets_random_weights_and_a_byte_tokenizer() -> None:
    torch.manual_seed(0)
    model = build_hf(HFConfig(config=TINY_LLAMA, dtype="bfloat16"), None)
    assert all(p.requires_grad for p in model.parameters())  # no adapter: every weight trains
    assert next(model.lm.parameters()).dtype == torch.bfloat16
    assert len(model.tokenizer) == 259
    text = "To be, or not to be: ça"
    assert model.tokenizer.decode(model.tokenizer(text)["input_ids"]) == text
    torch.manual_seed(0)
    again = build_hf(HFConfig(config=TINY_LLAMA, dtype="bfloat16"), None)
    torch.manual_seed(1)
    other = build_hf(HFConfig(config=TINY_LLAMA, dtype="bfloat16"), None)
    # The hash covers the frozen weights; freeze everything to hash the whole model here.
    for m in (model, again, other):
        m.requires_grad_(False)
    assert base_sha256(model) == base_sha256(again) != base_sha256(other)
    with pytest.raises(ConfideError, match="site 'clinic-3' holds a different base model"):
        check_base("clinic-3", other, base_sha256(model))


def test_loading_that_fails_says_why_in_one_line(tmp_path: Path, llama_dir: Path) -> None:
    with pytest.raises(ConfigError, match="is not a directory"):
        build_hf(HFConfig(path=str(tmp_path / "missing")), LORA)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no tokenizer could be loaded"):
        build_hf(HFConfig(path=str(empty)), LORA)
    # Weights without a tokenizer.
    from transformers import AutoModelForCausalLM, ViTConfig

    bare = tmp_path / "bare"
    AutoModelForCausalLM.from_pretrained(str(llama_dir)).save_pretrained(bare)
    with pytest.raises(ConfigError, match="no tokenizer") as e:
        build_hf(HFConfig(path=str(bare)), LORA)
    assert "\n" not in str(e.value)
    # A model that is not a causal language model.
    vision = tmp_path / "vision"
    ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8).save_pretrained(
        vision
    )
    tiny_tokenizer().save_pretrained(vision)
    with pytest.raises(ConfigError, match="'vit' model, which is not a causal language model"):
        build_hf(HFConfig(path=str(vision)), LORA)
    with pytest.raises(ConfigError, match="vocab_size 100, but the tokenizer has 259 tokens"):
        build_hf(HFConfig(config={**TINY_LLAMA, "vocab_size": 100}), None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where there is no CUDA")
def test_qlora_without_cuda_is_a_clear_error(llama_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"QLoRA.*needs a CUDA device and the bitsandbytes package"):
        build_hf(HFConfig(path=str(llama_dir)), AdapterConfig(kind="lora", quantize="4bit"))


def test_the_config_checks_an_hf_model_without_importing_it() -> None:
    base = {"run": {"rounds": 1}, "data": {"dataset": "text", "path": "x"}}
    with pytest.raises(ConfigError, match=r"exactly one of model.path"):
        from_dict({**base, "model": {"kind": "hf"}})
    with pytest.raises(ConfigError, match=r"model.dtype must be one of 'float32', 'bfloat16', 'float16'"):
        from_dict({**base, "model": {"kind": "hf", "path": "m", "dtype": "float8"}})
    with pytest.raises(ConfigError, match=r"adapter.kind = 'lora' needs model.kind = 'hf'"):
        from_dict({**base, "adapter": {"kind": "lora"}})
    with pytest.raises(ConfigError, match=r"model.config must be a table with a model_type"):
        model_config("hf", config={"hidden_size": 8})
    config = from_dict({**base, "model": {"kind": "hf", "config": TINY_LLAMA}, "adapter": {"kind": "lora"}})
    assert config.model["config"]["model_type"] == "llama"
    assert from_dict(__import__("tomllib").loads(config.to_toml())) == config  # round-trips through TOML


def test_the_inversion_audit_attacks_the_lora_adapters_of_an_hf_config(
    llama_dir: Path, instructions: Path, tmp_path: Path
) -> None:
    from confide.audit.inversion import Settings
    from confide.runtime.inversion import audit_inversion

    config = llm_config({"path": str(llama_dir)}, instructions, tmp_path)
    audit = audit_inversion(
        config,
        batch_sizes=(1,),
        steps=(1,),
        scenarios=("none", "secagg"),
        settings=Settings(iterations=3, restarts=1, discrete=3, sequential=False),
        sites_summed=2,
    )
    assert [c.scenario for c in audit.cells] == ["none", "secagg"]
    for cell in audit.cells:
        assert 0.0 <= cell.token_accuracy <= 1.0 and cell.examples and cell.examples[0].true
    with pytest.raises(ConfigError, match="DP-SGD"):
        audit_inversion(config, scenarios=("dpsgd",), write=False)
