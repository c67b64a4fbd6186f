"""Secure aggregation (Bonawitz et al. 2017) over a sparse neighbour graph (SecAgg+, Bell et al. 2020).

The server learns the sum of the sites' updates and nothing else about any one of them. The primitives
(``shamir``, ``prg``, ``keys``, ``fixedpoint``, ``graph``) are apart from the protocol (``protocol``: one
state machine per party; ``messages``: what they exchange), which is apart from any transport (``simulate``
moves the messages in this process; the backends move the same bytes over their own channels).
"""

from confide.privacy.secagg.errors import (
    MalformedMessage,
    MessageError,
    SecAggAbort,
    SecAggError,
    UnmaskRefused,
)
from confide.privacy.secagg.fixedpoint import FixedPoint
from confide.privacy.secagg.graph import default_neighbours, neighbour_graph
from confide.privacy.secagg.messages import (
    SERVER,
    AdvertisedKeys,
    AdvertiseKeys,
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
from confide.privacy.secagg.params import SecAggParams
from confide.privacy.secagg.protocol import SecAggClient, SecAggResult, SecAggServer
from confide.privacy.secagg.simulate import StepCost, Transcript, run_round

__all__ = [
    "SERVER",
    "AdvertiseKeys",
    "AdvertisedKeys",
    "FixedPoint",
    "KeyBroadcast",
    "MalformedMessage",
    "MaskedInput",
    "Message",
    "MessageError",
    "SecAggAbort",
    "SecAggClient",
    "SecAggError",
    "SecAggParams",
    "SecAggResult",
    "SecAggServer",
    "Setup",
    "ShareBroadcast",
    "ShareKeys",
    "Step",
    "StepCost",
    "Transcript",
    "UnmaskRefused",
    "UnmaskRequest",
    "UnmaskResponse",
    "decode",
    "default_neighbours",
    "neighbour_graph",
    "run_round",
]
