"""Language-model data in the model's tokenizer: text rows, instruction rows with the loss on the response
only, chat messages through the chat template, truncation, and the per-site split by the site field."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from confide.client.trainer import split_window
from confide.config import AdapterConfig
from confide.data.dataset import split_text
from confide.data.llm import (
    IGNORE_INDEX,
    NO_TOKEN,
    instruction_dataset,
    instruction_row,
    is_instruction_rows,
    prompts_and_references,
    retokenize,
    text_dataset,
    text_rows,
)
from confide.errors import DataError
from confide.models.configs import HFConfig
from confide.models.hf import build_hf, load_tokenizer
from tests.conftest import LINES
from tests.llm.conftest import CHAT_TEMPLATE, tiny_hf_model


def test_text_rows_make_every_token_after_the_first_a_target_once() -> None:
    ids = list(range(10, 30))  # 20 tokens
    rows = text_rows(ids, 8)  # stride 7: rows start at 0, 7, 14
    assert rows.shape == (3, 2, 8) and rows.dtype == np.int32
    targets = rows[:, 1, 1:]
    assert sorted(targets[targets != IGNORE_INDEX].tolist()) == ids[1:]
    assert (rows[-1, 0, 6:] == NO_TOKEN).all()  # the last row is padded, outside attention
    assert not is_instruction_rows(rows)


def test_instruction_rows_take_the_loss_on_the_response_only(llama_dir: Path, instructions: Path) -> None:
    tokenizer = load_tokenizer(HFConfig(path=str(llama_dir)))
    dataset = instruction_dataset(instructions, tokenizer, 48)
    assert dataset.site_names == ("site0", "site1", "site2")  # one site per site field
    site = dataset.by_name("site1")
    assert (site.num_train, site.num_test) == (8, 2)  # the last 20% of a site's examples are held out
    record = json.loads(instructions.read_text().splitlines()[10])  # site1's first example
    ids, labels = site.train[0]
    answer = labels >= 0
    assert tokenizer.decode(labels[answer].tolist()) == record["response"] + "</s>"
    assert (labels[~answer] == IGNORE_INDEX).all()
    assert (
        tokenizer.decode(ids[(ids >= 0) & ~answer].tolist(), skip_special_tokens=True)
        == record["prompt"] + "\n"
    )
    assert is_instruction_rows(site.train)
    assert prompts_and_references(site.train[:1], tokenizer) == [
        (record["prompt"] + "\n", record["response"])
    ]

    # The model's loss counts exactly the response tokens: equal to cross-entropy over them alone.
    model = build_hf(HFConfig(path=str(llama_dir)), AdapterConfig(kind="lora"))
    inputs, targets = split_window(site.train[:3])
    logits, loss = model(inputs, targets)
    keep = targets != IGNORE_INDEX
    expected = F.cross_entropy(logits[keep], targets[keep])
    assert loss is not None
    torch.testing.assert_close(loss, expected)
    # Padding is masked from attention: a row's logits do not depend on what its padding holds.
    alone, _ = model(inputs[:1, : int((inputs[0] >= 0).sum())])
    torch.testing.assert_close(logits[0, : alone.size(1)], alone[0], atol=1e-5, rtol=1e-5)


def test_truncation_keeps_the_end_of_the_prompt_and_the_start_of_the_response() -> None:
    ids, labels = instruction_row(list(range(100, 130)), list(range(1, 21)), 16)
    assert len(ids) == len(labels) == 16
    assert ids[:8] == list(range(122, 130)) and ids[8:] == list(range(1, 9))
    assert labels == [IGNORE_INDEX] * 8 + list(range(1, 9))
    short = instruction_row([7, 8], [1, 2, 3], 16)
    assert short == ([7, 8, 1, 2, 3], [IGNORE_INDEX, IGNORE_INDEX, 1, 2, 3])


def test_chat_messages_are_rendered_with_the_tokenizer_template(tmp_path: Path) -> None:
    path = tiny_hf_model(tmp_path / "chat", chat_template=True)
    tokenizer = load_tokenizer(HFConfig(path=str(path)))
    assert tokenizer.chat_template == CHAT_TEMPLATE
    data = tmp_path / "chat.jsonl"
    chats = [
        {
            "site": "a",
            "messages": [{"role": "user", "content": LINES[i]}, {"role": "assistant", "content": "Aye."}],
        }
        for i in range(3)
    ]
    data.write_text("\n".join(json.dumps(c) for c in chats) + "\n")
    site = instruction_dataset(data, tokenizer, 64).by_name("a")
    prompt, reference = prompts_and_references(site.train[:1], tokenizer)[0]
    assert prompt == f"Q: {LINES[0]}\nA: "
    assert reference == "Aye.\n"  # the template's end of turn (</s>) is a target; it decodes as special
    # Prompt/response records go through the same template when the tokenizer has one.
    data.write_text(json.dumps({"site": "b", "prompt": "Hail", "response": "Aye."}) + "\n" * 2)
    with pytest.raises(DataError, match="no site of 'chat' has enough data"):
        instruction_dataset(data, tokenizer, 64)  # one example cannot be both trained on and held out


def test_text_sites_split_at_a_line_and_use_the_models_tokenizer(llama_dir: Path) -> None:
    tokenizer = load_tokenizer(HFConfig(path=str(llama_dir)))
    text = "\n".join(LINES * 3) + "\n"
    dataset = text_dataset("lines", [("a", "g", text), ("tiny", "g", "Hi.\n")], tokenizer, 32)
    assert dataset.site_names == ("a",)  # a site with nothing to hold out is skipped
    site = dataset.by_name("a")
    ids = np.concatenate([site.train[0, 0], *(r[0, 1:] for r in site.train[1:])])
    # Rows overlap by one token, so the train rows hold the train text exactly, once.
    assert tokenizer.decode(ids[ids >= 0].tolist()) == split_text(text)[0]


def test_a_deployed_sites_character_windows_become_token_rows_of_the_same_text(llama_dir: Path) -> None:
    from confide.data.dataset import make_site
    from confide.data.tokenize import DEFAULT_TOKENIZER

    tokenizer = load_tokenizer(HFConfig(path=str(llama_dir)))
    text = "\n".join(LINES * 3) + "\n"
    site = retokenize(make_site("a", "a", text, DEFAULT_TOKENIZER), tokenizer, 32)
    expected = text_dataset("x", [("a", "a", text)], tokenizer, 32).by_name("a")
    np.testing.assert_array_equal(site.train, expected.train)
    np.testing.assert_array_equal(site.test, expected.test)


def test_an_unreadable_instruction_file_is_one_clear_error(tmp_path: Path) -> None:
    from confide.data.llm import is_instruction_file, read_instructions
    from confide.errors import DataError

    binary = tmp_path / "bad.jsonl"
    binary.write_bytes(b"\xff\xfe\x00not text")
    assert not is_instruction_file(binary)  # so the text reader gets it, and says what is wrong
    with pytest.raises(DataError, match="is not UTF-8 text"):
        read_instructions(binary)
    with pytest.raises(DataError, match="cannot read"):
        read_instructions(tmp_path / "missing.jsonl")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"site": "a", "prompt": "x", "response": "y"}\n{oops\n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        read_instructions(broken)
