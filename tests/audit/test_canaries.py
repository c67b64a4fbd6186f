from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from confide.audit.canaries import (
    PREFIX,
    Canary,
    estimated_exposure,
    exposure,
    fitted_exposure,
    make_canaries,
    plant,
    rank_exposure,
    score_with_model,
)
from confide.client.trainer import ClientOptimizer, Trainer
from confide.core import Plan
from confide.data import DEFAULT_TOKENIZER, windows
from confide.models import build_model


def test_canaries_are_distinct_random_secrets_of_the_format() -> None:
    canaries = make_canaries(50, np.random.default_rng(1))
    assert len({c.secret for c in canaries}) == 50
    assert all(c.text.startswith(PREFIX) and len(c.secret) == 6 and c.secret.isdigit() for c in canaries)
    assert canaries[0].space_size == 10**6
    assert make_canaries(50, np.random.default_rng(1)) == canaries
    letters = make_canaries(3, np.random.default_rng(1), alphabet="xyz", length=4, prefix="key: ")
    assert all(set(c.secret) <= set("xyz") and c.text.startswith("key: ") for c in letters)


def test_candidates_are_other_secrets_and_all_of_them_when_asked() -> None:
    canary = Canary("pin ", "ba", alphabet="abc")
    everyone = canary.candidates(100, np.random.default_rng(0))
    assert sorted(everyone) == sorted(f"pin {x}{y}" for x in "abc" for y in "abc" if x + y != "ba")
    sample = make_canaries(1, np.random.default_rng(2))[0].candidates(500, np.random.default_rng(3))
    assert len(set(sample)) == 500 and make_canaries(1, np.random.default_rng(2))[0].text not in sample
    huge = Canary("x", "a" * 40, alphabet="ab")  # 2^40 secrets: drawn symbol by symbol
    assert len(huge.candidates(10, np.random.default_rng(0))) == 10


def test_plant_inserts_each_canary_repeats_times_and_keeps_the_texts_in_order() -> None:
    texts = [f"line {i}" for i in range(10)]
    out = plant(texts, ["A", "B"], repeats=3)
    assert len(out) == 16 and out.count("A") == 3 and out.count("B") == 3
    assert [t for t in out if t.startswith("line")] == texts
    positions = [i for i, t in enumerate(out) if t in ("A", "B")]
    assert positions[0] > 0 and positions[-1] < len(out) - 1  # spread through, not piled at an end
    assert plant(texts, ["A"], repeats=0) == texts


def test_rank_exposure_is_log_space_minus_log_rank() -> None:
    candidates = np.arange(1.0, 1024.0)  # 1023 candidates: |R| = 1024 with the canary
    assert rank_exposure(0.5, candidates) == 10.0  # likeliest of all
    assert rank_exposure(2000.0, candidates) == 0.0  # least likely of all
    assert rank_exposure(511.5, candidates) == pytest.approx(1.0)  # rank 512 of 1024
    assert rank_exposure(1.0, candidates) == pytest.approx(9.0)  # a tie ranks against the canary


def test_skew_normal_estimate_agrees_with_the_rank_on_known_scores() -> None:
    # A scoring function built from known numbers: skew-normal log-perplexities for 20,000 candidates, and
    # a canary placed at the 2^-7 quantile of that distribution, so its exposure is 7 bits.
    canary = make_canaries(1, np.random.default_rng(4))[0]
    candidates = canary.candidates(20_000, np.random.default_rng(5))
    shape, loc, scale = 3.0, 50.0, 8.0
    known = dict(
        zip(candidates, stats.skewnorm.rvs(shape, loc, scale, size=20_000, random_state=6), strict=True)
    )
    known[canary.text] = float(stats.skewnorm.ppf(2.0**-7, shape, loc, scale))

    def scores(texts: list[str]) -> np.ndarray:
        return np.array([known[t] for t in texts])

    by_rank = exposure(scores, canary.text, candidates)
    by_fit = estimated_exposure(scores, canary.text, candidates)
    assert by_rank == pytest.approx(7.0, abs=0.25)
    assert by_fit == pytest.approx(7.0, abs=0.25)
    assert by_fit == pytest.approx(by_rank, abs=0.3)
    # Beyond the sample the rank saturates at log2(m + 1); the fit still extrapolates.
    far = float(stats.skewnorm.ppf(2.0**-30, shape, loc, scale))
    assert rank_exposure(far, scores(candidates)) == pytest.approx(math.log2(20_001))
    assert fitted_exposure(far, scores(candidates)) > 20


def tiny_gpt() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("gpt", 97, layers=1, heads=2, width=32, context=32)


def test_score_with_model_is_the_models_own_loss_over_the_secret() -> None:
    model = tiny_gpt()
    text = "my secret number is 123456"
    codes = torch.from_numpy(DEFAULT_TOKENIZER.encode(text).astype(np.int64))[None]
    with torch.no_grad():
        _, loss = model(codes[:, :-1], codes[:, 1:])
    assert loss is not None
    # With a one-character prefix every later character is scored: the sum of the per-character losses.
    whole = score_with_model(model, DEFAULT_TOKENIZER, [text], prefix="m")
    assert whole[0] == pytest.approx(loss.item() * (len(text) - 1) / math.log(2), rel=1e-5)
    # Scoring after the full prefix counts the 6 digits only, whatever the batch holds beside them.
    alone = score_with_model(model, DEFAULT_TOKENIZER, [text], PREFIX)
    batched = score_with_model(
        model, DEFAULT_TOKENIZER, [text, PREFIX + "99", text + "0"], PREFIX, batch_size=2
    )
    assert batched[0] == pytest.approx(alone[0], rel=1e-5) and 0 < alone[0] < whole[0]
    with pytest.raises(ValueError, match="does not start with the prefix"):
        score_with_model(model, DEFAULT_TOKENIZER, ["your secret number is 1"], PREFIX)


def test_a_memorised_canary_is_exposed_and_a_fresh_one_is_not() -> None:
    rng = np.random.default_rng(0)
    planted, fresh = make_canaries(2, rng)
    background = [
        "the quick brown fox jumps over the lazy dog",
        "to be or not to be that is the question",
        "now is the winter of our discontent",
    ]
    text = "\n".join(plant(background * 2, [planted.text], repeats=4)) + "\n"
    data = windows(DEFAULT_TOKENIZER.encode(text), window=32)
    model = tiny_gpt()
    trainer = Trainer(model, ClientOptimizer("adam"))
    trainer.fit(
        trainer.layout.read(model).copy(), data, Plan(round=1, epochs=150, batch_size=16, learning_rate=0.02)
    )

    def scores(texts: list[str]) -> np.ndarray:
        return score_with_model(model, DEFAULT_TOKENIZER, texts, PREFIX)

    candidates = planted.candidates(2_000, rng)
    assert exposure(scores, planted.text, candidates) == pytest.approx(math.log2(2_001))  # ranked first
    assert estimated_exposure(scores, planted.text, candidates) > 10
    assert exposure(scores, fresh.text, fresh.candidates(2_000, rng)) < 5
