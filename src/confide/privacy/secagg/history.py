"""What a site remembers between rounds: the survivor set it agreed to unmask, per (run, round).

If a server could unmask the same round twice over survivor sets that differ by one site w, with the same
inputs, the two sums would differ by w's input. A site therefore signs (and answers) at most one survivor set
per round of a run: once it has agreed to a set it refuses any other set for that round, in this attempt or a
later one, even after a restart of the site's process when the store is durable. The protocol keeps no I/O:
it reads and writes through :class:`SurvivorStore`, which a deployed site backs with its own database
(SQLite) and a simulation with :class:`MemorySurvivorStore`.
"""

from __future__ import annotations

from typing import Protocol


class SurvivorStore(Protocol):
    """Where a site keeps, per (run, round), the survivor set it agreed to unmask.

    ``put`` must never overwrite an entry that exists (an SQLite backing: ``INSERT OR IGNORE`` on a primary
    key (run, round)); the site reads the entry back after writing it, so two attempts at the same round
    racing each other cannot both win.
    """

    def get(self, run: str, round: int) -> tuple[str, ...] | None:
        """The sorted survivor set agreed to for ``round`` of ``run``, or None if there is none."""
        ...

    def put(self, run: str, round: int, survivors: tuple[str, ...]) -> None:
        """Remember ``survivors`` (sorted) for ``round`` of ``run``, unless an entry exists already."""
        ...


class MemorySurvivorStore:
    """A SurvivorStore in a dict: enough for one process's lifetime (simulations, tests)."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, int], tuple[str, ...]] = {}

    def get(self, run: str, round: int) -> tuple[str, ...] | None:
        return self._entries.get((run, round))

    def put(self, run: str, round: int, survivors: tuple[str, ...]) -> None:
        self._entries.setdefault((run, round), tuple(survivors))
