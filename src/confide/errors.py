"""The exceptions confide raises on purpose.

Every one of them carries a message meant for the person running confide: what is wrong, and what to do about
it. The command line prints a ``ConfideError`` as one line and exits non-zero; anything else is a bug and
shows its traceback.
"""

from __future__ import annotations


class ConfideError(Exception):
    """Base class of every error confide raises for a user to read."""


class ConfigError(ConfideError):
    """A configuration value is missing, of the wrong type, out of range, or impossible with another."""


class DataError(ConfideError):
    """A data set is missing, unreadable, or not in the expected shape."""


class UpdateError(ConfideError):
    """A site's update is malformed: wrong size, wrong type, non-finite values, or from the wrong round."""


class DivergedError(ConfideError):
    """Training diverged: the global model's held-out loss is no longer a finite number."""


class StoreError(ConfideError):
    """A run directory is missing, damaged, or does not belong to the run being resumed."""


class DeploymentError(ConfideError):
    """A deployment cannot go on: missing certificates, a refused site, a server that cannot be reached."""


class WireError(ConfideError):
    """A message on the wire is malformed, truncated, oversized, or of a version this side does not speak."""


class AttestationError(ConfideError):
    """An attestation report that does not prove what it must: a bad signature or certificate chain, an
    expired or replayed report, or a measurement that is not the expected one."""
