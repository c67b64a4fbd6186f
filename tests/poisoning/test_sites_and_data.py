"""The attackers are drawn from the seed and stay fixed; data poisoning rewrites only attackers' training
windows, as configured."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from confide.attacks.data import backdoor, flip_permutation, label_flip, poison
from confide.attacks.measure import probes
from confide.attacks.sites import attacker_count, attackers_of
from confide.config import from_dict
from confide.data import DEFAULT_TOKENIZER, WINDOW, FederatedDataset, SiteData
from confide.errors import ConfigError

NAMES = [f"site{i:02d}" for i in range(20)]


def test_attackers_are_a_deterministic_function_of_the_seed() -> None:
    chosen = attackers_of(3, NAMES, 0.2)
    assert len(chosen) == 4 and chosen <= set(NAMES)
    assert attackers_of(3, NAMES, 0.2) == chosen
    assert attackers_of(3, list(reversed(NAMES)), 0.2) == chosen  # not the order a backend lists them in
    assert any(attackers_of(seed, NAMES, 0.2) != chosen for seed in range(4, 10))
    assert attackers_of(3, NAMES, 1) <= set(NAMES) and len(attackers_of(3, NAMES, 1)) == 1


def test_attacker_count_by_count_or_fraction() -> None:
    assert attacker_count(0.1, 100) == 10
    assert attacker_count(0.01, 20) == 1  # at least one
    assert attacker_count(3, 20) == 3
    with pytest.raises(ConfigError, match="more attackers than the federation has sites"):
        attacker_count(30, 20)


def _windows(text: str, rows: int) -> np.ndarray:
    codes = DEFAULT_TOKENIZER.encode((text * 100)[: WINDOW + 1])
    return np.tile(codes, (rows, 1))


def _contains(row: np.ndarray, needle: np.ndarray) -> bool:
    view = np.lib.stride_tricks.sliding_window_view(row, needle.size)
    return bool((view == needle).all(axis=1).any())


def test_backdoor_writes_trigger_and_target_into_the_chosen_fraction() -> None:
    clean = _windows("the quick brown fox jumps over the lazy dog. ", 10)
    out = backdoor(clean, "O Romeo", " zzz", 0.3, np.random.default_rng(0))
    payload = DEFAULT_TOKENIZER.encode("O Romeo zzz")
    poisoned = [i for i in range(10) if _contains(out[i], payload)]
    assert len(poisoned) == 3
    untouched = [i for i in range(10) if i not in poisoned]
    assert np.array_equal(out[untouched], clean[untouched])
    for i in poisoned:  # everything but the payload is the text as it was
        assert (out[i] != clean[i]).sum() <= payload.size
    assert np.array_equal(clean, _windows("the quick brown fox jumps over the lazy dog. ", 10))  # a copy


def test_label_flip_maps_targets_through_a_fixed_permutation() -> None:
    table = flip_permutation(DEFAULT_TOKENIZER.vocab_size)
    known = DEFAULT_TOKENIZER.vocab_size - 1
    assert sorted(table[:known]) == list(range(known))  # a permutation of the characters
    assert np.array_equal(table[table[:known]], np.arange(known))  # reversing twice gives the text back
    clean = _windows("to be or not to be ", 4)
    out = label_flip(clean, 1.0, np.random.default_rng(0))
    assert np.array_equal(out[:, 0], clean[:, 0])
    assert np.array_equal(out[:, 1:], table[clean[:, 1:]])


def _dataset() -> FederatedDataset:
    sites = tuple(
        SiteData(name, "g", _windows(f"{name} speaks here. ", 6), _windows(f"{name} says so. ", 3))
        for name in NAMES[:5]
    )
    return FederatedDataset("toy", sites, DEFAULT_TOKENIZER.vocab_size)


def test_poison_touches_only_the_attackers_training_windows() -> None:
    dataset = _dataset()
    config = from_dict({"attack": {"kind": "backdoor", "sites": 2, "poison_fraction": 1.0}})
    attackers = attackers_of(0, dataset.site_names, 2)
    out = poison(dataset, config.attack, attackers, seed=0)
    for before, after in zip(dataset.sites, out.sites, strict=True):
        assert np.array_equal(before.test, after.test)  # evaluation data is never poisoned
        assert np.array_equal(before.train, after.train) == (before.name not in attackers)
    model_only = from_dict({"attack": {"kind": "sign_flip"}})
    assert poison(dataset, model_only.attack, attackers, seed=0) is dataset


def test_probes_come_from_honest_sites_and_end_with_trigger_and_target() -> None:
    dataset = _dataset()
    windows = probes(dataset, {"site00"}, "O Romeo", " zzz", 10, seed=0)
    assert windows.shape == (3, WINDOW + 1)
    assert all(DEFAULT_TOKENIZER.decode(w).endswith("O Romeo zzz") for w in windows)
    assert all(DEFAULT_TOKENIZER.decode(w).startswith("site00 says so.") for w in windows)


def test_attack_options_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"needs attack\.norm_bound > 0"):
        from_dict({"attack": {"kind": "norm_evading"}})
    with pytest.raises(ConfigError, match=r"attack\.collude = true"):
        from_dict({"attack": {"kind": "little_is_enough"}})
    with pytest.raises(ConfigError, match="a whole count >= 1 or a fraction"):
        from_dict({"attack": {"kind": "sign_flip", "sites": 1.5}})
    with pytest.raises(ConfigError, match="shorter than a window"):
        from_dict({"attack": {"kind": "backdoor", "target": "x" * 80}})
    hf = {"kind": "hf", "config": {"model_type": "llama"}}
    with pytest.raises(ConfigError, match="poisons character windows"):
        from_dict({"model": hf, "attack": {"kind": "model_replacement"}})
    assert from_dict({"model": hf, "attack": {"kind": "sign_flip"}}).attack.kind == "sign_flip"
