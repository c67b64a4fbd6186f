"""Fixtures of the runtime tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.runtime.grpc_harness import Cluster


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    """``cluster(config_text, overrides)``: a server and clients for that config, all killed at the end."""
    made: list[Cluster] = []

    def make(config_text: str, overrides: list[str] | None = None) -> Cluster:
        path = tmp_path / "run.toml"
        path.write_text(config_text)
        c = Cluster(tmp_path, path, tmp_path / "deploy", overrides)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()
