"""Attack: one site sends, instead of a masked clipped update, one with 2^(b-2) added to a coordinate, so
that the sum in Z_(2^b) wraps around and decodes to a wrong value far outside what clipped updates give.

Before the fix the server decoded whatever the sum was: here -8.0 on a coordinate whose clipped updates add
up to at most 5, passed on as the round's aggregate. Now a sum outside [-|S| R, |S| R] on any coordinate is
refused with SumOutOfRange, whose message the caller records.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from confide.privacy.secagg import SERVER, SumOutOfRange
from tests.privacy.secagg.conftest import Driver

EVIL = "site04"


def run_with_a_tampered_input(driver: Driver, added: dict[int, int]) -> np.ndarray:
    """A round in which the evil site adds ``added[i]`` to coordinate i of its masked input."""
    forwarded = driver.share(driver.advertise())
    for site, message in forwarded.items():
        masked = driver.clients[site].masked_input(SERVER, message, driver.vectors[site])
        if site == EVIL:
            vector = masked.vector.copy()
            for i, value in added.items():
                vector[i] = (int(vector[i]) + value) & driver.params.fixed_point.mask
            masked = dataclasses.replace(masked, vector=vector)
        driver.server.collect_masked_input(site, masked)
    requests = driver.confirm(driver.server.request_consistency())
    return driver.unmask(requests).vector


def test_a_sum_wrapped_by_one_site_is_refused() -> None:
    driver = Driver(5, 16)  # R = 1, f = 20: M = 2^20, b = 24
    fixed = driver.params.fixed_point
    assert fixed.modulus_bits == 24
    for site in driver.sites:
        driver.vectors[site][0] = 1.0  # the honest four add 4 M on coordinate 0
    driver.vectors[EVIL][0] = 0.0
    # 4 M + 2^22 = 2^23 = 2^(b-1): one past the largest positive value, so it wraps to -2^23 = -8 M.
    with pytest.raises(
        SumOutOfRange, match=r"outside \[-5 R, 5 R\] on 1 of 16 coordinates \(the first at index 0\)"
    ) as caught:
        run_with_a_tampered_input(driver, {0: 1 << (fixed.modulus_bits - 2)})
    assert caught.value.coordinates == 1
    assert driver.server.stage == "failed"


def test_a_shifted_sum_within_the_range_still_passes() -> None:
    """The control, and the limit the docstring states: a sum that |S| clipped updates could reach is
    taken, even when one site added 3 R to a coordinate where every update is 0 (any site can shift a sum
    within the range, as with any bad update: secure aggregation hides the updates that would show it)."""
    driver = Driver(5, 16)
    for site in driver.sites:
        driver.vectors[site][0] = 1.0
        driver.vectors[site][1] = 0.0
    total = run_with_a_tampered_input(driver, {1: 3 << 20})
    assert (total[0], total[1]) == (5.0, 3.0)
