"""DP-FTRL's banded factorization: the factorization, the correlated noise, and each site's exact account."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm

from confide.errors import ConfigError
from confide.privacy.accountant import gaussian_epsilon
from confide.privacy.matrix import (
    BandedLedger,
    BandedNoise,
    default_bands,
    gram,
    inverse_coefficients,
    max_participations,
    model_noise,
    square_root_coefficients,
)
from confide.randomness import SeededRandomness


def toeplitz(coefficients: np.ndarray, rounds: int) -> np.ndarray:
    """The lower-triangular banded Toeplitz matrix C of ``rounds`` rows."""
    c = np.zeros((rounds, rounds))
    for j, value in enumerate(coefficients[:rounds]):
        c += np.diag(np.full(rounds - j, value), -j)
    return c


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_the_square_root_squared_is_the_optimizers_workload(momentum: float) -> None:
    rounds = 30
    root = square_root_coefficients(rounds, momentum)
    k = np.arange(rounds)
    workload = np.ones(rounds) if momentum == 0 else (1 - momentum ** (k + 1)) / (1 - momentum)
    assert np.convolve(root, root)[:rounds] == pytest.approx(workload, rel=1e-12)
    c = toeplitz(root, rounds)
    assert c @ c == pytest.approx(toeplitz(workload, rounds), rel=1e-12, abs=1e-12)


def test_the_correlated_noise_is_c_inverse_of_fresh_gaussian_noise() -> None:
    coefficients = square_root_coefficients(4)
    noise = BandedNoise(coefficients)
    draws = np.stack([noise.next(5, SeededRandomness([1, t])) for t in range(10)])
    fresh = np.stack([SeededRandomness([1, t]).normal(5, 1.0) for t in range(10)])
    # C w = z, row by row: the released noise is exactly C^-1 applied to the fresh draws.
    assert toeplitz(coefficients, 10) @ draws == pytest.approx(fresh, abs=1e-5)
    assert inverse_coefficients(coefficients, 10) @ fresh[::-1, 0] == pytest.approx(draws[-1, 0], abs=1e-5)


def test_most_of_the_noise_cancels_in_the_model_as_the_factorization_says() -> None:
    rounds, bands, size = 40, 8, 200_000
    coefficients = square_root_coefficients(bands)
    noise = BandedNoise(coefficients)
    randomness = SeededRandomness([3])
    model = np.zeros(size)
    for _ in range(rounds):
        model += noise.next(size, randomness)
    predicted = model_noise(coefficients, rounds)[-1]
    assert model.std() == pytest.approx(predicted, rel=0.01)
    # Fresh noise would have left sqrt(40) = 6.3 in the model; the banded noise leaves about 2.2.
    assert predicted < 0.4 * model_noise(None, rounds)[-1]
    b = np.tril(np.ones((rounds, rounds))) @ np.linalg.inv(toeplitz(coefficients, rounds))
    assert model_noise(coefficients, rounds) == pytest.approx(np.sqrt((b**2).sum(axis=1)), rel=1e-9)


def brute_sensitivity(coefficients: np.ndarray, rounds: list[int], horizon: int) -> float:
    """||C e_pi||: the worst shift of C x by a site whose clipped updates (norm 1) all point one way."""
    indicator = np.zeros(horizon)
    indicator[rounds] = 1.0
    return float(np.linalg.norm(toeplitz(coefficients, horizon) @ indicator))


@pytest.mark.parametrize("rounds", [[0], [0, 8, 16], [0, 3, 5], [2, 3]])
def test_a_sites_account_is_the_exact_sensitivity_of_its_rounds(rounds: list[int]) -> None:
    coefficients = square_root_coefficients(8)
    ledger = BandedLedger(coefficients, "pld", "poisson", 10, 1e-5)
    for release in range(max(rounds) + 1):
        ledger.record(2.0, ["a"] if release in rounds else [])
    expected = brute_sensitivity(coefficients, rounds, max(rounds) + 8)  # every column whole
    assert ledger.participations()["a"] == pytest.approx(expected**2, rel=1e-12)
    assert ledger.site_epsilons()["a"] == pytest.approx(gaussian_epsilon(expected**2 / 4.0, 1e-5, "pld"))


def test_a_site_sits_out_the_rounds_its_columns_would_overlap() -> None:
    ledger = BandedLedger(square_root_coefficients(3), "rdp", "poisson", 4, 1e-5)
    ledger.record(1.0, ["a", "b"])
    assert ledger.recent() == {"a", "b"}
    ledger.record(1.0, ["c"])
    assert ledger.recent() == {"a", "b", "c"}
    ledger.record(1.0, ["d"])  # three releases after a and b: their columns no longer overlap the next
    assert ledger.recent() == {"c", "d"}


def test_well_separated_rounds_cost_k_times_g0_and_the_worst_site_is_found() -> None:
    coefficients = square_root_coefficients(5)
    g0 = float(gram(coefficients)[0])
    ledger = BandedLedger(coefficients, "pld", "poisson", 3, 1e-5)
    for release in range(20):
        ledger.record(3.0, ["a"] if release % 5 == 0 else ["b"] if release % 10 == 1 else [])
    assert ledger.participations()["a"] == pytest.approx(4 * g0)
    worst = ledger.worst()
    assert worst.site == "a" and worst.rounds == 4
    assert worst.epsilon == pytest.approx(gaussian_epsilon(4 * g0 / 9.0, 1e-5, "pld"))
    # One more round for a (release 20 is 5 after its last): one more G(0).
    assert ledger.worst(3.0).epsilon == pytest.approx(gaussian_epsilon(5 * g0 / 9.0, 1e-5, "pld"))
    assert ledger.exhausted(3.0, ledger.worst(3.0).epsilon - 1e-9) == {"a"}


def test_an_attacker_who_knows_the_sample_does_no_better_than_the_accounted_gaussian() -> None:
    """The server knows which rounds the site took part in and sees every noised sum. Its best test
    (Neyman-Pearson: project C x-hat on the site's columns) separates "the site's updates all point along one
    coordinate" from "the site sent nothing" exactly as a Gaussian of the ledger's mu does, and no better."""
    bands, horizon, z = 6, 24, 1.5
    coefficients = square_root_coefficients(bands)
    rounds = [1, 7, 13, 19]
    ledger = BandedLedger(coefficients, "pld", "poisson", 100, 1e-5)
    for release in range(horizon):
        ledger.record(z, ["site"] if release in rounds else [])
    mu = math.sqrt(ledger.participations()["site"]) / z

    trials = 20_000
    c = toeplitz(coefficients, horizon)
    present = np.zeros(horizon)
    present[rounds] = 1.0  # the clipped update (norm 1) in the one direction the attack looks at
    direction = c @ present / np.linalg.norm(c @ present)
    scores = {}
    for world, x in (("in", present), ("out", np.zeros(horizon))):
        noise = BandedNoise(coefficients)
        released = np.stack(
            [x[t] + z * noise.next(trials, SeededRandomness([11, t, world == "in"])) for t in range(horizon)]
        )
        scores[world] = direction @ (c @ released)  # the server undoes C^-1: C x-hat = C x + z
    threshold = np.quantile(scores["out"], 0.99)
    tpr = float((scores["in"] > threshold).mean())
    bound = norm.sf(norm.isf(0.01) - mu)  # a Gaussian mechanism's best power at 1% false positives
    assert tpr == pytest.approx(bound, abs=0.02)
    # And the sites' columns really are what the attacker measures: the empirical shift is mu.
    assert (scores["in"].mean() - scores["out"].mean()) / scores["out"].std() == pytest.approx(mu, rel=0.03)


def test_default_bands_and_participations() -> None:
    assert default_bands(755, 50, 40) == 15
    assert default_bands(10, 50, 40) == 1
    assert default_bands(10_000, 10, 30) == 30
    assert max_participations(40, 15) == 3


def test_bad_factorizations_and_accounts_are_refused() -> None:
    with pytest.raises(ConfigError, match="whole number"):
        square_root_coefficients(0)
    ledger = BandedLedger(square_root_coefficients(2), "rdp", "poisson", 4, 1e-5)
    with pytest.raises(ConfigError, match="participants"):
        ledger.record(1.0, None)
    ledger.record(1.0, ["a"])
    with pytest.raises(ConfigError, match="one noise multiplier"):
        ledger.record(2.0, ["b"])
