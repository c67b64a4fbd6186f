"""The protocol end to end: exact sums with and without dropouts, abandoned rounds, and every refusal."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
from scipy.stats import chisquare

from confide.errors import ConfigError, UpdateError
from confide.privacy.secagg import (
    SERVER,
    AdvertiseKeys,
    MaskedInput,
    MemorySurvivorStore,
    MessageError,
    SecAggAbort,
    SecAggClient,
    SecAggExpectation,
    SecAggParams,
    Setup,
    ShareKeys,
    Step,
    UnmaskRefused,
    UnmaskRequest,
    run_round,
)
from confide.privacy.secagg.common import Stage
from confide.privacy.secagg.keys import generate, generate_identity, public_bytes
from confide.privacy.secagg.messages import AdvertisedKeys
from tests.privacy.secagg.conftest import ROUND, Driver

# Two graphs: the complete graph of Bonawitz et al. (n = 10, t = 7) and a SecAgg+ graph (n = 16, k = 8,
# t = 6). Up to n - t (complete) or k + 1 - t (SecAgg+) sites may drop in ANY pattern: every site that must
# be unmasked keeps at least t holders of its shares.
GRAPHS = {"complete": (10, 0, 3), "secagg+": (16, 8, 3)}
# Where sites may drop without ending the attempt: anywhere but between committing and revealing (step 2).
STEPS = [Step.COMMIT, Step.SHARE_KEYS, Step.MASKED_INPUT, Step.CONSISTENCY, Step.UNMASKING]


def vectors_for(sites: int, size: int = 200, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"site{i:02d}": rng.uniform(-1, 1, size).astype(np.float32) for i in range(sites)}


def exact_encoded_sum(params: SecAggParams, vectors: dict[str, np.ndarray], sites: list[str]) -> np.ndarray:
    """The fixed-point encodings of ``sites`` summed as Python integers, reduced mod 2^b."""
    fixed = params.fixed_point
    total = sum(fixed.signed(fixed.encode(vectors[s])).astype(object) for s in sites)
    return np.array([int(v) % (1 << fixed.modulus_bits) for v in total], dtype=np.uint64)


@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize(
    "step",
    [None, *STEPS, "early", "late"],
    ids=["none", "commit", "share", "masked", "consistency", "unmasking", "early", "late"],
)
def test_unmasked_sum_is_the_exact_sum_of_the_encoded_updates(graph: str, step: Step | str | None) -> None:
    sites, neighbours, most = GRAPHS[graph]
    params = SecAggParams(sites=sites, neighbours=neighbours)
    assert params.complete == (graph == "complete")
    vectors = vectors_for(sites)
    rng = np.random.default_rng(1)
    gone = sorted(rng.choice(sorted(vectors), size=most, replace=False)) if step else []
    # "early" and "late": one site drops at each of three steps.
    where = {"early": STEPS[:3], "late": STEPS[2:]}.get(str(step), [step] * len(gone))
    dropouts = dict(zip(gone, where, strict=True))
    total, transcript = run_round(vectors, params, dropouts, rng)
    # A site that vanishes after sending its masked input is in the sum.
    summed = sorted(s for s in vectors if dropouts.get(s, Step.UNMASKING) > Step.MASKED_INPUT)
    result = transcript.result
    assert list(result.survivors) == summed
    assert np.array_equal(result.encoded_sum.astype(np.uint64), exact_encoded_sum(params, vectors, summed))
    assert transcript.refused == []
    # And the float sum it decodes to is within n * 2^-f of the float sum.
    float_sum = np.sum([vectors[s].astype(np.float64) for s in summed], axis=0)
    assert total.dtype == np.float32
    assert np.abs(total - float_sum).max() <= len(summed) * 2.0**-params.fractional_bits


def test_updates_outside_the_range_are_clipped_and_counted() -> None:
    driver = Driver(4, 8, clip_range=0.5)
    driver.vectors["site00"][:3] = [3.0, -7.0, 0.25]
    result = driver.run()
    expected = sum(np.clip(driver.vectors[s].astype(np.float64), -0.5, 0.5) for s in driver.sites)
    assert np.abs(result.vector - expected).max() <= 4 * 2.0**-20
    assert driver.clients["site00"].clipped == 2 + int((np.abs(driver.vectors["site00"][3:]) > 0.5).sum())


@pytest.mark.parametrize("step", [Step.MASKED_INPUT, Step.CONSISTENCY, Step.UNMASKING])
def test_fewer_than_t_survivors_abandon_the_round(step: Step) -> None:
    params = SecAggParams(sites=10)  # complete graph, t = 7: four may not drop
    vectors = vectors_for(10)
    dropouts = dict.fromkeys(sorted(vectors)[:4], step)
    with pytest.raises(SecAggAbort, match=re.escape(f"abandoned at {step.label}")):
        run_round(vectors, params, dropouts, np.random.default_rng(0))


def test_a_site_missing_between_commit_and_reveal_ends_the_attempt() -> None:
    driver = Driver(10)
    digests = driver.commit()
    with pytest.raises(SecAggAbort, match=r"'site03' committed to a session contribution but did not reveal"):
        driver.advertise(digests, skip={"site03"})


def test_an_abandoned_round_reveals_nothing_and_takes_nothing_more() -> None:
    driver = Driver(10)
    requests = driver.until_unmasking()
    responders = list(requests)[:6]  # t = 7 are needed
    with pytest.raises(SecAggAbort, match=r"fewer than the threshold t = 7 .* nothing was revealed"):
        driver.unmask(requests, skip=set(requests) - set(responders))
    # The server kept neither the masked sum nor any share, and will not be talked into going on.
    assert driver.server._total is None and not driver.server._self_shares and not driver.server._key_shares
    with pytest.raises(SecAggAbort):
        driver.server.finish()
    late = driver.clients[list(requests)[7]].unmask(SERVER, requests[list(requests)[7]])
    with pytest.raises(SecAggAbort, match="abandoned"):
        driver.server.collect_unmask(list(requests)[7], late)


def test_a_hollowed_out_neighbourhood_abandons_a_secagg_plus_round() -> None:
    driver = Driver(16, neighbours=4)  # t = 4 of each site's 5 holders
    broadcasts = driver.advertise()
    victim = "site05"
    gone = set(sorted(driver.server.graph[victim])[:2])
    with pytest.raises(SecAggAbort, match=f"'{victim}' \\(3 of 5\\)"):
        driver.share(broadcasts, skip=gone)


def test_a_single_masked_update_looks_uniform() -> None:
    """Chi-square over the bytes of one masked update whose input is a constant (the least random input there
    is): with 32-bit words every byte value should be equally frequent. The unmasked encoding, as a control,
    is nowhere near uniform, so the test can tell."""
    driver = Driver(4, 50_000, clip_range=256.0)  # M = 2^28, n * M = 2^30: b = 32, so bytes are uniform
    assert driver.params.fixed_point.modulus_bits == 32
    driver.vectors["site00"][:] = 0.5
    forwarded = driver.share(driver.advertise())
    masked = (
        driver.clients["site00"].masked_input(SERVER, forwarded["site00"], driver.vectors["site00"]).vector
    )
    counts = np.bincount(np.frombuffer(masked.tobytes(), dtype=np.uint8), minlength=256)
    # Masks come from keys drawn from the OS's randomness, not a seed: the bar is set where a right mask fails
    # by chance once in 10^6 runs, and the control below misses it by far.
    assert chisquare(counts).pvalue > 1e-6
    plain = driver.params.fixed_point.encode(driver.vectors["site00"])
    control = np.bincount(np.frombuffer(plain.tobytes(), dtype=np.uint8), minlength=256)
    assert chisquare(control).pvalue < 1e-9


def test_a_masked_update_is_uniform_in_a_smaller_ring_too() -> None:
    driver = Driver(4, 50_000)  # defaults: b = 24, values in [0, 2^24)
    bits = driver.params.fixed_point.modulus_bits
    driver.vectors["site01"][:] = -0.25
    forwarded = driver.share(driver.advertise())
    masked = (
        driver.clients["site01"].masked_input(SERVER, forwarded["site01"], driver.vectors["site01"]).vector
    )
    assert int(masked.max()) < 2**bits
    for byte in (masked >> (bits - 8), masked & 0xFF):  # the top and the bottom 8 bits
        assert chisquare(np.bincount(byte.astype(np.int64), minlength=256)).pvalue > 1e-6  # OS randomness


def test_a_tampered_or_misdelivered_ciphertext_is_refused_naming_its_sender() -> None:
    driver = Driver(5)
    forwarded = driver.share(driver.advertise())
    message = forwarded["site01"]
    origin, sealed = message.shares[0]
    flipped = sealed[:20] + bytes([sealed[20] ^ 1]) + sealed[21:]
    tampered = dataclasses.replace(message, shares=((origin, flipped), *message.shares[1:]))
    client = driver.clients["site01"]
    with pytest.raises(MessageError, match=f"shares from site '{origin}' failed authentication"):
        client.masked_input(SERVER, tampered, driver.vectors["site01"])
    # A ciphertext meant for site02, handed to site03 as if from the same sender: the AES-GCM associated data
    # names the receiver, so it does not open.
    sender = next(s for s, _ in forwarded["site02"].shares if s != "site03")
    for_two = dict(forwarded["site02"].shares)[sender]
    message = forwarded["site03"]
    moved = dataclasses.replace(
        message, shares=tuple((s, for_two if s == sender else c) for s, c in message.shares)
    )
    with pytest.raises(MessageError, match=f"shares from site '{sender}' failed authentication"):
        driver.clients["site03"].masked_input(SERVER, moved, driver.vectors["site03"])


def test_wrong_length_vectors_are_refused_on_both_sides() -> None:
    driver = Driver(4, 10)
    forwarded = driver.share(driver.advertise())
    client = driver.clients["site00"]
    with pytest.raises(UpdateError, match="vectors of 10 values; the update has 9"):
        client.masked_input(SERVER, forwarded["site00"], np.zeros(9, dtype=np.float32))
    with pytest.raises(UpdateError, match="flat float32"):
        client.masked_input(SERVER, forwarded["site00"], np.zeros(10, dtype=np.float64))
    with pytest.raises(UpdateError, match="NaN or infinite"):
        client.masked_input(SERVER, forwarded["site00"], np.full(10, np.nan, dtype=np.float32))
    # The failed attempts left the site where it was: the right vector still goes through.
    good = client.masked_input(SERVER, forwarded["site00"], driver.vectors["site00"])
    short = dataclasses.replace(good, vector=good.vector[:9])
    with pytest.raises(MessageError, match="masked vector of 9 values; this round's vectors have 10"):
        driver.server.collect_masked_input("site00", short)
    wide = dataclasses.replace(good, vector=good.vector.astype(np.uint64))
    with pytest.raises(MessageError, match="uint64; this round's are 32-bit"):
        driver.server.collect_masked_input("site00", wide)
    driver.server.collect_masked_input("site00", good)


def test_replayed_and_out_of_order_messages_are_refused() -> None:
    driver = Driver(5)
    server = driver.server
    committed = driver.clients["site00"].commit()
    server.collect_commitment("site00", committed)
    with pytest.raises(MessageError, match="already sent its message for step 1"):
        server.collect_commitment("site00", committed)
    with pytest.raises(MessageError, match="for round 2, but this is round 3 \\(a replay\\?\\)"):
        server.collect_commitment("site01", dataclasses.replace(committed, sender="site01", round=ROUND - 1))
    with pytest.raises(MessageError, match="marked step 2 \\(advertise keys\\), but the round is at step 1"):
        server.collect_commitment(
            "site01", dataclasses.replace(committed, sender="site01", step=Step.ADVERTISE_KEYS)
        )
    with pytest.raises(MessageError, match="another site's commitment"):
        server.collect_commitment("site01", dataclasses.replace(committed, sender="site01"))
    early = MaskedInput(sender="site01", round=ROUND, vector=np.zeros(64, dtype=np.uint32))
    with pytest.raises(MessageError, match="out of order"):
        server.receive("site01", early)
    commitments = {s: driver.clients[s].commit() for s in driver.sites[1:]}
    for s, message in commitments.items():
        server.collect_commitment(s, message)
    digests = server.broadcast_commitments()
    with pytest.raises(MessageError, match="too late"):
        server.collect_commitment("site01", commitments["site01"])
    # On the site's side: the same message twice, and a message of a later step first.
    client = driver.clients["site02"]
    client.advertise_keys(SERVER, digests["site02"])
    with pytest.raises(MessageError, match="got a CommitmentBroadcast while at the share keys stage"):
        client.advertise_keys(SERVER, digests["site02"])
    request = UnmaskRequest(sender=SERVER, round=ROUND, survivors=("site02",))
    with pytest.raises(MessageError, match="got a UnmaskRequest while at the share keys stage"):
        client.unmask(SERVER, request)
    with pytest.raises(MessageError, match="already committed"):
        client.commit()
    # The server cannot skip the consistency step.
    skipping = Driver(5)
    skipping.mask(skipping.share(skipping.advertise()))
    skipping.server._stage = Stage.MASK  # as if request_consistency had not been called
    with pytest.raises(MessageError, match="must run the consistency step"):
        skipping.server.request_unmasking()


def test_a_site_cannot_speak_for_another() -> None:
    driver = Driver(5)
    server = driver.server
    forged = driver.clients["site00"].commit()
    with pytest.raises(MessageError, match="site 'site01' sent a message that claims to come from 'site00'"):
        server.collect_commitment("site01", forged)
    with pytest.raises(MessageError, match="not a site of round 3"):
        server.collect_commitment("mallory", dataclasses.replace(forged, sender="mallory"))
    # Nor speak for the server: a site-to-site "server message" is refused by the receiving site.
    server.collect_commitment("site00", forged)
    digests = driver.commit(skip={"site00"})
    broadcasts = driver.advertise(digests)
    with pytest.raises(MessageError, match="got a server message from 'site03'"):
        driver.clients["site02"].share_keys("site03", broadcasts["site02"])
    with pytest.raises(MessageError, match="claims to come from 'site03'"):
        driver.clients["site02"].share_keys(
            SERVER, dataclasses.replace(broadcasts["site02"], sender="site03")
        )
    # A site that did not commit cannot come back later.
    late = Driver(5)
    late.advertise(late.commit(skip={"site04"}))
    with pytest.raises(MessageError, match="site 'site04' dropped out before step 3"):
        late.server.collect_shares("site04", ShareKeys(sender="site04", round=ROUND, shares=()))


def test_a_low_order_public_key_or_a_wrong_reveal_is_refused() -> None:
    driver = Driver(4)
    digests = driver.commit()
    message = driver.clients["site00"].advertise_keys(SERVER, digests["site00"])
    with pytest.raises(MessageError, match="site 'site00' advertised an invalid X25519 public key"):
        driver.server.collect_advertise("site00", dataclasses.replace(message, mask_key=bytes(32)))
    with pytest.raises(MessageError, match="contribution that does not match its commitment"):
        driver.server.collect_advertise("site00", dataclasses.replace(message, contribution=bytes(32)))
    driver.server.collect_advertise("site00", message)


def test_authenticated_round_sums_exactly() -> None:
    driver = Driver(6, authenticated=True)
    result = driver.run()
    assert np.array_equal(result.encoded_sum.astype(np.uint64), driver.expected_sum(driver.sites))


def substitute_mask_key(
    broadcast_keys: tuple[AdvertisedKeys, ...], victim: str
) -> tuple[AdvertisedKeys, ...]:
    """What a man-in-the-middle server does: put its own public key in place of the victim's."""
    attacker = public_bytes(generate())
    return tuple(dataclasses.replace(k, mask_key=attacker) if k.site == victim else k for k in broadcast_keys)


def test_a_server_substituting_a_key_is_caught_in_the_authenticated_mode() -> None:
    driver = Driver(5, authenticated=True)
    broadcasts = driver.advertise()
    message = broadcasts["site00"]
    forged = dataclasses.replace(message, keys=substitute_mask_key(message.keys, "site01"))
    with pytest.raises(MessageError, match="keys advertised for site 'site01' do not carry its signature"):
        driver.clients["site00"].share_keys(SERVER, forged)
    # Without authentication the same substitution goes unnoticed: that is what the mode is for.
    plain = Driver(5)
    message = plain.advertise()["site00"]
    plain.clients["site00"].share_keys(
        SERVER, dataclasses.replace(message, keys=substitute_mask_key(message.keys, "site01"))
    )


def test_keys_signed_by_the_wrong_identity_or_downgraded_rounds_are_refused() -> None:
    driver = Driver(4, authenticated=True)
    impostor = SecAggClient(
        "site01",
        SERVER,
        driver.setup,
        expect=driver.expect,
        identity=generate_identity(),
        registry=driver.registry,
    )
    driver.server.collect_commitment("site01", impostor.commit())
    digests = driver.commit(skip={"site01"})
    with pytest.raises(MessageError, match="do not carry the signature of its registered identity"):
        driver.server.collect_advertise("site01", impostor.advertise_keys(SERVER, digests["site01"]))
    unauthenticated = Driver(4).setup
    with pytest.raises(MessageError, match="downgrade"):
        SecAggClient(
            "site01",
            SERVER,
            unauthenticated,
            expect=driver.expect,
            identity=driver.identities["site01"],
            registry=driver.registry,
        )


def test_a_site_answers_only_for_the_survivor_set_it_signed() -> None:
    driver = Driver(6)
    requests = driver.until_unmasking()
    client = driver.clients["site00"]
    honest = requests["site00"]
    # Without site01 the answer would hold site01's mask-key share; the site gave it as a survivor before.
    other = dataclasses.replace(honest, survivors=tuple(s for s in honest.survivors if s != "site01"))
    with pytest.raises(UnmaskRefused, match="not the one this site agreed to in the consistency step"):
        client.unmask(SERVER, other)
    # Having refused, the site is out of the round: not even the honest request gets an answer now.
    with pytest.raises(MessageError, match="failed stage"):
        client.unmask(SERVER, honest)


def test_a_site_refuses_survivor_sets_that_cannot_unmask_the_sum() -> None:
    driver = Driver(6)  # complete graph, t = 4
    requests = driver.mask(driver.share(driver.advertise()))
    few = dataclasses.replace(requests["site01"], survivors=("site01", "site02", "site03"))
    with pytest.raises(UnmaskRefused, match="only 3 of its neighbourhood are said to survive"):
        driver.clients["site01"].confirm_survivors(SERVER, few)
    not_me = dataclasses.replace(requests["site02"], survivors=("site00", "site01", "site03", "site04"))
    with pytest.raises(UnmaskRefused, match="does not count this site"):
        driver.clients["site02"].confirm_survivors(SERVER, not_me)
    unsorted = dataclasses.replace(requests["site03"], survivors=requests["site03"].survivors[::-1])
    with pytest.raises(MessageError, match="must be sorted"):
        driver.clients["site03"].confirm_survivors(SERVER, unsorted)


def test_a_wrong_share_from_a_holder_is_caught_when_the_mask_key_is_rebuilt() -> None:
    driver = Driver(6)
    requests = driver.confirm(driver.mask(driver.share(driver.advertise()), skip={"site05"}))
    for s, request in requests.items():
        response = driver.clients[s].unmask(SERVER, request)
        if s == "site00":
            ((v, share),) = response.mask_key_shares
            # (Not the lowest bits: X25519 ignores the three lowest bits of a private key.)
            bad = share[:10] + bytes([share[10] ^ 0xFF]) + share[11:]
            response = dataclasses.replace(response, mask_key_shares=((v, bad),))
        driver.server.collect_unmask(s, response)
    # Keys come from the OS's randomness: the wrong share either rebuilds a key that does not match the one
    # site05 advertised, or (when the result does not even fit in 32 bytes) no key at all. Both abort.
    with pytest.raises(
        SecAggAbort,
        match=r"mask key of dropped site 'site05'.*does not match|shares of site 'site05' are inconsistent",
    ):
        driver.server.finish()


def test_a_site_refuses_a_setup_it_cannot_trust() -> None:
    driver = Driver(6)
    setup, expect = driver.setup, driver.expect
    weak = dataclasses.replace(setup, threshold=3)  # half of the 6 holders: two halves could unmask a site
    with pytest.raises(MessageError, match="refusing the round's setup: threshold must be more than half"):
        SecAggClient("site00", SERVER, weak, expect=expect)
    with pytest.raises(MessageError, match="include this site 'site99'"):
        SecAggClient("site99", SERVER, setup, expect=expect)
    with pytest.raises(MessageError, match="expects round 4"):
        SecAggClient("site00", SERVER, setup, expect=expect, expected_round=4)
    with pytest.raises(MessageError, match="not from the server"):
        SecAggClient("site00", "site01", setup, expect=expect)
    assert isinstance(setup, Setup)


def test_a_key_broadcast_that_is_not_the_graph_is_refused() -> None:
    driver = Driver(16, neighbours=4)
    broadcasts = driver.advertise()
    message = broadcasts["site00"]
    thin = dataclasses.replace(message, keys=message.keys[:2])
    with pytest.raises(MessageError, match="but the neighbours of 'site00' in this round's graph are"):
        driver.clients["site00"].share_keys(SERVER, thin)
    # Keys of sites that are not its neighbours, passed off as neighbours', are refused as well.
    stranger = next(s for s in driver.sites if s != "site01" and s not in driver.server.graph["site01"])
    other = broadcasts[stranger].keys
    swapped = dataclasses.replace(broadcasts["site01"], keys=other)
    with pytest.raises(MessageError, match="but the neighbours of 'site01'"):
        driver.clients["site01"].share_keys(SERVER, swapped)


def test_transcript_counts_the_bytes_of_each_message() -> None:
    params = SecAggParams(sites=5)
    vectors = vectors_for(5, size=1000)
    _, transcript = run_round(vectors, params, {}, np.random.default_rng(0))
    masked = transcript.steps[Step.MASKED_INPUT].upload_bytes
    header = MaskedInput(sender="site00", round=1, vector=np.zeros(0, dtype=np.uint32)).nbytes
    # Packed at b bits: 5 sites of M = 2^20 need b = bit_length(5 * 2^20) + 1 = 24, so 3 bytes a value.
    assert params.fixed_point.modulus_bits == 24
    assert masked == dict.fromkeys(vectors, header + 3 * 1000)
    received, sent = transcript.server_bytes
    assert received == sum(transcript.site_bytes(s)[0] for s in vectors)
    assert sent == sum(transcript.site_bytes(s)[1] for s in vectors)
    assert all(transcript.steps[Step.MASKED_INPUT].site_seconds[s] > 0 for s in vectors)
    advertise = AdvertiseKeys(
        sender="site00", round=1, cipher_key=bytes(32), mask_key=bytes(32), contribution=bytes(32)
    )
    assert transcript.steps[Step.ADVERTISE_KEYS].upload_bytes["site00"] == advertise.nbytes


def test_a_retry_of_a_round_over_the_same_survivor_set_is_answered() -> None:
    """A site refuses a second survivor set for a round it has agreed to, but a new attempt at the round
    (new keys, new session) over the same set is answered: that is an honest retry, and its sum is the
    same one the server could already have."""
    stores = {s: MemorySurvivorStore() for s in Driver(5).sites}
    first = Driver(5, stores=stores).run()
    second = Driver(5, stores=stores).run()
    assert np.array_equal(first.encoded_sum, second.encoded_sum)
    assert all(store.get("run", ROUND) == first.survivors for store in stores.values())
    # Another run, or another round, is a new key: nothing carries over.
    assert (
        stores["site00"].get("another run", ROUND) is None and stores["site00"].get("run", ROUND + 1) is None
    )


def test_survivor_stores_never_overwrite_an_agreed_set() -> None:
    store = MemorySurvivorStore()
    store.put("run", 1, ("a", "b", "c"))
    store.put("run", 1, ("a", "b"))
    assert store.get("run", 1) == ("a", "b", "c")


def test_an_expectation_resolves_defaults_as_the_server_does() -> None:
    expect = SecAggExpectation(clip_range=0.5, fractional_bits=16, vector_size=8, neighbours=6, threshold=6)
    assert expect.params(5) == SecAggParams(5, 4, 5, 0.5, 16)  # k capped to n - 1, t to k + 1
    assert expect.params(30) == SecAggParams(30, 6, 6, 0.5, 16)
    assert SecAggExpectation(1.0, 20, 8).params(100) == SecAggParams(100)
    with pytest.raises(ConfigError, match="min_sites must be between 2"):
        SecAggExpectation(1.0, 20, 8, min_sites=1)
    with pytest.raises(ConfigError, match="vector size must be at least 1"):
        SecAggExpectation(1.0, 20, 0)


def test_unmasking_needs_t_valid_signatures_of_the_neighbourhood_over_the_set() -> None:
    driver = Driver(6, authenticated=True)  # t = 4
    requests = driver.until_unmasking()
    request = requests["site00"]
    assert len(request.signatures) == 6
    few = dataclasses.replace(request, signatures=request.signatures[:3])
    with pytest.raises(UnmaskRefused, match="only 3 of its neighbourhood signed the survivor set"):
        driver.clients["site00"].unmask(SERVER, few)
    (signer, signature), *rest = requests["site01"].signatures
    bad = dataclasses.replace(
        requests["site01"], signatures=((signer, signature[:-1] + bytes([signature[-1] ^ 1])), *rest)
    )
    with pytest.raises(MessageError, match=f"signature of '{signer}' on the survivor set does not verify"):
        driver.clients["site01"].unmask(SERVER, bad)
    # The server checks each signature as it arrives, against its own registry.
    other = Driver(6, authenticated=True)
    consistency = other.mask(other.share(other.advertise()))
    answer = other.clients["site02"].confirm_survivors(SERVER, consistency["site02"])
    with pytest.raises(MessageError, match="did not sign the survivor set"):
        other.server.collect_consistency("site02", dataclasses.replace(answer, signature=bytes(64)))
