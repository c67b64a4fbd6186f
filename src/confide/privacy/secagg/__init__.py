"""Secure aggregation (Bonawitz et al. 2017) over a sparse neighbour graph (SecAgg+, Bell et al. 2020).

The server learns the sum of the sites' updates and nothing else about any one of them. The primitives
(``shamir``, ``prg``, ``keys``, ``session``, ``fixedpoint``, ``graph``) are apart from the protocol
(``protocol``: the threat model; ``client`` and ``server``: one state machine per party; ``messages``: what
they exchange; ``params``: what they agree on; ``history``: what a site remembers between rounds), which is
apart from any transport (``simulate`` moves the messages in this process; the backends move the same bytes
over their own channels).
"""

from confide.privacy.secagg.errors import (
    MalformedMessage,
    MessageError,
    SecAggAbort,
    SecAggError,
    SumOutOfRange,
    UnmaskRefused,
)
from confide.privacy.secagg.fixedpoint import FixedPoint
from confide.privacy.secagg.graph import default_neighbours, neighbour_graph
from confide.privacy.secagg.history import MemorySurvivorStore, SurvivorStore
from confide.privacy.secagg.messages import (
    SERVER,
    AdvertisedKeys,
    AdvertiseKeys,
    Commitment,
    CommitmentBroadcast,
    ConsistencyRequest,
    ConsistencyResponse,
    KeyBroadcast,
    MaskedInput,
    Message,
    Setup,
    ShareBroadcast,
    ShareKeys,
    Step,
    UnmaskRequest,
    UnmaskResponse,
    decode,
)
from confide.privacy.secagg.params import SecAggExpectation, SecAggParams, default_threshold
from confide.privacy.secagg.protocol import SecAggClient, SecAggResult, SecAggServer
from confide.privacy.secagg.simulate import StepCost, Transcript, run_round

__all__ = [
    "SERVER",
    "AdvertiseKeys",
    "AdvertisedKeys",
    "Commitment",
    "CommitmentBroadcast",
    "ConsistencyRequest",
    "ConsistencyResponse",
    "FixedPoint",
    "KeyBroadcast",
    "MalformedMessage",
    "MaskedInput",
    "MemorySurvivorStore",
    "Message",
    "MessageError",
    "SecAggAbort",
    "SecAggClient",
    "SecAggError",
    "SecAggExpectation",
    "SecAggParams",
    "SecAggResult",
    "SecAggServer",
    "Setup",
    "ShareBroadcast",
    "ShareKeys",
    "Step",
    "StepCost",
    "SumOutOfRange",
    "SurvivorStore",
    "Transcript",
    "UnmaskRefused",
    "UnmaskRequest",
    "UnmaskResponse",
    "decode",
    "default_neighbours",
    "default_threshold",
    "neighbour_graph",
    "run_round",
]
