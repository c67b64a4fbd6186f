"""Run one round of secure aggregation in this process, moving bytes between the state machines as a transport
would: every message is serialized with ``to_bytes``, decoded on the other side, and handed over with the
sender the "transport" knows. Sites run one after another; each party's time and bytes are counted per step.

This is the reference driver for the backends (a real transport replaces the loops below with its sends and
receives) and the workhorse of the tests and of ``benchmarks/secagg.py``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from confide.errors import ConfigError
from confide.privacy.secagg import keys
from confide.privacy.secagg.errors import SecAggAbort, SecAggError
from confide.privacy.secagg.messages import (
    SERVER,
    CommitmentBroadcast,
    ConsistencyRequest,
    KeyBroadcast,
    Message,
    Setup,
    ShareBroadcast,
    Step,
    UnmaskRequest,
    decode,
)
from confide.privacy.secagg.params import SecAggExpectation, SecAggParams
from confide.privacy.secagg.protocol import SecAggClient, SecAggResult, SecAggServer

T = TypeVar("T")


@dataclass
class StepCost:
    """Time and bytes of one step. A server message counts in the step it opens; the server's closing call
    (which builds the next step's messages) counts in the step it closes."""

    step: Step
    server_seconds: float = 0.0
    site_seconds: dict[str, float] = field(default_factory=dict)
    download_bytes: dict[str, int] = field(default_factory=dict)
    """Server -> site, per site."""
    upload_bytes: dict[str, int] = field(default_factory=dict)
    """Site -> server, per site."""

    @property
    def max_site_seconds(self) -> float:
        return max(self.site_seconds.values(), default=0.0)

    @property
    def mean_site_seconds(self) -> float:
        return float(np.mean(list(self.site_seconds.values()))) if self.site_seconds else 0.0


@dataclass
class Transcript:
    """What a simulated round cost, and what it gave the server."""

    steps: dict[Step, StepCost]
    result: SecAggResult
    refused: list[tuple[str, str]] = field(default_factory=list)
    """(site, reason) for each site whose message was refused or that gave up; it counted as dropped."""

    @property
    def server_seconds(self) -> float:
        return sum(s.server_seconds for s in self.steps.values())

    def site_seconds(self, site: str) -> float:
        return sum(s.site_seconds.get(site, 0.0) for s in self.steps.values())

    def site_bytes(self, site: str) -> tuple[int, int]:
        """(uploaded, downloaded) bytes of one site over the round."""
        up = sum(s.upload_bytes.get(site, 0) for s in self.steps.values())
        down = sum(s.download_bytes.get(site, 0) for s in self.steps.values())
        return up, down

    @property
    def server_bytes(self) -> tuple[int, int]:
        """(received, sent) bytes of the server over the round."""
        received = sum(sum(s.upload_bytes.values()) for s in self.steps.values())
        sent = sum(sum(s.download_bytes.values()) for s in self.steps.values())
        return received, sent


def run_round(
    vectors: Mapping[str, np.ndarray],
    params: SecAggParams,
    dropouts: Mapping[str, Step] | None = None,
    rng: np.random.Generator | None = None,
    *,
    round: int = 1,
) -> tuple[np.ndarray, Transcript]:
    """Securely sum ``vectors`` (site -> flat float32 vector) in one simulated round.

    ``dropouts[site] = step``: the site sends nothing from that step on (Step.MASKED_INPUT: it shared its
    keys, then vanished before sending its masked input; Step.ADVERTISE_KEYS ends the attempt, see
    ``session``). ``rng`` draws the server's public nonce; the session value, keys and masks come from the
    OS's randomness as always (so the graph differs from run to run). In the authenticated mode
    every site gets an Ed25519 identity, registered with the server and known to every site.

    Returns the decoded sum of the surviving sites' updates and the transcript. Raises SecAggAbort if the
    round cannot be unmasked.
    """
    dropouts = dict(dropouts or {})
    rng = rng if rng is not None else np.random.default_rng()
    sites = sorted(vectors)
    if len(sites) != params.sites:
        raise ConfigError(f"the parameters are for {params.sites} sites, but {len(sites)} vectors were given")
    unknown = set(dropouts) - set(sites)
    if unknown:
        raise ConfigError(f"dropouts name sites that are not in the round: {sorted(unknown)}")
    size = vectors[sites[0]].size
    identities = {s: keys.generate_identity() for s in sites} if params.authenticated else {}
    registry = {s: keys.identity_public_bytes(i) for s, i in identities.items()} if identities else None

    steps = {step: StepCost(step) for step in Step}
    refused: list[tuple[str, str]] = []
    clients: dict[str, SecAggClient] = {}

    def timed(cost: StepCost, site: str | None, work: Callable[..., T], *args: Any) -> T:
        started = time.perf_counter()
        out = work(*args)
        elapsed = time.perf_counter() - started
        if site is None:
            cost.server_seconds += elapsed
        else:
            cost.site_seconds[site] = cost.site_seconds.get(site, 0.0) + elapsed
        return out

    def exchange(
        step: Step, outgoing: Mapping[str, Message], answer: Callable[[str, bytes], Message]
    ) -> None:
        """Carry the server's messages of ``step`` to the sites and their answers back."""
        cost = steps[step]
        for site, message in outgoing.items():
            sent = timed(cost, None, message.to_bytes)
            cost.download_bytes[site] = len(sent)
            if site in dropouts and step >= dropouts[site]:
                continue
            try:
                reply = timed(cost, site, lambda *a: answer(*a).to_bytes(), site, sent)
            except SecAggError as e:  # the site gives up; for the server it has dropped
                refused.append((site, str(e)))
                continue
            cost.upload_bytes[site] = len(reply)
            try:
                timed(cost, None, lambda s, r: server.receive(s, decode(r)), site, reply)
            except SecAggAbort:
                raise
            except SecAggError as e:  # the server refused the message: the site has dropped
                refused.append((site, str(e)))

    def close(step: Step, work: Callable[[], Mapping[str, Message]]) -> Mapping[str, Message]:
        return timed(steps[step], None, work)

    server = SecAggServer(params, sites, round, size, nonce=rng.bytes(32), registry=registry)
    expect = SecAggExpectation.of(params, size)

    def commit(site: str, data: bytes) -> Message:
        clients[site] = SecAggClient(
            site,
            SERVER,
            Setup.from_bytes(data),
            expect=expect,
            identity=identities.get(site),
            registry=registry,
        )
        return clients[site].commit()

    setup = server.setup()
    exchange(Step.COMMIT, dict.fromkeys(sites, setup), commit)
    digests = close(Step.COMMIT, server.broadcast_commitments)
    exchange(
        Step.ADVERTISE_KEYS,
        digests,
        lambda site, data: clients[site].advertise_keys(SERVER, CommitmentBroadcast.from_bytes(data)),
    )
    broadcasts = close(Step.ADVERTISE_KEYS, server.broadcast_keys)
    exchange(
        Step.SHARE_KEYS,
        broadcasts,
        lambda site, data: clients[site].share_keys(SERVER, KeyBroadcast.from_bytes(data)),
    )
    forwarded = close(Step.SHARE_KEYS, server.forward_shares)
    exchange(
        Step.MASKED_INPUT,
        forwarded,
        lambda site, data: clients[site].masked_input(SERVER, ShareBroadcast.from_bytes(data), vectors[site]),
    )
    survivors = close(Step.MASKED_INPUT, server.request_consistency)
    exchange(
        Step.CONSISTENCY,
        survivors,
        lambda site, data: clients[site].confirm_survivors(SERVER, ConsistencyRequest.from_bytes(data)),
    )
    requests = close(Step.CONSISTENCY, server.request_unmasking)
    exchange(
        Step.UNMASKING,
        requests,
        lambda site, data: clients[site].unmask(SERVER, UnmaskRequest.from_bytes(data)),
    )
    result = timed(steps[Step.UNMASKING], None, server.finish)
    return result.vector, Transcript(steps=steps, result=result, refused=refused)
