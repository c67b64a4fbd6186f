"""A run from a config to a finished run directory: data, model, backend, federation, store.

The runner owns the loop over rounds: a round, then (every ``eval.every`` rounds) an evaluation, then (every
``run.checkpoint_every`` rounds) a checkpoint. Everything random is derived from ``(run.seed, round)``, never
from a stream that runs across rounds, so resuming from the checkpoint of round r recomputes rounds r+1, ...
exactly as an uninterrupted run computes them.

Over ~400 lines because the loop and what it does around each round (budget limits, retries, evaluation,
checkpoints, resume) are one object's state; the builders it shares with a site are in :mod:`.stack`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple, Protocol, cast

import numpy as np
import torch
from torch import nn

from confide.attacks.run import Attack
from confide.client.personalize import DITTO_KEY, FEDREP_KEY
from confide.client.site import DPSGD_EPSILON_KEY
from confide.config import Config, check_deployment
from confide.core import Layout, Plan, Vector, is_encrypted
from confide.data import DEFAULT_TOKENIZER, FederatedDataset, llm, partition, shakespeare
from confide.data.llm import is_instruction_rows
from confide.data.text import load_text, read_sites
from confide.errors import ConfideError, ConfigError, DivergedError, StoreError
from confide.models import CharModel
from confide.models.configs import HFConfig, model_config
from confide.models.hf import HFCausalLM
from confide.pipeline import RoundAbandoned
from confide.privacy.accountant import LedgerEntry
from confide.privacy.he.ckks import ENCRYPTED_MODEL
from confide.privacy.policy import CLIP_KEY, SiteDP
from confide.privacy.secure import SECAGG_CLIPPED
from confide.randomness import Stream, public_rng
from confide.runtime.clock import VirtualClock
from confide.runtime.federation import (
    Backend,
    Federation,
    RoundResult,
    ServerState,
    summarize,
)
from confide.runtime.llm import LanguageModelRun
from confide.runtime.local import LocalBackend
from confide.runtime.pool import SitePool, resolve_workers, worker_threads
from confide.runtime.sites import SiteRecipe
from confide.runtime.stack import (
    attach_server_data,
    build_aggregator,
    build_buffered,
    build_layers,
    build_model_for,
    build_secure,
    build_site_dp,
    build_site_kit,
    build_speeds,
    build_strategy,
    personal_parts,
    resolve_record_dp,
    server_randomness,
)
from confide.runtime.store import Store, StoreSiteState
from confide.server.reputation import offenders, outcomes

log = logging.getLogger(__name__)

CLOCK_KEY = "clock"
"""A checkpoint's extra tensor: the backend's clock (virtual seconds in a simulation) at that round."""

LIVE_SAMPLE_LENGTH = 120
"""Characters of the passage written at each evaluation for the live view (at most; ``eval.sample_length``
when shorter): on the demo's model a fraction of the evaluation's time."""

__all__ = [
    "Baseline",
    "NullObserver",
    "Observer",
    "Relay",
    "Runner",
    "SiteInfo",
    "build_model_for",
    "build_site_dp",
    "generate_text",
    "load_dataset",
    "stored_sites",
]


class Observer(Protocol):
    """Progress callbacks: the command line draws its display from these; the library never prints."""

    def run_started(self, runner: Runner, first_round: int) -> None: ...

    def round_started(self, round: int, sites: Sequence[str]) -> None: ...

    def site_done(self, round: int, site: str) -> None: ...

    def round_finished(self, result: RoundResult) -> None: ...

    def round_retried(self, round: int, reason: str) -> None:
        """A deployment's round failed for too few answers and will be tried again."""
        ...

    def evaluated(self, round: int, metrics: dict[str, Any]) -> None: ...

    def run_finished(self, runner: Runner) -> None: ...

    def stopped(self, reason: str) -> None:
        """The run stopped before its last round (its privacy budget is spent), for ``reason``."""
        ...


class NullObserver:
    """An observer that ignores everything (for library use and tests)."""

    def run_started(self, runner: Runner, first_round: int) -> None:
        pass

    def round_started(self, round: int, sites: Sequence[str]) -> None:
        pass

    def site_done(self, round: int, site: str) -> None:
        pass

    def round_finished(self, result: RoundResult) -> None:
        pass

    def round_retried(self, round: int, reason: str) -> None:
        pass

    def evaluated(self, round: int, metrics: dict[str, Any]) -> None:
        pass

    def run_finished(self, runner: Runner) -> None:
        pass

    def stopped(self, reason: str) -> None:
        pass


@dataclass(frozen=True)
class SiteInfo:
    """What the server knows of a site: its name, its group, and how many windows it trains and tests on."""

    name: str
    group: str
    num_train: int
    num_test: int


def stored_sites(store: Store) -> list[SiteInfo]:
    return [SiteInfo(*row) for row in store.db.execute("SELECT name, grp, num_train, num_test FROM sites")]


class _Evaluated(NamedTuple):
    metrics: dict[str, float]
    per_site: list[tuple[str, float, float, int]]
    complete: bool = True


@dataclass(frozen=True)
class Baseline:
    """The unigram baseline: always predict the most frequent character of the training text."""

    character: str
    accuracy: float


def unigram_baseline(dataset: FederatedDataset, eval_sites: Sequence[str]) -> Baseline:
    """The baseline on the evaluated sites' held-out text; its character is the most frequent one of every
    site's training text, or, when sites are registered lazily (``data.lazy``), of the evaluated sites'
    only: reading every site is what lazy registration avoids."""
    counts = np.zeros(256, dtype=np.int64)
    sources = [dataset.by_name(name) for name in eval_sites] if dataset.lazy else dataset.sites
    for site in sources:
        counts += np.bincount(site.train[:, 1:].ravel(), minlength=256)
    counts[255] = 0  # PAD is no character
    best = int(counts.argmax())
    hits = total = 0
    for name in eval_sites:
        targets = dataset.by_name(name).test[:, 1:]
        hits += int((targets == best).sum())
        total += int((targets != 255).sum())
    for name in eval_sites:
        dataset.by_name(name).release()
    return Baseline(DEFAULT_TOKENIZER.decode(np.array([best], dtype=np.uint8)), hits / max(total, 1))


def load_dataset(config: Config) -> FederatedDataset:
    """The config's data set, partitioned and (with data.max_sites) sampled, the same way every time."""
    d = config.data
    if d.dataset == "text" and not d.path:
        raise ConfigError(
            "data.path must name a folder or .jsonl file when data.dataset = 'text' (a deployed server needs "
            "none: there each site holds its own text and gives it with `confide client --data`)"
        )
    cache = Path(d.cache_dir) if d.cache_dir else None
    if config.model["kind"] == "hf":
        dataset = load_lm_dataset(config)
    elif d.dataset == "shakespeare":
        dataset = shakespeare.load(cache_dir=cache, min_lines=d.min_lines)
    else:
        dataset = load_text(Path(d.path), lazy=d.lazy)
    if d.partition != "group":
        dataset = _sample_sites(dataset, config)
    options: dict[str, Any] = {}
    if d.lazy:  # registered from the folder's listing: nothing read, nothing to re-partition (config.check)
        return dataset
    refused = d.partition == "dirichlet" and d.label != "group"
    instructions = d.partition != "natural" and is_instruction_rows(dataset.sites[0].train)
    if config.model["kind"] == "hf" and (instructions or refused):
        raise ConfigError(
            f"data.partition = {d.partition!r} (label {d.label!r}) is not available for this language "
            "model's data: instruction data is partitioned by its site field (partition = 'natural'), "
            "text by 'natural', 'iid', 'quantity' or 'dirichlet' over the 'group' label"
        )
    if d.partition == "group":
        # The sites are the groups (Shakespeare's plays): data.max_sites keeps whole groups, not roles.
        return _sample_sites(partition(dataset, "group"), config)
    if d.partition == "dirichlet":
        options = {"num_sites": d.num_sites, "alpha": d.alpha, "label": d.label}
    elif d.partition == "quantity":
        options = {"num_sites": d.num_sites, "alpha": d.alpha}
    return partition(dataset, d.partition, seed=config.run.seed, **options)


def _sample_sites(dataset: FederatedDataset, config: Config) -> FederatedDataset:
    """``data.max_sites`` of the data set's sites, a sample drawn from the run's seed (in their order)."""
    count = config.data.max_sites
    if not count or count >= len(dataset.sites):
        return dataset
    keep = np.sort(
        public_rng(config.run.seed, 0, Stream.DATA).choice(len(dataset.sites), count, replace=False)
    )
    return replace(dataset, sites=tuple(dataset.sites[i] for i in keep))


def load_lm_dataset(config: Config) -> FederatedDataset:
    """A language model's data set in its own tokenizer: Shakespeare's roles, a folder or jsonl of text, or a
    jsonl of instruction examples (see :mod:`confide.data.llm`)."""
    from confide.models.hf import load_tokenizer

    d = config.data
    hf = hf_config(config)
    tokenizer = load_tokenizer(hf)
    if d.dataset == "shakespeare":
        cache = Path(d.cache_dir) if d.cache_dir else None
        texts = shakespeare.site_texts(cache, d.min_lines)
        return llm.text_dataset("shakespeare", texts, tokenizer, hf.max_length)
    path = Path(d.path).expanduser()
    if llm.is_instruction_file(path):
        return llm.instruction_dataset(path, tokenizer, hf.max_length)
    texts = [(name, name, text) for name, text in read_sites(path).items()]
    return llm.text_dataset(path.stem, texts, tokenizer, hf.max_length)


def _with_absolute_paths(config: Config) -> Config:
    """``config`` with its data and model paths made absolute, for processes that start elsewhere (Ray
    workers, whose working directory is not ours)."""

    def absolute(path: str) -> str:
        return str(Path(path).expanduser().resolve()) if path else path

    d = config.data
    model = dict(config.model)
    if isinstance(model.get("path"), str):
        model["path"] = absolute(model["path"])
    data = replace(d, path=absolute(d.path), cache_dir=absolute(d.cache_dir))
    return replace(config, data=data, model=model)


def hf_config(config: Config) -> HFConfig:
    """The checked [model] table of an 'hf' run."""
    return cast(HFConfig, model_config("hf", **{k: v for k, v in config.model.items() if k != "kind"}))


SIMULATION_THREADS = 1
"""torch threads of a simulation's process when ``backend.threads`` is 0. A machine is rarely idle: with a
thread per core, torch's threads spin while they wait for one another, and when another program took one
of two cores the demo's rounds took 3.4x as long; on one thread they took no longer than the idle machine's
rounds had, and on the idle machine one thread took 0.8x to 1.1x the time of two (benchmarks/busy.py,
RESULTS section 17). Large models on an idle machine may gain from ``backend.threads``."""


class Runner:
    """Runs (or resumes) one federated training run into its run directory."""

    def __init__(
        self,
        config: Config,
        store: Store,
        dataset: FederatedDataset | None = None,
        *,
        sites: Sequence[SiteInfo] | None = None,
        backend: Backend | None = None,
        dp: SiteDP | None = None,
        registry: Mapping[str, bytes] | None = None,
    ) -> None:
        """A run over ``dataset`` with every site simulated in this process (the local backend), or, with
        ``backend``, over sites that live elsewhere and are described only by ``sites`` (a deployment);
        ``registry``: a deployment's enrolled identity keys, for authenticated secure aggregation."""
        self.store = store
        self.dataset = dataset
        if dataset is not None:
            sites = [SiteInfo(s.name, s.group, s.num_train, s.num_test) for s in dataset.sites]
        if sites is None:
            raise ValueError("a Runner needs a data set, or the sites of a deployment")
        self.sites = tuple(sites)
        windows = [s.num_train for s in self.sites]
        # DP-SGD's noise for privacy.record_target_epsilon: every part of the run builds from this config.
        config = resolve_record_dp(config, windows)
        self.config = config
        if config.backend.threads or backend is None:
            torch.set_num_threads(config.backend.threads or SIMULATION_THREADS)
        self.model = build_model_for(config, DEFAULT_TOKENIZER.vocab_size)
        self.layout = Layout.of_module(self.model)
        if backend is not None:
            check_deployment(config)
        self.dp = dp if dp is not None else build_site_dp(config, len(self.sites))
        # A simulation derives secure aggregation's range of DP-SGD updates from the sites' window counts;
        # a deployment's sites cannot, so neither does its server (config.check_deployment).
        secure, identities = build_secure(
            config, [s.name for s in self.sites], self.dp, registry, () if backend is not None else windows
        )
        self.secure = secure
        _, shared = personal_parts(config, self.model, self.layout)
        update_size = self.layout.size if shared is None else shared.size
        names = [s.name for s in self.sites]
        layers = build_layers(
            config, self.dp, secure, update_size, identities, sites=names, population=len(names)
        )
        self.encrypted = any(layer.traits.hides_model for layer in layers)
        """The server holds the global model encrypted (CKKS): it never reads it."""
        self.attack = Attack.build(config, dataset)
        self.lm = None
        if isinstance(self.model, HFCausalLM):
            self.lm = LanguageModelRun(config, self.model, self.layout)
            store.set_meta("base_sha256", self.lm.base_sha256)
        # A simulation plays the sites itself (here, or in Ray workers); a deployment is given its backend.
        self.deployed = backend is not None
        if backend is None and config.backend.kind == "ray":
            backend = self._ray_backend(config, identities)
        if backend is None:
            assert dataset is not None
            kit = build_site_kit(config, self.model, layers, StoreSiteState(store))
            # Only the training data the simulated sites use is poisoned; evaluation reads `dataset` as is.
            trained = self.attack.poison(dataset)
            backend = LocalBackend(
                trained,
                kit,
                dropout=config.backend.dropout,
                seed=config.run.seed,
                base_sha256=self.lm.base_sha256 if self.lm is not None else "",
                speeds=build_speeds(config),
                pool=self._site_pool(config, identities, trained),
            )
        self.backend: Backend = backend
        self.strategy = build_strategy(config, shared)
        # In a deployment a round needs a minimum of updates, and is retried (see run) when it falls short.
        min_updates = config.deploy.min_updates if self.deployed else 0
        aggregator = build_aggregator(config, self.dp)
        self.federation = Federation(
            self.strategy,
            layers,
            aggregator=aggregator,
            min_updates=min_updates,
            randomness=server_randomness(config),
            secret_sample=self.dp is not None and self.dp.trust == "secret_sample",
        )
        self.buffered = build_buffered(config, self.federation, len(self.sites))
        """FedBuff's asynchronous rounds, or None: synchronous rounds."""
        if self.buffered is not None and not hasattr(backend, "next_ready"):
            raise ConfigError(
                f"server.strategy = 'fedbuff' needs a backend that keeps sites training between rounds; "
                f"{type(backend).__name__} cannot"
            )
        attach_server_data(
            config, self.model, layers, aggregator, lambda: (self.state.weights, self.state.round + 1), shared
        )
        self.eval_sites = self._eval_sites()
        chars = dataset is not None and self.lm is None
        self.baseline = unigram_baseline(dataset, self.eval_sites) if chars and dataset else None
        self.rouge_pairs = self.lm.sample(dataset, self.eval_sites) if self.lm is not None else []
        self.state = ServerState(
            round=0,
            weights=self.layout.read(self.model),
            optimizer_state=self.federation.init_state(self.layout.size),
        )
        self.stopped: str | None = None
        """Why the run stopped before its last round (the privacy budget), or None."""

    def _ray_backend(self, config: Config, identities: Mapping[str, Any]) -> Backend:
        """The Ray backend of a simulation: its workers build the sites from the config, as this process
        would, with what the driver drew that the sites share with the server (the identity keys)."""
        from confide.runtime.ray import RayBackend

        b = config.backend
        recipe = self._site_recipe(config, identities, b.threads or max(1, int(b.num_cpus)))
        return RayBackend(
            recipe,
            address=b.address,
            num_cpus=b.num_cpus,
            num_gpus=b.num_gpus,
            workers=b.workers,
            dropout=b.dropout,
            seed=config.run.seed,
            speeds=build_speeds(config),
        )

    def _site_recipe(self, config: Config, identities: Mapping[str, Any], threads: int) -> SiteRecipe:
        """What a worker process needs to build the simulated sites as this process would, with what the
        driver drew that the sites share with the server (the identity keys)."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return SiteRecipe(
            config_toml=_with_absolute_paths(config).to_toml(),
            run_dir=str(self.store.run_dir.resolve()),
            sites=tuple(s.name for s in self.sites),
            secure=self.secure,
            identities={
                site: key.private_bytes_raw()
                for site, key in identities.items()
                if isinstance(key, Ed25519PrivateKey)
            },
            base_sha256=self.lm.base_sha256 if self.lm is not None else "",
            threads=threads,
        )

    def _site_pool(
        self, config: Config, identities: Mapping[str, Any], dataset: FederatedDataset
    ) -> SitePool | None:
        """The local backend's worker processes (``backend.workers``), or None: every site in this process."""
        workers = resolve_workers(config, len(self.sites))
        if workers <= 1:
            return None
        threads = worker_threads(config.backend.threads or SIMULATION_THREADS, workers)
        return SitePool(self._site_recipe(config, identities, threads), dataset, workers)

    def close(self) -> None:
        """Close the backend (a Ray backend stops its workers, and Ray if it started it) and the store."""
        try:
            self.backend.close()
        finally:
            self.store.close()

    @classmethod
    def start(cls, config: Config, dataset: FederatedDataset | None = None) -> Runner:
        """A new run of ``config`` (on ``dataset`` when given, else the config's data set)."""
        dataset = dataset if dataset is not None else load_dataset(config)
        store = cls.create_store(
            config, [SiteInfo(s.name, s.group, s.num_train, s.num_test) for s in dataset.sites]
        )
        return cls(config, store, dataset)

    @staticmethod
    def create_store(config: Config, sites: Sequence[SiteInfo]) -> Store:
        """The run directory of a new run of ``config`` over ``sites``."""
        run_dir = Path(config.run.output) / config.run.name
        store = Store.create(run_dir, config.to_toml())
        store.add_sites([(s.name, s.group, s.num_train, s.num_test) for s in sites])
        store.set_meta("status", "running")
        store.event("start", f"run {config.run.name} started with {len(sites)} sites")
        return store

    @classmethod
    def resume(cls, run_dir: Path, *, backend: Backend | None = None, dp: SiteDP | None = None) -> Runner:
        """Continue the run in ``run_dir`` from its last checkpoint: on the config's data set in this process,
        or, with ``backend``, over a deployment's sites (as the run store lists them)."""
        from confide.config import load

        store = Store.open(run_dir)
        config = load(run_dir / "config.toml")
        if backend is None:
            dataset = load_dataset(config)
            known = {row[0] for row in store.db.execute("SELECT name FROM sites")}
            if known != set(dataset.site_names):
                raise StoreError(
                    f"the data set no longer has the sites this run was started with ({len(known)} then, "
                    f"{len(dataset.site_names)} now); a run resumes only on the same data"
                )
            runner = cls(config, store, dataset)
        else:
            runner = cls(config, store, sites=stored_sites(store), backend=backend, dp=dp)
        runner.restore()
        return runner

    def restore(self) -> None:
        """Move to the store's last checkpoint, with the privacy ledger and the adaptive clip norm."""
        store = self.store
        checkpoint = store.latest_checkpoint()
        if checkpoint is not None:
            if not (self.encrypted and is_encrypted(checkpoint.weights)):
                self.layout.check(checkpoint.weights, "checkpoint's weights")
            self.state = ServerState(checkpoint.round, checkpoint.weights, dict(checkpoint.optimizer_state))
            clock = checkpoint.extra.get(CLOCK_KEY)
            virtual = getattr(self.backend, "clock", None)
            if clock is not None and not self.deployed and isinstance(virtual, VirtualClock):
                virtual.now = float(clock[0])  # the virtual clock goes on where it was
        store.rewind(self.state.round)
        if self.dp is not None:
            # Every charge stays spent. With secret noise each release is a new one, so rounds after the
            # checkpoint that were released before the crash stay charged and are charged again when they are
            # redone. Only the insecure reproducible simulation redoes a round with the very same result,
            # which then counts once (its entry is met again when the round is redone).
            reproducible = self.config.privacy.insecure_reproducible_noise
            up_to = self.state.round if reproducible else None
            entries = store.ledger(up_to)
            participants = [sites for _, sites in store.ledger_participants()][: len(entries)]
            # A store written before participants were kept has none: charged to every site, never less.
            self.dp.replay(
                [LedgerEntry(z, s, q, k) for _, z, s, q, k, _ in entries],
                [sites or None for sites in participants],
            )
            clip = self.state.optimizer_state.get(CLIP_KEY)
            if clip is not None and self.dp.adaptive is not None:
                self.dp.adaptive = replace(self.dp.adaptive, clip_norm=float(clip[0]))
                self.dp.set_clip_norm(float(clip[0]))
        store.event("resume", f"resumed after round {self.state.round}", self.state.round)

    def _eval_sites(self) -> list[str]:
        # A site with no held-out window (possible after a skewed re-partition) has nothing to evaluate on.
        names = [s.name for s in self.sites if s.num_test > 0]
        k = self.config.eval.sites
        if k == 0 or k >= len(names):
            return names
        chosen = public_rng(self.config.run.seed, 0, Stream.EVAL).choice(len(names), k, replace=False)
        return [names[i] for i in np.sort(chosen)]

    def run(self, observer: Observer | None = None) -> ServerState:
        status = _SiteStatus(observer or NullObserver(), self.store)
        observer = status
        config = self.config
        if not self.deployed and not self.store.site_states():
            now = time.time()
            self.store.sites_seen([(s.name, now, now) for s in self.sites])  # a simulation's sites are all in
        observer.run_started(self, self.state.round + 1)
        totals = self._totals()
        retries = 0
        # The next round's limits, worked out after the last one (nothing is charged in between).
        ahead: tuple[int, tuple[frozenset[str], int] | str] | None = None
        while self.state.round < config.run.rounds:
            r = self.state.round + 1
            limits = ahead[1] if ahead is not None and ahead[0] == r else self._limits(r)
            if isinstance(limits, str):
                # Only when the budget cannot pay for the first round left: every other stop happens after
                # the last affordable round, below, once it is evaluated and checkpointed.
                self._stop(limits, r - 1, observer)
                break
            exclude, minimum = limits
            quarantined = self.store.quarantined()
            if quarantined:
                exclude = exclude | frozenset(quarantined)
            charge = self._charge if self.dp is not None else None
            rounds = self.federation if self.buffered is None else self.buffered
            result = rounds.round(
                self.state,
                self.backend,  # type: ignore[arg-type]  # FedBuff's needs start/next_ready: checked at build
                observer,
                charge,
                len(self.sites),
                exclude=exclude,
                min_updates=minimum,
            )
            if result.abandoned is not None and self.deployed and retries < config.deploy.round_retries:
                # Too few sites answered (or secure aggregation could not finish): nothing was applied or
                # spent, so the same round is tried again once the sites have had time to come back.
                retries += 1
                self.state.round = r - 1
                message = (
                    f"round {r} failed ({result.abandoned}); retry {retries} of {config.deploy.round_retries}"
                )
                self.store.event("retry", message, r)
                log.warning("%s", message)
                observer.round_retried(r, result.abandoned)
                time.sleep(config.deploy.retry_wait)
                continue
            retries = 0
            self._after_round(result, status.answered)
            totals["seconds"] += result.seconds
            totals["bytes_sent"] += result.bytes_sent
            totals["bytes_received"] += result.bytes_received
            observer.round_finished(result)
            stop = None
            if r < config.run.rounds:
                ahead = (r + 1, self._limits(r + 1))
                stop = ahead[1] if isinstance(ahead[1], str) else None
            last = r == config.run.rounds or stop is not None
            if r % config.eval.every == 0 or last:
                if self.buffered is not None and self.deployed:
                    self.buffered.settle(self.state, self.backend)  # type: ignore[arg-type]
                metrics = self.evaluate(result, totals)
                observer.evaluated(r, metrics)
            if r % config.run.checkpoint_every == 0 or last:
                clock = {CLOCK_KEY: np.array([self.backend.now()])}
                self.store.save_checkpoint(r, self.state.weights, self.state.optimizer_state, clock)
            if stop is not None:
                self._stop(stop, r, observer)
                break
        if self.lm is not None and self.state.round == config.run.rounds and not self.encrypted:
            self.lm.finish(self.store.run_dir, self.state.weights)
        if self.stopped is None:
            self.store.set_meta("status", "finished")
        observer.run_finished(self)
        return self.state

    def _limits(self, round: int) -> tuple[frozenset[str], int] | str:
        """Who may take part in ``round`` and the fewest updates it may complete with, or why the run must
        stop before it (the privacy budget).

        The budget is never exceeded: under distributed DP a round with fewer updates carries less noise
        and is charged more, so the round's minimum is the fewest updates whose charge keeps the worst site
        (or the amplified epsilon) within the budget; a round that gets fewer is abandoned before anything
        is unmasked or charged. Sites that would pass their budget by taking part once more are left out
        (the budget is held per site against a server that knows who took part)."""
        base = self.federation.min_updates or 1
        if self.secure is not None:
            base = max(base, self.secure.min_sites)
        dp = self.dp
        # Under correlated noise a site sits out the b - 1 rounds after each of its own (their columns of the
        # factorization would overlap); public, like the sample itself.
        recent = dp.recent() if dp is not None else frozenset()
        if dp is None or dp.target_epsilon <= 0:
            return recent, base
        # Left out: sites that would pass their budget even in a round at the planned noise.
        exclude = dp.exhausted(dp.share_sites) if dp.trust == "knows_sample" else frozenset()
        exclude = exclude | recent
        reason = dp.over_budget(round, dp.share_sites, exclude)
        if reason is not None:
            return reason  # not even a round at the planned noise fits
        low, high = base, dp.share_sites  # the charge no longer grows with more updates than share_sites
        while low < high:  # the fewest updates that keep the round within the budget (monotone in it)
            middle = (low + high) // 2
            if dp.over_budget(round, middle, exclude) is None:
                high = middle
            else:
                low = middle + 1
        return frozenset(exclude), low

    def _charge(self, round: int, participants: Sequence[str]) -> None:
        assert self.dp is not None
        spent = self.dp.charge(round, list(participants))
        self.store.record_spend(
            round,
            tuple(spent.entry),  # type: ignore[arg-type]
            spent.epsilon,
            self.dp.delta,
            participants,
            once_per_round=self.config.privacy.insecure_reproducible_noise,
        )

    def _after_round(self, result: RoundResult, answered: set[str]) -> None:
        """What the server records of a round's result besides the model: events for what went wrong, each
        asked site's status (``answered``: the sites whose update came in), and the round's row."""
        r = result.round
        for site, reason in result.rejected:
            self.store.event("rejected", f"update of site {site} refused: {reason}", r)
        self._site_outcomes(result, answered)
        self._screened(result)
        if result.abandoned is not None:
            self.store.event("abandoned", f"round {r} abandoned: {result.abandoned}", r)
        clipped = round(result.sums.get(SECAGG_CLIPPED, 0.0))
        if clipped and self.secure is not None:
            bound = self.secure.clip_range
            message = (
                f"round {r}: the updates of {clipped} sites had coordinates outside the fixed-point "
                f"range [-{bound:g}, {bound:g}] of secure aggregation, which were clipped to it, so the "
                "unmasked sum is short of what was cut there (biased towards zero): raise "
                "privacy.secagg_range above the largest coordinate an update may have (try twice the range "
                f"now, {2 * bound:g}, if it is not known), or bound the updates so that the range follows "
                "from them (site-level clipping, privacy.dp; or DP-SGD, privacy.record_dp, with Adam or "
                "with SGD without weight decay)"
            )
            self.store.event("secagg_clipped", message, r)
            log.warning(message)
        self.store.record_round(
            r,
            result.sites,
            result.num_examples,
            result.train_loss,
            result.bytes_sent,
            result.bytes_received,
            result.seconds,
        )

    def _site_outcomes(self, result: RoundResult, answered: set[str]) -> None:
        """How the round went for each site asked: took part, refused (and why), or dropped (never answered);
        in an abandoned round the sites that answered stay 'answered', with the reason."""
        refused = dict(result.rejected)
        rows: list[tuple[str, str, int | None, str]] = []
        for site in result.sites:
            if site in refused:
                rows.append((site, "refused", result.round, refused[site]))
            elif site in answered and result.abandoned is not None:
                rows.append((site, "answered", result.round, f"round abandoned: {result.abandoned}"))
            elif site in answered:
                rows.append((site, "took part", result.round, ""))
            else:
                rows.append((site, "dropped", result.round, "asked, but no update came"))
        if rows:
            self.store.site_status(rows)

    def _screened(self, result: RoundResult) -> None:
        """Keep the round's defence scores and refusals in the site history, and quarantine the sites that
        have now offended ``defence.quarantine_after`` times within ``defence.quarantine_window`` rounds
        (see :mod:`confide.server.reputation`)."""
        r, d = result.round, self.config.defence
        reasons = dict(result.rejected)
        rows = [(site, s, site in reasons, reasons.get(site, "")) for site, s in result.scores.items()]
        rows += [(site, {}, True, why) for site, why in reasons.items() if site not in result.scores]
        if not rows:
            return
        self.store.record_scores(r, rows)
        if d.quarantine_after <= 0:
            return
        # Only the window's rounds: reading the whole history every round would grow with the run.
        history = outcomes(self.store.score_history(after=r - d.quarantine_window))
        known = self.store.quarantined()
        for site, count in offenders(history, r, d.quarantine_after, d.quarantine_window, known):
            why = (
                f"refused {count} times in the last {d.quarantine_window} rounds (defence.quarantine_after = "
                f"{d.quarantine_after}); last: {reasons.get(site, 'see the events')}"
            )
            self.store.quarantine(site, r, why)
            self.store.site_status([(site, "quarantined", r, why)])
            self.store.event("quarantine", f"site {site} is quarantined: {why}", r)
            log.warning("site %s is quarantined: %s", site, why)

    def _stop(self, reason: str, last_round: int, observer: Observer) -> None:
        """Stop before the round that would overspend the privacy budget, and say why."""
        self.stopped = reason
        self.store.event("budget", reason, last_round)
        self.store.set_meta("status", "stopped: privacy budget spent")
        observer.stopped(reason)

    def evaluate(self, result: RoundResult, totals: dict[str, float]) -> dict[str, Any]:
        started = time.perf_counter()
        counted = self.backend.traffic()
        metrics, per_site, complete = self._evaluate(result.round)
        if complete and not np.isfinite(metrics["loss"]):
            message = (
                f"training diverged: after round {result.round} the global model's held-out loss is "
                f"{metrics['loss']}; lower client.learning_rate (now {self.config.client.learning_rate}) or "
                f"server.learning_rate (now {self.config.server.learning_rate}) and start the run again"
            )
            self.store.event("diverged", message, result.round)
            raise DivergedError(message)
        personal: list[tuple[str, float, float, int]] = []
        personal_metrics: dict[str, float] = {}
        if self.strategy.personalization != "none":
            # The same sites evaluate their personalized models; the eval plan's seed is per round.
            seed = int(public_rng(self.config.run.seed, result.round, Stream.EVAL).integers(2**31 - 1))
            plan = self.strategy.plan(result.round, seed)
            pooled, personal, _ = self._evaluate(result.round, plan)
            personal_metrics = {f"personal_{k}": v for k, v in pooled.items() if k != "eval_sites"}
            personal_metrics["personalized_sites"] = float(self._personalized_sites())
        moved = self.backend.traffic() - counted
        totals["bytes_sent"] += moved.sent
        totals["bytes_received"] += moved.received
        record: dict[str, Any] = {
            "round": result.round,
            **metrics,
            **personal_metrics,
            "train_loss": result.train_loss,
            "unigram_accuracy": self.baseline.accuracy if self.baseline else float("nan"),
            "seconds": result.seconds,
            "compute_seconds": result.compute_seconds,
            "eval_seconds": time.perf_counter() - started,
            "bytes_sent": result.bytes_sent + moved.sent,
            "bytes_received": result.bytes_received + moved.received,
            "total_seconds": totals["seconds"],
            "clock_seconds": result.clock,
            "total_bytes_sent": totals["bytes_sent"],
            "total_bytes_received": totals["bytes_received"],
            "eval_bytes_sent": moved.sent,
            "eval_bytes_received": moved.received,
            "rejected_updates": len(result.rejected),
            "quarantined_sites": len(self.store.quarantined()),
            **self.attack.measure(self.model, self.layout, self.state.weights),
            **self._privacy_metrics(),
        }
        if self.lm is not None:
            peaks = getattr(self.backend, "peak_memory", {})
            # ROUGE-L needs answers generated with the model, which an encrypted run's server cannot read.
            pairs = [] if self.encrypted else self.rouge_pairs
            record.update(self.lm.metrics(self.state.weights, pairs, peaks))
        self.store.record_evaluation(result.round, record, per_site, personal)
        self._live_sample(result.round)
        return record

    def _live_sample(self, round: int) -> None:
        """A short passage of the model just evaluated, for the live view: only a character model the server
        holds in clear (an 'hf' model's generation costs far more; under CKKS the server cannot read it)."""
        e = self.config.eval
        if e.samples == 0 or self.lm is not None or self.encrypted or is_encrypted(self.state.weights):
            return
        length = min(e.sample_length, LIVE_SAMPLE_LENGTH)
        text = generate_text(self.model, self.layout, self.state.weights, e.prompt, length, seed=round)
        self.store.record_sample(round, e.prompt, text[len(e.prompt) :])

    def _evaluate(self, round: int, plan: Plan | None = None) -> _Evaluated:
        """The eval sites' evaluation through the federation's layers (summed only, under secure
        aggregation). One that cannot be completed (too few sites for a secure sum) leaves NaN metrics and
        an event that says why; training goes on."""
        try:
            ctx = self.federation.evaluate(round, self.state.weights, self.eval_sites, self.backend, plan)
        except RoundAbandoned as e:
            what = "personalized models" if plan is not None else "global model"
            self.store.event("evaluation", f"the evaluation of the {what} was abandoned: {e}", round)
            return _Evaluated(*summarize([]), complete=False)
        for site, why in ctx.rejected:
            self.store.event("rejected", f"site {site}'s evaluation was refused: {why}", round)
        return _Evaluated(*summarize(ctx.evaluations, ctx.total, len(ctx.summed)))

    def _privacy_metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.dp is not None:
            run = self.dp.spent()
            out.update(
                epsilon=run.epsilon,
                epsilon_worst_site=run.worst_site,
                epsilon_median_site=run.median_site,
                delta=self.dp.delta,
                noise_multiplier=self.dp.noise_multiplier,
                clip_norm=self.dp.clip_norm,
            )
            if self.dp.mechanism != "dp-ftrl":  # correlated noise claims no amplification by sampling
                out["epsilon_amplified"] = run.amplified
        if self.config.privacy.record_dp:
            spent = list(self.store.site_values(DPSGD_EPSILON_KEY).values())
            out["record_epsilon_max"] = max(spent) if spent else float("nan")
            out["record_epsilon_median"] = float(np.median(spent)) if spent else float("nan")
            out["record_dp_sites"] = float(len(spent))
        return out

    def _personalized_sites(self) -> int:
        """How many evaluated sites hold personal state (the others were never selected yet)."""
        keys = {"ditto": DITTO_KEY, "fedrep": FEDREP_KEY}
        key = keys.get(self.strategy.personalization)
        if key is None:
            return len(self.eval_sites)  # fine-tuning personalizes every site at evaluation time
        return sum(self.store.get_site_state(site, key) is not None for site in self.eval_sites)

    def _totals(self) -> dict[str, float]:
        rounds = self.store.rounds()
        evaluations = [m for _, m in self.store.evaluations()]
        return {
            "seconds": sum(r["seconds"] for r in rounds),
            "bytes_sent": sum(r["bytes_sent"] for r in rounds)
            + sum(m["eval_bytes_sent"] for m in evaluations),
            "bytes_received": sum(r["bytes_received"] for r in rounds)
            + sum(m["eval_bytes_received"] for m in evaluations),
        }

    def clear_weights(self) -> Vector | None:
        """The global model in clear; under CKKS only a simulation can, with a simulated site's key from the
        run store, and None elsewhere (the server of a deployment holds no key)."""
        try:
            return self.store.readable(self.state.weights, self.layout.size)
        except StoreError:
            return None

    def generate(
        self, prompt: str, length: int, temperature: float = 0.8, top_k: int | None = 20, seed: int = 0
    ) -> str:
        weights = self.clear_weights()
        if weights is None:
            raise ConfideError(ENCRYPTED_MODEL)
        return generate_text(self.model, self.layout, weights, prompt, length, temperature, top_k, seed)


class Relay:
    """An observer that passes every callback on to ``inner``: a base for observers that add to some."""

    def __init__(self, inner: Observer) -> None:
        self.inner = inner

    def run_started(self, runner: Runner, first_round: int) -> None:
        self.inner.run_started(runner, first_round)

    def round_started(self, round: int, sites: Sequence[str]) -> None:
        self.inner.round_started(round, sites)

    def site_done(self, round: int, site: str) -> None:
        self.inner.site_done(round, site)

    def round_finished(self, result: RoundResult) -> None:
        self.inner.round_finished(result)

    def round_retried(self, round: int, reason: str) -> None:
        self.inner.round_retried(round, reason)

    def evaluated(self, round: int, metrics: dict[str, Any]) -> None:
        self.inner.evaluated(round, metrics)

    def run_finished(self, runner: Runner) -> None:
        self.inner.run_finished(runner)

    def stopped(self, reason: str) -> None:
        self.inner.stopped(reason)


class _SiteStatus(Relay):
    """Keeps each site's status in the store as the round goes: asked (working) when the round starts,
    answered when its update comes in. One small transaction each."""

    def __init__(self, inner: Observer, store: Store) -> None:
        super().__init__(inner)
        self.store = store
        self.answered: set[str] = set()
        """The sites whose update came in during the round under way."""

    def round_started(self, round: int, sites: Sequence[str]) -> None:
        self.answered = set()
        self.store.site_status([(site, "working", round, "") for site in sites])
        super().round_started(round, sites)

    def site_done(self, round: int, site: str) -> None:
        self.answered.add(site)
        self.store.site_status([(site, "answered", round, "")], seen=True)
        super().site_done(round, site)


def generate_text(
    model: nn.Module,
    layout: Layout,
    weights: np.ndarray,
    prompt: str,
    length: int,
    temperature: float = 0.8,
    top_k: int | None = 20,
    seed: int = 0,
    top_p: float | None = None,
) -> str:
    """``prompt`` continued by ``length`` sampled characters (tokens, for an 'hf' model, which alone takes
    ``top_p``) from the model with ``weights``."""
    layout.write(model, weights)
    if isinstance(model, HFCausalLM):
        return prompt + model.complete([prompt], length, temperature, top_k, top_p, seed)[0]
    codes = DEFAULT_TOKENIZER.encode(prompt or "\n")
    idx = torch.from_numpy(codes.astype(np.int64))[None, :]
    out = cast(CharModel, model).generate(
        idx, length, temperature=temperature, top_k=top_k, generator=torch.Generator().manual_seed(seed)
    )
    return DEFAULT_TOKENIZER.decode(out[0].numpy().astype(np.uint8))
