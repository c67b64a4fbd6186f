"""SiteDP for a whole run: whom epsilon holds against, what a round is charged, what it may still spend, and
the printed noise multiplier being the one used."""

from __future__ import annotations

import json
import re
from typing import Any

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp

from confide.errors import ConfigError
from confide.privacy.accountant import LedgerEntry, PrivacyAccountant, calibrate_noise, combine_noise
from confide.privacy.dp import AdaptiveClip
from confide.privacy.policy import SiteDP

DELTA = 1e-3


def rdp_gaussians(z: float, rounds: int, delta: float = DELTA) -> float:
    """A site's epsilon for ``rounds`` unsampled Gaussian rounds, asked of dp-accounting directly."""
    event = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), rounds)
    return float(rdp.RdpAccountant().compose(event).get_epsilon(delta))


def distributed(**options: object) -> SiteDP:
    settings: dict[str, object] = {
        "placement": "distributed",
        "clip_norm": 1.0,
        "noise_multiplier": 2.0,
        "population": 8,
        "sites_per_round": 8,
        "sampling": "fixed",
        "delta": DELTA,
    }
    return SiteDP(**{**settings, **options})  # type: ignore[arg-type]


SITES = [f"s{i}" for i in range(8)]


def test_the_trust_model_follows_the_placement() -> None:
    assert distributed().trust == "knows_sample"
    assert distributed(placement="central").trust == "secret_sample"
    assert distributed(placement="central", trust="knows_sample").trust == "knows_sample"
    with pytest.raises(ConfigError, match="knows the sample"):
        distributed(trust="secret_sample")
    with pytest.raises(ConfigError, match="'knows_sample', 'secret_sample'"):
        distributed(trust="honest")
    assert "server that knows which sites took part" in distributed().describe()
    assert "aggregator is trusted" in distributed(placement="central").describe()


def test_the_budget_governs_the_worst_site_under_distributed_dp_and_the_amplified_one_under_central() -> None:
    for placement in ("distributed", "central"):
        dp = distributed(placement=placement, population=40, sites_per_round=4)
        dp.charge(1, SITES[:4])
        dp.charge(2, SITES[:4])
        dp.charge(3, SITES[4:])
        spent = dp.spent()
        worst = rdp_gaussians(2.0 / 2, 2)  # fixed-size sampling: replace-one, sensitivity 2C
        assert spent.worst_site == pytest.approx(worst, rel=1e-9)
        assert spent.worst_site == dp.worst_site_epsilon() == max(dp.site_epsilons().values())
        assert spent.median_site == 0.0  # 32 of the 40 sites never took part
        assert spent.amplified == dp.amplified_epsilon() < spent.worst_site
        governing = spent.worst_site if placement == "distributed" else spent.amplified
        assert dp.epsilon() == spent.epsilon == governing


def test_a_calibrated_multiplier_is_used_and_accounted_exactly_as_printed() -> None:
    options: dict[str, Any] = {
        "clip_norm": 1.0,
        "population": 100,
        "sites_per_round": 10,
        "sampling": "poisson",
    }
    dp = SiteDP.calibrated(2.0, 10, placement="central", delta=1e-5, **options)
    raw = calibrate_noise(2.0, 1e-5, 10, 0.1, 100, "poisson", "rdp")
    printed = re.search(r"noise multiplier ([0-9.e-]+),", dp.describe())
    assert printed is not None
    z = float(printed.group(1))
    assert z == dp.noise_multiplier and float(f"{z:.4g}") == z
    assert raw <= z < raw * 1.001
    for r in range(1, 11):
        dp.charge(r, [f"s{i}" for i in range(10)])
    direct = PrivacyAccountant("rdp", "poisson", 100, 1e-5)
    direct.spend(z, 0.1, steps=10)
    assert dp.epsilon() == pytest.approx(direct.epsilon(), rel=1e-12)
    assert dp.epsilon() <= 2.0
    # Against a server that knows the sample: a site that takes part in 3 rounds spends the budget.
    site = SiteDP.calibrated(2.0, 10, placement="distributed", delta=1e-5, participations=3, **options)
    for r in range(1, 4):
        site.charge(r, [f"s{i}" for i in range(10)])
    printed = re.search(r"noise multiplier ([0-9.e-]+),", site.describe())
    assert printed is not None and float(printed.group(1)) == site.noise_multiplier
    assert site.epsilon() == pytest.approx(rdp_gaussians(site.noise_multiplier, 3, 1e-5), rel=1e-9)
    assert 1.99 < site.epsilon() <= 2.0


def test_fewer_survivors_are_charged_at_less_noise_with_the_clipping_bits_counted() -> None:
    dp = distributed(noise_multiplier=1.5)
    assert dp.charged_noise(8) == dp.charged_noise(20) == 1.5
    assert dp.charged_noise(2) == pytest.approx(1.5 * 0.5, abs=1e-3) and dp.charged_noise(2) <= 0.75
    assert distributed(placement="central", noise_multiplier=1.5).charged_noise(2) == 1.5
    adaptive = distributed(noise_multiplier=1.5, adaptive=AdaptiveClip.init(1.0, 0.5, 0.2, 2.0))
    assert adaptive.charged_noise(8) == 1.5
    short = adaptive.charged_noise(2)
    assert short == pytest.approx(combine_noise(adaptive.update_noise * 0.5, 2.0), abs=1e-3)
    assert short <= combine_noise(adaptive.update_noise * 0.5, 2.0)
    # Only the update noise shrinks with fewer sites, so this is more than 1.5 / 2, which under-charged.
    assert short > 0.75


def test_charges_replay_into_the_same_accounts_and_unknown_participants_cost_everyone() -> None:
    dp = distributed()
    rounds = [SITES[:8], SITES[:5], SITES[3:6], SITES[:2]]
    stored = []
    for r, participants in enumerate(rounds, start=1):
        charge = dp.charge(r, participants)
        assert charge.participants == tuple(participants) and charge.epsilon == dp.epsilon()
        assert charge.entry.noise_multiplier == dp.charged_noise(len(participants))
        stored.append(json.dumps([charge.round, list(charge.entry), list(charge.participants or ())]))
    assert len({c for c in dp.sites.histories()["s0"]}) == 3  # s0 was charged at three different z

    resumed = distributed()
    rows = [json.loads(row) for row in stored]
    resumed.replay([LedgerEntry(*entry) for _, entry, _ in rows], [who for *_, who in rows])
    assert resumed.spent() == dp.spent()
    assert resumed.site_epsilons() == dp.site_epsilons()
    # A ledger stored without participants (written before they were kept) charges every round to every site.
    old = distributed()
    old.replay([LedgerEntry(*entry) for _, entry, _ in rows])
    assert old.worst_site_epsilon() >= dp.worst_site_epsilon()
    assert old.median_site_epsilon() > dp.median_site_epsilon()
    assert old.amplified_epsilon() == dp.amplified_epsilon()
    # So does the old interface, a bare count.
    counted = distributed()
    counted.charge(1, 3)
    assert counted.median_site_epsilon() == counted.worst_site_epsilon() > 0
    with pytest.raises(ConfigError, match="one list"):
        resumed.replay([LedgerEntry(*rows[0][1])], [])
    with pytest.raises(ConfigError, match="takes a list"):
        resumed.charge(5, "s1")


def simulate(rule: str, rng: np.random.Generator, min_reported: int = 3) -> tuple[int, float]:
    """One run of distributed DP whose rounds keep a random number (min_reported to 8) of the 8 sites.

    ``rule`` decides when to stop: ``"worst"`` checks the worst charge an accepted round can bring (the
    fix), ``"planned"`` the planned multiplier (the old rule, which a short last round overshoots).
    Simulation only: which sites survive is drawn from a seeded generator.
    """
    dp = distributed(noise_multiplier=4.0, target_epsilon=6.0)
    rounds = 0
    while rounds < 50:
        floor = min_reported if rule == "worst" else dp.share_sites
        if dp.over_budget(rounds + 1, floor) is not None:
            break
        survivors = int(rng.integers(min_reported, 9))
        dp.charge(rounds + 1, list(rng.choice(SITES, survivors, replace=False)))
        rounds += 1
    return rounds, dp.epsilon()


def test_the_budget_is_never_exceeded_whatever_the_survivors() -> None:
    rng = np.random.default_rng(11)
    fixed = [simulate("worst", rng) for _ in range(200)]
    old = [simulate("planned", rng) for _ in range(200)]
    assert max(epsilon for _, epsilon in fixed) <= 6.0
    assert min(rounds for rounds, _ in fixed) >= 3  # it still trains
    overshoots = [epsilon for _, epsilon in old if epsilon > 6.0]
    assert len(overshoots) >= 20, "the old rule should overshoot in some runs: the test would show nothing"


def test_over_budget_says_what_the_worst_round_would_cost_and_sites_can_be_left_out() -> None:
    dp = distributed(noise_multiplier=3.0, target_epsilon=5.0)
    assert dp.over_budget(1, 8) is None
    dp.charge(1, SITES)
    dp.charge(2, SITES[:4])
    reason = dp.over_budget(3, 3)
    assert reason is not None
    assert (
        "stopped before round 3: with as few as 3 updates it would be charged at noise multiplier 1.837"
        in reason
    )
    assert "worst site (one that would have taken part in 3 rounds)" in reason
    assert "from 4.217 to 6.266, past the budget privacy.target_epsilon = 5" in reason
    # Holding the budget per site, the strategy may leave out the sites that would pass it and go on.
    exhausted = dp.exhausted(3)
    assert exhausted == set(SITES[:4])
    assert dp.over_budget(3, 3, exclude=exhausted) is None
    assert "only 4 sites can take part again" in str(dp.over_budget(3, 5, exclude=exhausted))
    with pytest.raises(ConfigError, match="amplification by sampling assumes"):
        distributed(placement="central", target_epsilon=4.0).over_budget(1, 1, exclude={"s1"})
    assert distributed(target_epsilon=0.0).over_budget(1) is None
