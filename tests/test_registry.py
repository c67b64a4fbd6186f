from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

import confide
from confide import config, registry
from confide.errors import ConfigError
from confide.registry import REGISTRIES, STRATEGIES, Registry

EVERY_PLUGIN = [(r, p) for r in REGISTRIES for p in r]


@pytest.mark.parametrize(("reg", "plugin"), EVERY_PLUGIN, ids=[f"{r.key}={p.name}" for r, p in EVERY_PLUGIN])
def test_every_target_loads(reg: Registry, plugin: registry.Plugin) -> None:
    loaded = reg.load(plugin.name)
    if plugin.target is None:
        assert loaded is None
    else:
        assert callable(loaded), f"{plugin.target} is not a class or function"
    options = reg.load_options(plugin.name)
    assert options is None or dataclasses.is_dataclass(options)
    assert plugin.help and "\n" not in plugin.help


def test_every_choice_option_takes_its_names_from_the_registry_of_its_key() -> None:
    seen = set()
    for section, cls in config.SECTIONS.items():
        for f in dataclasses.fields(cls):
            choices = f.metadata["choices"]
            if choices is None:
                continue
            assert isinstance(choices, Registry)
            assert choices.key == f"{section}.{f.name}"
            assert f.default in choices, f"the default of {choices.key} is not registered"
            seen.add(choices.key)
    # Every registry of a config key is used by the config (LAYERS are built from the config, not named).
    keyed = {r.key for r in REGISTRIES} - {"model.kind", "layer"}
    assert keyed == seen


def test_an_unknown_name_says_key_value_accepted_and_the_nearest() -> None:
    with pytest.raises(ConfigError) as info:
        STRATEGIES.check("scafold")
    assert str(info.value) == (
        "server.strategy must be one of 'fedavg', 'fedprox', 'scaffold', 'fednova', 'fedbuff' "
        "(got 'scafold'); "
        "did you mean 'scaffold'?"
    )
    with pytest.raises(ConfigError, match=r"must be one of .* \(got 3\)$"):
        STRATEGIES.check(3)
    with pytest.raises(ConfigError, match=r"\(got 'zzz'\)$"):  # nothing close: no guess
        STRATEGIES.load("zzz")
    empty = Registry("layer", "a layer")
    with pytest.raises(ConfigError, match="layer must be one of nothing registered yet"):
        empty.get("clip")


def test_registering_is_checked() -> None:
    reg = Registry("x.y", "test")
    reg.register("a", "the first", "confide.server.optim:ServerOptimizer")
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("a", "again", None)
    with pytest.raises(ValueError, match="module:attribute"):
        reg.register("b", "no colon", "confide.server.optim.ServerOptimizer")
    assert reg.names() == ("a",) and len(reg) == 1 and "a" in reg and "b" not in reg
    assert reg.describe() == "'a': the first"


def test_a_missing_optional_package_is_a_config_error_but_a_wrong_confide_module_is_a_bug() -> None:
    reg = Registry("backend.kind", "test")
    reg.register("ray", "spread over Ray", "confide_no_such_package.backend:RayBackend")
    reg.register("typo", "a registration error", "confide.no_such_module:Thing")
    with pytest.raises(ConfigError, match=r"backend.kind = 'ray' needs the package 'confide_no_such_pac"):
        reg.load("ray")
    with pytest.raises(ModuleNotFoundError):
        reg.load("typo")


def test_facts_say_which_plugins_have_a_property_and_why() -> None:
    assert STRATEGIES.having(registry.NEEDS_SGD) == ("scaffold", "fednova")
    assert STRATEGIES.having(registry.PER_SITE_EXTRAS) == ("scaffold", "fednova")
    assert STRATEGIES.fact("fedavg", registry.NEEDS_SGD) is None
    assert STRATEGIES.fact("scaffold", registry.PER_SITE_EXTRAS) == "control variates"


def test_the_registry_imports_no_torch() -> None:
    code = "import sys, confide.registry; assert 'torch' not in sys.modules, 'torch was imported'"
    env = {**os.environ, "PYTHONPATH": str(Path(confide.__file__).parent.parent)}
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, env=env)
