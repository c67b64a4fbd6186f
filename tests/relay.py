"""A backend that passes every call to another: the base of the tests' spies and attackers, which override
only the calls they watch or change (``train``, ``evaluate``)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from confide.core import Plan, SiteEvaluation, Task, Traffic, Update, Vector
from confide.runtime.federation import Backend, Ready


class Relay:
    def __init__(self, inner: Backend) -> None:
        self.inner = inner

    def sites(self) -> Sequence[str]:
        return self.inner.sites()

    def train(self, weights: Vector, tasks: Sequence[Task]) -> Iterator[Update]:
        return self.inner.train(weights, tasks)

    def evaluate(
        self, weights: Vector, sites: Sequence[str], plan: Plan | None = None
    ) -> Iterator[SiteEvaluation]:
        return self.inner.evaluate(weights, sites, plan)

    def exchange(self, messages: Mapping[str, bytes]) -> Iterator[tuple[str, bytes]]:
        return self.inner.exchange(messages)

    def traffic(self) -> Traffic:
        return self.inner.traffic()

    def now(self) -> float:
        return self.inner.now()

    def start(self, weights: Vector, task: Task) -> None:
        """Asynchronous rounds (an inner backend without them raises AttributeError, as it would)."""
        self.inner.start(weights, task)  # type: ignore[attr-defined]

    def next_ready(self) -> Ready | None:
        return self.inner.next_ready()  # type: ignore[attr-defined, no-any-return]

    def close(self) -> None:
        self.inner.close()
