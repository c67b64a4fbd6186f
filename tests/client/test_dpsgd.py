from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from scipy import stats

from confide.client.dpsgd import DPSGD, PerSampleGradients, record_accountant
from confide.client.trainer import ClientOptimizer, split_window
from confide.core import Layout, Plan
from confide.errors import ConfigError
from confide.models import PAD, build_model
from confide.privacy.accountant import PrivacyAccountant
from confide.randomness import SecretRandomness, SeededRandomness

MODELS = {
    "gpt": {"layers": 1, "heads": 2, "width": 16},
    "lstm": {"embedding": 8, "hidden": 16, "layers": 2},
}


def windows(n: int = 6, width: int = 17) -> np.ndarray:
    """Random windows, the second one ending early (PAD after its text) when there are two or more."""
    rng = np.random.default_rng(0)
    data = rng.integers(0, 40, size=(n, width), dtype=np.uint8)
    if n >= 2:
        data[1, width // 2 :] = PAD
    return data


def model(kind: str = "gpt", **extra: float) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(kind, 97, **{**MODELS[kind], **extra})


def hand_gradients(net: torch.nn.Module, layout: Layout, data: np.ndarray) -> np.ndarray:
    """Each window's gradient on its own, by plain autograd, one window at a time: (N, parameters)."""
    rows = []
    for i in range(len(data)):
        inputs, targets = split_window(data[i : i + 1])
        net.zero_grad(set_to_none=True)
        _, loss = net(inputs, targets)
        loss.backward()
        rows.append(layout.flatten({n: p.grad for n, p in net.named_parameters()}).copy())
    return np.stack(rows)


@pytest.mark.parametrize("kind", ["gpt", "lstm"])
def test_noise_free_step_is_the_mean_of_hand_clipped_gradients(kind: str) -> None:
    net = model(kind)
    data = windows()
    layout = Layout.of_module(net)
    weights = layout.read(net).copy()
    grads = hand_gradients(net, layout, data)
    norms = np.linalg.norm(grads.astype(np.float64), axis=1)
    clip_norm = float(np.median(norms))
    assert (norms > clip_norm).any() and (norms < clip_norm).any()  # some windows clipped, some not
    clipped = grads * np.minimum(1.0, clip_norm / norms)[:, None]

    dp = DPSGD(net, max_grad_norm=clip_norm, noise_multiplier=0.0, optimizer=ClientOptimizer("sgd"))
    # batch_size = N makes the Poisson rate 1: every window is in the batch, and the mean is over N.
    plan = Plan(round=1, max_steps=1, batch_size=len(data), learning_rate=0.5, seed=0)
    result = dp.fit(weights, data, plan, SeededRandomness(1))
    assert result.steps == 1 and result.sampling_rate == 1.0
    # atol: float32 sums of terms that cancel (an embedding row summed over positions in another order).
    np.testing.assert_allclose(result.delta, -0.5 * clipped.mean(axis=0), rtol=1e-4, atol=5e-7)


def per_window(grads: dict[str, torch.Tensor], layout: Layout, n: int) -> np.ndarray:
    return np.stack([layout.flatten({k: g[i] for k, g in grads.items()}).copy() for i in range(n)])


def test_per_sample_gradients_match_autograd_with_tied_weights_and_positions() -> None:
    net = model("gpt")
    data = windows(4)
    layout = Layout.of_module(net)
    grads, losses = PerSampleGradients(net, chunk_size=3)(*split_window(data))
    np.testing.assert_allclose(
        per_window(grads, layout, 4), hand_gradients(net, layout, data), rtol=1e-4, atol=1e-7
    )
    assert losses.shape == (4,)


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # the vmap path's fallback
@pytest.mark.parametrize("method", ["auto", "vmap"])
def test_lstm_per_window_gradients_match_autograd_with_padding(method: str) -> None:
    # auto: the LSTM's hand-written backward pass; vmap: the old path, kept for comparison.
    net = model("lstm")
    data = windows(5)
    data[3, 1:] = PAD  # one target only: a window's loss is the mean over its own real targets
    layout = Layout.of_module(net)
    gradients = PerSampleGradients(net, method=method)
    assert gradients.clips_exactly == (method == "auto")
    inputs, targets = split_window(data)
    grads, losses = gradients(inputs, targets)
    assert list(grads) == list(layout.names)
    expected = hand_gradients(net, layout, data)
    np.testing.assert_allclose(per_window(grads, layout, 5), expected, rtol=1e-4, atol=1e-7)
    with torch.no_grad():
        own = [float(net(inputs[i : i + 1], targets[i : i + 1])[1]) for i in range(5)]
    np.testing.assert_allclose(losses.numpy(), own, rtol=1e-5)


def test_lstm_clipped_sum_equals_clipping_each_window_gradient() -> None:
    net = model(
        "lstm", hidden=24
    )  # 4H * H > T (4H + H) for this T: the recurrent weights' norms go the T x T way
    data = windows(6, width=9)
    layout = Layout.of_module(net)
    expected = hand_gradients(net, layout, data).astype(np.float64)
    norms = np.linalg.norm(expected, axis=1)
    clip = float(np.median(norms))
    sums, got_norms, losses = PerSampleGradients(net).clipped_sum(*split_window(data), clip)
    np.testing.assert_allclose(got_norms.numpy(), norms, rtol=1e-4)
    factors = np.minimum(1.0, clip / (norms + 1e-6))
    np.testing.assert_allclose(layout.flatten(sums), factors @ expected, rtol=1e-4, atol=1e-7)
    assert losses.shape == (6,)
    with pytest.raises(ValueError, match="LSTM"):
        PerSampleGradients(model("gpt")).clipped_sum(*split_window(data), clip)


@pytest.mark.parametrize("kind", ["gpt", "lstm"])
def test_a_dp_step_warns_of_no_slow_fallback(kind: str) -> None:
    # vmap falls back to a loop over the windows, with a UserWarning, where it has no batching rule (the fused
    # LSTM and attention kernels): a DP step must not reach one.
    net = model(kind, dropout=0.1) if kind == "gpt" else model(kind)
    data = windows(4)
    dp = DPSGD(net, max_grad_norm=1.0, noise_multiplier=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        losses = dp.step_batch(*split_window(data), 4.0, SeededRandomness(0))
    assert losses.shape == (4,) and torch.isfinite(losses).all()


def test_noise_on_the_step_has_std_z_c_over_the_expected_batch() -> None:
    net = model()
    data = windows()
    layout = Layout.of_module(net)
    weights = layout.read(net).copy()
    plan = Plan(round=1, max_steps=1, batch_size=len(data), learning_rate=1.0, seed=0)
    clean = DPSGD(net, 0.1, 0.0, ClientOptimizer("sgd")).fit(weights, data, plan, SeededRandomness(3)).delta
    noisy = DPSGD(net, 0.1, 2.0, ClientOptimizer("sgd")).fit(weights, data, plan, SeededRandomness(3)).delta
    noise = (noisy - clean).astype(np.float64)
    variance = (2.0 * 0.1 / len(data)) ** 2  # (z C / expected batch)², times lr² = 1
    statistic = float(np.sum(noise**2)) / variance
    assert stats.chi2.ppf(1e-6, noise.size) < statistic < stats.chi2.ppf(1 - 1e-6, noise.size)


def test_site_epsilon_grows_with_steps_and_follows_the_accountant() -> None:
    net = model(dropout=0.1)
    data = windows(20)
    layout = Layout.of_module(net)
    weights = layout.read(net).copy()
    dp = DPSGD(net, max_grad_norm=1.0, noise_multiplier=1.1)
    accountant = record_accountant(len(data), delta=1e-5)
    plan = Plan(round=1, epochs=1, batch_size=5, learning_rate=0.1, seed=0)
    first = dp.fit(weights, data, plan, SeededRandomness(4), accountant)
    second = dp.fit(weights, data, plan, SeededRandomness(5), accountant)
    assert first.steps == 4 and first.sampling_rate == 0.25
    assert first.epsilon is not None and second.epsilon is not None
    assert 0 < first.epsilon < second.epsilon
    direct = PrivacyAccountant("rdp", "poisson", len(data), 1e-5)
    direct.spend(1.1, 0.25, steps=8)
    assert second.epsilon == pytest.approx(direct.epsilon(), rel=1e-12)
    assert np.isfinite(first.delta).all() and first.loss > 0
    with pytest.raises(ConfigError, match="'poisson'"):
        dp.fit(weights, data, plan, SecretRandomness(), PrivacyAccountant("rdp", "fixed", len(data), 1e-5))


def test_fit_repeats_only_with_insecure_seeded_noise_and_is_secret_otherwise() -> None:
    net = model()
    data = windows(12)
    weights = Layout.of_module(net).read(net).copy()
    dp = DPSGD(net, max_grad_norm=1.0, noise_multiplier=1.0)
    plan = Plan(round=1, batch_size=3, max_steps=3, learning_rate=0.1, seed=0)
    a, b = dp.fit(weights, data, plan, SeededRandomness(9)), dp.fit(weights, data, plan, SeededRandomness(9))
    np.testing.assert_array_equal(a.delta, b.delta)
    secret = [dp.fit(weights, data, plan, SecretRandomness()).delta for _ in range(2)]
    assert not np.array_equal(*secret)
    with pytest.raises(ConfigError, match="max_grad_norm"):
        DPSGD(net, max_grad_norm=0.0, noise_multiplier=1.0)


def test_building_dp_sgd_leaves_logging_unconfigured() -> None:
    # Opacus calls logging.basicConfig() on import; in a fresh process, DPSGD must leave no root handler.
    code = (
        "import logging\n"
        "from confide.client.dpsgd import DPSGD\n"
        "from confide.models import build_model\n"
        "DPSGD(build_model('gpt', 97, layers=1, heads=1, width=8), 1.0, 1.0)\n"
        "print(len(logging.root.handlers))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "0"
