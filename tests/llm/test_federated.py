"""Federated LoRA: only the adapters travel, the base stays as it was at every site, and every layer of the
stack (FedAvg, FedProx, secure aggregation, DP) works on the adapter vector unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from confide.config import Config
from confide.errors import ConfideError
from confide.models.hf import HFCausalLM, base_sha256
from confide.runtime.local import LocalBackend
from confide.runtime.runner import Runner
from tests.llm.conftest import TINY_LLAMA, llm_config


def frozen_state(model: HFCausalLM) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def start(config: Config) -> tuple[Runner, dict[str, torch.Tensor], np.ndarray]:
    runner = Runner.start(config)
    assert isinstance(runner.model, HFCausalLM)
    return runner, frozen_state(runner.model), runner.state.weights.copy()


def test_only_the_adapters_travel_and_the_base_is_unchanged_at_every_site(
    tmp_path: Path, llama_dir: Path, instructions: Path
) -> None:
    config = llm_config({"path": str(llama_dir)}, instructions, tmp_path)
    runner, base, initial = start(config)
    model = runner.model
    assert isinstance(model, HFCausalLM)
    sha = base_sha256(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert runner.layout.size == trainable and all("lora_" in n for n in runner.layout.names)
    records: list[dict[str, Any]] = []

    class Keep:
        def __getattr__(self, name: str) -> Any:
            return lambda *args: None

        def evaluated(self, round: int, metrics: dict[str, Any]) -> None:
            records.append(metrics)

    runner.run(Keep())  # type: ignore[arg-type]
    assert not np.array_equal(runner.state.weights, initial)  # the adapters learned
    # The one model every simulated site trained on holds the very same base weights as before.
    after = frozen_state(model)
    assert after.keys() == base.keys()
    assert all(torch.equal(after[n], base[n]) for n in base)
    assert base_sha256(model) == sha == runner.store.meta("base_sha256")
    # What crossed the wire each round is the adapter vector, far below the model's bytes.
    full = model.full_model_bytes()
    for metrics in records:
        assert metrics["update_bytes"] == 4 * runner.layout.size
        assert metrics["full_model_bytes"] == full
        assert metrics["bytes_received"] < 3 * full * 0.25  # 3 sites' updates, each under a quarter
        assert metrics["site_peak_memory_max"] > 0
        assert 0.0 <= metrics["rouge_l"] <= 1.0
        assert np.isfinite(metrics["perplexity"]) and metrics["perplexity"] > 1


def test_a_site_whose_base_differs_is_refused_by_name(
    tmp_path: Path, llama_dir: Path, instructions: Path
) -> None:
    runner, _, _ = start(llm_config({"path": str(llama_dir)}, instructions, tmp_path))
    assert isinstance(runner.backend, LocalBackend)
    backend = LocalBackend(runner.dataset, runner.backend.kit, base_sha256="0" * 64)  # type: ignore[arg-type]
    with pytest.raises(ConfideError, match="site 'site1' holds a different base model than the server"):
        backend.site("site1")


def test_fedprox_pulls_the_adapters_towards_the_global_ones(
    tmp_path: Path, llama_dir: Path, instructions: Path
) -> None:
    moves = {}
    for strategy, mu in (("fedavg", 0.0), ("fedprox", 50.0)):
        config = llm_config(
            {"path": str(llama_dir)},
            instructions,
            tmp_path / strategy,
            run={"rounds": 1},
            server={"strategy": strategy, "mu": mu},
            client={"optimizer": "sgd", "learning_rate": 0.01, "max_steps": 4},
            eval={"rouge_samples": 0},
        )
        runner, base, initial = start(config)
        runner.run()
        moves[strategy] = float(np.linalg.norm(runner.state.weights - initial))
        assert isinstance(runner.model, HFCausalLM)
        assert all(torch.equal(p, base[n]) for n, p in frozen_state(runner.model).items())
    assert 0 < moves["fedprox"] < moves["fedavg"]


def test_secure_aggregation_with_dp_gives_the_plain_sum_to_fixed_point_precision(
    tmp_path: Path, llama_dir: Path, instructions: Path
) -> None:
    common = {"clip_norm": 0.05, "noise_multiplier": 0.0, "secagg_bits": 24}
    # Plain: clipped updates summed by the server in clear (central DP without noise) ...
    plain = llm_config(
        {"path": str(llama_dir)},
        instructions,
        tmp_path / "plain",
        run={"rounds": 1},
        privacy={"dp": "central", **common},
    )
    # ... and the full stack: clip, each site's noise share, SecAgg+ masks; the server unmasks only the sum.
    hidden = llm_config(
        {"path": str(llama_dir)},
        instructions,
        tmp_path / "secure",
        run={"rounds": 1},
        privacy={"dp": "distributed", "secure_aggregation": True, **common},
    )
    results = []
    for config in (plain, hidden):
        runner, base, _ = start(config)
        runner.run()
        assert isinstance(runner.model, HFCausalLM)
        assert all(torch.equal(p, base[n]) for n, p in frozen_state(runner.model).items())
        results.append(runner.state.weights)
    # Each coordinate of each of the 3 sites' updates is rounded to 2^-24 on the way through fixed point.
    np.testing.assert_allclose(results[1], results[0], rtol=0, atol=3 * 2.0**-24)
    assert not np.array_equal(results[1], results[0])  # it really went through fixed point


def test_dp_noise_on_the_adapters_is_charged_and_moves_them(
    tmp_path: Path, llama_dir: Path, instructions: Path
) -> None:
    config = llm_config(
        {"path": str(llama_dir)},
        instructions,
        tmp_path,
        privacy={"dp": "distributed", "secure_aggregation": True, "clip_norm": 0.05, "noise_multiplier": 1.0},
    )
    runner, _, initial = start(config)
    runner.run()
    assert runner.dp is not None
    assert np.isfinite(runner.dp.spent().epsilon) and runner.dp.spent().epsilon > 0
    assert not np.array_equal(runner.state.weights, initial)


def test_a_base_pretrained_by_a_run_is_the_model_path_of_the_next(tmp_path: Path, instructions: Path) -> None:
    pretrain = llm_config({"config": TINY_LLAMA}, instructions, tmp_path, adapter={"kind": "none"})
    runner = Runner.start(pretrain)
    runner.run()
    run_dir = tmp_path / "llm"
    assert (run_dir / "base" / "config.json").exists()
    tune = llm_config({"path": str(run_dir)}, instructions, tmp_path, run={"name": "tuned", "rounds": 1})
    tuned = Runner.start(tune)
    assert isinstance(tuned.model, HFCausalLM) and isinstance(runner.model, HFCausalLM)
    # The new run's base is the first run's final model: the same logits before any adapter is trained.
    ids = torch.tensor([[5, 9, 17, 3]])
    runner.layout.write(runner.model, runner.state.weights)
    torch.testing.assert_close(tuned.model(ids)[0], runner.model(ids)[0])


@pytest.mark.parametrize(
    "sections",
    [
        {"server": {"sites_per_round": 3, "optimizer": "adam", "learning_rate": 0.01}},
        {"client": {"max_steps": 2, "batch_size": 4, "personalization": "ditto", "ditto_lambda": 0.1}},
    ],
    ids=["fedadam", "ditto"],
)
def test_server_optimizers_and_personalization_run_on_the_adapters(
    tmp_path: Path, llama_dir: Path, instructions: Path, sections: dict[str, Any]
) -> None:
    config = llm_config({"path": str(llama_dir)}, instructions, tmp_path, **sections)
    runner, base, initial = start(config)
    runner.run()
    assert not np.array_equal(runner.state.weights, initial)
    assert isinstance(runner.model, HFCausalLM)
    after = frozen_state(runner.model)
    assert all(torch.equal(after[n], base[n]) for n in base)
    last = runner.store.evaluations()[-1][1]
    assert np.isfinite(last["perplexity"])
    if "client" in sections:
        assert np.isfinite(last["personal_perplexity"]) and last["personalized_sites"] > 0
