"""Gradient inversion: the attack recovers one window from a tiny model's unprotected update, not from a sum
of many sites' updates; the scores; the HF + LoRA path; the audit end to end on a tiny config."""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from confide import config
from confide.audit.inversion import (
    Settings,
    Target,
    baseline,
    invert,
    lcs_length,
    rouge_l,
    score,
    sequential,
    token_set,
)
from confide.client.trainer import ClientOptimizer, Trainer
from confide.core import Layout, Plan
from confide.data import DEFAULT_TOKENIZER, windows
from confide.errors import ConfigError
from confide.models import build_model
from confide.runtime.audit import audit_folder
from confide.runtime.inversion import audit_inversion, word_recall
from tests.conftest import tiny_config

TEXT = (
    "First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. First Citizen: You are "
    "all resolved rather to die than to famish? All: Resolved. resolved. First Citizen: First, you know "
    "Caius Marcius is chief enemy to the people."
)
LENGTH = 9
FAST = Settings(iterations=60, restarts=1, step_size=0.3, discrete=150)


def tiny(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "lstm":
        return build_model("lstm", vocab_size=DEFAULT_TOKENIZER.vocab_size, embedding=8, hidden=16, layers=1)
    return build_model(
        "gpt", vocab_size=DEFAULT_TOKENIZER.vocab_size, width=16, layers=1, heads=2, context=16, dropout=0.0
    )


def site_update(model: torch.nn.Module, batch: np.ndarray, steps: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The global weights and the delta a site trains on ``batch`` (plain SGD, lr 1, full batch)."""
    layout = Layout.of_module(model)
    start = layout.read(model).copy()
    plan = Plan(round=0, epochs=steps, max_steps=steps, batch_size=len(batch), learning_rate=1.0)
    return start, Trainer(model, ClientOptimizer()).fit(start, batch, plan).delta


def all_windows() -> np.ndarray:
    return windows(DEFAULT_TOKENIZER.encode(TEXT), LENGTH - 1)[:-1]  # the last one is padded


@pytest.mark.parametrize("kind", ["lstm", "gpt"])
def test_one_unprotected_window_is_recovered_far_above_the_baseline(kind: str) -> None:
    model = tiny(kind)
    truth = all_windows()[:1]
    start, delta = site_update(model, truth)
    found = invert(model, Target(start, delta, 1, LENGTH, learning_rate=1.0), FAST)
    result = score(truth.astype(np.int64), found.windows)
    guess = baseline(model, Layout.of_module(model), start, truth[:, 0], LENGTH)
    assert result.token_accuracy >= 0.8
    assert result.token_accuracy >= score(truth.astype(np.int64), guess).token_accuracy + 0.5
    # The shortcut applies to the LSTM (its embedding rows moved only for the characters read), not the GPT.
    assert found.vocabulary == (len(set(DEFAULT_TOKENIZER.decode(truth[0]))) if kind == "lstm" else 97)


def test_the_sum_of_many_sites_updates_defeats_the_attack() -> None:
    model = tiny("lstm")
    batches = all_windows()
    truth = batches[:1]
    start, total = site_update(model, truth)
    for other in batches[1:]:  # 20 other sites, one window each, from the same weights
        total = total + site_update(model, other[None])[1]
    found = invert(model, Target(start, total, 1, LENGTH, learning_rate=1.0), FAST)
    result = score(truth.astype(np.int64), found.windows)
    assert result.token_accuracy <= 0.4
    assert found.distance > 0.05  # no one window's update explains the sum


def test_token_set_is_the_characters_of_the_batch_without_noise_and_none_for_tied_embeddings() -> None:
    batch = all_windows()[:2]
    lstm = tiny("lstm")
    start, delta = site_update(lstm, batch)
    target = Target(start, delta, 2, LENGTH, learning_rate=1.0)
    found = token_set(lstm, Layout.of_module(lstm), target)
    assert found is not None and set(found.tolist()) == set(batch.reshape(-1).tolist())
    gpt = tiny("gpt")
    start, delta = site_update(gpt, batch)
    assert token_set(gpt, Layout.of_module(gpt), Target(start, delta, 2, LENGTH)) is None


def test_scores_on_known_strings() -> None:
    assert lcs_length([1, 2, 3, 4], [2, 4, 3]) == 2
    assert rouge_l([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert rouge_l([1, 2, 3, 4], [5, 6]) == 0.0
    assert rouge_l([1, 2, 3, 4], [1, 3]) == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    truth = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    swapped = np.array([[5, 6, 7, 0], [1, 2, 3, 4]])  # the windows in the other order, one code wrong
    result = score(truth, swapped)
    assert result.order == (1, 0)
    assert result.token_accuracy == 7 / 8
    assert result.rouge_l == pytest.approx((1.0 + 0.75) / 2)
    padded = np.array([[1, 2, 255, 255]])  # a PAD tail is not text: not counted
    assert score(padded, np.array([[1, 2, 9, 9]])).token_accuracy == 1.0


def test_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="distance"):
        Settings(distance="manhattan")
    with pytest.raises(ConfigError, match="iteration"):
        Settings(iterations=0)


def test_hf_lora_adapters_are_inverted_into_valid_tokens(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    from confide.config import AdapterConfig
    from confide.models.configs import HFConfig
    from confide.models.hf import build_hf
    from tests.llm.conftest import tiny_hf_model

    path = tiny_hf_model(tmp_path / "llama")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_hf(HFConfig(path=str(path), device="cpu"), AdapterConfig(kind="lora", r=2))
    layout = Layout.of_module(model)
    assert all("lora" in name for name in layout.names)  # only the adapters travel
    ids = model.tokenizer("hear me speak all", return_tensors="np").input_ids[0][:5].astype(np.int64)
    rows = np.stack([ids, ids])[None]  # (1, 2, T+1): ids and labels, as confide.data.llm gives them
    start = layout.read(model).copy()
    plan = Plan(round=0, batch_size=1, max_steps=1, learning_rate=1.0)
    delta = Trainer(model, ClientOptimizer()).fit(start, rows, plan).delta
    assert np.abs(delta).max() > 0
    found = invert(model, Target(start, delta, 1, len(ids), learning_rate=1.0), Settings(10, 1, discrete=5))
    assert found.windows.shape == (1, len(ids))
    assert found.windows.min() >= 0 and found.windows.max() < len(model.tokenizer)
    assert found.vocabulary == model.lm.get_input_embeddings().num_embeddings  # no shortcut under LoRA
    assert 0.0 <= score(ids[None], found.windows).token_accuracy <= 1.0


def test_audit_inversion_end_to_end_on_a_tiny_config(tmp_path: Path, text_corpus: Path) -> None:
    path = tmp_path / "tiny.toml"
    path.write_text(tiny_config(text_corpus, tmp_path / "runs"))
    cfg = config.load(path, ["privacy.dp=central", "privacy.noise_multiplier=1", "run.rounds=3"])
    seen: list[tuple[int, int, str]] = []
    audit = audit_inversion(
        cfg,
        batch_sizes=(1, 2),
        steps=(1,),
        scenarios=("none", "distributed-share", "secagg", "secagg+dp"),
        # The sequential search has tests of its own; here the views, cells, file and page are the point.
        settings=Settings(iterations=2, restarts=1, discrete=2, sequential=False),
        sites_summed=3,
        progress=lambda done, total, label: seen.append((done, total, label)),
    )
    assert [(c.scenario, c.batch_size) for c in audit.cells] == [
        (s, b) for b in (1, 2) for s in ("none", "distributed-share", "secagg", "secagg+dp")
    ]
    assert seen[0] == (0, 8, "none, batch 1, 1 step") and seen[-1] == (8, 8, "done")
    assert audit.sites_summed == 3 and audit.clip_norm is not None and audit.noise_multiplier == 1.0
    for cell in audit.cells:
        assert 0.0 <= cell.token_accuracy <= 1.0 and 0.0 <= cell.baseline_rouge_l <= 1.0
        assert 0.0 <= cell.words <= 1.0 and 0.0 <= cell.baseline_words <= 1.0
        assert len(cell.examples) == min(2, cell.batch_size) and len(cell.examples[0].true) == 81
    written = json.loads((audit_folder(cfg) / "inversion.json").read_text())
    assert written["victim"] == audit.victim and len(written["cells"]) == 8
    page = (audit_folder(cfg) / "audit.html").read_text()
    assert "Gradient inversion" in page and page.count("<img") == 1  # the chart, and the examples as text
    assert html.escape(audit.cells[0].examples[0].true, quote=True)[:40] in page
    with pytest.raises(ConfigError, match="scenario"):
        audit_inversion(cfg, scenarios=("mitm",), write=False)
    with pytest.raises(ConfigError, match="full training windows"):
        audit_inversion(cfg, batch_sizes=(10_000,), write=False)


def test_the_sequential_search_reads_a_longer_window_off_a_trained_models_update() -> None:
    # A causal model's update is a sum of one term per position, each depending on the text up to it: once
    # the model has learnt something of the text, peeling the terms left to right reads the window back.
    # At random weights its states say little of the characters read, and the same search fails.
    torch.manual_seed(0)
    model = build_model(
        "gpt", vocab_size=DEFAULT_TOKENIZER.vocab_size, width=16, layers=1, heads=2, context=32, dropout=0.0
    )
    layout = Layout.of_module(model)
    every = windows(DEFAULT_TOKENIZER.encode(TEXT), 23)[:-1]
    truth = every[3:4].astype(np.int64)
    untrained = layout.read(model).copy()
    plan = Plan(round=0, epochs=100, max_steps=100, batch_size=len(every), learning_rate=0.03)
    trained = untrained + Trainer(model, ClientOptimizer("adam")).fit(untrained, every, plan).delta
    accuracy = {}
    for name, start in (("untrained", untrained), ("trained", trained)):
        one = Plan(round=0, epochs=1, max_steps=1, batch_size=1, learning_rate=1.0)
        delta = Trainer(model, ClientOptimizer()).fit(start, truth, one).delta
        found = sequential(model, Target(start, delta, 1, 24, learning_rate=1.0), None, Settings(beam=2))
        accuracy[name] = score(truth, found).token_accuracy
    assert accuracy["trained"] >= 0.9
    assert accuracy["untrained"] <= 0.5


def test_word_recall_counts_words_in_any_order_with_repeats() -> None:
    assert word_recall(["to be or not to be"], ["be not to or"]) == pytest.approx(4 / 6)
    assert word_recall(["To be, or"], ["or TO be"]) == 1.0
    assert word_recall(["a b c"], ["a b c"]) == 0.0  # no word of two letters: nothing to recover
