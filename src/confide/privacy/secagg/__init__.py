"""Secure aggregation (Bonawitz et al. 2017) over a sparse neighbour graph (SecAgg+, Bell et al. 2020).

The server learns the sum of the sites' updates and nothing else about any one of them. The primitives
(``shamir``, ``prg``, ``keys``, ``fixedpoint``, ``graph``) are kept apart from the protocol, which is kept
apart from any transport.
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
    "SecAggError",
    "SecAggParams",
    "Setup",
    "ShareBroadcast",
    "ShareKeys",
    "Step",
    "UnmaskRefused",
    "UnmaskRequest",
    "UnmaskResponse",
    "decode",
    "default_neighbours",
    "neighbour_graph",
]
