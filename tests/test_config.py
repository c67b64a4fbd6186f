from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from confide import config
from confide.errors import ConfigError
from confide.registry import MODELS, STRATEGIES


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_defaults_fill_everything_and_round_trip(tmp_path: Path) -> None:
    c = config.load(write(tmp_path, "[run]\nname = 'x'\nrounds = 3\n"))
    assert c.run.rounds == 3 and c.client.batch_size == 10 and c.model == {"kind": "gpt"}
    again = config.load(write(tmp_path, c.to_toml()))
    assert again == c


def test_overrides_are_typed(tmp_path: Path) -> None:
    c = config.load(
        write(tmp_path, "[run]\nname='x'\n"),
        [
            "client.learning_rate=0.25",
            "server.optimizer=adam",
            "model.width=64",
            "server.sites_per_round=0.5",
        ],
    )
    assert c.client.learning_rate == 0.25 and c.server.optimizer == "adam"
    assert c.model["width"] == 64 and c.server.sites_per_round == 0.5


def test_integer_accepted_where_a_number_is_expected(tmp_path: Path) -> None:
    assert config.load(write(tmp_path, "[client]\nlearning_rate = 1\n")).client.learning_rate == 1.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[client]\nbatch_size = -3\n", "client.batch_size must be >= 1 (got -3)"),
        ("[client]\nbatch_size = 'ten'\n", "client.batch_size must be an integer (got 'ten')"),
        ("[client]\nlearning_rate = 0\n", "client.learning_rate must be > 0 (got 0.0)"),
        (
            "[server]\noptimizr = 'adam'\n",
            "server.optimizr is not an option of [server]; did you mean 'optimizer'?",
        ),
        (
            "[server]\noptimizer = 'lamb'\n",
            "server.optimizer must be one of 'sgd', 'momentum', 'adam', 'yogi', 'adagrad' (got 'lamb')",
        ),
        ("[serverr]\n", "[serverr] is not a section of the config; did you mean 'server'?"),
        (
            "[data]\npartition = 'random'\n",
            "data.partition must be one of 'natural', 'iid', 'dirichlet', 'quantity', 'group' (got 'random')",
        ),
        ("[model]\nkind = 'rnn'\n", "model.kind must be one of 'gpt', 'lstm', 'hf' (got 'rnn')"),
        ("[model]\nwidth = 130\nheads = 4\n", "model.width (130) must be divisible by model.heads (4)"),
        ("[model]\nkind = 'lstm'\nwidth = 3\n", "model.width is not an option of the 'lstm' model"),
        ("[eval]\nevery = true\n", "eval.every must be an integer (got True)"),
        ("[run\n", "is not valid TOML"),
    ],
)
def test_errors_name_the_key_the_value_and_what_is_accepted(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(write(tmp_path, text))
    assert message in str(info.value)


def test_missing_file_and_bad_override(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match=r"--set takes section\.key=value"):
        config.load(write(tmp_path, ""), ["learning_rate=3"])


def test_every_option_is_described() -> None:
    rows = config.describe()
    assert len(rows) > 30 and all(help for _, _, help in rows)


@pytest.mark.parametrize("path", sorted(Path(__file__).parent.parent.glob("examples/*.toml")), ids=str)
def test_every_example_config_is_valid(path: Path) -> None:
    loaded = config.load(path)
    assert loaded.run.rounds >= 1


def test_loading_a_config_imports_no_torch() -> None:
    # The [model] table is checked against the models' config dataclasses, not by building a model.
    root = Path(__file__).parent.parent
    code = (
        "import sys, confide.config\n"
        "c = confide.config.load('examples/shakespeare.toml')\n"
        "assert c.model['kind'] in ('gpt', 'lstm')\n"
        "assert 'torch' not in sys.modules, 'loading a config imported torch'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=root, env=env)


def test_a_misspelt_choice_gets_a_guess(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(write(tmp_path, "[server]\nstrategy = 'fedprx'\n"))
    assert str(info.value) == (
        "server.strategy must be one of 'fedavg', 'fedprox', 'scaffold', 'fednova', 'fedbuff' "
        "(got 'fedprx'); "
        "did you mean 'fedprox'?"
    )


def test_the_help_of_a_choice_lists_every_accepted_name_with_its_own_help() -> None:
    rows = {key: help for key, _, help in config.describe()}
    for key, registry in (("server.strategy", STRATEGIES), ("model.kind", MODELS)):
        for plugin in registry:
            assert f"{plugin.name!r}: {plugin.help}" in rows[key]


def test_insecure_reproducible_noise_is_off_needs_dp_and_no_deployment_takes_it(tmp_path: Path) -> None:
    assert config.load(write(tmp_path, "")).privacy.insecure_reproducible_noise is False
    with pytest.raises(ConfigError, match=r"insecure_reproducible_noise .* but the run adds none"):
        config.load(write(tmp_path, "[privacy]\ninsecure_reproducible_noise = true\n"))
    text = "[privacy]\ndp = 'central'\ninsecure_reproducible_noise = true\n"
    simulated = config.load(write(tmp_path, text))
    assert simulated.privacy.insecure_reproducible_noise is True
    with pytest.raises(ConfigError, match="a deployment refuses it: set it to false"):
        config.check_deployment(simulated)
    config.check_deployment(config.load(write(tmp_path, "[privacy]\ndp = 'central'\n")))
    record = config.load(write(tmp_path, "[privacy]\nrecord_dp = true\ninsecure_reproducible_noise = true\n"))
    assert record.privacy.insecure_reproducible_noise


def test_model_options_are_checked_without_building_the_model(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model.dropout \(1.5\) must be at least 0 and below 1"):
        config.load(write(tmp_path, "[model]\ndropout = 1.5\n"))
    with pytest.raises(ConfigError, match=r"model.hidden must be an integer, got 2.5"):
        config.load(write(tmp_path, "[model]\nkind = 'lstm'\nhidden = 2.5\n"))
    with pytest.raises(ConfigError, match=r"\[model\] must be a table"):
        config.load(write(tmp_path, "model = 3\n"))
    big = config.load(write(tmp_path, "[model]\nlayers = 96\nwidth = 12288\nheads = 96\n"))
    assert big.model["width"] == 12288  # checking a 175B-parameter shape costs nothing: nothing is built


def test_text_data_needs_a_path_where_it_is_loaded_not_in_a_servers_config(tmp_path: Path) -> None:
    from confide.runtime.runner import load_dataset

    loaded = config.load(write(tmp_path, "[data]\ndataset = 'text'\n"))  # a deployed server's config
    with pytest.raises(ConfigError, match=r"data.path must name a folder .* \(a deployed server needs none"):
        load_dataset(loaded)
