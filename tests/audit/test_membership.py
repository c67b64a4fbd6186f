"""Membership inference: the metrics on known scores, and the audit end to end on tiny runs.

The end-to-end corpus is lines of random words: what one site's training text says cannot be guessed from
its held-out text, so a model that tells them apart has memorised its training text.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from confide import config
from confide.audit.membership import (
    attack,
    auc,
    downsample_roc,
    min_nonmembers,
    reference_scores,
    roc_curve,
    tpr_at_fpr,
)
from confide.errors import ConfigError
from confide.runtime.audit import audit_folder
from confide.runtime.membership import MembershipAudit, audit_membership
from confide.runtime.runner import stored_sites
from confide.runtime.store import Store
from tests.conftest import tiny_config

# -- the metrics ---------------------------------------------------------------------------------------------


def test_auc_is_one_for_separated_scores_and_a_half_for_identical_ones() -> None:
    assert auc(np.array([3.0, 4.0, 5.0]), np.array([0.0, 1.0, 2.0])) == 1.0
    assert auc(np.array([0.0, 1.0]), np.array([2.0, 3.0, 4.0])) == 0.0
    same = np.arange(10.0)
    assert auc(same, same) == 0.5
    assert auc(np.ones(4), np.ones(7)) == 0.5  # all tied: a coin
    # One member below one non-member out of 2 x 2 pairs.
    assert auc(np.array([1.0, 3.0]), np.array([0.0, 2.0])) == 0.75


def test_roc_curve_runs_from_the_origin_to_one_and_moves_ties_together() -> None:
    fpr, tpr = roc_curve(np.array([3.0, 2.0, 2.0]), np.array([2.0, 1.0]))
    # Thresholds 3, 2 (two members and a non-member tied), 1.
    np.testing.assert_allclose(fpr, [0.0, 0.0, 0.5, 1.0])
    np.testing.assert_allclose(tpr, [0.0, 1 / 3, 1.0, 1.0])
    # The trapezoid area under the curve is the AUC.
    members, nonmembers = (
        np.random.default_rng(0).normal(1, 1, 300),
        np.random.default_rng(1).normal(0, 1, 500),
    )
    fpr, tpr = roc_curve(members, nonmembers)
    assert np.trapezoid(tpr, fpr) == pytest.approx(auc(members, nonmembers))
    with pytest.raises(ValueError, match="at least one member and one non-member"):
        roc_curve(np.array([1.0]), np.array([]))
    with pytest.raises(ValueError, match="finite"):
        auc(np.array([np.nan]), np.array([1.0]))


def test_tpr_at_fpr_is_the_best_rate_within_the_target_or_unresolved_with_too_few_nonmembers() -> None:
    assert min_nonmembers(0.01) == 100 and min_nonmembers(0.001) == 1000
    # 1000 non-members at 0..999, members at 995.5..: a threshold that passes 5 non-members (0.5%) catches
    # every member above 994.5.
    nonmembers = np.arange(1000.0)
    members = np.array([2000.0, 1500.0, 999.5, 996.0, 10.0])
    fpr, tpr = roc_curve(members, nonmembers)
    assert tpr_at_fpr(fpr, tpr, 0.001, 1000) == pytest.approx(3 / 5)  # one false positive allowed: 999
    assert tpr_at_fpr(fpr, tpr, 0.01, 1000) == pytest.approx(4 / 5)  # ten allowed: 990..999
    # 500 non-members resolve 1% but not 0.1%: the audit says so rather than report a rate of 0.
    fpr, tpr = roc_curve(members, nonmembers[:500])
    assert tpr_at_fpr(fpr, tpr, 0.01, 500) is not None
    assert tpr_at_fpr(fpr, tpr, 0.001, 500) is None
    result = attack("loss", members, nonmembers[:99])
    assert result.tpr_at_1pct_fpr is None and result.tpr_at_01pct_fpr is None
    assert result.members == 5 and result.nonmembers == 99


def test_downsampled_roc_keeps_the_ends_and_the_low_false_positive_rates() -> None:
    rng = np.random.default_rng(2)
    fpr, tpr = roc_curve(rng.normal(1, 1, 5000), rng.normal(0, 1, 5000))
    points = downsample_roc(fpr, tpr, points=50)
    assert len(points) <= 102 and points[0] == (0.0, 0.0) and points[-1] == (1.0, 1.0)
    assert min(f for f, _ in points if f > 0) == pytest.approx(1 / 5000)  # the log grid reaches 1/N
    xs, ys = zip(*points, strict=True)
    assert list(xs) == sorted(xs) and list(ys) == sorted(ys)
    curve = set(zip(fpr.tolist(), tpr.tolist(), strict=True))
    assert all(point in curve for point in points)  # points of the curve itself
    # After the origin, each the highest of its false-positive rate: the upper envelope a plot shows.
    for f, t in points[1:]:
        assert t == tpr[np.searchsorted(fpr, f, side="right") - 1]


def test_reference_scores_are_the_difference_with_one_reference_and_lira_with_more() -> None:
    target = np.array([1.0, 2.0, 3.0])
    assert reference_scores(target, np.array([[0.5, 2.5, 3.0]])).tolist() == [0.5, -0.5, 0.0]
    # Two references: the mean out-score, and the standard deviation pooled over records.
    refs = np.array([[0.0, 1.0, 2.0], [2.0, 3.0, 4.0]])  # mean 1, 2, 3; every record's sd sqrt(2)
    np.testing.assert_allclose(reference_scores(target, refs), [0.0, 0.0, 0.0])
    np.testing.assert_allclose(reference_scores(target + np.sqrt(2), refs), [1.0, 1.0, 1.0])
    # Eight references and more: each record's own spread, so a record that varies little out of training
    # counts a small rise as much as a noisy record counts a large one.
    rng = np.random.default_rng(3)
    refs = np.stack([rng.normal(0, 1, 8), rng.normal(0, 10, 8)], axis=1)
    scores = reference_scores(refs.mean(0) + refs.std(0, ddof=1) * 2, refs)
    np.testing.assert_allclose(scores, [2.0, 2.0])
    with pytest.raises(ValueError, match="shape"):
        reference_scores(target, np.zeros((1, 2)))


# -- the audit end to end ------------------------------------------------------------------------------------

WORDS_SEED = 0


def random_words_corpus(root: Path, sites: int = 4, lines: int = 40) -> Path:
    """``sites`` sites of ``lines`` lines of six words each, drawn at random from one vocabulary of 30."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(WORDS_SEED)
    letters = list("abcdefghijklmnopqrstuvwxyz")
    words = ["".join(rng.choice(letters, rng.integers(3, 6))) for _ in range(30)]
    for i in range(sites):
        text = "\n".join(" ".join(rng.choice(words, 6)) for _ in range(lines))
        (root / f"site{i}.txt").write_text(text + "\n")
    return root


# Every site in both rounds, 30 local epochs each, the mean of the updates applied as is: the model
# memorises its training windows. The DP run clips each site's update to norm 0.01 and adds noise of 5 times
# that to their sum (seeded here, to be repeatable): epsilon about 1, and what 4 sites could say is drowned.
OVERFIT = [
    "run.rounds=2",
    "client.epochs=30",
    "client.max_steps=0",
    "client.batch_size=16",
    "server.sites_per_round=4",
    "server.optimizer=sgd",
    "server.learning_rate=1.0",
    "eval.every=2",
]
STRONG_DP = [
    "privacy.dp=central",
    "privacy.clip_norm=0.01",
    "privacy.noise_multiplier=5",
    "privacy.insecure_reproducible_noise=true",
]


def load(tmp: Path, overrides: list[str], lines: int = 40) -> config.Config:
    corpus = random_words_corpus(tmp / "corpus", lines=lines)
    path = tmp / "tiny.toml"
    path.write_text(tiny_config(corpus, tmp / "runs"))
    return config.load(path, overrides)


@pytest.fixture(scope="module")
def overfit(tmp_path_factory: pytest.TempPathFactory) -> tuple[config.Config, MembershipAudit]:
    """One audit for the tests below: 3 of 4 sites audited, with and without strong DP, one reference run
    of each (on the one site left)."""
    cfg = load(tmp_path_factory.mktemp("overfit"), OVERFIT + STRONG_DP, lines=120)
    return cfg, audit_membership(cfg, sites=3, records=50, references=1)


def by_key(audit: MembershipAudit) -> dict[tuple[str, str, str], dict[str, float]]:
    return {(r.model, r.privacy, r.attack): {"auc": r.auc, "members": r.members} for r in audit.results}


def test_the_loss_attack_finds_an_overfit_models_members_and_not_under_strong_dp(
    overfit: tuple[config.Config, MembershipAudit],
) -> None:
    _, audit = overfit
    results = by_key(audit)
    assert results[("global", "no-dp", "loss")]["auc"] > 0.85
    # Under DP both attacks are within 3 standard deviations of a coin's AUC, for this many records
    # (the Mann-Whitney statistic's spread when members and non-members score alike).
    for attack_name in ("loss", "reference"):
        n = results[("global", "dp", attack_name)]["members"]
        assert abs(results[("global", "dp", attack_name)]["auc"] - 0.5) < 3 * math.sqrt(
            (2 * n + 1) / (12 * n * n)
        )
    dp = next(r for r in audit.results if r.privacy == "dp")
    no_dp = next(r for r in audit.results if r.privacy == "no-dp")
    assert dp.epsilon is not None and dp.epsilon > 0 and dp.delta is not None and no_dp.epsilon is None
    # Too few records to read a false-positive rate of 1%, let alone 0.1%.
    assert all(r.nonmembers < 100 and r.tpr_at_1pct_fpr is None for r in audit.results)


def test_the_audit_attacks_each_model_with_both_attacks_and_writes_its_runs_and_numbers(
    overfit: tuple[config.Config, MembershipAudit],
) -> None:
    cfg, audit = overfit
    assert [(r.model, r.privacy, r.attack) for r in audit.results] == [
        ("global", "no-dp", "loss"),
        ("global", "no-dp", "reference"),
        ("global", "dp", "loss"),
        ("global", "dp", "reference"),
    ]
    assert audit.dp == "central" and "no personalization" in audit.note
    assert len(audit.audited_sites) == 3 and audit.references == 1
    for privacy in ("dp", "no-dp"):
        assert set(audit.rounds_trained[privacy]) == set(audit.audited_sites)
        assert all(
            rounds == 2 for rounds in audit.rounds_trained[privacy].values()
        )  # every site, every round
    for r in audit.results:
        # Each audited site gives as many members as non-members: all of its held-out windows, here.
        assert r.members == r.nonmembers > 0 and r.sites == 3
        assert r.roc[0] == (0.0, 0.0) and r.roc[-1] == (1.0, 1.0)
    folder = audit_folder(cfg)
    for name in ("membership-dp", "membership-no-dp", "membership-ref1-dp", "membership-ref1-no-dp"):
        assert (folder / name / "metrics.jsonl").is_file()
    written = json.loads((folder / "membership.json").read_text())
    assert written["audited_sites"] == audit.audited_sites and len(written["results"]) == 4
    assert written["results"][0]["auc"] == audit.results[0].auc
    # The reference runs never saw an audited site.
    # The reference runs never had an audited site; the audited runs had every site.
    for name, expected in (("membership-ref1-dp", 1), ("membership-dp", 4)):
        store = Store.open(folder / name)
        try:
            names = {s.name for s in stored_sites(store)}
        finally:
            store.close()
        assert len(names) == expected and (expected == 4 or not names & set(audit.audited_sites))


def test_personalized_models_are_attacked_on_their_own_sites_text(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        [
            "run.rounds=2",
            "client.epochs=2",
            "client.max_steps=0",
            "client.batch_size=8",
            "server.sites_per_round=4",
            "client.personalization=ditto",
            "client.ditto_lambda=0.01",
        ],
    )
    audit = audit_membership(cfg, sites=2, records=5, references=1)
    assert "no differential privacy" in audit.note and "personalization" not in audit.note
    keys = [(r.model, r.privacy, r.attack) for r in audit.results]
    assert keys == [
        ("global", "no-dp", "loss"),
        ("global", "no-dp", "reference"),
        ("personal", "no-dp", "loss"),
        ("personal", "no-dp", "reference"),
    ]
    glob, _, personal, _ = audit.results
    assert personal.members == glob.members > 0 and personal.sites == 2
    # Ditto's personal models are not the global model: their scores, and so their ROC curves, differ.
    assert personal.roc != glob.roc and personal.accuracy is not None and 0 <= personal.accuracy <= 1


def test_bad_options_are_refused_with_a_plain_message(tmp_path: Path) -> None:
    cfg = load(tmp_path, [])
    with pytest.raises(ConfigError, match="4 sites"):
        audit_membership(cfg, sites=5)
    with pytest.raises(ConfigError, match="at least one site left"):
        audit_membership(cfg, sites=4, references=1)
    with pytest.raises(ConfigError, match="0 or more"):
        audit_membership(cfg, references=-1)
    with pytest.raises(ConfigError, match="at least 1 site"):
        audit_membership(cfg, sites=0)
