"""Differential privacy in whole runs: the ledger, the budget stop, resume, calibration, adaptive clipping,
record-level DP-SGD, and the configurations that are refused."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from confide import config
from confide.errors import ConfigError
from confide.privacy.accountant import PrivacyAccountant, gaussian_epsilon
from confide.runtime.runner import Runner
from confide.server.strategy import Strategy
from tests.conftest import tiny_config
from tests.runtime.test_runner import Crash, CrashAfter, metrics

DP = ("privacy.dp=central", "privacy.noise_multiplier=1.1", "privacy.clip_norm=0.5")


@pytest.fixture
def path(tmp_path: Path, text_corpus: Path) -> Path:
    p = tmp_path / "tiny.toml"
    p.write_text(tiny_config(text_corpus, tmp_path / "runs"))
    return p


def start(path: Path, *overrides: str) -> Runner:
    return Runner.start(config.load(path, list(overrides)))


def test_epsilon_after_each_round_is_dp_accountings_for_the_rounds_spent(path: Path) -> None:
    runner = start(path, *DP, "privacy.delta=1e-3")
    runner.run()
    rows = metrics(runner.store.run_dir)
    # 6 sites, 3 drawn per round without replacement, z = 1.1: accounted directly with dp-accounting's RDP.
    for r in rows:
        direct = PrivacyAccountant("rdp", "fixed", 6, 1e-3)
        direct.spend(1.1, 3, steps=r["round"])
        assert r["epsilon"] == pytest.approx(direct.epsilon(), rel=1e-9)
    assert [r["epsilon"] for r in rows] == sorted(r["epsilon"] for r in rows)
    ledger = runner.store.ledger()
    assert [row[0] for row in ledger] == [1, 2, 3, 4]
    assert ledger[-1][-1] == pytest.approx(rows[-1]["epsilon"])


def test_the_budget_stops_the_run_before_the_round_that_would_overspend(path: Path) -> None:
    target = 5.0
    accountant = PrivacyAccountant("rdp", "fixed", 6, 1e-3)
    affordable = 0
    while accountant.epsilon_if(3.0, 3) <= target:
        accountant.spend(3.0, 3)
        affordable += 1
    assert 0 < affordable < 10
    overrides = (*DP, "privacy.noise_multiplier=3", "privacy.delta=1e-3", f"privacy.target_epsilon={target}")
    runner = start(path, *overrides, "run.rounds=10")
    runner.run()
    assert runner.state.round == affordable
    assert runner.stopped is not None and f"stopped before round {affordable + 1}" in runner.stopped
    assert len(runner.store.ledger()) == affordable
    assert runner.store.meta("status") == "stopped: privacy budget spent"
    rows = metrics(runner.store.run_dir)
    assert rows[-1]["round"] == affordable and rows[-1]["epsilon"] <= target
    assert runner.store.latest_checkpoint().round == affordable  # type: ignore[union-attr]
    assert [e[2] for e in runner.store.events()][-1] == "budget"


REPRODUCIBLE = ("privacy.insecure_reproducible_noise=true",)


def test_a_reproducible_simulation_resumes_exactly_without_double_counting(path: Path) -> None:
    options = (*DP, *REPRODUCIBLE, "privacy.adaptive_clip=true", "privacy.bits_noise=2")
    reference = start(path, *options, "run.name=whole")
    reference.run()
    expected = metrics(reference.store.run_dir)
    assert len({r["clip_norm"] for r in expected}) > 1  # adaptive clipping moved C

    killed = start(path, *options, "run.name=killed")
    with pytest.raises(Crash):
        killed.run(CrashAfter(4, 3))  # after round 4's last site: its spend may or may not be recorded
    killed.store.close()
    spent_before = killed.store.run_dir / "run.sqlite"
    before = sqlite3.connect(spent_before).execute("SELECT COUNT(*) FROM privacy_ledger").fetchone()[0]
    assert before >= 3  # rounds 1-3 were charged, and none is forgotten by the rewind to checkpoint 2
    resumed = Runner.resume(killed.store.run_dir)
    resumed.run()
    rows = metrics(resumed.store.run_dir)
    keys = ("round", "epsilon", "clip_norm", "loss", "accuracy")
    assert [tuple(r[k] for k in keys) for r in rows] == [tuple(r[k] for k in keys) for r in expected]
    assert [row[0] for row in resumed.store.ledger()] == [1, 2, 3, 4]


def test_with_secret_noise_a_redone_round_is_charged_again(path: Path) -> None:
    """A round redone after a crash draws fresh noise, so the server has seen two releases of it: both are
    charged (the ledger keeps every charge, and the resumed accountant replays them all)."""
    reference = start(path, *DP, "run.name=whole")
    reference.run()
    killed = start(path, *DP, "run.name=killed")
    with pytest.raises(Crash):
        killed.run(CrashAfter(4, 3))
    # Round 3 was released after checkpoint 2; round 4 crashed before its charge, so it released nothing.
    assert [row[0] for row in killed.store.ledger()] == [1, 2, 3]
    killed.store.close()
    resumed = Runner.resume(killed.store.run_dir)
    resumed.run()
    rounds = [row[0] for row in resumed.store.ledger()]
    assert rounds == [1, 2, 3, *range(3, resumed.state.round + 1)]  # round 3 charged twice
    assert metrics(resumed.store.run_dir)[-1]["epsilon"] > metrics(reference.store.run_dir)[-1]["epsilon"]


def test_calibrated_noise_spends_the_budget_in_the_planned_rounds(path: Path) -> None:
    runner = start(path, *DP, "privacy.calibrate=true", "privacy.target_epsilon=8", "privacy.delta=1e-3")
    runner.run()
    assert runner.state.round == 4  # no early stop: the budget lasts exactly the planned rounds
    final = metrics(runner.store.run_dir)[-1]["epsilon"]
    assert 7.9 < final <= 8.0


def test_poisson_sampling_draws_a_varying_number_of_sites_at_the_configured_rate() -> None:
    strategy = Strategy(sites_per_round=10, sampling="poisson", seed=3)
    sites = [f"s{k}" for k in range(100)]
    counts = [len(strategy.select(r, sites)) for r in range(1, 201)]
    assert len(set(counts)) > 5
    assert np.mean(counts) == pytest.approx(10, abs=0.7)
    assert strategy.select(7, sites) == strategy.select(7, sites)


def test_record_level_dp_sgd_reports_each_sites_epsilon(path: Path) -> None:
    runner = start(
        path,
        "privacy.record_dp=true",
        "privacy.record_noise=1.0",
        "client.optimizer=sgd",
        "client.learning_rate=0.5",
        "run.rounds=3",
    )
    runner.run()
    rows = metrics(runner.store.run_dir)
    worst = [r["record_epsilon_max"] for r in rows]
    assert all(np.isfinite(w) and w > 0 for w in worst)
    assert worst == sorted(worst)
    assert all(np.isfinite(r["loss"]) for r in rows)


def test_central_dp_runs_with_poisson_sampling_and_pld(path: Path) -> None:
    runner = start(path, *DP, "server.sampling=poisson", "privacy.accounting=pld", "privacy.delta=1e-3")
    runner.run()
    rows = metrics(runner.store.run_dir)
    direct = PrivacyAccountant("pld", "poisson", 6, 1e-3)
    direct.spend(1.1, 0.5, steps=4)
    assert rows[-1]["epsilon"] == pytest.approx(direct.epsilon(), rel=1e-6)
    entry = json.loads(json.dumps(runner.store.ledger()[0]))
    assert entry[2] == "poisson" and entry[3] == 0.5


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("privacy.target_epsilon=3",), r"privacy.target_epsilon needs site-level differential privacy"),
        (("privacy.dp=distributed",), r"needs secure aggregation"),
        (("privacy.dp=central", "privacy.calibrate=true"), r"calibrate = true needs privacy.target_epsilon"),
        (("privacy.dp=central", "privacy.accounting=pld"), r"'pld' cannot account server.sampling = 'fixed'"),
        (
            ("privacy.dp=central", "server.strategy=scaffold", "client.optimizer=sgd"),
            r"cannot run with server.strategy = 'scaffold'",
        ),
        (("privacy.record_dp=true", "server.strategy=fedprox"), r"record_dp trains with plain DP-SGD"),
        (
            ("privacy.dp=distributed", "privacy.adaptive_clip=true", "privacy.bits_noise=2"),
            r"adaptive_clip needs privacy.dp = 'central'",
        ),
    ],
)
def test_impossible_privacy_settings_are_refused(
    path: Path, overrides: tuple[str, ...], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        config.load(path, list(overrides))


def test_the_report_of_a_dp_run_shows_the_privacy_spent(path: Path) -> None:
    from confide.report import write_report

    runner = start(path, *DP, "privacy.target_epsilon=100")
    runner.run()
    runner.store.close()
    page = write_report(runner.store.run_dir).read_text(encoding="utf-8")
    last = metrics(runner.store.run_dir)[-1]
    assert "Site-level epsilon the budget holds (from the privacy ledger)" in page
    assert "Worst site, against a server that knows who took part" in page
    assert f"{last['epsilon']:.3f} at delta" in page
    assert 'alt="Epsilon spent per round, from the privacy ledger, beside accuracy"' in page


def test_each_sites_record_level_epsilon_is_kept_and_summarized(path: Path) -> None:
    runner = start(path, "privacy.record_dp=true", "client.optimizer=sgd", "run.rounds=2")
    runner.run()
    per_site = runner.store.site_values("dpsgd.epsilon")
    last = metrics(runner.store.run_dir)[-1]
    assert 0 < len(per_site) <= 6 and last["record_dp_sites"] == len(per_site)
    assert last["record_epsilon_max"] == pytest.approx(max(per_site.values()))
    assert last["record_epsilon_median"] == pytest.approx(float(np.median(list(per_site.values()))))


def test_central_dp_draws_its_sample_in_secret(path: Path) -> None:
    """Amplification by sampling holds only against someone who cannot know the sample, and anyone with the
    config knows the run's seed: under central DP the sites of a round come from the server's secret
    randomness, not the seed."""
    runner = start(path, *DP, "run.rounds=4", "server.sites_per_round=3")
    runner.run()
    names = [s.name for s in runner.sites]
    drawn = [r["sites"] for r in runner.store.rounds()]
    predicted = [runner.strategy.select(r, names) for r in range(1, 5)]
    assert drawn != predicted  # each round matches by chance with probability 1/20


def test_the_budget_is_never_exceeded_when_sites_drop_out(path: Path) -> None:
    """Dropouts leave fewer updates and so less noise in the sum; each round needs enough updates that its
    worst charge stays within the budget, and sites that reached it are left out."""
    overrides = (
        "privacy.dp=distributed",
        "privacy.secure_aggregation=true",
        "privacy.noise_multiplier=1.5",
        "privacy.target_epsilon=12",
        "server.sites_per_round=4",
        "backend.dropout=0.4",
        "run.rounds=8",
    )
    runner = start(path, *overrides)
    runner.run()
    assert runner.dp is not None
    worst = runner.dp.worst_site_epsilon()
    assert worst <= 12.0
    rows = metrics(runner.store.run_dir)
    assert all(r["epsilon_worst_site"] <= 12.0 and r["epsilon"] == r["epsilon_worst_site"] for r in rows)
    assert all(r["epsilon_median_site"] <= r["epsilon_worst_site"] for r in rows)
    # Every charge is in the ledger with the sites that took part; dropouts made some rounds smaller.
    participants = [sites for _, sites in runner.store.ledger_participants()]
    assert len(participants) == len(runner.store.ledger()) and all(participants)


def test_a_round_whose_secret_poisson_sample_is_empty_is_still_charged(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One site in six expected a round: a third of the rounds draw nobody. Amplification counts an empty
    # sample as one of the round's outcomes, whose release is the noise alone: such a round releases the
    # noise (the model moves) and is charged, never abandoned, which would tell that the sample was empty.
    runner = start(
        path,
        *DP,
        "server.sampling=poisson",
        "server.sites_per_round=1",
        "privacy.accounting=pld",
        "privacy.delta=1e-3",
        "run.rounds=8",
    )
    # The secret draw comes out empty in rounds 2 and 5 for sure (else about a third of rounds would).
    select = Strategy.select

    def draw(self: Strategy, round: int, *args, **kwargs):  # type: ignore[no-untyped-def]
        return [] if round in (2, 5) else select(self, round, *args, **kwargs)

    monkeypatch.setattr(Strategy, "select", draw)
    moves = []
    original = runner.federation.round

    def round_and_move(state, *args, **kwargs):  # type: ignore[no-untyped-def]
        before = state.weights.copy()
        result = original(state, *args, **kwargs)
        moved = float(np.abs(state.weights - before).max())
        moves.append((len(result.participants), result.abandoned, moved))
        return result

    runner.federation.round = round_and_move  # type: ignore[method-assign]
    runner.run()
    assert len(runner.store.ledger()) == 8
    empty = [move for move in moves if move[0] == 0]
    assert len(empty) >= 2
    assert all(abandoned is None and moved > 0 for _, abandoned, moved in empty)
    direct = PrivacyAccountant("pld", "poisson", 6, 1e-3)
    direct.spend(1.1, 1 / 6, steps=8)
    assert runner.dp is not None and runner.dp.epsilon() == pytest.approx(direct.epsilon(), rel=1e-6)


def test_dp_ftrl_correlates_the_noise_and_accounts_each_site_without_sampling(path: Path) -> None:
    # 6 sites, 2 a round, 3 bands: a site sits out the 2 rounds after each of its own, so every site takes
    # part every third round at most, and its epsilon is a Gaussian's of k G(0) (2C)^2 over (zC)^2, known
    # sample or not (fixed-size sampling: replace-one neighbours, so one site moves the sum by 2C).
    runner = start(
        path,
        "privacy.dp=central",
        "privacy.mechanism=dp-ftrl",
        "privacy.clip_norm=0.5",
        "privacy.target_epsilon=6",
        "privacy.calibrate=true",
        "privacy.delta=1e-3",
        "server.sites_per_round=2",
        "run.rounds=6",
    )
    dp = runner.dp
    assert dp is not None and dp.coefficients is not None and dp.coefficients.size == 3
    runner.run()
    participants = [sites for _, sites in runner.store.ledger_participants()]
    assert len(participants) == 6
    last: dict[str, int] = {}
    for r, sites in enumerate(participants):
        for site in sites:
            assert r - last.get(site, -3) >= 3, f"{site} took part again after {r - last[site]} rounds"
            last[site] = r
    g0 = float(np.sum(dp.coefficients**2))
    rounds = {s: sum(s in sites for sites in participants) for s in last}
    for site, k in rounds.items():
        expected = gaussian_epsilon(k * g0 * 4 / dp.noise_multiplier**2, 1e-3, "rdp")
        assert dp.site_epsilons()[site] == pytest.approx(expected)
    rows = metrics(runner.store.run_dir)
    assert rows[-1]["epsilon"] == pytest.approx(max(dp.site_epsilons().values())) and rows[-1]["epsilon"] <= 6
    assert "DP-FTRL" in dp.describe() and "No amplification" in dp.describe()


RECORD_SECURE = (
    "privacy.record_dp=true",
    "privacy.record_target_epsilon=8",
    "privacy.secure_aggregation=true",
    "client.optimizer=sgd",
    "client.learning_rate=4.0",  # noise on a coordinate: standard deviation about 0.9 (4 z sqrt(3) / 4)
    "server.optimizer=sgd",
    "server.learning_rate=1.0",
    "server.sites_per_round=6",  # all six sites, every round: the calibration's worst case
    "run.rounds=2",
)


def test_record_noise_calibrated_to_a_target_keeps_every_site_within_it_and_nothing_is_clipped(
    path: Path,
) -> None:
    from confide.privacy.record import record_noise_for, record_update_bound

    runner = start(path, *RECORD_SECURE)
    windows = [s.num_train for s in runner.sites]
    noise, _ = record_noise_for(8.0, windows, batch_size=4, epochs=1, max_steps=3, rounds=2)
    assert runner.config.privacy.record_noise == runner.strategy.record_noise == noise != 1.0
    assert runner.secure is not None
    bound = record_update_bound(4.0, 1.0, noise, 0.0, 4, 1, 3, windows)
    assert runner.secure.clip_range == pytest.approx(bound)
    runner.run()
    per_site = runner.store.site_values("dpsgd.epsilon")
    assert len(per_site) == 6 and 7.5 < max(per_site.values()) <= 8.0
    assert not [e for e in runner.store.events() if e[2] == "secagg_clipped"]


def test_the_old_fixed_range_clipped_the_same_dp_sgd_updates(path: Path) -> None:
    runner = start(path, *RECORD_SECURE, "privacy.secagg_range=1", "run.rounds=1")
    runner.run()
    events = [e for e in runner.store.events() if e[2] == "secagg_clipped"]
    assert len(events) == 1 and "outside the fixed-point range [-1, 1]" in events[0][3]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("privacy.dp=distributed", "privacy.secure_aggregation=true"), "secure aggregation hides"),
        (("privacy.dp=central", "privacy.adaptive_clip=true"), "fixed clip norm"),
        (("privacy.dp=central", "privacy.enclave=simulated"), "keeps no noise between rounds"),
    ],
)
def test_dp_ftrl_is_refused_where_no_one_can_keep_the_noise(
    path: Path, overrides: tuple[str, ...], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        config.load(path, ["privacy.mechanism=dp-ftrl", "privacy.clip_norm=0.5", *overrides])


def test_dp_ftrl_factors_the_server_optimizers_workload(path: Path) -> None:
    from confide.privacy.matrix import square_root_coefficients
    from confide.runtime.stack import build_site_dp

    common = ["privacy.dp=central", "privacy.mechanism=dp-ftrl", "privacy.bands=3"]
    common.append("server.sites_per_round=2")  # 6 sites, 2 rounds out of 3: 2 left to draw
    for optimizer, beta in (("sgd", 0.0), ("momentum", 0.9), ("adam", 0.8)):
        cfg = config.load(path, [*common, f"server.optimizer={optimizer}", f"server.beta1={beta}"])
        dp = build_site_dp(cfg, 6)
        assert dp is not None and dp.coefficients is not None
        assert dp.coefficients == pytest.approx(square_root_coefficients(3, beta))


def test_dp_fedadam_steps_on_the_noised_mean(path: Path) -> None:
    # Adam on the server is post-processing of the noised mean: the run is charged as plain DP-FedAvg is.
    runner = start(path, *DP, "server.optimizer=adam", "server.learning_rate=0.01", "run.rounds=2")
    runner.run()
    rows = metrics(runner.store.run_dir)
    assert len(runner.store.ledger()) == 2 and rows[-1]["epsilon"] > 0
    assert np.isfinite(rows[-1]["loss"])


def test_dp_ftrl_refuses_more_bands_than_the_sites_can_sit_out(path: Path) -> None:
    from confide.runtime.stack import build_site_dp

    cfg = config.load(path, ["privacy.dp=central", "privacy.mechanism=dp-ftrl", "privacy.bands=3"])
    with pytest.raises(ConfigError, match="at most 2 bands"):
        build_site_dp(cfg, 6)  # 3 sites a round, 2 rounds out: nobody left to draw


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("privacy.record_target_epsilon=8",), r"record_target_epsilon calibrates DP-SGD's noise, which"),
        (
            (
                "privacy.record_dp=true",
                "privacy.secure_aggregation=true",
                "client.optimizer=sgd",
                "client.weight_decay=0.01",
            ),
            r"under SGD with client.weight_decay = 0.01 has no such bound .* set privacy.secagg_range",
        ),
    ],
)
def test_record_dp_settings_that_cannot_hold_are_refused(
    path: Path, overrides: tuple[str, ...], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        config.load(path, list(overrides))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ("privacy.record_dp=true", "privacy.record_target_epsilon=8", "client.optimizer=sgd"),
            r"server learns only as the sites join.*set privacy.record_noise",
        ),
        (
            ("privacy.record_dp=true", "privacy.secure_aggregation=true", "client.optimizer=sgd"),
            r"which a deployment's sites do not know of each other: set privacy.secagg_range",
        ),
    ],
)
def test_a_deployment_refuses_what_needs_every_sites_window_count(
    path: Path, overrides: tuple[str, ...], message: str
) -> None:
    loaded = config.load(path, list(overrides))
    with pytest.raises(ConfigError, match=message):
        config.check_deployment(loaded)
    given = ["privacy.record_dp=true", "privacy.secure_aggregation=true", "client.optimizer=sgd"]
    config.check_deployment(config.load(path, [*given, "privacy.record_noise=1.1", "privacy.secagg_range=4"]))


def test_secure_aggregation_takes_its_range_from_adams_bound_and_the_smaller_of_two_clips(path: Path) -> None:
    from confide.privacy.record import adam_update_bound, record_update_bound
    from confide.runtime.stack import build_secure, build_site_dp

    windows = [40, 90]
    adam = config.load(path, ["privacy.record_dp=true", "privacy.secure_aggregation=true"])
    secure, _ = build_secure(adam, ["a", "b"], None, windows=windows)
    assert secure is not None  # the tiny config trains with Adam, lr 0.01, at most 3 steps of 4
    assert secure.clip_range == pytest.approx(adam_update_bound(0.01, 4, 1, 3, windows))
    assert secure.clip_range < 0.05
    both = [*RECORD_SECURE, "privacy.dp=distributed", "privacy.clip_norm=0.5", "privacy.noise_multiplier=1"]
    loaded = config.load(path, [o for o in both if "target_epsilon" not in o])
    dp = build_site_dp(loaded, 6)
    assert dp is not None
    secure, _ = build_secure(loaded, ["a", "b"], dp, windows=windows)
    assert record_update_bound(4.0, 1.0, 1.0, 0.0, 4, 1, 3, windows) > 0.5  # the site clip is the smaller
    spread = dp.update_noise / np.sqrt(dp.share_sites)
    assert secure is not None and secure.clip_range == pytest.approx(0.5 + 8 * spread * 0.5)
