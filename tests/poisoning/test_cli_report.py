"""A simulated backdoor run as a user runs it: the display, metrics.jsonl and the report show the attack."""

from __future__ import annotations

import json
from pathlib import Path

from tests.test_cli import confide


def test_a_backdoor_run_shows_its_attack_everywhere(tiny_config_path: Path, tmp_path: Path) -> None:
    result = confide(
        "run", tiny_config_path, "--set", "run.rounds=2", "--set", "attack.kind=backdoor",
        "--set", "attack.sites=2", "--set", "attack.probes=8",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "simulated attack: backdoor by 2 of 6 sites" in result.stdout
    assert result.stdout.count("backdoor: attack success") == 2
    run_dir = tmp_path / "runs" / "tiny"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all({"attack_success", "attack_char_accuracy", "attackers"} <= set(r) for r in rows)
    page = (run_dir / "report.html").read_text()
    assert "Backdoor attack success (greedy" in page
    assert "Backdoor attack success and main-task accuracy per round" in page  # the figure
