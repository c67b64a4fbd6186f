"""A round driven step by step, so that tests can drop, replay, tamper with or forge any message."""

from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np

from confide.privacy.secagg import (
    SERVER,
    CommitmentBroadcast,
    ConsistencyRequest,
    KeyBroadcast,
    SecAggClient,
    SecAggExpectation,
    SecAggParams,
    SecAggResult,
    SecAggServer,
    ShareBroadcast,
    SurvivorStore,
    UnmaskRequest,
)
from confide.privacy.secagg.keys import generate_identity, identity_public_bytes

ROUND = 3


class Driver:
    """One server and n clients of one round; each method runs a step for the sites not in ``skip`` (which
    drop out at that step) and returns what the server sends next."""

    def __init__(
        self,
        sites: int,
        size: int = 64,
        *,
        neighbours: int = 0,
        threshold: int = 0,
        authenticated: bool = False,
        seed: int = 0,
        stores: Mapping[str, SurvivorStore] | None = None,
        **params: float,
    ) -> None:
        self.params = SecAggParams(
            sites=sites, neighbours=neighbours, threshold=threshold, authenticated=authenticated, **params
        )
        self.sites = [f"site{i:02d}" for i in range(sites)]
        rng = np.random.default_rng(seed)
        self.vectors = {s: rng.uniform(-1, 1, size).astype(np.float32) for s in self.sites}
        self.identities = {s: generate_identity() for s in self.sites} if authenticated else {}
        self.registry = {s: identity_public_bytes(i) for s, i in self.identities.items()} or None
        self.expect = SecAggExpectation.of(self.params, size, run="run")
        self.masked: dict[str, np.ndarray] = {}
        """Each masked input the server took, as a server would keep it (the attack tests use them)."""
        self.server = SecAggServer(
            self.params, self.sites, ROUND, size, nonce=rng.bytes(32), registry=self.registry
        )
        self.setup = self.server.setup()
        self.clients = {
            s: SecAggClient(
                s,
                SERVER,
                self.setup,
                expect=self.expect,
                identity=self.identities.get(s),
                registry=self.registry,
                store=(stores or {}).get(s),
            )
            for s in self.sites
        }

    def commit(self, skip: Collection[str] = ()) -> dict[str, CommitmentBroadcast]:
        for s in self.sites:
            if s not in skip:
                self.server.collect_commitment(s, self.clients[s].commit())
        return self.server.broadcast_commitments()

    def advertise(
        self, digests: Mapping[str, CommitmentBroadcast] | None = None, skip: Collection[str] = ()
    ) -> dict[str, KeyBroadcast]:
        """Step 2 (after step 1 for every site when ``digests`` is None)."""
        for s, message in (self.commit() if digests is None else digests).items():
            if s not in skip:
                self.server.collect_advertise(s, self.clients[s].advertise_keys(SERVER, message))
        return self.server.broadcast_keys()

    def share(
        self, broadcasts: Mapping[str, KeyBroadcast], skip: Collection[str] = ()
    ) -> dict[str, ShareBroadcast]:
        for s, message in broadcasts.items():
            if s not in skip:
                self.server.collect_shares(s, self.clients[s].share_keys(SERVER, message))
        return self.server.forward_shares()

    def mask(
        self, forwarded: Mapping[str, ShareBroadcast], skip: Collection[str] = ()
    ) -> dict[str, ConsistencyRequest]:
        for s, message in forwarded.items():
            if s not in skip:
                masked = self.clients[s].masked_input(SERVER, message, self.vectors[s])
                self.masked[s] = masked.vector.copy()
                self.server.collect_masked_input(s, masked)
        return self.server.request_consistency()

    def confirm(
        self, requests: Mapping[str, ConsistencyRequest], skip: Collection[str] = ()
    ) -> dict[str, UnmaskRequest]:
        for s, message in requests.items():
            if s not in skip:
                self.server.collect_consistency(s, self.clients[s].confirm_survivors(SERVER, message))
        return self.server.request_unmasking()

    def unmask(self, requests: Mapping[str, UnmaskRequest], skip: Collection[str] = ()) -> SecAggResult:
        for s, message in requests.items():
            if s not in skip:
                self.server.collect_unmask(s, self.clients[s].unmask(SERVER, message))
        return self.server.finish()

    def until_unmasking(self) -> dict[str, UnmaskRequest]:
        return self.confirm(self.mask(self.share(self.advertise())))

    def run(self) -> SecAggResult:
        return self.unmask(self.until_unmasking())

    def expected_sum(self, survivors: Collection[str]) -> np.ndarray:
        """The exact sum of the survivors' fixed-point encodings, in Z_(2^b), computed in Python integers."""
        fixed = self.params.fixed_point
        total = sum(fixed.signed(fixed.encode(self.vectors[s])).astype(object) for s in survivors)
        return np.array([int(v) % (1 << fixed.modulus_bits) for v in total], dtype=np.uint64)
