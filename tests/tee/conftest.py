"""Fixtures of the attested-aggregator tests: tiny runs, one round or two, with and without the enclave."""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from confide.config import Config, from_dict
from confide.runtime.runner import Runner
from tests.conftest import tiny_config

MakeConfig = Callable[..., Config]


@pytest.fixture
def make_config(text_corpus: Path, tmp_path: Path) -> MakeConfig:
    """``make_config(name, section__key="toml value", ...)``: the tiny config of two rounds, no evaluation."""

    def make(name: str, **extra: str) -> Config:
        options = {"run__rounds": "2", "eval__every": "100", "run__name": repr(name), **extra}
        return from_dict(tomllib.loads(tiny_config(text_corpus, tmp_path / "runs", **options)))

    return make


def run(config: Config) -> Runner:
    """A finished simulation of ``config`` (its store closed)."""
    runner = Runner.start(config)
    try:
        runner.run()
    finally:
        runner.store.close()
    return runner
