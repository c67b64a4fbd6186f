"""confide: federated training of generative models across sites that keep their data."""

from confide.errors import ConfideError, ConfigError, DataError, DivergedError, StoreError, UpdateError

__version__ = "0.1.0"

__all__ = [
    "ConfideError",
    "ConfigError",
    "DataError",
    "DivergedError",
    "StoreError",
    "UpdateError",
    "__version__",
]
