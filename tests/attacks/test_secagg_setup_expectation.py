"""Attack: a malicious server proposes a round whose parameters hurt the sites: two sites (the victim and the
server's sybil, so that the sum minus the sybil's input is the victim's), a clipping range of 10^6 with no
fractional bits, a lower threshold, another graph, the unauthenticated mode, another vector size.

Before the fix a site accepted any Setup whose parameters were merely well-formed: the two-site round with
R = 10^6 and f = 0 ran, and the server read the victim's input from the sum. Now each site holds a
SecAggExpectation from its own configuration and refuses any difference, naming it.
"""

from __future__ import annotations

import numpy as np
import pytest

from confide.privacy.secagg import (
    SERVER,
    MessageError,
    SecAggClient,
    SecAggExpectation,
    SecAggParams,
    SecAggServer,
)
from confide.privacy.secagg.keys import generate_identity, identity_public_bytes

SIZE = 16
EXPECT = SecAggExpectation(clip_range=1.0, fractional_bits=20, vector_size=SIZE, min_sites=5)
"""What the run's configuration gives every site: R = 1, f = 20, default graph and threshold, 5 sites or
more."""


def sites(n: int) -> list[str]:
    return [f"site{i:02d}" for i in range(n)]


def test_a_two_site_round_with_a_huge_range_and_no_fractional_bits_is_refused() -> None:
    server = SecAggServer(SecAggParams(sites=2, clip_range=1e6, fractional_bits=0), sites(2), 1, SIZE)
    with pytest.raises(
        MessageError, match="it has 2 sites, and this site's configuration requires at least 5"
    ):
        SecAggClient("site00", SERVER, server.setup(), expect=EXPECT)
    # Even where two-site rounds are allowed, R and f must be the configured ones.
    two = SecAggExpectation(clip_range=1.0, fractional_bits=20, vector_size=SIZE)
    with pytest.raises(MessageError, match=r"proposed clip range 1000000\.0 for 2 sites, but .* gives 1\.0"):
        SecAggClient("site00", SERVER, server.setup(), expect=two)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"clip_range": 2.0}, "clip range 2.0"),
        ({"fractional_bits": 8}, "fractional bits 8"),
        ({"threshold": 6}, "threshold 6"),  # the default for k = 8, where the run configured 7
        ({"threshold": 5}, "threshold 5"),  # a majority of 9
        ({"neighbours": 4, "threshold": 4}, "neighbours 4"),
        ({"neighbours": 9}, "neighbours 9"),  # the complete graph
    ],
)
def test_any_parameter_other_than_the_configured_one_is_refused(change: dict[str, float], named: str) -> None:
    expect = SecAggExpectation(
        clip_range=1.0, fractional_bits=20, vector_size=SIZE, neighbours=8, threshold=7
    )
    honest = SecAggParams(sites=10, neighbours=8, threshold=7)
    SecAggClient("site00", SERVER, SecAggServer(honest, sites(10), 1, SIZE).setup(), expect=expect)
    params = SecAggParams(**{"sites": 10, "neighbours": 8, "threshold": 7, **change})  # type: ignore[arg-type]
    setup = SecAggServer(params, sites(10), 1, SIZE).setup()
    with pytest.raises(MessageError, match=f"refusing the round's setup: the server proposed {named} "):
        SecAggClient("site00", SERVER, setup, expect=expect)


def test_another_vector_size_or_the_unauthenticated_mode_is_refused() -> None:
    setup = SecAggServer(SecAggParams(sites=6), sites(6), 1, SIZE + 1).setup()
    with pytest.raises(MessageError, match=f"vector size {SIZE + 1} for 6 sites, but .* gives {SIZE}"):
        SecAggClient("site00", SERVER, setup, expect=EXPECT)
    authenticated = SecAggExpectation(1.0, 20, SIZE, authenticated=True)
    plain = SecAggServer(SecAggParams(sites=6), sites(6), 1, SIZE).setup()
    identity = generate_identity()
    registry = {s: identity_public_bytes(identity) for s in sites(6)}
    with pytest.raises(MessageError, match="downgrade"):
        SecAggClient("site00", SERVER, plain, expect=authenticated, identity=identity, registry=registry)


def test_the_expected_setup_is_taken_and_its_defaults_follow_the_round_size() -> None:
    """The control: a Setup from a server configured like the site passes, at any round size from
    min_sites on (neighbours and threshold follow the size as the defaults say)."""
    for n in (5, 12, 40):
        setup = SecAggServer(SecAggParams(sites=n), sites(n), 1, SIZE).setup()
        client = SecAggClient("site00", SERVER, setup, expect=EXPECT)
        assert client.params == EXPECT.params(n)
        assert np.isclose(client.params.clip_range, 1.0)
