"""State a site keeps between rounds: SCAFFOLD's control variate, Ditto's personal model, FedRep's head.

This state belongs to the site, never to the server. A deployed site keeps it in its own store; in
simulation the backend keeps every site's state in the run store, tagged with the round that wrote it, so
that a resumed run rewinds it together with the global model and recomputes exactly what an uninterrupted
run computes.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from confide.core import Vector


class SiteState(Protocol):
    """Per-site named vectors that survive from one round to the next."""

    def get(self, site: str, key: str) -> Vector | None:
        """The latest vector ``key`` of ``site``, or None if the site has not stored one yet."""
        ...

    def put(self, site: str, key: str, round: int, vector: Vector) -> None:
        """Store ``vector`` as ``key`` of ``site``, written in round ``round``."""
        ...


class MemorySiteState:
    """Site state in a dictionary: for library use and tests that need no run directory."""

    def __init__(self) -> None:
        self._data: dict[tuple[str, str], tuple[int, Vector]] = {}

    def get(self, site: str, key: str) -> Vector | None:
        entry = self._data.get((site, key))
        return None if entry is None else entry[1]

    def put(self, site: str, key: str, round: int, vector: Vector) -> None:
        self._data[(site, key)] = (round, np.array(vector, dtype=np.float32, copy=True))

    def keys(self) -> list[tuple[str, str]]:
        return sorted(self._data)
