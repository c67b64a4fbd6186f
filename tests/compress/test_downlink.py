"""Downlink compression: sites rebuild the server's public model bit for bit from the changes it sends, a
wrong digest or a missing copy is refused clearly and answered with the full model, sites share one copy per
version in a simulation, and whole runs send fewer bytes by the codec's factor, learn as well, compose with
uplink compression, secure aggregation, DP and FedRep, and resume from a checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from confide import config
from confide.compress.downlink import DELTA, DIGEST, MODEL, PUBLIC_KEY, VERSIONS, Codec, DownlinkLayer
from confide.compress.quantize import BLOCK
from confide.core import Plan, Task, Update, Vector
from confide.errors import ConfigError, UpdateError
from confide.pipeline import RoundContext
from confide.randomness import SecretRandomness
from confide.runtime.runner import Runner
from confide.server.strategy import WeightedMean
from tests.compress.helpers import deploy_three_sites, module_config, run, three_sites
from tests.conftest import tiny_config
from tests.runtime.grpc_harness import metrics as deployed_metrics
from tests.runtime.test_runner import Crash, CrashAfter

SIZE = 3000  # not a whole number of quantization blocks: the padding is exercised
CODECS = {"float16": ("float16", 8), "quantize 8 bits": ("quantize", 8), "quantize 3 bits": ("quantize", 3)}


def delta_bytes(kind: str, bits: int, size: int) -> int:
    """One compressed change's bytes, from the format: 2 bytes a value, or b bits a value over whole blocks
    of 1024 plus two float32 (the block's range) a block."""
    if kind == "float16":
        return 2 * size
    blocks = math.ceil(size / BLOCK)
    return math.ceil(blocks * BLOCK * bits / 8) + 8 * blocks


def serve(
    server: DownlinkLayer, weights: Vector, round: int, sites: list[str], state: dict[str, Any]
) -> RoundContext:
    """The server's side of ``round``: the layer's ``begin`` on a round asking ``sites``."""
    aggregator = WeightedMean()
    ctx = RoundContext(
        round=round,
        sites=sites,
        tasks={s: Task(s, Plan(round=round), round - 1) for s in sites},
        weights=weights,
        server_state=state,
        exchange=lambda messages: iter(()),
        min_updates=1,
        randomness=SecretRandomness(),
        population=len(sites),
        aggregator=aggregator,
        aggregate=aggregator.init(weights.size),
    )
    server.begin(ctx)
    return ctx


def answer(server: DownlinkLayer, ctx: RoundContext, site: str) -> None:
    """``site``'s update of the round reaches the server."""
    server.decode(Update(site, ctx.round, 1, np.zeros(1, np.float32), ctx.round - 1), ctx)


def receive(sites: DownlinkLayer, ctx: RoundContext, site: str) -> Vector:
    assert ctx.broadcast is not None and ctx.broadcast.size == 0
    model, task = sites.receive(ctx.broadcast, ctx.tasks[site], site)
    assert not task.extras  # the layer's payload is taken out before training
    return model


def walk(rounds: int, seed: int = 0) -> list[Vector]:
    """The server's true model over ``rounds`` rounds: a random walk with a few large coordinates."""
    rng = np.random.default_rng(seed)
    weights = rng.standard_normal(SIZE).astype(np.float32)
    weights[:3] = [40.0, -25.0, 7.0]
    out = []
    for _ in range(rounds):
        weights = weights + (0.01 * rng.standard_normal(SIZE)).astype(np.float32)
        out.append(weights)
    return out


@pytest.mark.parametrize("name", list(CODECS))
def test_sites_rebuild_the_public_model_bit_for_bit(name: str) -> None:
    kind, bits = CODECS[name]
    server, sites = DownlinkLayer(Codec(kind, bits, seed=3)), DownlinkLayer(Codec(kind, bits, seed=3))
    state: dict[str, Any] = {}
    asked = {1: ["a", "b"], 2: ["a"], 3: ["a", "b"], 4: ["a", "b"], 5: ["a"]}
    for round, weights in enumerate(walk(5), start=1):
        ctx = serve(server, weights, round, asked[round], state)
        public = state[PUBLIC_KEY]
        for site in asked[round]:
            extras = ctx.tasks[site].extras
            model = receive(sites, ctx, site)
            assert model.dtype == np.float32 and model.tobytes() == public.tobytes()
            deltas = sorted(k for k in extras if k.startswith(DELTA))
            if round == 1:
                assert MODEL in extras and not deltas
            elif site == "b" and round == 3:
                # b missed round 2: two changes, unless they add up to the model's bytes (float16's do).
                two_smaller = 2 * delta_bytes(kind, bits, SIZE) < 4 * SIZE
                assert deltas == ([f"{DELTA}2", f"{DELTA}3"] if two_smaller else [])
                assert (MODEL in extras) != two_smaller
            else:
                assert deltas == [f"{DELTA}{round}"] and MODEL not in extras
                assert extras[deltas[0]].size == delta_bytes(kind, bits, SIZE)
            answer(server, ctx, site)
        assert not np.array_equal(public, weights) or round == 1  # lossy after the first, full, version
        np.testing.assert_allclose(public, weights, atol=0.2 if bits == 3 else 0.05)


def test_error_feedback_brings_the_public_model_to_the_true_one() -> None:
    # EF21-P: what one change leaves out goes with the next, so once W stops moving P converges to it. A
    # codec without the feedback (P_t = P_(t-1) + C(W_t - W_(t-1))) would keep its first error for ever.
    server = DownlinkLayer(Codec("quantize", 3, seed=1))
    first, moved = walk(2)
    state: dict[str, Any] = {}
    serve(server, first, 1, ["a"], state)
    errors = []
    for round in range(2, 12):
        serve(server, moved, round, ["a"], state)
        errors.append(float(np.abs(state[PUBLIC_KEY] - moved).max()))
    assert errors[-1] < errors[0] / 1000


def test_a_wrong_digest_is_refused_and_the_site_is_sent_the_full_model_next() -> None:
    server, sites = DownlinkLayer(Codec("quantize")), DownlinkLayer(Codec("quantize"))
    state: dict[str, Any] = {}
    w1, w2, w3, w4 = walk(4)
    ctx = serve(server, w1, 1, ["a"], state)
    receive(sites, ctx, "a")
    answer(server, ctx, "a")
    ctx = serve(server, w2, 2, ["a"], state)
    extras = dict(ctx.tasks["a"].extras)
    extras[DIGEST] = np.zeros(32, np.uint8)
    with pytest.raises(
        UpdateError,
        match=r"site 'a' built version 2 .* its digest \w+ is not the 0+ the "
        r"server sent: .* the server sends it the full model next time",
    ):
        sites.receive(ctx.broadcast, Task("a", Plan(round=2), 1, extras), "a")  # type: ignore[arg-type]
    # The site sent no update, so the server knows of no copy: the full model goes out, and is taken.
    ctx = serve(server, w3, 3, ["a"], state)
    assert MODEL in ctx.tasks["a"].extras
    assert receive(sites, ctx, "a").tobytes() == state[PUBLIC_KEY].tobytes()
    answer(server, ctx, "a")
    # A change altered on its way (one level of one value) is caught by the same digest.
    ctx = serve(server, w4, 4, ["a"], state)
    extras = dict(ctx.tasks["a"].extras)
    altered = extras[f"{DELTA}4"].copy()
    altered[-1] ^= 1
    extras[f"{DELTA}4"] = altered
    with pytest.raises(UpdateError, match=r"is not the .* the server sent"):
        sites.receive(ctx.broadcast, Task("a", Plan(round=4), 3, extras), "a")  # type: ignore[arg-type]
    # Changes that claim to span more versions than the history are refused before any is applied.
    extras = dict(ctx.tasks["a"].extras)
    extras[VERSIONS] = np.array([4, 100], dtype=np.int64)  # from version 4 to 100: 96 versions
    with pytest.raises(UpdateError, match=r"they must span 1 to compression.downlink_history = 8 versions"):
        sites.receive(ctx.broadcast, Task("a", Plan(round=4), 3, extras), "a")  # type: ignore[arg-type]


def test_new_restarted_and_far_behind_sites_get_the_full_model() -> None:
    server, sites = DownlinkLayer(Codec("quantize"), history=2), DownlinkLayer(Codec("quantize"), history=2)
    state: dict[str, Any] = {}
    models = walk(6)
    ctx = serve(server, models[0], 1, ["old", "restarted"], state)
    for site in ("old", "restarted"):
        receive(sites, ctx, site)
        answer(server, ctx, site)
    ctx = serve(server, models[1], 2, ["restarted"], state)
    restarted = DownlinkLayer(Codec("quantize"), history=2)  # its process lost the copy of version 1
    with pytest.raises(
        UpdateError,
        match=r"site 'restarted' was sent the changes from version 1 .* but holds "
        "no copy .* the server sends it the full model next time",
    ):
        receive(restarted, ctx, "restarted")
    for round in (3, 4):
        serve(server, models[round - 1], round, ["nobody"], state)
    ctx = serve(server, models[4], 5, ["old", "restarted", "new"], state)
    # 'old' holds version 1, three versions behind a history of two; 'restarted' sent no update in round 2.
    for site in ("old", "restarted", "new"):
        assert MODEL in ctx.tasks[site].extras and not any(
            k.startswith(DELTA) for k in ctx.tasks[site].extras
        )
        assert receive(restarted if site == "restarted" else sites, ctx, site).tobytes() == (
            state[PUBLIC_KEY].tobytes()
        )


def test_simulated_sites_share_one_copy_per_version() -> None:
    server, sites = DownlinkLayer(Codec("float16"), history=3), DownlinkLayer(Codec("float16"), history=3)
    names = [f"site{i}" for i in range(40)]
    state: dict[str, Any] = {}
    for round, weights in enumerate(walk(8), start=1):
        asked = names if round == 1 else names[(round * 7) % 40 :][:10]
        ctx = serve(server, weights, round, asked, state)
        models = [receive(sites, ctx, site) for site in asked]
        assert all(m is models[0] for m in models)  # one array, however many sites hold it
        for site in asked:
            answer(server, ctx, site)
        # Copies of versions older than the history are dropped (their sites will get full models).
        assert len(sites.sites.copies) <= 3 + 1
        assert {v for v, _ in sites.sites.copies} <= set(range(round - 3, round + 1))


def test_downlink_compression_is_refused_with_ckks(tiny_config_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(
            tiny_config_path,
            ["privacy.encryption=ckks", "server.optimizer=sgd", "compression.downlink=float16"],
        )
    message = str(info.value)
    assert "compression.downlink = 'float16' cannot run with privacy.encryption = 'ckks'" in message
    assert "set compression.downlink = 'none'" in message


# -- whole runs ---------------------------------------------------------------------------------------------

EVERY_SITE = "server.sites_per_round=6"  # every site every round: from round 2 each holds the last version
OVERHEAD = 300
"""Bytes a task with changes may spend beyond them on naming its tensors (versions, two digests)."""


@pytest.fixture(scope="module")
def corpus_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return module_config(tmp_path_factory, "downlink")


def sent(row: dict[str, Any]) -> int:
    """Bytes the server sent with the round's training tasks (evaluation left out)."""
    return int(row["bytes_sent"] - row["eval_bytes_sent"])


def received(row: dict[str, Any]) -> int:
    return int(row["bytes_received"] - row["eval_bytes_received"])


@pytest.fixture(scope="module")
def plain(corpus_config: Path) -> tuple[Runner, list[dict[str, Any]]]:
    return run(corpus_config, EVERY_SITE, "run.name=plain")


@pytest.mark.parametrize("name", ["float16", "quantize 8 bits"])
def test_a_run_sends_the_codecs_bytes_and_learns_as_well(
    corpus_config: Path, plain: tuple[Runner, list[dict[str, Any]]], name: str
) -> None:
    kind, bits = CODECS[name]
    runner, rows = run(corpus_config, EVERY_SITE, f"compression.downlink={kind}", f"run.name={kind}")
    reference = plain[1]
    size = runner.layout.size
    # Round 1 sends every site the full model (plus its digest); from round 2 every site holds the last
    # version, so each of the six tasks carries one change instead of the model.
    assert 0 < sent(rows[0]) - sent(reference[0]) <= 6 * OVERHEAD
    saved = 6 * (4 * size - delta_bytes(kind, bits, size))
    for row, base in zip(rows[1:], reference[1:], strict=True):
        assert saved - 6 * OVERHEAD <= sent(base) - sent(row) <= saved
    assert sent(rows[-1]) / sent(reference[-1]) < delta_bytes(kind, bits, size) / (4 * size) + 0.02
    # The uplink, and evaluation (which sends the true model in full), are untouched.
    assert [received(r) for r in rows] == [received(r) for r in reference]
    assert [r["eval_bytes_sent"] for r in rows] == [r["eval_bytes_sent"] for r in reference]
    final = rows[-1]["loss"]
    assert final < rows[0]["loss"]  # it learns
    assert abs(final - reference[-1]["loss"]) < 0.03 * reference[-1]["loss"]


def test_downlink_and_uplink_compression_compose(corpus_config: Path) -> None:
    uplink = ("compression.kind=quantize",)
    _, up = run(corpus_config, EVERY_SITE, *uplink, "run.name=up")
    _, both = run(corpus_config, EVERY_SITE, *uplink, "compression.downlink=quantize", "run.name=both")
    assert [received(r) for r in both] == [received(r) for r in up]
    assert all(sent(b) < sent(u) / 3 for b, u in zip(both[1:], up[1:], strict=True))
    assert both[-1]["loss"] < both[0]["loss"]


def test_downlink_runs_under_secure_aggregation_with_distributed_dp_and_dropouts(corpus_config: Path) -> None:
    # A site that drops out sends no update, so the server sends it the full model the next time it asks it.
    overrides = [
        "privacy.secure_aggregation=true",
        "privacy.dp=distributed",
        "privacy.noise_multiplier=0.8",
        "server.sites_per_round=5",
        "backend.dropout=0.2",
        "compression.downlink=quantize",
    ]
    runner, rows = run(corpus_config, *overrides, "run.name=secure")
    assert len(rows) == 4 and all(np.isfinite(r["epsilon"]) and np.isfinite(r["loss"]) for r in rows)
    full = 5 * 4 * runner.layout.size
    assert any(sent(r) < full / 2 for r in rows[1:])


def test_downlink_runs_with_fedrep(corpus_config: Path) -> None:
    _, rows = run(
        corpus_config,
        "client.personalization=fedrep",
        "client.personal_steps=2",
        "compression.downlink=float16",
        "run.name=fedrep",
    )
    assert all(np.isfinite(r["personal_loss"]) for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_a_resumed_run_sends_full_models_once_and_trains_the_same_model(corpus_config: Path) -> None:
    overrides = (EVERY_SITE, "compression.downlink=quantize")
    _, whole = run(corpus_config, *overrides, "run.name=whole")
    killed = Runner.start(config.load(corpus_config, [*overrides, "run.name=killed"]))
    with pytest.raises(Crash):
        killed.run(CrashAfter(3, 2))
    killed.store.close()
    resumed = Runner.resume(killed.store.run_dir)  # from checkpoint 2, with the public model in it
    resumed.run()
    resumed.store.close()
    rows = [json.loads(line) for line in (resumed.store.run_dir / "metrics.jsonl").read_text().splitlines()]
    keys = ("loss", "accuracy", "train_loss")
    assert [tuple(r[k] for k in keys) for r in rows] == [tuple(r[k] for k in keys) for r in whole]
    # The restarted server knows no site's copy: round 3 goes out in full, round 4 as changes again.
    size = resumed.layout.size
    saved = 6 * (4 * size - delta_bytes("quantize", 8, size))
    assert saved - 6 * OVERHEAD <= sent(rows[2]) - sent(whole[2]) <= saved
    assert sent(rows[3]) == sent(whole[3])


def test_a_deployed_run_rebuilds_the_model_from_changes_and_gives_the_simulation(
    tmp_path: Path, text_corpus: Path
) -> None:
    # Real `confide server` and `confide client` processes on 127.0.0.1: one client process plays the three
    # sites (their copies of the model shared in it), and the changes cross the real wire.
    corpus = three_sites(tmp_path, text_corpus)
    text = tiny_config(corpus, tmp_path / "runs", run__rounds="3", compression__downlink="'quantize'")
    deploy_three_sites(tmp_path, corpus, text)
    deployed = deployed_metrics(tmp_path / "runs" / "tiny")

    local = tmp_path / "local.toml"
    local.write_text(text.replace(str(tmp_path / "runs"), str(tmp_path / "local-runs")))
    runner, expected = run(local)
    assert [m["round"] for m in deployed] == [1, 2, 3]
    for a, b in zip(deployed, expected, strict=True):
        for key in ("loss", "accuracy", "train_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["round"], key)
    # All three sites train every round: round 1 sends them the model, rounds 2 and 3 its changes. The
    # deployment's counts include its polls and heartbeats, so only most of the saving must show.
    size = runner.layout.size
    saved = 3 * (4 * size - delta_bytes("quantize", 8, size))
    assert sent(deployed[0]) - sent(deployed[1]) > 0.9 * saved
