"""Attack: the server rebuilds the sites' distributed-DP noise from what it knows (the config, the run's
seed, every plan it sent) and subtracts it from the unmasked sum, which would leave the sum of the sites'
clipped updates without any noise (epsilon infinite against the server).

It worked while the sites drew their noise from the plan's seed. Now a site's noise comes from its own
secret randomness; the test shows that the same attack still works against the insecure reproducible
simulation (so it is mounted correctly) and fails against the default.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from confide import config
from confide.randomness import SeededRandomness, Stream
from confide.runtime.runner import Runner
from tests.conftest import tiny_config

DISTRIBUTED = (
    "privacy.dp=distributed",
    "privacy.secure_aggregation=true",
    "privacy.clip_norm=0.5",
    "server.sites_per_round=4",
    "server.optimizer=sgd",
    "server.learning_rate=1.0",
    "run.rounds=1",
    "model.dropout=0.0",
)


def released_sum(tmp_path: Path, corpus: Path, name: str, *overrides: str) -> tuple[np.ndarray, Runner]:
    """The sum of the round's updates as the server unmasks it (with SGD at rate 1 the model moves by the
    sum over the fixed denominator of sites per round)."""
    path = tmp_path / f"{name}.toml"
    path.write_text(tiny_config(corpus, tmp_path / "runs", run__name=repr(name)))
    runner = Runner.start(config.load(path, [*DISTRIBUTED, *overrides]))
    before = runner.state.weights.copy()
    runner.run()
    assert runner.dp is not None
    return (runner.state.weights - before) * np.float32(runner.dp.sites_per_round), runner


def predicted_noise(runner: Runner) -> np.ndarray:
    """What the server can compute of the sites' noise: each site's share drawn from its plan's seed, as
    the site code draws it when the noise is reproducible."""
    assert runner.dp is not None
    strategy = runner.strategy
    sites = strategy.select(1, [s.name for s in runner.sites])
    plans = strategy.plans(1, sites)
    std = runner.dp.noise_share.std()
    size = runner.layout.size
    return np.sum(
        [SeededRandomness([plans[s].seed, int(Stream.SITE_NOISE)]).normal(size, std) for s in sites], axis=0
    )


@pytest.mark.parametrize("noise", ["secret", "insecure-reproducible"])
def test_the_server_cannot_subtract_the_sites_noise(tmp_path: Path, text_corpus: Path, noise: str) -> None:
    # The clipped updates without any noise: what the attacker wants to learn.
    clean, _ = released_sum(tmp_path, text_corpus, "clean", "privacy.noise_multiplier=0")
    insecure = ("privacy.insecure_reproducible_noise=true",) if noise != "secret" else ()
    released, runner = released_sum(tmp_path, text_corpus, noise, "privacy.noise_multiplier=2", *insecure)
    assert runner.dp is not None
    std_of_sum = runner.dp.noise_share.std() * np.sqrt(runner.dp.sites_per_round)
    noisy_error = float(np.abs(released - clean).max())
    assert noisy_error > std_of_sum  # the released sum carries noise of the planned size
    error = float(np.abs(released - predicted_noise(runner) - clean).max())
    if noise == "secret":
        # The attack removes nothing: what is left is as noisy as what was released.
        assert error > std_of_sum
    else:
        # Against reproducible noise the attack strips it to fixed-point rounding: the attack is real.
        assert error < 1e-3 * std_of_sum


def test_a_deployment_refuses_reproducible_noise_on_both_sides(tmp_path: Path, text_corpus: Path) -> None:
    from confide.client.state import MemorySiteState
    from confide.errors import ConfigError
    from confide.runtime.runner import SiteInfo
    from confide.runtime.stack import build_model_for, build_site_kit

    path = tmp_path / "tiny.toml"
    path.write_text(tiny_config(text_corpus, tmp_path / "runs"))
    loaded = config.load(path, [*DISTRIBUTED, "privacy.insecure_reproducible_noise=true"])
    model = build_model_for(loaded, 97)
    with pytest.raises(ConfigError, match="a deployment refuses it"):
        build_site_kit(loaded, model, [], MemorySiteState(), deployed=True)
    store = Runner.create_store(loaded, [SiteInfo("a", "a", 10, 2), SiteInfo("b", "b", 10, 2)])
    with pytest.raises(ConfigError, match="a deployment refuses it"):
        Runner(loaded, store, sites=[SiteInfo("a", "a", 10, 2)], backend=object())  # type: ignore[arg-type]
