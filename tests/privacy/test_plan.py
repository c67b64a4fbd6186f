"""`confide dp plan`: the noise against the signal and the epsilons, worked out before a run trains."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from confide.cli import main
from confide.privacy.accountant import PrivacyAccountant
from confide.privacy.plan import CANNOT_LEARN, plan, record_plan
from confide.privacy.policy import SiteDP

DEMO = {"population": 755, "sites_per_round": 50, "sampling": "poisson", "clip_norm": 1.5}
DEMO_SIZE = 216_041


def demo(**options: object) -> SiteDP:
    settings = {**DEMO, "placement": "distributed", **options}
    dp = SiteDP.calibrated(8.0, 40, participations=4, **settings)  # type: ignore[arg-type]
    dp.participation_cap = 4
    return dp


def test_the_demo_plan_reads_its_noise_and_both_epsilons() -> None:
    dp = demo()
    p = plan(dp, 40, DEMO_SIZE)
    assert p.round_std == pytest.approx(dp.noise_multiplier * 1.5 / 50)
    assert p.model_std == pytest.approx(p.round_std * math.sqrt(40))
    # Fresh noise and plain SGD: the ratio is one round's noise norm over the clip norm.
    assert p.noise_to_signal == pytest.approx(p.round_std * math.sqrt(DEMO_SIZE) / 1.5)
    assert 10 < p.noise_to_signal < 12 and p.warning() is None
    assert p.epsilon_knows_sample == pytest.approx(8.0, abs=0.01)  # calibrated for a site in 4 rounds
    direct = PrivacyAccountant("rdp", "poisson", 755, dp.delta)
    direct.spend(dp.noise_multiplier, 50 / 755, steps=40)
    assert p.epsilon_secret_sample == pytest.approx(direct.epsilon())
    assert any("verdict" in line for line in p.lines())


def test_a_few_sites_with_site_level_dp_are_told_they_cannot_learn() -> None:
    # The user's federation: 14 sites, 8 a round, central DP calibrated to epsilon 10 (they got z = 4.87).
    dp = SiteDP.calibrated(
        10.0, 20, population=14, sites_per_round=8, sampling="fixed", clip_norm=1.0, placement="central"
    )
    p = plan(dp, 20, DEMO_SIZE)
    assert p.noise_to_signal > CANNOT_LEARN
    warning = p.warning()
    assert warning is not None and "cannot learn" in warning
    assert "record-level DP" in warning and "more sites per round" in warning and "dp-ftrl" in warning
    assert p.lines()[-1].startswith("WARNING")


def test_dp_ftrl_leaves_less_noise_in_the_model_and_claims_no_amplification() -> None:
    ftrl = SiteDP.calibrated(
        8.0,
        40,
        placement="central",
        mechanism="dp-ftrl",
        bands=15,
        **DEMO,  # type: ignore[arg-type]
    )
    p = plan(ftrl, 40, DEMO_SIZE)
    assert p.participations == 3  # 40 rounds, 15 apart
    assert p.epsilon_knows_sample == pytest.approx(8.0, abs=0.01)
    assert p.epsilon_secret_sample is None
    assert p.model_std < 0.5 * p.fresh_model_std
    assert any("no amplification" in line for line in p.lines())


def test_server_momentum_adds_up_the_noise_in_the_model_as_it_adds_up_the_updates() -> None:
    dp = demo()
    sgd, momentum = plan(dp, 40, DEMO_SIZE), plan(dp, 40, DEMO_SIZE, "momentum", 0.9)
    assert momentum.model_std > 5 * sgd.model_std
    # ... and the updates by up to 1 / (1 - 0.9): the ratio stays of the same order.
    assert 0.5 < momentum.noise_to_signal / sgd.noise_to_signal < 1.5


def test_the_command_prints_the_plan_and_refuses_a_config_without_dp(
    tiny_config_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    noisy = ["--set", "privacy.dp=central", "--set", "privacy.noise_multiplier=5"]
    assert main(["dp", "plan", str(tiny_config_path), *noisy]) == 0  # in process: as the command, faster
    out = " ".join(capsys.readouterr().out.split())
    assert "noise on one round's mean update" in out and "noise-to-signal ratio" in out
    assert "WARNING: this run cannot learn" in out  # 6 sites, 3 a round, z = 5
    assert main(["run", str(tiny_config_path), "--no-report", "--set", "run.rounds=1", *noisy]) == 0
    assert "WARNING: this run cannot learn" in " ".join(capsys.readouterr().out.split())
    assert main(["dp", "plan", str(tiny_config_path)]) == 2
    refused = capsys.readouterr().err
    assert "no differential privacy" in refused and "Traceback" not in refused


def test_record_level_dp_plans_each_steps_noise_and_the_records_epsilon() -> None:
    from confide.privacy.record import record_noise_for

    windows = [800, 1200, 1500]
    z, _ = record_noise_for(8.0, windows, 64, 1, 20, 12)
    common = {"sites_per_round": 3, "rounds": 12, "batch_size": 64, "epochs": 1, "max_steps": 20, "clip": 1.0}
    p = record_plan(windows, 100_000, noise_multiplier=z, calibrated=True, **common)  # type: ignore[arg-type]
    assert p.worst_epsilon <= 8.0 and p.worst_epsilon > 7.9
    assert p.noise_to_signal == pytest.approx(z * math.sqrt(100_000) / 64 / math.sqrt(3))
    assert p.warning() is None
    tiny = record_plan(windows, 100_000, noise_multiplier=z, calibrated=True, **{**common, "batch_size": 2})
    assert tiny.warning() is not None and "client.batch_size" in tiny.warning()  # type: ignore[operator]
