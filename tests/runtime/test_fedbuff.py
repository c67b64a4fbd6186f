"""FedBuff's asynchronous rounds: the driver against scripted sites (staleness discounts, the buffer's
arithmetic, dropped and excluded sites, concurrency), the virtual clock, and whole runs with secure
aggregation and DP."""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest

from confide import config
from confide.algorithms.fedbuff import StalenessLayer, staleness_weight
from confide.core import Plan, SiteEvaluation, Task, Traffic, Update, Vector
from confide.errors import ConfigError
from confide.pipeline import SiteContext
from confide.privacy.dp import EqualMean
from confide.randomness import SecretRandomness
from confide.runtime.buffered import Buffered
from confide.runtime.clock import Speeds, VirtualClock
from confide.runtime.federation import Federation, Ready, RoundResult, ServerState
from confide.runtime.runner import NullObserver, Runner
from confide.server.strategy import Strategy
from tests.conftest import tiny_config

SITES = [f"s{i}" for i in range(6)]


class ScriptedAsync:
    """Sites of known speeds (site i takes ``durations[i]`` time units) that send their value times their
    discount when released, as the staleness layer makes a real site do."""

    def __init__(self, durations: Mapping[str, float], fail: Sequence[str] = ()) -> None:
        self.durations = dict(durations)
        self.fail = set(fail)
        self.clock = 0.0
        self.heap: list[tuple[float, str, int]] = []
        self.started: list[tuple[str, int]] = []
        self.most_training = 0
        self.released: list[Plan] = []

    def sites(self) -> Sequence[str]:
        return list(self.durations)

    def start(self, weights: Vector, task: Task) -> None:
        assert task.plan.hold and not task.plan.release
        self.started.append((task.site, task.model_version))
        heapq.heappush(self.heap, (self.clock + self.durations[task.site], task.site, task.model_version))
        self.most_training = max(self.most_training, len(self.heap))

    def next_ready(self) -> Ready | None:
        if not self.heap:
            return None
        moment, site, version = heapq.heappop(self.heap)
        self.clock = max(self.clock, moment)
        return Ready(site, version, "it ran out of memory" if site in self.fail else None)

    def train(self, weights: Vector, tasks: Sequence[Task]) -> Iterator[Update]:
        for task in tasks:
            assert task.plan.release and not task.plan.hold
            self.released.append(task.plan)
            value = float(task.site[1:]) + 1.0
            vector = np.full(4, value * task.plan.staleness_weight, np.float32)
            yield Update(task.site, task.plan.round, 1, vector, task.model_version)

    def evaluate(
        self, weights: Vector, sites: Sequence[str], plan: Plan | None = None
    ) -> Iterator[SiteEvaluation]:
        raise NotImplementedError

    def exchange(self, messages: Mapping[str, bytes]) -> Iterator[tuple[str, bytes]]:
        raise NotImplementedError

    def traffic(self) -> Traffic:
        return Traffic()

    def now(self) -> float:
        return self.clock

    def close(self) -> None:
        pass


def buffered(buffer: int, concurrency: int, max_staleness: int = 10) -> Buffered:
    federation = Federation(Strategy(sites_per_round=buffer), aggregator=EqualMean())
    return Buffered(federation, buffer, concurrency, max_staleness, exponent=0.5, seed=3)


def test_each_buffer_holds_the_first_sites_to_finish_each_discounted_by_its_staleness() -> None:
    # s0 is fast (1 unit), s5 slow (6 units): with two training at once and buffers of two, the fast sites
    # lap the slow ones, whose updates arrive versions late.
    backend = ScriptedAsync({s: float(i + 1) for i, s in enumerate(SITES)})
    driver = buffered(buffer=2, concurrency=3)
    state = ServerState(round=0, weights=np.zeros(4, np.float32))
    for _ in range(4):
        before = state.weights.copy()
        result = driver.round(state, backend)
        assert len(result.participants) == 2 and backend.most_training <= 3
        # The buffer's mean of value x discount, exactly (EqualMean, one plain SGD step of rate 1).
        released = backend.released[-2:]
        values = [(float(p_site[1:]) + 1) for p_site in result.participants]
        weights = [p.staleness_weight for p in released]
        expected = np.mean([v * w for v, w in zip(values, weights, strict=True)])
        np.testing.assert_allclose(state.weights - before, np.full(4, expected), rtol=1e-6)
        for s, plan in zip(result.staleness, released, strict=True):
            assert plan.staleness_weight == pytest.approx(1 / math.sqrt(1 + s))
    assert state.round == 4
    assert max(result.staleness) > 0, "some update in the last buffer should have been stale"


def test_updates_past_the_staleness_limit_and_failed_sites_are_dropped_with_the_reason() -> None:
    # s5 takes 10 time units, the others 1: by the time s5 is ready the model has moved on ~20 versions.
    durations = {s: 1.0 for s in SITES[:5]} | {"s5": 10.0}
    backend = ScriptedAsync(durations, fail=["s4"])
    driver = buffered(buffer=2, concurrency=6, max_staleness=2)
    state = ServerState(round=0, weights=np.zeros(4, np.float32))
    reasons = []
    for _ in range(30):
        result = driver.round(state, backend)
        reasons += [why for _, why in result.rejected]
        assert "s4" not in result.participants and "s5" not in result.participants
    assert any("more than server.max_staleness = 2" in why for why in reasons)
    assert any("could not train" in why and "ran out of memory" in why for why in reasons)


def test_excluded_sites_are_never_started_and_concurrency_is_kept() -> None:
    backend = ScriptedAsync({s: 1.0 + 0.1 * i for i, s in enumerate(SITES)})
    driver = buffered(buffer=2, concurrency=3)
    state = ServerState(round=0, weights=np.zeros(4, np.float32))
    for _ in range(5):
        driver.round(state, backend, exclude={"s0", "s1"})
    assert {site for site, _ in backend.started}.isdisjoint({"s0", "s1"})
    assert backend.most_training == 3
    # Every site started trains on the model version that was newest when it started.
    assert [v for _, v in backend.started] == sorted(v for _, v in backend.started)


def test_staleness_discount_and_the_site_layer_that_applies_it() -> None:
    assert staleness_weight(0, 0.5) == 1.0 and staleness_weight(3, 0.5) == 0.5
    assert staleness_weight(5, 0.0) == 1.0
    plan = Plan(round=4, release=True, staleness_weight=0.25)
    update = Update("s1", 4, 3, np.full(3, 2.0, np.float32), 1)
    site = SiteContext("s1", plan, SecretRandomness(), {})
    out = StalenessLayer().encode(update, site)
    np.testing.assert_array_equal(out.vector, np.full(3, 0.5, np.float32))


def test_the_virtual_clock_is_drawn_from_the_seed_and_charges_steps_delays_and_bytes() -> None:
    speeds = Speeds(step_seconds=0.2, sigma=0.5, slow_fraction=0.5, slow_factor=10, latency=0.1, bandwidth=2)
    a, b = VirtualClock(speeds, SITES, seed=1), VirtualClock(speeds, SITES, seed=1)
    assert a.profiles == b.profiles
    assert VirtualClock(speeds, SITES, seed=2).profiles != a.profiles
    slow = [s for s, p in a.profiles.items() if p.speed < 0.3]
    assert 1 <= len(slow) <= 5
    site = SITES[0]
    profile = a.profiles[site]
    assert a.compute(site, 5) == pytest.approx(5 * 0.2 / profile.speed)
    assert a.transfer(site, 4_000_000) == pytest.approx(profile.latency + 2.0)


# -- whole runs -----------------------------------------------------------------------------------------


def run(text_corpus: Path, tmp_path: Path, name: str, **extra: str) -> Runner:
    path = tmp_path / f"{name}.toml"
    path.write_text(tiny_config(text_corpus, tmp_path / name, **extra))
    runner = Runner.start(config.load(path))
    runner.run()
    return runner


FEDBUFF = {
    "server__strategy": "'fedbuff'",
    "server__sites_per_round": "2",
    "server__optimizer": "'sgd'",
    "server__learning_rate": "1.0",
    "backend__speed_sigma": "1.0",
    "run__rounds": "5",
}


def test_a_synchronous_round_lasts_until_its_slowest_site_has_answered(text_corpus, tmp_path) -> None:
    # Equal speeds: every round is a download, three local steps and an upload, whatever the machine.
    runner = run(
        text_corpus, tmp_path, "sync", run__rounds="2", backend__latency="0.5", backend__step_seconds="0.25"
    )
    rounds = runner.store.rounds()
    assert len(rounds) == 2
    assert runner.backend.now() == pytest.approx(2 * (0.5 + 3 * 0.25 + 0.5))  # type: ignore[attr-defined]


def test_an_asynchronous_run_is_exactly_reproducible_on_the_virtual_clock(text_corpus, tmp_path) -> None:
    first = run(text_corpus, tmp_path, "a", **FEDBUFF)
    second = run(text_corpus, tmp_path, "b", **FEDBUFF)
    assert first.backend.now() == second.backend.now() > 0  # type: ignore[attr-defined]
    np.testing.assert_array_equal(first.state.weights, second.state.weights)
    losses = [m["loss"] for _, m in first.store.evaluations()]
    assert losses[-1] < losses[0]


def test_fedbuff_with_secure_aggregation_and_distributed_dp(text_corpus, tmp_path) -> None:
    # Each buffer is one secure-aggregation instance among the sites that fill it, and one charge on the
    # per-site ledger (no amplification: the server knows who filled the buffer).
    runner = run(
        text_corpus,
        tmp_path,
        "secure",
        privacy__secure_aggregation="true",
        privacy__dp="'distributed'",
        privacy__noise_multiplier="1.0",
        **FEDBUFF | {"server__sites_per_round": "3", "run__rounds": "4"},
    )
    assert runner.dp is not None and runner.dp.trust == "knows_sample"
    evaluations = [m for _, m in runner.store.evaluations()]
    assert len(evaluations) == 4 and all(np.isfinite(m["loss"]) for m in evaluations)
    participations: dict[str, int] = {}
    for row in runner.store.rounds():
        assert len(row["sites"]) == 3
        for site in row["sites"]:
            participations[site] = participations.get(site, 0) + 1
    # Each site is charged once per buffer it was in, at the buffer's noise: equal counts, equal epsilons,
    # and more buffers, more epsilon; the run reports the worst site's.
    spent = runner.dp.sites.site_epsilons()
    assert set(spent) == set(participations)
    by_count: dict[int, set[float]] = {}
    for site, count in participations.items():
        by_count.setdefault(count, set()).add(round(spent[site], 9))
    assert all(len(values) == 1 for values in by_count.values())
    ordered = [next(iter(by_count[k])) for k in sorted(by_count)]
    assert ordered == sorted(ordered) and len(set(ordered)) == len(ordered)
    assert evaluations[-1]["epsilon"] == pytest.approx(max(spent.values()))


class Results(NullObserver):
    def __init__(self, crash_at: int = 0) -> None:
        self.results: list[RoundResult] = []
        self.crash_at = crash_at

    def round_started(self, round: int, sites: Sequence[str]) -> None:
        if round == self.crash_at:
            raise KeyboardInterrupt  # the server is killed while the buffer fills

    def round_finished(self, result: RoundResult) -> None:
        self.results.append(result)


def test_sites_gone_after_training_drop_out_of_their_buffers_secure_sum(text_corpus, tmp_path) -> None:
    # Simulated dropouts: a site vanishes after the buffer's key exchange, before it sends its masked update.
    # SecAgg+ unmasks the sum of the others, and the buffer is applied with the updates it has.
    path = tmp_path / "dropouts.toml"
    extra = FEDBUFF | {"server__sites_per_round": "4", "server__concurrency": "6", "run__rounds": "6"}
    path.write_text(
        tiny_config(
            text_corpus, tmp_path / "d", privacy__secure_aggregation="true", backend__dropout="0.3", **extra
        )
    )
    observer = Results()
    Runner.start(config.load(path)).run(observer)
    assert [len(r.sites) for r in observer.results] == [4] * 6  # four sites released each time
    applied = [r for r in observer.results if r.abandoned is None]
    assert applied and any(len(r.participants) < 4 for r in applied)
    assert all(np.isfinite(r.train_loss) for r in applied)


def test_a_resumed_asynchronous_run_goes_on_from_its_checkpoint_and_clock(text_corpus, tmp_path) -> None:
    path = tmp_path / "resume.toml"
    path.write_text(tiny_config(text_corpus, tmp_path / "r", **FEDBUFF | {"run__rounds": "4"}))
    runner = Runner.start(config.load(path))
    observer = Results(crash_at=4)
    with pytest.raises(KeyboardInterrupt):
        runner.run(observer)
    runner.store.close()
    at_checkpoint = observer.results[1].clock  # checkpoint_every = 2
    resumed = Runner.resume(runner.store.run_dir)
    assert resumed.state.round == 2 and resumed.backend.now() == at_checkpoint > 0  # type: ignore[attr-defined]
    resumed.run()
    clocks = [m["clock_seconds"] for _, m in resumed.store.evaluations()]
    assert len(clocks) == 4 and clocks == sorted(clocks) and clocks[2] > at_checkpoint


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"privacy__encryption": "'ckks'"}, "privacy.encryption"),
        ({"privacy__enclave": "'simulated'"}, "privacy.enclave"),
        ({"server__sampling": "'poisson'"}, "server.sampling"),
        ({"client__personalization": "'ditto'"}, "client.personalization"),
        ({"compression__downlink": "'float16'"}, "compression.downlink"),
    ],
)
def test_what_fedbuff_cannot_run_with_is_refused(text_corpus, tmp_path, setting, message) -> None:
    path = tmp_path / "c.toml"
    path.write_text(tiny_config(text_corpus, tmp_path / "r", **FEDBUFF | setting))
    with pytest.raises(ConfigError, match=message):
        config.load(path)


def test_a_concurrency_below_the_buffer_is_refused(text_corpus, tmp_path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(tiny_config(text_corpus, tmp_path / "r", **FEDBUFF | {"server__concurrency": "1"}))
    with pytest.raises(ConfigError, match=r"server\.concurrency = 1 sites cannot fill a buffer"):
        Runner.start(config.load(path))


def test_fedbuff_over_grpc_with_quantized_secure_aggregation(cluster, tmp_path, text_corpus) -> None:
    # Real `confide server` and `confide client` processes: sites train side by side, each buffer is a
    # secure-aggregation instance among the sites that filled it (its masked updates quantized to 4 bits
    # after a rotation common to the buffer), and evaluations wait for the sites in training.
    from tests.runtime.grpc_harness import enroll, metrics

    text = tiny_config(
        text_corpus,
        tmp_path / "runs",
        privacy__secure_aggregation="true",
        compression__kind="'quantize'",
        compression__bits="4",
        compression__rotate="true",
        **FEDBUFF | {"server__sites_per_round": "3", "server__concurrency": "5", "run__rounds": "3"},
    )
    sites = [f"site{i}" for i in range(6)]
    credentials = enroll(tmp_path / "deploy", sites)
    c = cluster(text, ["deploy.auth='token'"])
    c.start_server()
    for site in sites:
        c.start_client(site, credentials[site], text_corpus)
    assert c.wait_server() == 0, c.log("server")
    assert set(c.wait_clients().values()) == {0}, c.log("site0")
    run = tmp_path / "runs" / "tiny"
    deployed = metrics(run)
    assert [m["round"] for m in deployed] == [1, 2, 3]
    assert all(np.isfinite(m["loss"]) for m in deployed)
    store_rounds = Runner.resume(run).store.rounds()
    assert all(len(r["sites"]) == 3 for r in store_rounds)
