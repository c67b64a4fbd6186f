"""The enclave's core: sealed updates open only where they were sealed for, and only aggregates leave it."""

from __future__ import annotations

import numpy as np
import pytest

from confide.config import DefenceConfig
from confide.core import Update
from confide.errors import UpdateError
from confide.pipeline import RoundAbandoned
from confide.privacy.tee.attestation import SimulatedPlatform, SimulatedVerifier
from confide.privacy.tee.enclave import (
    Enclave,
    EnclaveSettings,
    associated_data,
    pack_update,
    seal,
    unpack_update,
)

SIZE = 5


def settings(**changes: object) -> EnclaveSettings:
    values: dict[str, object] = {
        "platform": "simulated",
        "run": "run",
        "update_size": SIZE,
        "aggregator": "mean",
        "defence": DefenceConfig(),
    }
    values.update(changes)
    return EnclaveSettings(**values)  # type: ignore[arg-type]


def update(site: str, round: int, values: list[float], examples: int = 1) -> Update:
    return Update(
        site,
        round,
        examples,
        np.array(values, dtype=np.float32),
        round - 1,
        metrics={"train_loss": 1.0},
        sums={"loss_sum": 2.0 * examples},
    )


def sealed(enclave: Enclave, report: bytes, u: Update, as_site: str | None = None, run: str = "run") -> bytes:
    """What a site seals: to the key the (verified) report binds, bound to run, round, site and report."""
    platform_key = enclave.platform.public_key()  # type: ignore[attr-defined]
    key = SimulatedVerifier(platform_key).verify(report, now=0).public_key
    return seal(pack_update(u), key, associated_data(run, u.round, as_site or u.site, report))


@pytest.fixture
def enclave() -> Enclave:
    return Enclave(settings(), SimulatedPlatform())


def test_the_enclave_releases_the_weighted_mean_and_sums(enclave: Enclave) -> None:
    report = enclave.open(1)
    a, b = update("a", 1, [1, 2, 3, 4, 5], 1), update("b", 1, [3, 2, 1, 0, -1], 3)
    enclave.submit(1, "a", sealed(enclave, report, a))
    enclave.submit(1, "b", sealed(enclave, report, b))
    summary = enclave.close(1)
    assert summary.accepted == ("a", "b") and summary.refused == ()
    assert summary.sums == {"examples": 4.0, "loss_sum": 8.0}
    np.testing.assert_allclose(enclave.release(1), (np.array(a.vector) + 3 * np.array(b.vector)) / 4)


def test_a_sealed_update_replayed_into_another_round_is_refused(enclave: Enclave) -> None:
    report = enclave.open(1)
    old = sealed(enclave, report, update("a", 1, [1] * SIZE))
    enclave.submit(1, "a", old)
    enclave.submit(1, "b", sealed(enclave, report, update("b", 1, [2] * SIZE)))
    enclave.close(1)
    enclave.release(1)
    enclave.open(2)
    with pytest.raises(UpdateError, match="does not open here"):
        enclave.submit(2, "a", old)


def test_a_sealed_update_replayed_into_a_retried_attempt_is_refused(enclave: Enclave) -> None:
    first = enclave.open(1)
    kept = sealed(enclave, first, update("a", 1, [1] * SIZE))
    enclave.open(1)  # the server restarts the round: a fresh report, and nothing of the first attempt
    with pytest.raises(UpdateError, match="does not open here"):
        enclave.submit(1, "a", kept)


def test_a_sealed_update_relabelled_as_another_site_is_refused(enclave: Enclave) -> None:
    report = enclave.open(1)
    from_a = sealed(enclave, report, update("a", 1, [1] * SIZE))
    with pytest.raises(UpdateError, match="does not open here"):
        enclave.submit(1, "b", from_a)
    # and a site that seals under another name than the update's is caught inside
    lying = sealed(enclave, report, update("a", 1, [1] * SIZE), as_site="c")
    with pytest.raises(UpdateError, match="names site 'a'"):
        enclave.submit(1, "c", lying)


def test_a_second_update_of_a_site_and_bad_updates_are_refused(enclave: Enclave) -> None:
    report = enclave.open(1)
    a = sealed(enclave, report, update("a", 1, [1] * SIZE))
    enclave.submit(1, "a", a)
    with pytest.raises(UpdateError, match="already has an update"):
        enclave.submit(1, "a", a)
    with pytest.raises(UpdateError, match="NaN"):
        enclave.submit(1, "b", sealed(enclave, report, update("b", 1, [np.nan] * SIZE)))
    with pytest.raises(UpdateError, match="values"):
        enclave.submit(1, "c", sealed(enclave, report, update("c", 1, [1.0] * (SIZE + 1))))
    with pytest.raises(UpdateError, match="does not open here"):
        enclave.submit(1, "d", b"\x01" + b"x" * 70)
    with pytest.raises(UpdateError, match="malformed"):
        enclave.submit(1, "f", b"\x01")
    enclave.submit(1, "e", sealed(enclave, report, update("e", 1, [3] * SIZE)))
    summary = enclave.close(1)
    assert summary.accepted == ("a", "e")
    assert [site for site, _ in summary.refused] == ["b", "c", "d", "f"]


def test_fewer_than_two_updates_are_never_released(enclave: Enclave) -> None:
    report = enclave.open(1)
    enclave.submit(1, "a", sealed(enclave, report, update("a", 1, [1] * SIZE)))
    with pytest.raises(RoundAbandoned, match="fewer than 2"):
        enclave.close(1)
    with pytest.raises(RoundAbandoned, match="no closed round"):
        enclave.release(1)
    with pytest.raises(ValueError):
        Enclave(settings(min_updates=1), SimulatedPlatform())


def test_a_round_is_released_once_and_never_reopened(enclave: Enclave) -> None:
    report = enclave.open(1)
    for site in "ab":
        enclave.submit(1, site, sealed(enclave, report, update(site, 1, [1] * SIZE)))
    enclave.close(1)
    enclave.release(1)
    with pytest.raises(RoundAbandoned, match="no closed round"):
        enclave.release(1)
    with pytest.raises(RoundAbandoned, match="already released round 1"):
        enclave.open(1)
    with pytest.raises(UpdateError, match="no open round 2"):
        enclave.submit(2, "a", b"")


def test_central_dp_inside_clips_and_adds_secret_noise() -> None:
    enclave = Enclave(settings(central_dp=(1.0, 0.0, 2.0)), SimulatedPlatform())
    report = enclave.open(1)
    enclave.submit(
        1, "a", sealed(enclave, report, update("a", 1, [30, 40, 0, 0, 0]))
    )  # norm 50, clipped to 1
    enclave.submit(1, "b", sealed(enclave, report, update("b", 1, [0, 0, 0, 0, 0])))
    enclave.close(1)
    np.testing.assert_allclose(enclave.release(1), [0.3, 0.4, 0, 0, 0], rtol=1e-5)  # sum / 2 sites, z = 0
    noisy = Enclave(settings(central_dp=(1.0, 1.0, 2.0)), SimulatedPlatform())
    report = noisy.open(1)
    for site in "ab":
        noisy.submit(1, site, sealed(noisy, report, update(site, 1, [0] * SIZE)))
    noisy.close(1)
    assert np.abs(noisy.release(1)).max() > 0  # the noise is drawn inside


def test_a_robust_aggregator_runs_inside() -> None:
    enclave = Enclave(settings(aggregator="median"), SimulatedPlatform())
    report = enclave.open(1)
    for site, value in zip("abc", [1.0, 2.0, 100.0], strict=True):
        enclave.submit(1, site, sealed(enclave, report, update(site, 1, [value] * SIZE)))
    enclave.close(1)
    np.testing.assert_array_equal(enclave.release(1), [2.0] * SIZE)


def test_packing_round_trips() -> None:
    u = update("a", 4, [1.5, -2, 3, 0, 7], 9)
    back = unpack_update(pack_update(u))
    assert (back.site, back.round, back.num_examples, back.sums, back.metrics) == (
        "a",
        4,
        9,
        u.sums,
        u.metrics,
    )
    np.testing.assert_array_equal(back.vector, u.vector)
