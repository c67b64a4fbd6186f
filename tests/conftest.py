"""Shared fixtures: a tiny federated data set on disk and a tiny run config, so runs take about a second."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

# The tests' models are tiny: one thread is faster than two fighting over small matrices, and results do not
# depend on how many cores the machine has.
torch.set_num_threads(1)

# The local backend's default is a worker process per core; the suite's hundreds of tiny runs are faster in
# one process (a run's workers cost more than its sites' training), and the results are the same.
# tests/runtime/test_local_workers.py runs the workers; this reaches `confide` subprocesses too.
os.environ.setdefault("CONFIDE_WORKERS", "1")

LINES = [
    "Now is the winter of our discontent made glorious summer by this sun of York;",
    "And all the clouds that lour'd upon our house in the deep bosom of the ocean buried.",
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer",
    "The slings and arrows of outrageous fortune, or to take arms against a sea of troubles.",
    "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him.",
    "If music be the food of love, play on; give me excess of it, that, surfeiting, the appetite may sicken.",
]


def write_corpus(root: Path) -> Path:
    """Six sites in ``root``, one .txt file each, with different mixes of the lines above (non-IID on
    purpose); the same corpus every time."""
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        picks = rng.choice(len(LINES), size=40, p=np.roll([0.5, 0.2, 0.1, 0.1, 0.05, 0.05], i))
        (root / f"site{i}.txt").write_text("\n".join(LINES[j] for j in picks) + "\n")
    return root


@pytest.fixture
def text_corpus(tmp_path: Path) -> Path:
    """The six sites of :func:`write_corpus`, for one test."""
    return write_corpus(tmp_path / "corpus")


def tiny_config(corpus: Path, output: Path, model: dict[str, str] | None = None, **extra: str) -> str:
    """A config that trains a 1-layer GPT on the corpus for a few rounds."""
    sections = {
        "run": {
            "name": "'tiny'",
            "output": repr(str(output)),
            "rounds": "4",
            "checkpoint_every": "2",
            "seed": "7",
        },
        "data": {"dataset": "'text'", "path": repr(str(corpus))},
        "model": {"kind": "'gpt'", "layers": "1", "heads": "2", "width": "32", "dropout": "0.1"},
        "client": {"max_steps": "3", "batch_size": "4", "optimizer": "'adam'", "learning_rate": "0.01"},
        "server": {"sites_per_round": "3", "optimizer": "'adam'", "learning_rate": "0.05"},
        "eval": {"every": "1", "samples": "1", "sample_length": "20", "prompt": "'To be'"},
        "backend": {"threads": "1"},
    }
    if model is not None:
        sections["model"] = model
    for key, value in extra.items():
        section, name = key.split("__")
        sections.setdefault(section, {})[name] = value
    return "".join(
        f"[{s}]\n" + "".join(f"{k} = {v}\n" for k, v in table.items()) for s, table in sections.items()
    )


@pytest.fixture
def tiny_config_path(tmp_path: Path, text_corpus: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(tiny_config(text_corpus, tmp_path / "runs"))
    return path
