"""Exports load with plain transformers / peft and compute what confide computes.

Everything is made here (a confide GPT, tiny runs, a tiny Llama saved to a temporary folder); nothing comes
from a hub.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from confide import config  # noqa: E402
from confide.cli import main  # noqa: E402
from confide.core import Layout  # noqa: E402
from confide.data.tokenize import DEFAULT_TOKENIZER  # noqa: E402
from confide.export import char_tokenizer, export_adapter, export_gpt  # noqa: E402
from confide.models.gpt import GPT, GPTConfig  # noqa: E402
from confide.runtime.federation import RoundResult  # noqa: E402
from confide.runtime.runner import NullObserver, Runner  # noqa: E402
from confide.runtime.stack import build_model_for  # noqa: E402
from confide.runtime.store import Store  # noqa: E402

from .conftest import tiny_config  # noqa: E402

TEXT = "To be, or not to be: that is the question.\nWhether 'tis nobler -- café, “naïve” — in the mind"
SHORT = TEXT[-60:]
"""Within the tiny runs' context of 80 characters."""


def codes(text: str) -> torch.Tensor:
    return torch.from_numpy(DEFAULT_TOKENIZER.encode(text).astype(np.int64))[None, :]


def randomize(model: torch.nn.Module) -> None:
    """Weights far from their start: at the initial scale (std 0.02) GELU and its tanh approximation agree
    within the tolerance, and every LayerNorm is the same (1 and 0), so a wrong activation or two norms
    mixed up would go unseen."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)


def load_export(folder: Path) -> tuple[Any, Any]:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    return model, tokenizer


# -- confide's GPT as GPT-2 --------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_gpt_export_gives_the_same_ids_logits_and_greedy_text(tmp_path: Path, bias: bool) -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(layers=2, heads=4, width=32, context=128, bias=bias))
    randomize(model)
    model.eval()
    export_gpt(model, tmp_path / "export")

    hf, tokenizer = load_export(tmp_path / "export")
    assert type(hf).__name__ == "GPT2LMHeadModel"
    inputs = tokenizer(TEXT, return_tensors="pt")
    assert set(inputs) == {"input_ids", "attention_mask"}  # token_type_ids would be added as embeddings
    assert torch.equal(inputs["input_ids"], codes(TEXT))
    with torch.no_grad():
        expected, _ = model(codes(TEXT))
        got = hf(**inputs).logits
    torch.testing.assert_close(got, expected)

    prompt = codes("To be")
    ours = model.generate(prompt, 30, temperature=0.0)
    theirs = hf.generate(prompt, max_new_tokens=30, do_sample=False)
    assert torch.equal(theirs, ours)
    assert tokenizer.decode(theirs[0]) == DEFAULT_TOKENIZER.decode(ours[0].numpy())


def test_gpt_export_with_right_padding_matches_on_the_real_positions(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = GPT(GPTConfig(layers=1, heads=2, width=16, context=64)).eval()
    export_gpt(model, tmp_path / "export")
    hf, tokenizer = load_export(tmp_path / "export")
    texts = ["Friends, Romans, countrymen", "lend me your ears"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = hf(**batch).logits
        for row, text in enumerate(texts):
            expected, _ = model(codes(text))
            torch.testing.assert_close(logits[row : row + 1, : len(text)], expected)


def test_the_tokenizer_gives_confides_ids_for_every_character() -> None:
    """Every Unicode code point (surrogates cannot stand alone in a str): typography, accents, symbols the
    vocabulary lacks, and characters whose decomposition tokenizers' Unicode tables give differently."""
    tokenizer = char_tokenizer(model_max_length=80)
    every = "".join(chr(p) for p in range(0x110000) if not 0xD800 <= p <= 0xDFFF)
    ids = tokenizer.backend_tokenizer.encode(every, add_special_tokens=False).ids
    assert ids == DEFAULT_TOKENIZER.encode(every).tolist()
    vocabulary = np.arange(DEFAULT_TOKENIZER.vocab_size)
    assert tokenizer.decode(vocabulary.tolist()) == DEFAULT_TOKENIZER.decode(vocabulary)


# -- `confide export` on runs ------------------------------------------------------------------------------


class InterruptAt(NullObserver):
    """Stops the run as Ctrl-C would, once round ``round`` is trained (before its checkpoint)."""

    def __init__(self, round: int) -> None:
        self.round = round

    def round_finished(self, result: RoundResult) -> None:
        if result.round == self.round:
            raise KeyboardInterrupt


def tiny_run(
    tmp_path: Path,
    corpus: Path,
    name: str,
    *overrides: str,
    interrupt: int | None = None,
    model: dict[str, str] | None = None,
) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(tiny_config(corpus, tmp_path / "runs", model))
    runner = Runner.start(config.load(path, [f"run.name={name}", *overrides]))
    try:
        if interrupt is None:
            runner.run(NullObserver())
        else:
            with pytest.raises(KeyboardInterrupt):
                runner.run(InterruptAt(interrupt))
    finally:
        runner.store.close()
    return tmp_path / "runs" / name


def run_logits(run_dir: Path, round: int, text: str) -> torch.Tensor:
    """The logits of the run's stored model of ``round``, computed by confide itself."""
    run_config = config.load(run_dir / "config.toml")
    model = build_model_for(run_config, DEFAULT_TOKENIZER.vocab_size).eval()
    store = Store.open(run_dir)
    try:
        path = store.db.execute("SELECT path FROM checkpoints WHERE round = ?", (round,)).fetchone()[0]
    finally:
        store.close()
    from safetensors.numpy import load_file

    Layout.of_module(model).write(model, load_file(str(run_dir / path))["weights"])
    with torch.no_grad():
        return model(codes(text))[0]


def export(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    code = main(["export", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def exported_logits(folder: Path, text: str) -> torch.Tensor:
    hf, tokenizer = load_export(folder)
    with torch.no_grad():
        return hf(**tokenizer(text, return_tensors="pt")).logits


def test_export_of_a_finished_gpt_run(
    tmp_path: Path, text_corpus: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tiny_run(tmp_path, text_corpus, "finished")  # 4 rounds, checkpoints after 2 and 4
    out = tmp_path / "export"
    code, stdout, stderr = export(capsys, run_dir, "--out", out)
    assert code == 0, stderr
    assert "round 4 of 4" in stdout
    torch.testing.assert_close(exported_logits(out, SHORT), run_logits(run_dir, 4, SHORT))

    code, _, stderr = export(capsys, run_dir, "--out", out)
    assert code == 2 and "already exists and is not empty" in stderr and "--force" in stderr
    assert stderr.count("\n") == 1

    code, stdout, stderr = export(capsys, run_dir, "--out", out, "--round", "2", "--force")
    assert code == 0, stderr
    assert "round 2 of 4" in stdout
    round_2 = exported_logits(out, SHORT)
    torch.testing.assert_close(round_2, run_logits(run_dir, 2, SHORT))
    assert not torch.allclose(round_2, run_logits(run_dir, 4, SHORT))  # the export did change
    assert not any(p.name.endswith(".partial") or p.name.endswith(".old") for p in tmp_path.iterdir())

    for args, message in [
        (("--round", "3"), "has no stored model of round 3; it has those of rounds 2, 4"),
        (("--merged",), "--merged is for adapter runs"),
    ]:
        code, _, stderr = export(capsys, run_dir, "--out", tmp_path / "other", *args)
        assert code == 2 and message in stderr and stderr.count("\n") == 1
        assert not (tmp_path / "other").exists()


def test_export_errors_are_one_clear_line(
    tmp_path: Path, text_corpus: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    unfinished = tiny_run(tmp_path, text_corpus, "unfinished", interrupt=3)  # checkpoint 2 only
    lstm_model = {"kind": "'lstm'", "embedding": "4", "hidden": "16", "layers": "1"}
    lstm = tiny_run(tmp_path, text_corpus, "lstm", "run.rounds=1", model=lstm_model)
    (tmp_path / "papers").mkdir()
    (tmp_path / "papers" / "notes.txt").write_text("mine")
    cases = [
        (tmp_path / "nowhere", tmp_path / "a", (), "there is no run directory"),
        (tmp_path, tmp_path / "a", (), "is not a confide run directory"),
        (unfinished, tmp_path / "a", (), "has not finished (its last stored model is of round 2 of 4)"),
        (lstm, tmp_path / "a", (), "has no transformers architecture"),
        (unfinished, tmp_path / "papers", ("--force", "--round", "2"), "holds files that are not a model"),
    ]
    for run_dir, out, args, message in cases:
        code, _, stderr = export(capsys, run_dir, "--out", out, *args)
        assert code == 2, stderr
        assert message in stderr and stderr.count("\n") == 1, stderr
    assert (tmp_path / "papers" / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "a").exists()

    code, _, stderr = export(capsys, unfinished, "--out", tmp_path / "a", "--round", "2")
    assert code == 0, stderr
    torch.testing.assert_close(exported_logits(tmp_path / "a", SHORT), run_logits(unfinished, 2, SHORT))


# -- LoRA adapters -----------------------------------------------------------------------------------------


@pytest.fixture
def tiny_lora(tmp_path: Path) -> tuple[Path, Any, Any]:
    """A tiny Llama with random weights and confide's tokenizer, saved and loaded back by path, with a LoRA
    adapter whose B matrices are random (PEFT starts them at zero, which would make the adapter a no-op)."""
    torch.manual_seed(2)
    base_config = transformers.LlamaConfig(
        vocab_size=DEFAULT_TOKENIZER.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    folder = tmp_path / "base"
    transformers.LlamaForCausalLM(base_config).save_pretrained(folder)
    tokenizer = char_tokenizer(model_max_length=128)
    tokenizer.save_pretrained(folder)
    base = transformers.AutoModelForCausalLM.from_pretrained(folder)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return folder, peft.get_peft_model(base, lora).eval(), tokenizer


def test_export_adapter_loads_with_peft_and_merged_with_transformers(
    tmp_path: Path, tiny_lora: tuple[Path, Any, Any]
) -> None:
    base_dir, model, tokenizer = tiny_lora
    inputs = tokenizer(TEXT, return_tensors="pt")
    base_before = {k: v.clone() for k, v in model.get_base_model().state_dict().items()}
    with torch.no_grad():
        expected = model(**inputs).logits

    export_adapter(model, tmp_path / "adapter", tokenizer=tokenizer)
    export_adapter(model, tmp_path / "merged", merged=True, tokenizer=tokenizer)

    plain_base = transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()
    with torch.no_grad():
        without_adapter = plain_base(**inputs).logits
    assert not torch.allclose(without_adapter, expected, atol=1e-3)  # the adapter changes the output
    reloaded = peft.PeftModel.from_pretrained(plain_base, tmp_path / "adapter").eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    again = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "merged" / "adapter"
    ).eval()
    with torch.no_grad():
        for other in (reloaded, merged, again):
            torch.testing.assert_close(other(**inputs).logits, expected)
        # The merge ran on a copy: the model passed in keeps its adapter and its base, bit for bit.
        assert torch.equal(model(**inputs).logits, expected)
    after = model.get_base_model().state_dict()
    assert all(torch.equal(after[k], v) for k, v in base_before.items())
    assert (
        transformers.AutoTokenizer.from_pretrained(tmp_path / "merged")(TEXT)["input_ids"]
        == codes(TEXT)[0].tolist()
    )


def test_a_forced_export_replaces_the_previous_one_whole(
    tmp_path: Path, tiny_lora: tuple[Path, Any, Any]
) -> None:
    _, model, _ = tiny_lora
    out = tmp_path / "out"
    export_adapter(model, out)
    assert (out / "adapter_config.json").is_file()
    export_adapter(model, out, merged=True, force=True)
    # A stale adapter_config.json beside config.json would make transformers load the folder as an adapter.
    assert (out / "config.json").is_file() and not (out / "adapter_config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "out"]


def test_confide_imports_without_the_language_model_libraries(tmp_path: Path) -> None:
    """transformers, peft and tokenizers are an extra: importing confide loads none of them, and an export
    without them says what to install."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import confide.cli, confide.export\n"
        "loaded = [m for m in ('transformers', 'peft', 'tokenizers', 'torch') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
        "sys.modules['transformers'] = None  # as if it were not installed: importing it fails\n"
        "from confide.errors import ConfideError\n"
        "from confide.export import char_tokenizer\n"
        "try:\n"
        "    char_tokenizer(80)\n"
        "except ConfideError as e:\n"
        "    print(e)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "needs 'transformers', which is not installed" in result.stdout
    assert "pip install 'confide[llm]'" in result.stdout
