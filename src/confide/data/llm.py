"""Federated data for language models (``model.kind = "hf"``), in the model's own tokenizer.

A site's rows are one int32 array of shape ``(n, 2, max_length)``: ``row[0]`` the token ids, with
:data:`NO_TOKEN` (-1) after a row's end (masked out of attention), and ``row[1]`` the labels, the id where a
loss is taken and :data:`IGNORE_INDEX` (-100) elsewhere. A model reads ``row[0][:-1]`` and predicts
``row[1][1:]``. Two kinds of data make rows:

* plain text (Shakespeare's roles, a folder of text files, ``site``/``text`` jsonl): each site's text split
  at a line boundary (80% train), tokenized, and cut into rows with stride ``max_length - 1``, so consecutive
  rows share one token and every token after the first is a target exactly once;
* instruction data: a ``.jsonl`` whose lines hold ``site`` and either ``prompt`` and ``response`` or chat
  ``messages`` (rendered with the tokenizer's chat template; the last message is the answer). One example a
  row; the loss is taken on the response tokens only. A site's last 20% of examples (at least one) are held
  out. The site field makes the partition: naturally non-IID.

Rows are truncated to ``max_length``: an example keeps at most half the row for its response and the end of
its prompt (the part next to the answer) in the rest.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from confide.data.dataset import FederatedDataset, SiteData, split_text
from confide.data.text import json_lines
from confide.errors import DataError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
NO_TOKEN = -1


def _pad(pieces: Sequence[tuple[list[int], list[int]]], length: int) -> np.ndarray:
    rows = np.empty((len(pieces), 2, length), dtype=np.int32)
    rows[:, 0] = NO_TOKEN
    rows[:, 1] = IGNORE_INDEX
    for k, (ids, labels) in enumerate(pieces):
        rows[k, 0, : len(ids)] = ids
        rows[k, 1, : len(labels)] = labels
    return rows


def text_rows(ids: Sequence[int], length: int) -> np.ndarray:
    """``ids`` cut into rows of ``length`` tokens with stride ``length - 1``; a loss on every token."""
    stride = length - 1
    count = math.ceil((len(ids) - 1) / stride) if len(ids) >= 2 else 0
    pieces = [list(ids[k * stride : k * stride + length]) for k in range(count)]
    return _pad([(p, p) for p in pieces], length)


def instruction_row(prompt: list[int], response: list[int], length: int) -> tuple[list[int], list[int]]:
    """One example, truncated to ``length``: labels on the response only."""
    response = response[: max(length // 2, length - len(prompt))]
    prompt = prompt[-(length - len(response)) :] if len(prompt) + len(response) > length else prompt
    return prompt + response, [IGNORE_INDEX] * len(prompt) + response


def render(tokenizer: Any, record: Mapping[str, Any], where: str) -> tuple[str, str]:
    """The prompt text and the response text of one instruction record."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or len(messages) < 2 or messages[-1].get("role") != "assistant":
            raise DataError(
                f"{where}: 'messages' must be a list of chat messages ending with the assistant's"
            )
    else:
        for key in ("prompt", "response"):
            if not isinstance(record.get(key), str):
                raise DataError(f"{where} needs string fields 'prompt' and 'response' (or 'messages')")
        if not tokenizer.chat_template:
            return record["prompt"] + "\n", record["response"] + (tokenizer.eos_token or "")
        messages = [
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["response"]},
        ]
    if not tokenizer.chat_template:
        raise DataError(f"{where} holds chat 'messages', but the model's tokenizer has no chat template")
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise DataError(f"{where}: the chat template does not render the conversation as prompt + answer")
    return prompt, full[len(prompt) :]


def _encode(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def read_instructions(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Each site's records, in file order."""
    sites: dict[str, list[dict[str, Any]]] = {}
    for number, record in json_lines(path):
        if not isinstance(record, dict) or not isinstance(record.get("site"), str) or not record["site"]:
            raise DataError(f"{path} line {number} must be a JSON object with a non-empty 'site' string")
        record["_where"] = f"{path} line {number}"
        sites.setdefault(record["site"], []).append(record)
    if not sites:
        raise DataError(f"{path} holds no records")
    return sites


def is_instruction_file(path: Path) -> bool:
    """Whether ``path`` is a .jsonl of instruction records (its first record has prompt or messages)."""
    if path.suffix != ".jsonl" or not path.is_file():
        return False
    try:
        with path.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    first = json.loads(line)
                    return isinstance(first, dict) and ("prompt" in first or "messages" in first)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False  # not one: the text reader says clearly what is wrong with the file
    return False


def instruction_dataset(path: Path, tokenizer: Any, length: int) -> FederatedDataset:
    sites = []
    for name, records in read_instructions(path).items():
        if len(records) < 2:
            logger.warning("skipping site %r: it has %d example; a site needs 2 (one held out)", name, 1)
            continue
        pieces = []
        for record in records:
            prompt, response = render(tokenizer, record, record["_where"])
            p = _encode(tokenizer, prompt, special=True)
            pieces.append(instruction_row(p, _encode(tokenizer, response, special=False), length))
        held_out = max(1, round(0.2 * len(pieces)))
        rows = _pad(pieces, length)
        sites.append(SiteData(name, name, rows[:-held_out], rows[-held_out:]))
    return _dataset(path.stem, sites, tokenizer)


def text_dataset(
    name: str, texts: Sequence[tuple[str, str, str]], tokenizer: Any, length: int
) -> FederatedDataset:
    """Sites from ``(site, group, text)`` triples: train and test split at a line boundary, then tokenized."""
    sites = []
    for site, group, text in texts:
        train, test = split_text(text)
        rows = [text_rows(_encode(tokenizer, part, special=False), length) for part in (train, test)]
        if len(rows[0]) == 0 or len(rows[1]) == 0:
            logger.warning("skipping site %r: its text leaves no held-out tokens", site)
            continue
        sites.append(SiteData(site, group, rows[0], rows[1]))
    return _dataset(name, sites, tokenizer)


def retokenize(site: SiteData, tokenizer: Any, length: int) -> SiteData:
    """A site of character windows (:mod:`confide.data.dataset`) as token rows: the text its train and test
    windows tile (each once: windows overlap by one character), tokenized again. A deployed site reads its
    data before it learns the model."""
    from confide.data.tokenize import DEFAULT_TOKENIZER, PAD

    parts = []
    for windows in (site.train, site.test):
        codes = np.concatenate([windows[0], *(w[1:] for w in windows[1:])]) if len(windows) else windows
        text = DEFAULT_TOKENIZER.decode(np.asarray(codes)[np.asarray(codes) != PAD])
        parts.append(text_rows(_encode(tokenizer, text, special=False), length))
    return SiteData(site.name, site.group, parts[0], parts[1])


def _dataset(name: str, sites: list[SiteData], tokenizer: Any) -> FederatedDataset:
    if not sites:
        raise DataError(f"no site of {name!r} has enough data to train on and hold some out")
    return FederatedDataset(name=name, sites=tuple(sites), vocab_size=len(tokenizer))


def prompts_and_references(rows: np.ndarray, tokenizer: Any) -> list[tuple[str, str]]:
    """The prompt and the reference response of each instruction row, decoded (for ROUGE-L)."""
    out = []
    for ids, labels in rows:
        answer = labels >= 0
        first = int(np.argmax(answer)) if answer.any() else int((ids >= 0).sum())
        prompt = tokenizer.decode(ids[:first].tolist(), skip_special_tokens=True)
        out.append((prompt, tokenizer.decode(labels[answer].tolist(), skip_special_tokens=True)))
    return out


def is_instruction_rows(rows: np.ndarray) -> bool:
    """Whether token rows hold instruction examples (the first token of a row is never a target of text)."""
    return bool(rows.ndim == 3 and len(rows) and (rows[:, 1, 0] == IGNORE_INDEX).all())
