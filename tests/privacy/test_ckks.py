"""CKKS encryption: precision, what the server holds, malformed ciphertexts, and whole runs under it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from confide.config import load
from confide.core import Layout, is_encrypted
from confide.errors import ConfigError, UpdateError
from confide.privacy.he.ckks import PARAMS, CKKSParams, PublicKey, SecretKey
from confide.privacy.he.layer import add_or_undo
from confide.runtime.runner import Runner
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def key() -> SecretKey:
    return SecretKey.generate()


def test_the_decrypted_mean_is_within_1e_4_of_the_float64_mean(key: SecretKey) -> None:
    rng = np.random.default_rng(0)
    updates = [rng.normal(0, 0.05, 5000) for _ in range(10)]
    server = PublicKey.from_bytes(key.public().to_bytes())  # what the server holds: no secret
    total = server.load(key.encrypt(updates[0] / 10).to_bytes(), 5000)
    for update in updates[1:]:
        total += server.load(key.encrypt(update / 10).to_bytes(), 5000)
    mean = key.decrypt(total.to_bytes(), 5000)
    assert np.abs(mean - np.mean(updates, axis=0)).max() < 1e-4
    assert np.abs(mean - np.mean(updates, axis=0)).max() < 1e-6  # measured ~1e-8: the goal with room


def test_a_ciphertext_costs_32_bytes_per_value() -> None:
    key = SecretKey.generate()
    data = key.encrypt(np.zeros(PARAMS.slots * 3)).to_bytes()
    assert 30 * PARAMS.slots * 3 < len(data) < 34 * PARAMS.slots * 3  # 8x a float32, and no more


def test_the_server_key_cannot_decrypt_and_a_secret_key_is_refused_as_public(key: SecretKey) -> None:
    public = PublicKey.from_bytes(key.public().to_bytes())
    assert not public.context.has_secret_key()
    encrypted = public.load(key.encrypt(np.ones(10)).to_bytes(), 10)
    with pytest.raises(ValueError):
        encrypted.decrypt()  # TenSEAL: the context holds no secret key
    with pytest.raises(UpdateError, match="holds the secret key"):
        PublicKey.from_bytes(key.secret_bytes())


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b[:-10], "truncated"),
        (lambda b: b + b"x", "after its last ciphertext"),
        (lambda b: b"PLAIN" + b[5:], "no CKKS header"),
        (lambda b: b[:40] + bytes(200) + b[240:], "malformed"),
    ],
    ids=["truncated", "trailing", "no-header", "zeroed"],
)
def test_a_malformed_encrypted_update_is_refused(key: SecretKey, damage, message: str) -> None:
    data = key.encrypt(np.ones(3000)).to_bytes()
    with pytest.raises(UpdateError, match=message):
        key.public().load(damage(data), 3000)


def test_an_update_of_other_parameters_is_refused_and_leaves_the_sum_exact(key: SecretKey) -> None:
    server = key.public()
    total = server.load(key.encrypt(np.full(3000, 0.5)).to_bytes(), 3000)
    before = total.to_bytes()
    with pytest.raises(UpdateError, match="holds"):  # too few values in its last ciphertext
        server.load(key.encrypt(np.ones(2999)).to_bytes(), 3000)
    # A ciphertext at another scale (a hostile site's) passes parsing but cannot be added: the sum is
    # rolled back to exactly what it was.
    other = SecretKey(key.context.copy(), PARAMS)
    other.context.global_scale = 2.0**30
    hostile = server.load(other.encrypt(np.ones(3000)).to_bytes(), 3000)
    with pytest.raises(UpdateError, match="cannot be added"):
        add_or_undo(total, hostile)
    assert total.to_bytes() == before


def test_a_value_beyond_the_scale_is_refused_before_encryption(key: SecretKey) -> None:
    with pytest.raises(ValueError, match="too large"):
        key.encrypt(np.array([0.0, 2.0**20]))
    with pytest.raises(ValueError, match="not finite"):
        key.encrypt(np.array([np.nan]))


def test_the_parameters_are_128_bit_secure() -> None:
    # HE Standard (Albrecht et al. 2018), table for 128-bit classical security: log q <= 109 at N = 4096.
    assert PARAMS.poly_degree == 4096 and sum(PARAMS.coeff_bits) <= 109
    with pytest.raises(ValueError):  # SEAL itself refuses a modulus too large for 128-bit security
        SecretKey.generate(CKKSParams(poly_degree=4096, coeff_bits=(60, 60), scale_bits=40))


def _config(tmp_path: Path, corpus: Path, name: str, **extra: str) -> Path:
    options = {
        "run__rounds": "3",
        "server__optimizer": "'sgd'",
        "server__learning_rate": "1.0",
        # SGD at the sites: Adam's normalized steps would magnify CKKS's 1e-8 errors on near-zero gradients.
        "client__optimizer": "'sgd'",
        "client__learning_rate": "0.5",
        # Central DP with no noise: the aggregate is DP-FedAvg's equal mean over a fixed denominator, the
        # very weights CKKS applies, so the two runs must agree to CKKS's precision.
        "privacy__dp": "'central'",
        "privacy__clip_norm": "1000.0",
        "privacy__noise_multiplier": "0.0",
        # Central DP draws each round's sites from the server's secret randomness; seeded here, so that both
        # runs ask the same sites (a simulation-only setting).
        "privacy__insecure_reproducible_noise": "true",
    }
    text = tiny_config(corpus, tmp_path / name, **{**options, **extra})
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


def test_a_run_under_ckks_gives_the_model_of_the_plain_run_and_the_server_never_reads_it(
    tmp_path: Path, text_corpus: Path
) -> None:
    plain = Runner.start(load(_config(tmp_path, text_corpus, "plain")))
    plain.run()
    encrypted = Runner.start(load(_config(tmp_path, text_corpus, "ckks", privacy__encryption="'ckks'")))
    encrypted.run()

    # The server holds ciphertexts, checkpoints ciphertexts, and cannot read them as a model.
    held = encrypted.state.weights
    assert is_encrypted(held)
    checkpoint = encrypted.store.latest_checkpoint()
    assert checkpoint is not None and is_encrypted(checkpoint.weights)
    with pytest.raises(UpdateError, match="encrypted with CKKS"):
        Layout.of_module(encrypted.model).check(checkpoint.weights)
    assert "ckks.public" in encrypted.state.optimizer_state  # the public key, checkpointed with the model

    # A simulation keeps the simulated sites' keys: with one, the model is the plain run's.
    clear = encrypted.clear_weights()
    assert clear is not None
    np.testing.assert_allclose(clear, plain.state.weights, atol=1e-5)
    for (_, a), (_, b) in zip(encrypted.store.evaluations(), plain.store.evaluations(), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    # The updates went up as ciphertexts: about 8 times the plain run's bytes.
    up = sum(r["bytes_received"] for r in encrypted.store.rounds())
    assert up > 6 * sum(r["bytes_received"] for r in plain.store.rounds())


def test_a_run_under_ckks_resumes_from_its_encrypted_checkpoint(tmp_path: Path, text_corpus: Path) -> None:
    path = _config(tmp_path, text_corpus, "resume", privacy__encryption="'ckks'", run__checkpoint_every="1")
    first = Runner.start(load(path))
    first.run()
    run_dir = first.store.run_dir
    first.store.close()
    resumed = Runner.resume(run_dir)
    assert resumed.state.round == 3 and is_encrypted(resumed.state.weights)
    assert resumed.clear_weights() is not None


@pytest.mark.parametrize(
    "extra, refusal",
    [
        ({"privacy__secure_aggregation": "true"}, "choose one"),
        ({"server__optimizer": "'adam'"}, "one plain SGD step"),
        ({"server__strategy": "'scaffold'", "client__optimizer": "'sgd'"}, "extras"),
        ({"client__personalization": "'fedrep'"}, "fedrep"),
    ],
    ids=["secure-aggregation", "adam", "scaffold", "fedrep"],
)
def test_what_ckks_cannot_do_is_refused_with_the_reason(
    tmp_path: Path, text_corpus: Path, extra: dict[str, str], refusal: str
) -> None:
    options = {"server__optimizer": "'sgd'", "privacy__encryption": "'ckks'", **extra}
    path = tmp_path / "bad.toml"
    path.write_text(tiny_config(text_corpus, tmp_path / "runs", **options))
    with pytest.raises(ConfigError, match=refusal):
        load(path)


def test_distributed_dp_runs_under_ckks(tmp_path: Path, text_corpus: Path) -> None:
    path = tmp_path / "ddp.toml"
    options = {
        "server__optimizer": "'sgd'",
        "server__learning_rate": "1.0",
        "privacy__encryption": "'ckks'",
        "privacy__dp": "'distributed'",
        "privacy__noise_multiplier": "0.5",
        "run__rounds": "2",
    }
    path.write_text(tiny_config(text_corpus, tmp_path / "runs", **options))
    runner = Runner.start(load(path))
    runner.run()
    assert runner.dp is not None and runner.dp.spent().epsilon > 0
    assert all(r["num_examples"] > 0 for r in runner.store.rounds())  # no round was abandoned
    assert len(runner.store.ledger()) == 2  # both rounds charged to the accountant


def test_central_dp_under_ckks_adds_the_server_noise_inside_the_encryption(
    tmp_path: Path, text_corpus: Path
) -> None:
    """The server encrypts its Gaussian noise with the public key and adds it to the encrypted sum: the model
    the sites decrypt differs from the noiseless one by noise of standard deviation z C lr / m."""
    models = []
    for z in ("0.0", "2.0"):
        path = _config(
            tmp_path,
            text_corpus,
            f"central-{z}",
            privacy__encryption="'ckks'",
            privacy__clip_norm="0.5",
            privacy__noise_multiplier=z,
            run__rounds="1",
        )
        runner = Runner.start(load(path))
        runner.run()
        models.append(runner.clear_weights())
    assert models[0] is not None and models[1] is not None
    spread = float(np.std(models[1] - models[0]))
    assert spread == pytest.approx(2.0 * 0.5 * 1.0 / 3, rel=0.05)  # z C lr / m, m = 3 sites per round


def test_generate_reads_a_ckks_model_only_with_a_sites_key(tmp_path: Path, text_corpus: Path, capsys) -> None:
    import sqlite3

    from confide.cli import main

    path = _config(tmp_path, text_corpus, "gen", privacy__encryption="'ckks'", run__rounds="2")
    runner = Runner.start(load(path))
    runner.run()
    run_dir = runner.store.run_dir
    runner.store.close()
    # A simulation keeps its simulated sites' keys in the run store, so its model can be read there.
    assert main(["generate", str(run_dir), "--prompt", "To be", "--length", "10"]) == 0
    assert "To be" in capsys.readouterr().out
    # A server's run directory holds no site's key: the model cannot be read, and the user is told why.
    with sqlite3.connect(run_dir / "run.sqlite") as db:
        db.execute("DELETE FROM site_state")
    assert main(["generate", str(run_dir), "--prompt", "To be"]) != 0
    assert "encrypted with CKKS" in capsys.readouterr().err


def test_the_error_after_a_thousand_additions_stays_near_1e_7(key: SecretKey) -> None:
    """What the README states: the error grows with the number of ciphertexts added, to about 1e-7 after a
    thousand (100 rounds of 10 sites), far inside the 1e-4 the mean must keep."""
    rng = np.random.default_rng(1)
    server = key.public()
    start = rng.normal(0, 1, PARAMS.slots)
    model = server.encrypt(start)
    expected = start.copy()
    for _ in range(1000):
        update = rng.normal(0, 0.001, PARAMS.slots)
        model += server.load(key.encrypt(update).to_bytes(), PARAMS.slots)
        expected += update
    error = np.abs(key.decrypt(model.to_bytes(), PARAMS.slots) - expected).max()
    assert error < 1e-6
