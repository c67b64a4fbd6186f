"""The exceptions of secure aggregation: a refused message, a refused request, an abandoned round.

``MessageError`` is also an :class:`~confide.errors.UpdateError`: on the server it means that one site's
message was refused (that site is then treated as dropped), which is how the federation already handles a
malformed update. ``SecAggAbort`` concerns the whole round and is not an UpdateError on purpose: a caller that
skips bad sites must not skip an abandoned round by mistake.
"""

from __future__ import annotations

from confide.errors import ConfideError, UpdateError


class SecAggError(ConfideError):
    """Base class of the errors of secure aggregation."""


class MessageError(SecAggError, UpdateError):
    """A message was refused: malformed, out of order, replayed, forged, tampered with, or of the wrong size.

    ``sender`` names the party the message came from (as the transport authenticated it), so that the caller
    can drop that site from the round.
    """

    def __init__(self, message: str, sender: str | None = None) -> None:
        super().__init__(message)
        self.sender = sender


class MalformedMessage(MessageError):
    """Bytes that do not decode to a message: bad magic or version, truncated, too large, out of range."""


class UnmaskRefused(MessageError):
    """A site refused the server's unmasking request, because answering it could reveal a site's input."""


class SecAggAbort(SecAggError):
    """The round was abandoned: too few sites survived to unmask the sum, a committed site did not reveal
    its session contribution, or the unmasked sum could not be right; no sum is returned."""


class SumOutOfRange(SecAggAbort):
    """The unmasked sum lies outside what the survivors' clipped updates can add up to on some coordinate:
    a site sent a masked input that is not a masked, clipped update (or the sum wrapped around). The round
    is refused rather than passing a wrong sum on; ``coordinates`` counts the coordinates out of range."""

    def __init__(self, message: str, coordinates: int) -> None:
        super().__init__(message)
        self.coordinates = coordinates
