"""Attack: a malicious server unmasks one round twice, the second time leaving one site w out of the survivor
set. The inputs are the same (the same model and data give the same update), so sum(S) - sum(S - {w}) is
w's input.

Before the fix every attempt at a round started afresh, so a second attempt in which the server ignored w's
masked input unmasked the smaller sum, and the difference gave w's input exactly. Now each site remembers,
per (run, round), the survivor set it agreed to (SurvivorStore, durable at a deployed site) and refuses any
other set for that round.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from confide.privacy.secagg import (
    SERVER,
    MemorySurvivorStore,
    MessageError,
    SecAggAbort,
    UnmaskRefused,
    UnmaskRequest,
)
from tests.privacy.secagg.conftest import ROUND, Driver

SITES, TARGET = 6, "site03"


def second_attempt_without(target: str, stores: dict[str, MemorySurvivorStore]) -> np.ndarray | None:
    """Attempt 2 at the same round, same inputs, the target's masked input ignored: the smaller sum, or None
    if the sites refuse it."""
    again = Driver(SITES, 16, stores=stores)
    requests = again.mask(again.share(again.advertise()), skip={target})
    refused = 0
    for site, request in requests.items():
        try:
            again.server.collect_consistency(site, again.clients[site].confirm_survivors(SERVER, request))
        except UnmaskRefused as e:
            assert "a second time over a different survivor set" in str(e) and target in str(e)
            refused += 1
    if refused:
        assert refused == len(requests)  # every site remembers
        with pytest.raises(SecAggAbort, match="fewer than the threshold"):
            again.server.request_unmasking()
        return None
    return again.unmask(again.server.request_unmasking()).encoded_sum


def test_a_round_is_not_unmasked_again_over_a_set_one_site_smaller() -> None:
    stores = {s: MemorySurvivorStore() for s in Driver(SITES).sites}  # each site's own store
    first = Driver(SITES, 16, stores=stores)
    whole = first.run().encoded_sum
    assert second_attempt_without(TARGET, stores) is None
    # The first sum alone says nothing about the target beyond the sum.
    assert not np.array_equal(whole, first.expected_sum([TARGET]))


def test_the_attack_is_real_against_a_site_that_forgets() -> None:
    """The control: sites without a store that outlives the attempt (as before the fix) answer both, and
    the difference of the sums is the target's input, exactly."""
    whole = Driver(SITES, 16).run().encoded_sum
    fresh = {s: MemorySurvivorStore() for s in Driver(SITES).sites}
    smaller = second_attempt_without(TARGET, fresh)
    assert smaller is not None
    driver = Driver(SITES, 16)
    fixed = driver.params.fixed_point
    difference = (whole.astype(np.uint64) - smaller.astype(np.uint64)) & np.uint64(fixed.mask)
    assert np.array_equal(difference, driver.expected_sum([TARGET]))


def test_within_one_attempt_a_second_unmasking_request_is_refused() -> None:
    driver = Driver(SITES, 16)
    requests = driver.until_unmasking()
    client = driver.clients["site00"]
    client.unmask(SERVER, requests["site00"])
    smaller = tuple(s for s in requests["site00"].survivors if s != TARGET)
    for survivors in (requests["site00"].survivors, smaller):
        again = UnmaskRequest(sender=SERVER, round=ROUND, survivors=survivors)
        with pytest.raises(MessageError, match="while at the done stage"):
            client.unmask(SERVER, again)
    # And a request straight to a new attempt's site, skipping the consistency step, is out of order.
    skipping = Driver(SITES, 16)
    skipping.mask(skipping.share(skipping.advertise()))
    request = dataclasses.replace(requests["site01"], survivors=smaller)
    with pytest.raises(MessageError, match="while at the consistency stage"):
        skipping.clients["site01"].unmask(SERVER, request)
