"""benchmarks/llm_lora.py runs its whole recipe (base, federated, local-only) on a tiny saved model on CPU."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import tomli_w

ROOT = Path(__file__).resolve().parents[2]


def test_the_lora_benchmark_runs_on_a_tiny_model(tmp_path: Path, llama_dir: Path, instructions: Path) -> None:
    # The demo's recipe, with less work per site so that the test stays short.
    recipe = tomllib.loads((ROOT / "examples" / "llm-lora.toml").read_text())
    recipe["client"].update(epochs=1, max_steps=1)
    recipe["eval"].update(max_new_tokens=4)
    config = tmp_path / "recipe.toml"
    config.write_text(tomli_w.dumps(recipe))
    result = subprocess.run(
        [
            *(sys.executable, "benchmarks/llm_lora.py", "--model", llama_dir, "--data", instructions),
            *("--config", config, "--rounds", "1", "--output", tmp_path),
        ],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    rows = ("base", "local-only adapters (mean site)", "federated adapter", "adapter / full", "FlowerTune")
    assert all(row in result.stdout for row in rows)
    assert (tmp_path / "federated" / "run.sqlite").is_file()
