"""What a run's config builds, the same on the server and at every site: the model with its seeded initial
weights, site-level DP, secure aggregation's settings, the layer stack and a site's training kit.

Both sides call these functions with the same config (a deployed site gets it from the server at join), so
the server's half and the sites' half of every layer agree on their settings.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from torch import nn

from confide.algorithms import algorithm
from confide.client.dpsgd import DPSGD
from confide.client.personalize import Personal
from confide.client.site import SiteKit
from confide.client.state import SiteState
from confide.client.trainer import ClientOptimizer, Trainer
from confide.compress.subset import subset_size
from confide.config import Config, check_deployment
from confide.core import Layout, Vector, round_size
from confide.errors import ConfigError
from confide.models import build_model, head_names
from confide.pipeline import Aggregator, Layer, StackContext
from confide.privacy.dp import AdaptiveClip, CentralDP
from confide.privacy.matrix import default_bands
from confide.privacy.policy import SiteDP, expected_bits_noise
from confide.privacy.record import adam_update_bound, record_noise_for, record_update_bound
from confide.privacy.secagg import keys
from confide.privacy.secure import SecureAggregation
from confide.privacy.tee.layer import EnclaveRelease
from confide.randomness import Randomness, SecretRandomness, SeededRandomness, Stream, public_rng
from confide.registry import AGGREGATORS, LAYERS
from confide.runtime.buffered import Buffered
from confide.runtime.clock import Speeds
from confide.runtime.federation import Federation
from confide.server.optim import ServerOptimizer
from confide.server.reference import ServerData, read_windows
from confide.server.screen import ScreenLayer
from confide.server.strategy import Strategy, WeightedMean
from confide.server.trust import FLTrust

log = logging.getLogger(__name__)


def build_model_for(config: Config, vocab_size: int) -> nn.Module:
    """The config's model with the run's seeded initial weights (the same in every process)."""
    options = {k: v for k, v in config.model.items() if k != "kind"}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(public_rng(config.run.seed, 0, Stream.MODEL_INIT).integers(2**31 - 1)))
        if config.model["kind"] == "hf":
            from confide.models.configs import model_config
            from confide.models.hf import build_hf

            return build_hf(model_config("hf", **options), config.adapter)  # type: ignore[arg-type]
        return build_model(config.model["kind"], vocab_size=vocab_size, **options)


def resolve_record_dp(config: Config, windows: Sequence[int]) -> Config:
    """``config`` with DP-SGD's noise multiplier calibrated to ``privacy.record_target_epsilon`` for sites
    of these window counts (see :func:`~confide.privacy.record.record_noise_for`); unchanged without it.

    The server and a simulation's sites build from the returned config, so the noise the sites add is the
    one the plan carries and the header prints."""
    p, c = config.privacy, config.client
    if not (p.record_dp and p.record_target_epsilon):
        return config
    noise, _ = record_noise_for(
        p.record_target_epsilon, windows, c.batch_size, c.epochs, c.max_steps or None, config.run.rounds
    )
    return replace(config, privacy=replace(p, record_noise=noise))


def record_bound(config: Config, windows: Sequence[int]) -> float | None:
    """The bound on every coordinate of a DP-SGD update for sites of these window counts, or None where none
    is known: no DP-SGD, no window counts (a deployment's site knows only its own), or SGD with weight decay
    (whose pull towards zero depends on the weights, not the clip). Under SGD it follows from the clip and
    the noise (:func:`~confide.privacy.record.record_update_bound`), under Adam from Adam's own bounded step
    (:func:`~confide.privacy.record.adam_update_bound`)."""
    p, c = config.privacy, config.client
    if not p.record_dp or not windows:
        return None
    if c.optimizer == "adam":
        return adam_update_bound(c.learning_rate, c.batch_size, c.epochs, c.max_steps or None, windows)
    if c.optimizer != "sgd" or c.weight_decay > 0:
        return None
    return record_update_bound(
        c.learning_rate,
        p.record_clip,
        p.record_noise,
        c.momentum,
        c.batch_size,
        c.epochs,
        c.max_steps or None,
        windows,
    )


_UNBOUNDED_WARNED: set[str] = set()
"""Runs already warned that their updates have no known bound (the warning is given once per process)."""


def secagg_range(config: Config, dp: SiteDP | None, windows: Sequence[int] = ()) -> float:
    """Secure aggregation's fixed-point range R: ``privacy.secagg_range``, or else derived from the clip
    norms in force, so that no coordinate of an update falls outside [-R, R] but with negligible probability.

    A site-clipped update has no coordinate above its clip norm C, and a DP-SGD update none above its
    :func:`record_bound`; with both the smaller holds (clipping only shrinks an update). Distributed DP's
    share of the noise, added after, gets 8 of its standard deviations. Without any bound (secure
    aggregation without DP) R stays 1, with a warning: such updates are unbounded, and were always so here.
    """
    p = config.privacy
    if p.secagg_range:
        return p.secagg_range
    bounds = [] if dp is None else [dp.clip_norm]
    record = record_bound(config, windows)
    if record is not None:
        bounds.append(record)
    if not bounds:
        if p.record_dp:
            # The config check refuses DP-SGD's unbounded optimizers and deployments; windows are missing.
            raise ConfigError(
                "secure aggregation's range under DP-SGD follows from the sites' window counts, which are "
                "not known here: set privacy.secagg_range"
            )
        if config.run.name not in _UNBOUNDED_WARNED:
            _UNBOUNDED_WARNED.add(config.run.name)
            log.warning(
                "secure aggregation encodes each coordinate in [-1, 1], and nothing bounds these updates (no "
                "site-level clipping, no DP-SGD): a coordinate outside is clipped, and the run says so. Set "
                "privacy.secagg_range above the largest coordinate an update may have, or clip the updates "
                "(privacy.dp = 'central' or 'distributed')"
            )
        return 1.0
    # Under distributed DP each share of the noise adds z C / sqrt(m) of standard deviation, and 8 of those
    # leave essentially nothing to clip.
    spread = 0.0
    if dp is not None and dp.placement == "distributed":
        spread = dp.update_noise / math.sqrt(dp.share_sites)
    return min(bounds) + 8.0 * spread * (dp.clip_norm if dp is not None else 0.0)


def build_strategy(config: Config, shared: np.ndarray | None = None) -> Strategy:
    c, s, p = config.client, config.server, config.privacy
    return Strategy(
        sites_per_round=s.sites_per_round,
        epochs=c.epochs,
        max_steps=c.max_steps or None,
        batch_size=c.batch_size,
        learning_rate=c.learning_rate,
        optimizer=ServerOptimizer(
            s.optimizer, s.learning_rate, s.beta1, s.beta2, s.tau, s.schedule, config.run.rounds
        ),
        seed=config.run.seed,
        sampling=s.sampling,
        aggregator=WeightedMean(),
        algorithm=s.strategy,
        mu=s.mu,
        personalization=c.personalization,
        personal_steps=c.personal_steps,
        personal_lambda=c.ditto_lambda,
        personal_learning_rate=c.personal_learning_rate,
        stragglers=c.stragglers,
        min_work=c.min_work,
        record_clip=p.record_clip if p.record_dp else 0.0,
        record_noise=p.record_noise if p.record_dp else 0.0,
        shared=shared,
    )


def build_speeds(config: Config) -> Speeds:
    """How the simulation's virtual clock draws the sites' speeds (``[backend]``)."""
    b = config.backend
    return Speeds(b.step_seconds, b.speed_sigma, b.slow_fraction, b.slow_factor, b.latency, b.bandwidth)


def build_buffered(config: Config, federation: Federation, population: int) -> Buffered | None:
    """FedBuff's asynchronous rounds over ``federation``, or None when the run's rounds are synchronous."""
    s = config.server
    if s.strategy != "fedbuff":
        return None
    size = round_size(s.sites_per_round, population)
    concurrency = min(s.concurrency or 2 * size, population)
    if concurrency < size:
        raise ConfigError(
            f"server.concurrency = {s.concurrency} sites cannot fill a buffer of server.sites_per_round = "
            f"{size} updates: raise server.concurrency to at least {size} (or set 0: twice the buffer)"
        )
    return Buffered(federation, size, concurrency, s.max_staleness, s.staleness_exponent, config.run.seed)


def build_site_dp(config: Config, population: int) -> SiteDP | None:
    """The run's site-level DP policy, or None without ``privacy.dp``."""
    p = config.privacy
    if p.dp == "none":
        return None
    per_round = build_strategy(config).count(population)
    adaptive = None
    if p.adaptive_clip:
        bits = p.bits_noise or expected_bits_noise(per_round)
        adaptive = AdaptiveClip.init(p.clip_norm, p.target_quantile, p.clip_learning_rate, bits)
    options: dict[str, Any] = {
        "placement": p.dp,
        "clip_norm": p.clip_norm,
        "population": population,
        "sites_per_round": per_round,
        "sampling": config.server.sampling,
        "accounting": p.accounting,
        "delta": p.delta,
        "adaptive": adaptive,
        "mechanism": p.mechanism,
    }
    if p.mechanism == "dp-ftrl":
        options["bands"] = p.bands or default_bands(population, per_round, config.run.rounds)
        if (options["bands"] - 1) * per_round > population - per_round:
            raise ConfigError(
                f"privacy.bands = {p.bands}: a site sits out the {p.bands - 1} rounds after each of its own, "
                f"so {p.bands - 1} rounds of {per_round} sites leave fewer than {per_round} of the "
                f"{population} sites to draw from. Use at most {max(1, population // per_round)} bands "
                "(or 0, which picks that)"
            )
        # The factorization follows the server's optimizer: the square root of its workload (momentum's
        # first-moment decay for momentum and the adaptive ones, whose steps are not linear: a heuristic
        # that moves utility only, never the privacy).
        options["workload_momentum"] = config.server.beta1 if config.server.optimizer != "sgd" else 0.0
    if p.enclave != "none" or config.server.strategy == "fedbuff":
        # The server, no longer trusted with the updates, chooses the sites and sees who sends a sealed
        # update; and a FedBuff buffer holds the sites that finish first, not a random sample: either way no
        # amplification by sampling is claimed.
        options["trust"] = "knows_sample"
    if p.calibrate:
        participations = p.max_participations or None
        rounds = config.run.rounds
        dp = SiteDP.calibrated(p.target_epsilon, rounds, participations=participations, **options)
    else:
        dp = SiteDP(noise_multiplier=p.noise_multiplier, target_epsilon=p.target_epsilon, **options)
    dp.participation_cap = p.max_participations
    return dp


def build_secure(
    config: Config,
    sites: Sequence[str],
    dp: SiteDP | None,
    registry: Mapping[str, bytes] | None = None,
    windows: Sequence[int] = (),
) -> tuple[SecureAggregation | None, dict[str, Ed25519PrivateKey]]:
    """Secure aggregation's settings (None when off) and the sites' identity keys where a simulation needs
    them (secure aggregation's authenticated mode, the CKKS key ceremony): a long-term identity made for each
    simulated site. A deployment passes its ``registry`` (enrolled, endorsed by its CA) instead.
    ``windows``: the sites' window counts, from which a simulation derives the range of DP-SGD updates (see
    :func:`secagg_range`); a deployment, whose sites cannot know them, passes none."""
    p = config.privacy
    identities: dict[str, Ed25519PrivateKey] = {}
    if (p.encryption == "ckks" or p.enclave != "none") and registry is None:
        # The CKKS key ceremony, and updates sealed to the enclave, are signed with each site's identity
        # (a deployment's enrolled ones).
        identities = {site: keys.generate_identity() for site in sites}
    if not p.secure_aggregation:
        return None, identities
    clip_range = secagg_range(config, dp, windows)
    if not p.secagg_authenticated:
        registry = None
    elif registry is None:
        identities = {site: keys.generate_identity() for site in sites}
        registry = {site: keys.identity_public_bytes(key) for site, key in identities.items()}
    settings = SecureAggregation(
        p.secagg_neighbours,
        p.secagg_threshold,
        clip_range,
        p.secagg_bits,
        p.secagg_authenticated,
        registry,
        min_sites=max(2, config.deploy.min_updates),
    ).with_compression(config.compression, dp, p.secagg_range)
    return settings, identities


def build_layers(
    config: Config,
    dp: SiteDP | None,
    secure: SecureAggregation | None,
    update_size: int,
    identities: Mapping[str, Ed25519PrivateKey] | None = None,
    sites: Sequence[str] = (),
    *,
    population: int = 0,
    registry: Mapping[str, bytes] | None = None,
) -> list[Layer]:
    """The run's layer stack, in site order: the strategy's own layers (SCAFFOLD's control variates), then
    every registered layer the config asks for, in the registry's order (adaptive clipping, clip, noise
    share, then secure aggregation, or, where the server reads each update, validation). ``sites``: the
    federation's site names, which a simulation with ``[attack]`` draws its attackers from."""
    if config.compression.subset < 1:
        # What the protecting layers see of an update: the round's common subset of its values.
        update_size = subset_size(update_size, config.compression.subset)
    stack = StackContext(
        config,
        dp,
        secure,
        dict(identities or {}),
        update_size,
        tuple(sites),
        population=population or len(sites),
        registry=registry,
    )
    layers: list[Layer] = algorithm(config.server.strategy).layers()
    for plugin in LAYERS:
        layer = LAYERS.load(plugin.name).from_config(stack)
        if layer is not None:
            layers.append(layer)
    if config.privacy.enclave_address:
        from confide.runtime.grpc.aggregator import connect_enclave

        connect_enclave(layers, config.privacy.enclave_address, update_size)
    return layers


def build_aggregator(config: Config, dp: SiteDP | None) -> Aggregator | None:
    """The server's aggregator when it is not the strategy's own: the robust one ``server.aggregator``
    names (central DP's noise wrapped around it under central DP), DP-FedAvg's equal mean under DP, or None
    (the strategy's example-weighted mean)."""
    name = config.server.aggregator
    if config.privacy.enclave != "none":
        return EnclaveRelease(name)  # the aggregator and central DP run inside the enclave
    if name == "mean":
        return dp.aggregator if dp is not None else None
    robust: Any = AGGREGATORS.load(name).from_defence(config.defence)
    if isinstance(robust, FLTrust) and dp is not None:
        robust.reference_norm = dp.clip_norm  # bounds its result, hence its sensitivity (see FLTrust)
    if dp is not None and dp.central is not None:
        return CentralDP(robust, dp.central)
    return robust  # under distributed DP the stack check refuses it: secure aggregation hides the updates


def attach_server_data(
    config: Config,
    model: nn.Module,
    layers: Sequence[Layer],
    aggregator: Aggregator | None,
    current: Callable[[], tuple[Vector, int]],
    shared: np.ndarray | None = None,
) -> None:
    """Give the defences that need the server's own data their data: the screen its validation loss
    (``defence.validation_data``), FLTrust its root update (``defence.root_data``). ``current()`` is the
    global weights and number of the round being aggregated; the server trains as a site would."""
    c, d = config.client, config.defence

    def server_data(path: str) -> ServerData:
        optimizer = ClientOptimizer(c.optimizer, c.momentum, c.weight_decay)
        return ServerData(
            model, read_windows(path), optimizer, c.learning_rate, c.batch_size, d.root_steps, config.run.seed
        )

    if d.validation_data:
        for layer in layers:
            if isinstance(layer, ScreenLayer):
                layer.validation = server_data(d.validation_data).loss
    inner = getattr(aggregator, "inner", aggregator)
    if isinstance(inner, FLTrust) and d.root_data:
        root = server_data(d.root_data)

        def root_update() -> Vector:
            weights, round = current()
            delta = root.update(weights, round)
            return delta if shared is None else delta[shared]

        inner.root = root_update


def server_randomness(config: Config) -> Any:
    """The server's randomness for round r: secret, unless the run is an insecure reproducible simulation."""
    if not config.privacy.insecure_reproducible_noise:
        return lambda round: SecretRandomness()
    seed = config.run.seed

    def seeded(round: int) -> Randomness:
        return SeededRandomness([seed, round, int(Stream.CENTRAL_NOISE)])

    return seeded


def personal_parts(
    config: Config, model: nn.Module, layout: Layout
) -> tuple[frozenset[str], np.ndarray | None]:
    """FedRep's head (parameter names) and the positions of the shared body; without FedRep, no head."""
    if config.client.personalization != "fedrep":
        return frozenset(), None
    prefixes = tuple(p.strip() for p in config.client.personal_layers.split(",") if p.strip())
    head = head_names(model, prefixes)
    return head, layout.index(n for n in layout.names if n not in head)


def build_site_kit(
    config: Config, model: nn.Module, layers: Sequence[Layer], state: SiteState, *, deployed: bool = False
) -> SiteKit:
    """The trainer, personal state, shared positions, DP-SGD and layers of ``config`` for ``model``. A
    deployed site builds exactly this from the config the server sends, so both sides agree."""
    c, p = config.client, config.privacy
    if deployed:
        check_deployment(config)
    layout = Layout.of_module(model)
    optimizer = ClientOptimizer(c.optimizer, c.momentum, c.weight_decay)
    trainer = Trainer(model, optimizer)
    head, shared = personal_parts(config, model, layout)
    personal = Personal(state, layout.index(head), head)
    dpsgd = DPSGD(model, p.record_clip, p.record_noise, optimizer) if p.record_dp else None
    insecure_seed = config.run.seed if p.insecure_reproducible_noise else None
    return SiteKit(
        trainer, personal, shared, dpsgd, tuple(layers), config.eval.batch_size, insecure_seed=insecure_seed
    )
