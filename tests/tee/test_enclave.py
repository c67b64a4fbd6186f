"""The enclave's core: sealed updates open only where they were sealed for, and only aggregates leave it."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from confide.config import DefenceConfig
from confide.core import Update
from confide.errors import UpdateError
from confide.pipeline import RoundAbandoned
from confide.privacy.secagg import keys
from confide.privacy.tee.attestation import SimulatedPlatform, SimulatedVerifier
from confide.privacy.tee.enclave import (
    Enclave,
    EnclaveSettings,
    associated_data,
    pack_update,
    seal,
    sign_update,
    unpack_update,
)

SIZE = 5


class Identities(dict):  # type: ignore[type-arg]
    """Each site's enrolled identity, made the first time the site is named."""

    def __missing__(self, site: str) -> Ed25519PrivateKey:
        self[site] = keys.generate_identity()
        return self[site]


IDENTITIES = Identities()


class Registry(dict):  # type: ignore[type-arg]
    """The enclave's registry: every site of IDENTITIES, with its public key."""

    def get(self, site: str, default: object = None) -> object:
        return keys.identity_public_bytes(IDENTITIES[site])


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
    signed = sign_update(u, IDENTITIES[u.site], run)
    return seal(signed, key, associated_data(run, u.round, as_site or u.site, report))


@pytest.fixture
def enclave() -> Enclave:
    return Enclave(settings(), SimulatedPlatform(), registry=Registry())


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
    # and an update sealed under another site's name is caught inside: c's name, a's signature
    lying = sealed(enclave, report, update("a", 1, [1] * SIZE), as_site="c")
    with pytest.raises(UpdateError, match="not signed by its enrolled identity"):
        enclave.submit(1, "c", lying)


def test_a_server_that_makes_up_updates_cannot_isolate_one_sites_update(enclave: Enclave) -> None:
    """The attack: the server knows the enclave's public key (it is in the report) and can seal anything. With
    one real update and made-up ones of known values, the released mean would give the real one away. Each
    made-up update lacks its site's signature and is refused, without locking the real site out; one real
    update alone is never released."""

    def forge(report: bytes, round: int, site: str) -> list[bytes]:
        platform_key = enclave.platform.public_key()  # type: ignore[attr-defined]
        key = SimulatedVerifier(platform_key).verify(report, now=0).public_key
        aad = associated_data("run", round, site, report)
        signed_by_another = sign_update(update(site, round, [0] * SIZE), keys.generate_identity(), "run")
        unsigned = pack_update(update(site, round, [0] * SIZE)) + bytes(64)
        return [seal(signed_by_another, key, aad), seal(unsigned, key, aad)]

    report = enclave.open(1)
    enclave.submit(1, "a", sealed(enclave, report, update("a", 1, [7] * SIZE)))
    for fake in forge(report, 1, "b"):
        with pytest.raises(UpdateError, match="not signed by its enrolled identity"):
            enclave.submit(1, "b", fake)
    enclave.submit(1, "b", sealed(enclave, report, update("b", 1, [3] * SIZE)))  # the real b still counts
    assert enclave.close(1).accepted == ("a", "b")
    enclave.release(1)

    report = enclave.open(2)
    enclave.submit(2, "a", sealed(enclave, report, update("a", 2, [7] * SIZE)))
    for fake in forge(report, 2, "c"):
        with pytest.raises(UpdateError):
            enclave.submit(2, "c", fake)
    with pytest.raises(RoundAbandoned, match="fewer than 2"):
        enclave.close(2)


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
        Enclave(settings(min_updates=1), SimulatedPlatform(), registry=Registry())


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
    enclave = Enclave(settings(central_dp=(1.0, 0.0, 2.0)), SimulatedPlatform(), registry=Registry())
    report = enclave.open(1)
    enclave.submit(
        1, "a", sealed(enclave, report, update("a", 1, [30, 40, 0, 0, 0]))
    )  # norm 50, clipped to 1
    enclave.submit(1, "b", sealed(enclave, report, update("b", 1, [0, 0, 0, 0, 0])))
    enclave.close(1)
    np.testing.assert_allclose(enclave.release(1), [0.3, 0.4, 0, 0, 0], rtol=1e-5)  # sum / 2 sites, z = 0
    noisy = Enclave(settings(central_dp=(1.0, 1.0, 2.0)), SimulatedPlatform(), registry=Registry())
    report = noisy.open(1)
    for site in "ab":
        noisy.submit(1, site, sealed(noisy, report, update(site, 1, [0] * SIZE)))
    noisy.close(1)
    assert np.abs(noisy.release(1)).max() > 0  # the noise is drawn inside


def test_a_robust_aggregator_runs_inside() -> None:
    enclave = Enclave(settings(aggregator="median"), SimulatedPlatform(), registry=Registry())
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
