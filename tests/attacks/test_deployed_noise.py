"""Attack, against a real deployment: the server rebuilds every site's distributed-DP noise from the config,
the run's seed and the plans it sent, and subtracts it from the sum it unmasked. Before, deployed sites drew
their noise from the plan's seed and this left the clipped updates bare; now each `confide client` draws it
from its own secret randomness, and what is left is as noisy as what was released."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from confide import config
from confide.core import Layout
from confide.data import DEFAULT_TOKENIZER
from confide.randomness import SeededRandomness, Stream
from confide.runtime.runner import Runner, stored_sites
from confide.runtime.stack import build_model_for, build_site_dp, build_strategy
from confide.runtime.store import Store
from tests.conftest import tiny_config
from tests.runtime.conftest import cluster  # noqa: F401 (the fixture)
from tests.runtime.grpc_harness import enroll

SITES = [f"site{i}" for i in range(6)]
SETTINGS = {
    "privacy__dp": "'distributed'",
    "privacy__secure_aggregation": "true",
    "privacy__clip_norm": "0.5",
    "server__sites_per_round": "4",
    "server__optimizer": "'sgd'",
    "server__learning_rate": "1.0",
    "run__rounds": "1",
    "model__dropout": "0.0",
}


def test_a_deployed_server_cannot_subtract_the_sites_noise(
    cluster,  # noqa: F811
    tmp_path: Path,
    text_corpus: Path,
) -> None:
    text = tiny_config(text_corpus, tmp_path / "runs", privacy__noise_multiplier="2.0", **SETTINGS)
    c = cluster(text)
    credentials = enroll(tmp_path / "deploy", SITES)
    c.start_server()
    for site in SITES:
        c.start_client(site, credentials[site], text_corpus)
    assert c.wait_server() == 0, c.log("server")
    run_dir = tmp_path / "runs" / "tiny"
    loaded = config.load(run_dir / "config.toml")
    initial = Layout.of_module(model := build_model_for(loaded, DEFAULT_TOKENIZER.vocab_size)).read(model)
    store = Store.open(run_dir)
    checkpoint = store.latest_checkpoint()
    assert checkpoint is not None and checkpoint.round == 1
    released = (checkpoint.weights - initial) * np.float32(4)  # SGD at rate 1 over the 4 expected sites

    # What the server can compute: the same clipped updates without noise (a run at z = 0 on the same data,
    # with the same public plans), and each site's noise as drawn from its plan's seed.
    clean_path = tmp_path / "clean.toml"
    clean_text = text.replace("'tiny'", "'clean'").replace("noise_multiplier = 2.0", "noise_multiplier = 0.0")
    clean_path.write_text(clean_text)
    clean_runner = Runner.start(config.load(clean_path))
    before = clean_runner.state.weights.copy()
    clean_runner.run()
    clean = (clean_runner.state.weights - before) * np.float32(4)
    dp = build_site_dp(loaded, len(SITES))
    assert dp is not None
    strategy = build_strategy(loaded)
    sites = strategy.select(1, [s.name for s in stored_sites(store)])
    plans = strategy.plans(1, sites)
    std = dp.noise_share.std()
    predicted = np.sum(
        [SeededRandomness([plans[s].seed, int(Stream.SITE_NOISE)]).normal(initial.size, std) for s in sites],
        axis=0,
    )
    std_of_sum = std * np.sqrt(len(sites))
    assert float(np.abs(released - clean).max()) > std_of_sum  # the release carries the noise
    # Subtracting the noise the seeds predict removes none of it.
    assert float(np.abs(released - predicted - clean).max()) > std_of_sum
    assert np.std(released - predicted - clean) > 0.5 * np.sqrt(2) * std_of_sum
