"""The simulation's virtual clock: how long a round would take on sites of different speeds, computed rather
than measured, so that it is the same on every machine and in every repeat.

Each site gets a profile once per run, drawn from the run's seed (simulation only, :data:`Stream.CLOCK`): a
compute speed, lognormal around 1 with ``backend.speed_sigma`` (a fraction ``backend.slow_fraction`` of the
sites are ``backend.slow_factor`` times slower still), and a one-way network delay, lognormal around
``backend.latency`` with the same sigma. A local step takes ``backend.step_seconds / speed``; a message takes
the site's delay plus its bytes over ``backend.bandwidth`` (megabytes per second; 0: unlimited). The local
backend (:mod:`confide.runtime.local`) advances the clock: a synchronous round lasts until its slowest site
has answered (download, local steps, upload), and each protocol step until its slowest site has answered;
evaluations are measurements and take no virtual time. An asynchronous run (:mod:`confide.runtime.buffered`)
reads the same clock, so wall time to an accuracy can be compared between the two exactly (Nguyen et al. 2022
compare FedBuff with synchronous FedAvg this way, on simulated site speeds).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from confide.randomness import Stream, public_rng

T = TypeVar("T")

MEGABYTE = 1_000_000


@dataclass(frozen=True)
class Profile:
    """One simulated site's speed: how fast it computes (1 is typical) and its one-way network delay."""

    speed: float
    latency: float


@dataclass(frozen=True)
class Speeds:
    """How site speeds are drawn (the ``[backend]`` settings of the virtual clock)."""

    step_seconds: float = 0.1
    sigma: float = 0.0
    slow_fraction: float = 0.0
    slow_factor: float = 10.0
    latency: float = 0.05
    bandwidth: float = 0.0
    """Megabytes per second; 0: unlimited."""

    def draw(self, sites: Sequence[str], seed: int) -> dict[str, Profile]:
        """Every site's profile, from the run's seed (the same sites get the same profiles in every run)."""
        rng = public_rng(seed, 0, Stream.CLOCK)
        n = len(sites)
        speed = rng.lognormal(0.0, self.sigma, n) if self.sigma > 0 else np.ones(n)
        slow = rng.random(n) < self.slow_fraction
        speed = np.where(slow, speed / self.slow_factor, speed)
        delay = self.latency * (rng.lognormal(0.0, self.sigma, n) if self.sigma > 0 else np.ones(n))
        return {site: Profile(float(s), float(d)) for site, s, d in zip(sites, speed, delay, strict=True)}


class VirtualClock:
    """Virtual seconds since the run began, and what each site's work costs on it."""

    def __init__(self, speeds: Speeds, sites: Sequence[str], seed: int) -> None:
        self.speeds = speeds
        self.profiles = speeds.draw(sites, seed)
        self.now = 0.0

    def transfer(self, site: str, size: int) -> float:
        """Seconds for one message of ``size`` bytes between the server and ``site``."""
        seconds = self.profiles[site].latency
        if self.speeds.bandwidth > 0:
            seconds += size / (self.speeds.bandwidth * MEGABYTE)
        return seconds

    def compute(self, site: str, steps: float) -> float:
        """Seconds ``site`` takes for ``steps`` local steps."""
        return steps * self.speeds.step_seconds / self.profiles[site].speed

    def advance(self, seconds: float) -> None:
        """Move the clock on by ``seconds`` (a step that all its sites finished within that time)."""
        self.now += max(seconds, 0.0)

    def reach(self, moment: float) -> None:
        """Move the clock on to ``moment``, if that is later than now."""
        self.now = max(self.now, moment)


class ReadyQueue(Generic[T]):
    """Asynchronous rounds in a simulation: each started site's answer, ready at its moment on the clock."""

    def __init__(self, clock: VirtualClock) -> None:
        self.clock = clock
        self._heap: list[tuple[float, int, T, int]] = []
        self._order = itertools.count()

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, site: str, answer: T, sent: int, steps: float, size: int, began: float) -> None:
        """``site``'s ``answer``, of ``size`` bytes, ready after it was sent ``sent`` bytes at ``began``,
        trained ``steps`` steps and uploaded its answer."""
        clock = self.clock
        working = clock.transfer(site, sent) + clock.compute(site, steps)
        moment = began + working + clock.transfer(site, size)
        heapq.heappush(self._heap, (moment, next(self._order), answer, size))

    def pop(self) -> tuple[T, int] | None:
        """The answer ready first and its size; the clock moves on to its moment. None when none is left."""
        if not self._heap:
            return None
        moment, _, answer, size = heapq.heappop(self._heap)
        self.clock.reach(moment)
        return answer, size
