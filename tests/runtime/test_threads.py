"""A simulation trains on one torch thread unless backend.threads says otherwise (benchmarks/busy.py: with a
thread per core, the demo's rounds took 3.4x as long when another program took a core)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from confide import config
from confide.runtime.runner import SIMULATION_THREADS, Runner


@pytest.fixture
def two_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def threads_of(path: Path, *overrides: str) -> int:
    runner = Runner.start(config.load(path, list(overrides)))
    runner.close()
    return torch.get_num_threads()


def test_a_simulation_takes_one_thread_unless_told(tiny_config_path: Path, two_threads: None) -> None:
    assert threads_of(tiny_config_path, "backend.threads=0", "run.name='one'") == SIMULATION_THREADS == 1
    assert threads_of(tiny_config_path, "backend.threads=2", "run.name='two'") == 2
