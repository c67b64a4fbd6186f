"""The `confide` command end to end, as a user runs it: a real subprocess on a tiny config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
    # Piped output is not wrapped at 80 columns: the long lines come whole.
    assert f"report: {run_dir / 'report.html'}\n" in result.stdout
    header = next(line for line in result.stdout.splitlines() if "model with" in line)
    assert len(header) > 80 and header.endswith("3 rounds"), header

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


def test_config_lists_one_option_a_record_when_piped(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config"]) == 0  # captured: not a terminal
    lines = capsys.readouterr().out.splitlines()
    at = lines.index("run.seed = 0")
    meaning = "seed of every random choice: site sampling, initial weights, shuffling, dropout"
    assert lines[at + 1] == f"    {meaning}"
    assert "privacy.mechanism = 'dp-fedavg'" in lines


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


@pytest.mark.parametrize("rounds", ["synchronous", "fedbuff"])
def test_a_run_with_secure_aggregation_and_distributed_dp_prints_its_spend(
    tiny_config_path: Path, tmp_path: Path, rounds: str
) -> None:
    privacy = ["privacy.secure_aggregation=true", "privacy.dp=distributed", "privacy.noise_multiplier=2"]
    if rounds == "fedbuff":
        privacy.append("server.strategy=fedbuff")
    result = confide("run", tiny_config_path, *[a for p in privacy for a in ("--set", p)], "--no-report")
    assert result.returncode == 0, result.stderr
    out = result.stdout.replace("\n", " ")
    assert "site-level DP (distributed: each site adds its share)" in out
    assert out.count("sites in the sum") == 4  # a line per round with its bytes and epsilon
    if rounds == "fedbuff":
        assert "asynchronous (FedBuff): 6 sites training at once, 4 buffers of 3 updates" in out
        assert out.count("buffer ") == 4 and "none stale" in out  # a line per buffer, the first fresh
    rows = [
        json.loads(line) for line in (tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()
    ]
    assert all(r["epsilon"] > 0 for r in rows) and rows[-1]["epsilon"] > rows[0]["epsilon"]
    assert f"site-level epsilon {rows[-1]['epsilon']:.3f}" in out


def test_audit_canaries_command(tiny_config_path: Path, tmp_path: Path) -> None:
    result = confide(
        "audit",
        "canaries",
        tiny_config_path,
        "--set",
        "privacy.dp=central",
        "--set",
        "run.rounds=2",
        "--canaries",
        "2",
        "--repeats",
        "3",
        "--candidates",
        "40",
    )
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "runs" / "tiny-audit"
    summary = json.loads((folder / "canaries.json").read_text())
    for secret in (c["secret"] for c in summary["runs"][0]["canaries"]):
        assert secret in result.stdout  # the table names every planted secret
    assert "Training without DP" in result.stdout and "Training with DP" in result.stdout
    assert "Canaries" in (folder / "audit.html").read_text()
    refused = confide("audit", "canaries", tiny_config_path)
    assert refused.returncode == 2 and "set privacy.dp = 'central'" in refused.stderr


def test_audit_inversion_and_membership_commands_share_one_page(
    tiny_config_path: Path, tmp_path: Path
) -> None:
    inversion = confide(
        "audit",
        "inversion",
        tiny_config_path,
        *("--batch-sizes", "1", "--steps", "1", "--views", "none,secagg", "--sites-summed", "3"),
        *("--iterations", "2", "--discrete", "2", "--sequential-batch", "0"),
    )
    assert inversion.returncode == 0, inversion.stderr
    assert "Gradient inversion of site" in inversion.stdout and "secagg" in inversion.stdout
    assert "give --run RUN_DIR" in inversion.stdout  # attacked at the initial weights: the hint says so
    membership = confide(
        "audit",
        "membership",
        tiny_config_path,
        *("--set", "run.rounds=2", "--sites", "2", "--records", "3", "--references", "0"),
    )
    assert membership.returncode == 0, membership.stderr
    assert "Membership inference" in membership.stdout and "Training without DP" in membership.stdout
    folder = tmp_path / "runs" / "tiny-audit"
    page = (folder / "audit.html").read_text()
    assert "Gradient inversion" in page and "Membership inference" in page  # one page, every audit run
    assert json.loads((folder / "membership.json").read_text())["references"] == 0
    bad = confide("audit", "inversion", tiny_config_path, "--batch-sizes", "one")
    assert bad.returncode == 2 and "expected whole numbers" in bad.stderr
    refused = confide("audit", "membership", tiny_config_path, "--references", "-1")
    assert refused.returncode == 2 and "reference runs must be 0 or more" in refused.stderr


def test_a_library_warning_is_one_plain_line_once(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import warnings

    from confide import cli

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # restored after the test
    cli._plain_warnings()
    torch_file = "/venv/lib/python3.11/site-packages/torch/_functorch/vmap.py"
    mkldnn = (
        "There is a performance drop because we have not yet implemented the batching rule for "
        "aten::mkldnn_rnn_layer. Please file us an issue on GitHub so that we can prioritize its "
        "implementation."
    )
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # as if raised at many places: still shown once
        for line in (10, 20):
            warnings.warn_explicit(mkldnn, UserWarning, torch_file, line)
        warnings.warn_explicit("something new\nsecond line", FutureWarning, "/x/site-packages/ray/w.py", 3)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2, err
    assert err[0].startswith("note: PyTorch computes the LSTM's per-window gradients one window at a time")
    assert "(torch warned: There is a performance drop" in err[0]
    assert err[1] == "note: ray warned, once (FutureWarning; the run goes on): something new"
