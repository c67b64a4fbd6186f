"""confide: federated training of generative models across sites that keep their data."""

import os

# torch computes each operation on a team of OpenMP threads that, by default, spin while they wait for one
# another. When another program holds one of the cores, the spinning thread keeps the core from the thread
# it waits for, and a training step takes ten times as long (measured: benchmarks/RESULTS.md, "A busy
# machine"). Waiting threads that sleep give that core back. It must be set before torch is imported; a
# value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
