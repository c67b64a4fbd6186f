from __future__ import annotations

import json
import math

import dp_accounting
import pytest
from dp_accounting import pld, rdp

from confide.errors import ConfigError
from confide.privacy.accountant import (
    LedgerEntry,
    PrivacyAccountant,
    SiteLedger,
    calibrate_noise,
    calibrate_site_noise,
    combine_noise,
    combined_noise,
    gaussian_epsilon,
    round_up,
)

NR = dp_accounting.NeighboringRelation


def direct(
    method: str, event: dp_accounting.DpEvent, delta: float, relation: NR = NR.ADD_OR_REMOVE_ONE
) -> float:
    """Epsilon of ``event`` asked of dp-accounting itself, with nothing of ours in between."""
    accountant = (
        rdp.RdpAccountant(neighboring_relation=relation)
        if method == "rdp"
        else pld.PLDAccountant(neighboring_relation=relation)
    )
    return float(accountant.compose(event).get_epsilon(delta))


def poisson(q: float, z: float, steps: int) -> dp_accounting.DpEvent:
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps
    )


@pytest.mark.parametrize(("method", "published"), [("rdp", 1.04), ("pld", 0.95)])
def test_abadi_et_al_point_matches_dp_accounting(method: str, published: float) -> None:
    # Abadi et al. 2016: q = 0.01, sigma = 4, 10,000 steps, delta = 1e-5 gives epsilon <= 1.26 (moments
    # accountant); RDP gives about 1.04 and PLD about 0.95 for the same mechanism.
    accountant = PrivacyAccountant(method, "poisson", population=60_000, delta=1e-5)
    for _ in range(10):
        accountant.spend(4.0, 0.01, steps=1_000)
    ours = accountant.epsilon()
    assert ours == pytest.approx(direct(method, poisson(0.01, 4.0, 10_000), 1e-5), rel=1e-9)
    assert ours == pytest.approx(published, abs=0.01)
    assert ours < 1.26


@pytest.mark.parametrize("method", ["rdp", "pld"])
def test_mixed_events_match_dp_accounting_composition(method: str) -> None:
    accountant = PrivacyAccountant(method, "poisson", population=1_000, delta=1e-6)
    for _ in range(30):
        accountant.spend(2.0, 0.05)
    accountant.spend(3.0, 0.1, steps=20)
    event = dp_accounting.ComposedDpEvent([poisson(0.05, 2.0, 30), poisson(0.1, 3.0, 20)])
    assert accountant.epsilon() == pytest.approx(direct(method, event, 1e-6), rel=1e-6)


def test_fixed_size_sampling_is_replace_one_with_twice_the_sensitivity() -> None:
    accountant = PrivacyAccountant("rdp", "fixed", population=100, delta=1e-5)
    accountant.spend(1.5, 10, steps=50)
    assert accountant.relation == "replace_one"
    # Replacing +C by -C moves the sum by 2C, so the event is a Gaussian of multiplier z / 2.
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.SampledWithoutReplacementDpEvent(100, 10, dp_accounting.GaussianDpEvent(0.75)), 50
    )
    assert accountant.epsilon() == pytest.approx(direct("rdp", event, 1e-5, NR.REPLACE_ONE), rel=1e-9)
    # With everyone sampled it is the plain Gaussian mechanism at sensitivity 2C.
    everyone = PrivacyAccountant("rdp", "fixed", population=20, delta=1e-5)
    everyone.spend(3.0, 20)
    gaussian = dp_accounting.GaussianDpEvent(1.5)
    assert everyone.epsilon() == pytest.approx(direct("rdp", gaussian, 1e-5), rel=1e-9)
    assert everyone.epsilon() > direct("rdp", dp_accounting.GaussianDpEvent(3.0), 1e-5)


def test_pld_with_fixed_size_sampling_is_refused_with_what_works() -> None:
    with pytest.raises(ConfigError, match="accounting = 'rdp' with fixed-size"):
        PrivacyAccountant("pld", "fixed", population=100, delta=1e-5)


def test_no_noise_is_infinite_epsilon_and_nothing_is_zero() -> None:
    accountant = PrivacyAccountant("rdp", "poisson", population=10, delta=1e-5)
    assert accountant.epsilon() == 0.0
    accountant.spend(0.0, 0.5)
    assert math.isinf(accountant.epsilon())


def test_epsilon_if_does_not_change_the_state_and_predicts_the_next_round() -> None:
    accountant = PrivacyAccountant("rdp", "poisson", population=500, delta=1e-5)
    accountant.spend(1.0, 0.02, steps=10)
    before = accountant.epsilon()
    predicted = accountant.epsilon_if(1.0, 0.02)
    assert accountant.epsilon() == before and len(accountant.ledger()) == 1
    assert predicted > before
    accountant.spend(1.0, 0.02)
    assert accountant.epsilon() == pytest.approx(predicted, rel=1e-12)


def test_stopping_before_the_round_that_would_overspend() -> None:
    accountant = PrivacyAccountant("rdp", "poisson", population=100, delta=1e-5)
    budget, rounds = 1.0, 0
    while accountant.epsilon_if(2.0, 0.1) <= budget:
        accountant.spend(2.0, 0.1)
        rounds += 1
    assert rounds > 5 and accountant.epsilon() <= budget < accountant.epsilon_if(2.0, 0.1)


@pytest.mark.parametrize(("method", "sampling", "sample"), [("pld", "poisson", 0.1), ("rdp", "fixed", 7)])
def test_ledger_round_trips_through_json(method: str, sampling: str, sample: float) -> None:
    accountant = PrivacyAccountant(method, sampling, population=70, delta=1e-5)
    accountant.spend(3.0, sample, steps=3)
    accountant.spend(2.5, sample)
    stored = json.loads(json.dumps(accountant.ledger()))
    replayed = PrivacyAccountant.from_ledger(
        stored, method=method, sampling=sampling, population=70, delta=1e-5
    )
    assert replayed.ledger() == accountant.ledger()
    assert all(isinstance(e, LedgerEntry) for e in replayed.ledger())
    assert replayed.epsilon() == accountant.epsilon() > 0
    with pytest.raises(ConfigError, match="replay"):
        other = "fixed" if sampling == "poisson" else "poisson"
        PrivacyAccountant.from_ledger(stored, method="rdp", sampling=other, population=70, delta=1e-5)


@pytest.mark.parametrize(
    ("sample", "steps"), [(0.0, 1), (1.5, 1), (0.1, 0)], ids=["rate 0", "rate above 1", "no steps"]
)
def test_bad_events_are_refused(sample: float, steps: int) -> None:
    accountant = PrivacyAccountant("rdp", "poisson", population=10, delta=1e-5)
    with pytest.raises(ConfigError):
        accountant.spend(1.0, sample, steps)
    fixed = PrivacyAccountant("rdp", "fixed", population=10, delta=1e-5)
    with pytest.raises(ConfigError, match="whole number from 1 to the population 10"):
        fixed.spend(1.0, 11)


def test_calibrated_noise_hits_the_target_and_more_rounds_need_more_noise() -> None:
    z = calibrate_noise(2.0, 1e-5, rounds=100, sample=0.1, population=1_000)
    at = PrivacyAccountant("rdp", "poisson", population=1_000, delta=1e-5)
    at.spend(z, 0.1, steps=100)
    assert 2.0 - 1e-3 < at.epsilon() <= 2.0
    assert calibrate_noise(2.0, 1e-5, rounds=400, sample=0.1, population=1_000) > z + 0.2
    assert calibrate_noise(4.0, 1e-5, rounds=100, sample=0.1, population=1_000) < z


def test_calibration_with_fixed_size_sampling_charges_the_replace_one_sensitivity() -> None:
    zf = calibrate_noise(1.0, 1e-5, rounds=20, sample=20, population=100, sampling="fixed")
    fixed = PrivacyAccountant("rdp", "fixed", population=100, delta=1e-5)
    fixed.spend(zf, 20, steps=20)
    assert 1.0 - 2e-3 < fixed.epsilon() <= 1.0
    # At least twice the noise of Poisson sampling at the same rate: the sensitivity alone doubles.
    assert zf > 2 * calibrate_noise(1.0, 1e-5, rounds=20, sample=0.2, population=100)


def test_combined_noise_is_andrew_et_al_split() -> None:
    z, sigma_b = 1.0, 5.0
    z_delta = combined_noise(z, sigma_b)
    assert z_delta == pytest.approx((1 / z**2 - 1 / (2 * sigma_b) ** 2) ** -0.5)
    assert z < z_delta < 1.01 * z
    # Composing the two Gaussians (updates at z_delta, centred bits at 2 sigma_b) costs what one at z costs.
    pair = dp_accounting.ComposedDpEvent(
        [dp_accounting.GaussianDpEvent(z_delta), dp_accounting.GaussianDpEvent(2 * sigma_b)]
    )
    assert direct("rdp", pair, 1e-5) == pytest.approx(direct("rdp", dp_accounting.GaussianDpEvent(z), 1e-5))
    with pytest.raises(ConfigError, match="whole privacy budget"):
        combined_noise(1.0, 0.5)


# -- the per-site account, against an adversary who knows the sample ----------------------------------------


def gaussians(*history: tuple[float, int]) -> dp_accounting.DpEvent:
    """Rounds a site took part in, with no sampling: plain Gaussian mechanisms, composed."""
    return dp_accounting.ComposedDpEvent(
        [dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), k) for z, k in history]
    )


@pytest.mark.parametrize(("rounds", "audited"), [(1, 6.3), (3, 12.6), (5, 17.7), (10, 28.8)])
def test_a_site_that_took_part_k_times_has_the_audits_epsilon(rounds: int, audited: float) -> None:
    # The outside audit, with dp-accounting's PLD: z = 0.651, 755 sites, delta = 1 / (10 x 755).
    ledger = SiteLedger("pld", "poisson", population=755, delta=1 / 7550)
    for _ in range(rounds):
        ledger.record(0.651, ["a"])
    assert ledger.site_epsilons()["a"] == pytest.approx(audited, abs=0.05)
    # dp-accounting's PLD accountant composes the rounds one by one and rounds up in doing so: ours (the exact
    # Gaussian the composition equals) lies just below it, never above.
    direct_pld = direct("pld", gaussians((0.651, rounds)), 1 / 7550)
    assert direct_pld * (1 - 1e-3) <= ledger.site_epsilons()["a"] <= direct_pld


def test_a_mixed_history_is_dp_accountings_composition_of_its_rounds() -> None:
    rdp_ledger = SiteLedger("rdp", "poisson", population=10, delta=1e-5)
    pld_ledger = SiteLedger("pld", "poisson", population=10, delta=1e-5)
    for ledger in (rdp_ledger, pld_ledger):
        ledger.record(1.2, ["a", "b"], steps=3)
        ledger.record(0.9, ["a"], steps=2)
        ledger.record(2.0, ["b"])
    for site, history in {"a": [(1.2, 3), (0.9, 2)], "b": [(1.2, 3), (2.0, 1)]}.items():
        event = gaussians(*history)
        assert rdp_ledger.site_epsilons()[site] == pytest.approx(direct("rdp", event, 1e-5), rel=1e-9)
        assert pld_ledger.site_epsilons()[site] == pytest.approx(direct("pld", event, 1e-5), rel=1e-3)
    assert rdp_ledger.histories() == {"a": {1.2: 3, 0.9: 2}, "b": {1.2: 3, 2.0: 1}}


def test_fixed_size_sampling_accounts_each_site_under_replace_one() -> None:
    # The same relation as the amplified account: replacing +C by -C moves the sum by 2C.
    ledger = SiteLedger("rdp", "fixed", population=10, delta=1e-5)
    ledger.record(3.0, ["a"], steps=4)
    assert ledger.site_epsilons()["a"] == pytest.approx(direct("rdp", gaussians((1.5, 4)), 1e-5), rel=1e-9)


def test_worst_median_and_the_sites_that_never_took_part() -> None:
    ledger = SiteLedger("rdp", "poisson", population=7, delta=1e-5)
    ledger.record(1.0, ["a", "b", "c"])
    ledger.record(1.0, ["a", "b"])
    ledger.record(0.5, ["a"])
    one, two = (direct("rdp", gaussians((1.0, k)), 1e-5) for k in (1, 2))
    worst = ledger.worst()
    assert worst.site == "a" and worst.rounds == 3
    assert worst.epsilon == pytest.approx(direct("rdp", gaussians((1.0, 2), (0.5, 1)), 1e-5), rel=1e-9)
    # Seven sites: a, b, c and four that never took part (epsilon 0); the median site is the fourth.
    assert ledger.median() == 0.0
    ledger.record(1.0, ["d"])
    assert ledger.median() == pytest.approx(one)  # 0, 0, 0, 1 round, 1, 2, 3 rounds: the upper middle one
    # One more round at z = 1 for the worst site it may still be asked; leaving "a" out, "b" is the worst.
    assert ledger.worst(1.0).epsilon > worst.epsilon
    assert ledger.worst(1.0, exclude={"a"}) == (
        "b",
        3,
        pytest.approx(direct("rdp", gaussians((1.0, 3)), 1e-5), rel=1e-9),
    )
    assert ledger.exhausted(1.0, target_epsilon=two * 1.01) == {"a", "b"}
    assert ledger.unseen_epsilon() == 0.0


def test_rounds_with_unknown_participants_are_charged_to_every_site() -> None:
    ledger = SiteLedger("rdp", "poisson", population=3, delta=1e-5)
    ledger.record(1.0, None, steps=2)
    ledger.record(1.0, ["a"])
    everyone = direct("rdp", gaussians((1.0, 2)), 1e-5)
    assert ledger.unseen_epsilon() == pytest.approx(everyone, rel=1e-9)
    assert ledger.median() == pytest.approx(everyone, rel=1e-9)
    assert ledger.worst() == ("a", 3, pytest.approx(direct("rdp", gaussians((1.0, 3)), 1e-5), rel=1e-9))
    with pytest.raises(ConfigError, match="listed twice"):
        ledger.record(1.0, ["b", "b"])


def test_no_noise_is_infinite_for_the_site_and_gaussian_epsilon_is_monotone() -> None:
    ledger = SiteLedger("pld", "poisson", population=3, delta=1e-5)
    ledger.record(0.0, ["a"])
    assert math.isinf(ledger.worst().epsilon) and ledger.median() == 0.0
    values = [gaussian_epsilon(p, 1e-5, method) for method in ("rdp", "pld") for p in (0.5, 1.0, 2.0)]
    assert values[:3] == sorted(values[:3]) and values[3:] == sorted(values[3:])


@pytest.mark.parametrize("method", ["rdp", "pld"])
@pytest.mark.parametrize("sampling", ["poisson", "fixed"])
def test_site_calibration_holds_a_site_that_takes_part_k_times(method: str, sampling: str) -> None:
    z = calibrate_site_noise(4.0, 1e-5, participations=5, sampling=sampling, method=method)
    ledger = SiteLedger(method, sampling, population=10, delta=1e-5)
    ledger.record(z, ["a"], steps=5)
    assert 4.0 - 1e-3 < ledger.worst().epsilon <= 4.0 + 1e-9
    assert calibrate_site_noise(4.0, 1e-5, 20, sampling, method) == pytest.approx(2 * z)


@pytest.mark.parametrize(
    ("value", "printed"),
    [(0.6512287468932361, 0.6513), (0.65, 0.65), (123.456, 123.5), (1.2341e-4, 1.235e-4), (7.0, 7.0)],
)
def test_round_up_keeps_four_significant_digits_and_never_lowers(value: float, printed: float) -> None:
    assert round_up(value) == printed >= value
    assert repr(round_up(value)) == repr(printed)


def test_combine_noise_undoes_the_split() -> None:
    assert combine_noise(combined_noise(0.8, 3.0), 3.0) == pytest.approx(0.8, rel=1e-12)
    assert combine_noise(0.8, None) == 0.8
