"""The `confide` command end to end, as a user runs it: a real subprocess on a tiny config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from confide.cli import main


def confide(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "confide.cli", *map(str, args)], capture_output=True, text=True, timeout=300
    )


def test_run_generate_report(tiny_config_path: Path, tmp_path: Path) -> None:
    result = confide("run", tiny_config_path, "--set", "run.rounds=3")
    assert result.returncode == 0, result.stderr
    assert "unigram baseline" in result.stdout
    assert result.stdout.count("accuracy") >= 3  # one summary line per evaluated round
    run_dir = tmp_path / "runs" / "tiny"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert {"round", "loss", "accuracy", "perplexity", "seconds", "bytes_sent", "bytes_received"} <= set(
            r
        )
        assert r["bytes_sent"] > 0 and r["bytes_received"] > 0
    assert (run_dir / "report.html").is_file()
    assert f"report: {run_dir / 'report.html'}" in result.stdout.replace("\n", "")

    generated = confide("generate", run_dir, "--prompt", "To be", "--length", "30", "--seed", "1")
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout.startswith("To be") and len(generated.stdout.rstrip("\n")) == 35
    assert (
        confide("generate", run_dir, "--prompt", "To be", "--length", "30", "--seed", "1").stdout
        == generated.stdout
    )

    (run_dir / "report.html").unlink()
    assert confide("report", run_dir).returncode == 0
    assert (run_dir / "report.html").is_file()


def test_config_error_is_one_clear_line(tiny_config_path: Path) -> None:
    result = confide("run", tiny_config_path, "--set", "client.batch_size=0")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: ConfigError: client.batch_size must be >= 1 (got 0)"
    assert "Traceback" not in result.stderr


def test_missing_data_is_a_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        f"[run]\noutput = '{tmp_path}'\n[data]\ndataset = 'text'\npath = '{tmp_path / 'absent'}'\n"
    )
    result = confide("run", config)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert str(tmp_path / "absent") in result.stderr and "DataError" in result.stderr


def test_main_returns_exit_codes(tiny_config_path: Path) -> None:
    assert main(["run", str(tiny_config_path), "--set", "server.optimizer=lamb"]) == 2


def test_resume_of_unknown_directory(tmp_path: Path) -> None:
    result = confide("run", "--resume", tmp_path)
    assert result.returncode == 2 and "is not a confide run directory" in result.stderr


def test_data_summary_of_user_text(text_corpus: Path) -> None:
    result = confide("data", "text", text_corpus)
    assert result.returncode == 0, result.stderr
    assert "6 sites" in result.stdout and "median" in result.stdout
