"""The run configuration: TOML in, typed and validated objects out.

Every option has a default that works and a one-line help text; this module is the one place that resolves
defaults, and nothing deeper in confide reads raw dictionaries. A wrong value stops the run before anything
starts, with one message naming the key, the value, and what is accepted::

    client.batch_size must be an integer >= 1 (got -3)
    server.optimizr is not an option of [server]; did you mean 'optimizer'? (accepted: beta1, beta2, ...)
    server.strategy must be one of 'fedavg', 'fedprox', 'scaffold', 'fednova' (got 'fedprx'); did you mean ...

An option that names a plug-in (a strategy, an optimizer, a model kind) takes the accepted names and their
help texts from :mod:`confide.registry`, and the ``[model]`` table is checked against the model's config
dataclass in :mod:`confide.models.configs`; neither imports torch, so loading a config stays light. The file
is long because it is the list of every option; the checks that involve several options follow the sections.

Over ~400 lines because every option is declared here once, with its help text and its check; the parsing
itself is the last ~150 lines.
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, get_type_hints

import tomli_w

from confide.errors import ConfigError
from confide.registry import (
    ACCOUNTANTS,
    AGGREGATORS,
    ATTACKS,
    AUTH_MODES,
    BACKENDS,
    CLIENT_OPTIMIZERS,
    COMPRESSIONS,
    DATASETS,
    DIRICHLET_LABELS,
    DOWNLINKS,
    DP_PLACEMENTS,
    ENCRYPTIONS,
    MODELS,
    NEEDS_SGD,
    PARTITIONS,
    PER_SITE_EXTRAS,
    PERSONALIZATIONS,
    POISONS_DATA,
    SAMPLINGS,
    SERVER_OPTIMIZERS,
    STRATEGIES,
    Registry,
)

Check = Callable[[Any], bool]

ENCLAVE_PLATFORMS = ("none", "simulated", "aws-nitro")
"""privacy.enclave's platforms (see confide.privacy.tee.attestation.VERIFIERS)."""


def option(
    default: Any, help: str, check: Check | None = None, accepts: str = "", choices: Registry | None = None
) -> Any:
    """A config field: its default, its help text, and what values it accepts (a check, or the names of a
    registry of :mod:`confide.registry`, whose help texts ``confide config`` shows)."""
    return field(
        default=default, metadata={"help": help, "check": check, "accepts": accepts, "choices": choices}
    )


def positive(x: Any) -> bool:
    return bool(x > 0)


def at_least(n: float) -> Check:
    return lambda x: bool(x >= n)


@dataclass(frozen=True)
class RunConfig:
    name: str = option(
        "", "name of the run directory under `output`; empty: the config file's name and the time"
    )
    output: str = option("runs", "folder that holds run directories")
    seed: int = option(0, "seed of every random choice: site sampling, initial weights, shuffling, dropout")
    rounds: int = option(20, "number of federated rounds", at_least(1), ">= 1")
    checkpoint_every: int = option(
        5, "save a checkpoint every this many rounds (and after the last)", at_least(1), ">= 1"
    )


@dataclass(frozen=True)
class DataConfig:
    dataset: str = option("shakespeare", DATASETS.help, choices=DATASETS)
    path: str = option(
        "", "for dataset = 'text': a folder with one text file or subfolder per site, or a .jsonl file"
    )
    partition: str = option("natural", PARTITIONS.help, choices=PARTITIONS)
    alpha: float = option(
        0.5, "Dirichlet concentration for 'dirichlet' and 'quantity' (small: skewed)", positive, "> 0"
    )
    num_sites: int = option(100, "number of sites for 'dirichlet' and 'quantity'", at_least(1), ">= 1")
    label: str = option("group", DIRICHLET_LABELS.help, choices=DIRICHLET_LABELS)
    min_lines: int = option(
        64, "Shakespeare: a role needs at least this many lines to be a site", at_least(1), ">= 1"
    )
    max_sites: int = option(
        0,
        "keep only this many sites (a sample drawn from run.seed; with partition = 'group', this many "
        "groups); 0 keeps all",
        at_least(0),
        ">= 0",
    )
    cache_dir: str = option("", "where processed data is cached; empty: $CONFIDE_CACHE or ~/.cache/confide")
    lazy: bool = option(
        False,
        "register the sites of data.path (a folder, one text file or folder per site) from its listing and "
        "read a site's text only when it is drawn: for very many sites (window counts are estimated from "
        "file sizes until then)",
    )


@dataclass(frozen=True)
class ClientConfig:
    epochs: int = option(1, "local epochs over the site's training windows per round", at_least(1), ">= 1")
    max_steps: int = option(0, "stop local training after this many steps; 0: no limit", at_least(0), ">= 0")
    batch_size: int = option(10, "windows per local step", at_least(1), ">= 1")
    learning_rate: float = option(0.5, "the sites' learning rate", positive, "> 0")
    optimizer: str = option("sgd", CLIENT_OPTIMIZERS.help, choices=CLIENT_OPTIMIZERS)
    momentum: float = option(0.0, "momentum of the sites' SGD", lambda x: 0 <= x < 1, "in [0, 1)")
    weight_decay: float = option(0.0, "weight decay at the sites", at_least(0), ">= 0")
    personalization: str = option("none", PERSONALIZATIONS.help, choices=PERSONALIZATIONS)
    personal_steps: int = option(
        0,
        "steps of personal training (Ditto's personal model, FedRep's head, fine-tuning); 0: as max_steps",
        at_least(0),
        ">= 0",
    )
    personal_learning_rate: float = option(
        0.0,
        "learning rate of personal training and fine-tuning; 0: client.learning_rate",
        at_least(0),
        ">= 0",
    )
    ditto_lambda: float = option(
        0.1,
        "Ditto: pull of the personal model towards the global one (inf: the global model)",
        at_least(0),
        ">= 0 (inf allowed)",
    )
    personal_layers: str = option(
        "",
        "FedRep: comma-separated parameter-name prefixes of the personal head; empty: the model's own "
        "(the GPT's last block and final norm, the LSTM's output layer)",
    )
    stragglers: float = option(
        0.0,
        "fraction of each round's sites that do only part of their local work (systems heterogeneity)",
        lambda x: 0 <= x <= 1,
        "in [0, 1]",
    )
    min_work: float = option(
        0.1,
        "a straggler does a fraction of its work drawn from [min_work, 1)",
        lambda x: 0 < x <= 1,
        "in (0, 1]",
    )


@dataclass(frozen=True)
class ServerConfig:
    sites_per_round: float = option(
        10,
        "sites per round: a count (>= 1) or a fraction of all sites (< 1)",
        positive,
        "a count >= 1 or a fraction in (0, 1)",
    )
    optimizer: str = option("sgd", SERVER_OPTIMIZERS.help, choices=SERVER_OPTIMIZERS)
    sampling: str = option("fixed", SAMPLINGS.help, choices=SAMPLINGS)
    strategy: str = option("fedavg", STRATEGIES.help, choices=STRATEGIES)
    mu: float = option(
        0.01, "FedProx: weight of the proximal term mu/2 ||w - w_global||^2", at_least(0), ">= 0"
    )
    learning_rate: float = option(1.0, "server learning rate", positive, "> 0")
    beta1: float = option(0.9, "momentum / first-moment decay", lambda x: 0 <= x < 1, "in [0, 1)")
    beta2: float = option(0.99, "second-moment decay (adam, yogi)", lambda x: 0 <= x < 1, "in [0, 1)")
    tau: float = option(1e-3, "adaptivity constant of adam, yogi and adagrad", positive, "> 0")
    schedule: str = option(
        "constant",
        "server learning rate over the run: 'constant', or 'cosine' (half a cosine from learning_rate in the "
        "first round to a tenth of it in the last)",
        lambda x: x in ("constant", "cosine"),
        "'constant' or 'cosine'",
    )
    aggregator: str = option("mean", AGGREGATORS.help, choices=AGGREGATORS)
    concurrency: int = option(
        0,
        "fedbuff: how many sites train at once (each on the newest model it was sent); 0: twice the "
        "buffer (sites_per_round)",
        at_least(0),
        ">= 0",
    )
    max_staleness: int = option(
        10,
        "fedbuff: an update trained on a model more than this many versions old is dropped",
        at_least(0),
        ">= 0",
    )
    staleness_exponent: float = option(
        0.5,
        "fedbuff: an update s versions old is scaled by (1 + s)^-a, with this a (0.5: FedBuff's paper; 0: no "
        "discount)",
        at_least(0),
        ">= 0",
    )


@dataclass(frozen=True)
class EvalConfig:
    every: int = option(1, "evaluate every this many rounds (and after the last)", at_least(1), ">= 1")
    sites: int = option(
        0, "evaluate on a seeded sample of this many sites; 0: all sites", at_least(0), ">= 0"
    )
    batch_size: int = option(256, "windows per evaluation batch", at_least(1), ">= 1")
    samples: int = option(2, "generated passages kept in the report", at_least(0), ">= 0")
    sample_length: int = option(300, "characters per generated passage", at_least(1), ">= 1")
    prompt: str = option("ROMEO.\n", "prompt of the generated passages")
    rouge_samples: int = option(
        8,
        "model.kind = 'hf' on instruction data: held-out examples (a seeded sample) whose greedy answers are "
        "scored by ROUGE-L against the references; 0: none",
        at_least(0),
        ">= 0",
    )
    max_new_tokens: int = option(32, "tokens generated per answer for ROUGE-L", at_least(1), ">= 1")


@dataclass(frozen=True)
class AdapterConfig:
    """Parameter-efficient fine-tuning of a model.kind = 'hf' model: only the adapter travels."""

    kind: str = option(
        "none",
        "'lora' (Hu et al. 2021, with peft): only the low-rank adapters train and travel; 'none': all",
        lambda x: x in ("none", "lora"),
        "'none' or 'lora'",
    )
    r: int = option(8, "LoRA rank", at_least(1), ">= 1")
    alpha: int = option(16, "LoRA scaling alpha (the update is scaled by alpha / r)", at_least(1), ">= 1")
    dropout: float = option(0.0, "dropout on the LoRA input", lambda x: 0 <= x < 1, "in [0, 1)")
    target_modules: str = option(
        "",
        "comma-separated module names that get adapters; empty: q_proj,v_proj for Llama-like models, c_attn "
        "for GPT-2, else peft's own default for the architecture",
    )
    quantize: str = option(
        "none",
        "'4bit': QLoRA (Dettmers et al. 2023), the base held in 4 bits by bitsandbytes (needs CUDA)",
        lambda x: x in ("none", "4bit"),
        "'none' or '4bit'",
    )


@dataclass(frozen=True)
class BackendConfig:
    kind: str = option("local", BACKENDS.help, choices=BACKENDS)
    threads: int = option(
        0,
        "torch threads per process; 0: one in a simulation (and a group of sites in one client process), "
        "torch's default (one a core) for a site alone or a deployment's server",
        at_least(0),
        ">= 0",
    )
    dropout: float = option(
        0.0,
        "simulation: the fraction of each round's sites that vanish after the key exchange, before sending "
        "their update",
        lambda x: 0 <= x < 1,
        "in [0, 1)",
    )
    step_seconds: float = option(
        0.1,
        "simulation's virtual clock: seconds a site of typical speed takes for one local step",
        positive,
        "> 0",
    )
    speed_sigma: float = option(
        0.0,
        "virtual clock: sites' speeds (and network delays) are lognormal with this sigma around the "
        "typical one; 0: every site is equally fast",
        at_least(0),
        ">= 0",
    )
    slow_fraction: float = option(
        0.0,
        "virtual clock: the fraction of sites that are very slow (slow_factor times slower to compute)",
        lambda x: 0 <= x <= 1,
        "in [0, 1]",
    )
    slow_factor: float = option(
        10.0, "virtual clock: how many times slower a very slow site computes", at_least(1), ">= 1"
    )
    latency: float = option(
        0.05, "virtual clock: one-way network delay of a typical site, in seconds", at_least(0), ">= 0"
    )
    bandwidth: float = option(
        0.0,
        "virtual clock: each site's link speed in megabytes per second, so bytes cost time; 0: unlimited",
        at_least(0),
        ">= 0",
    )
    address: str = option(
        "",
        "kind = 'ray': the Ray cluster to join (as `ray start --head` prints it, e.g. '10.0.0.5:6379', or "
        "'auto'); empty: start a Ray of our own on this machine for the run",
    )
    num_cpus: float = option(
        1.0, "kind = 'ray': CPUs each Ray worker (one model, many sites) reserves", positive, "> 0"
    )
    num_gpus: float = option(
        0.0, "kind = 'ray': GPUs each Ray worker reserves (a fraction shares one GPU)", at_least(0), ">= 0"
    )
    workers: int = option(
        0,
        "how many worker processes play the simulated sites, each with its own model, in parallel (the "
        "results are the same whatever the number). local: 0 = the machine's cores (no more than a round's "
        "sites; $CONFIDE_WORKERS, if set, instead), 1 = every site in this process; ray: 0 = as many as the "
        "cluster's CPUs allow at num_cpus each",
        at_least(0),
        ">= 0",
    )


@dataclass(frozen=True)
class PrivacyConfig:
    dp: str = option("none", DP_PLACEMENTS.help, choices=DP_PLACEMENTS)
    clip_norm: float = option(1.0, "L2 norm each site's update is clipped to (C)", positive, "> 0")
    noise_multiplier: float = option(
        1.0, "z: the noise on the sum of updates has standard deviation z * C", at_least(0), ">= 0"
    )
    target_epsilon: float = option(
        0.0, "privacy budget: stop before the round that would spend more; 0: no budget", at_least(0), ">= 0"
    )
    max_participations: int = option(
        0,
        "under distributed DP, where the server knows who takes part: calibrate the noise for a site that "
        "takes part in this many rounds (sites that reach the budget are left out of later rounds); "
        "0: every round",
        at_least(0),
        ">= 0",
    )
    delta: float = option(
        0.0, "the delta of (epsilon, delta); 0: 1 / (10 x number of sites)", lambda x: 0 <= x < 1, "in [0, 1)"
    )
    calibrate: bool = option(
        False,
        "set the noise multiplier from target_epsilon so that run.rounds rounds spend exactly the budget",
    )
    accounting: str = option("rdp", ACCOUNTANTS.help, choices=ACCOUNTANTS)
    mechanism: str = option(
        "dp-fedavg",
        "site-level DP's noise: 'dp-fedavg', fresh every round; 'dp-ftrl', correlated across rounds by a "
        "banded matrix factorization so most of it cancels in the model, with no sampling assumption "
        "(central DP only)",
        lambda x: x in ("dp-fedavg", "dp-ftrl"),
        "'dp-fedavg' or 'dp-ftrl'",
    )
    bands: int = option(
        0,
        "dp-ftrl: bands of the factorization; a site sits out bands - 1 rounds after each of its own; "
        "0: sites // sites_per_round (at most run.rounds and 256)",
        lambda x: 0 <= x <= 256,
        "0 to 256",
    )
    adaptive_clip: bool = option(
        False, "move the clip norm towards a quantile of the update norms (Andrew et al. 2021)"
    )
    target_quantile: float = option(
        0.5, "adaptive clipping: the quantile of update norms to clip at", lambda x: 0 < x < 1, "in (0, 1)"
    )
    clip_learning_rate: float = option(
        0.2, "adaptive clipping: step of the geometric update", positive, "> 0"
    )
    bits_noise: float = option(
        0.0,
        "adaptive clipping: std of the noise on the count of unclipped updates; 0: sites per round / 20",
        at_least(0),
        ">= 0",
    )
    secure_aggregation: bool = option(
        False,
        "SecAgg+ (Bonawitz et al. 2017, Bell et al. 2020): the server learns only the sum of the updates",
    )
    secagg_neighbours: int = option(
        0,
        "secure aggregation: neighbours each site shares with; 0: 2 log2(n) + 6 (n - 1: complete graph)",
        at_least(0),
        ">= 0",
    )
    secagg_threshold: int = option(
        0,
        "secure aggregation: shares needed to unmask a site; 0: a majority of its neighbours",
        at_least(0),
        ">= 0",
    )
    secagg_range: float = option(
        0.0,
        "secure aggregation: every coordinate is clipped to [-R, R] for fixed-point encoding (or "
        "quantization); 0: the clip norm plus room for the noise under DP (about a 32nd of it with "
        "compression.rotate), else 1",
        at_least(0),
        ">= 0",
    )
    secagg_bits: int = option(
        20,
        "secure aggregation: fractional bits of the fixed-point encoding",
        lambda x: 1 <= x <= 40,
        "1 to 40",
    )
    secagg_authenticated: bool = option(
        False, "secure aggregation: sites sign their keys with registered Ed25519 identities"
    )
    encryption: str = option("none", ENCRYPTIONS.help, choices=ENCRYPTIONS)
    ckks_key_holder: str = option(
        "",
        "CKKS: the site that makes the secret key and shares it with the others (it must take part in the "
        "first round's key ceremony); empty: the first of the first round's sites in name order",
    )
    record_dp: bool = option(False, "record-level DP-SGD at each site (Opacus), with each site's own epsilon")
    record_clip: float = option(1.0, "DP-SGD: L2 norm each window's gradient is clipped to", positive, "> 0")
    record_noise: float = option(
        1.0,
        "DP-SGD: noise multiplier of each step (replaced by the calibrated one when record_target_epsilon "
        "is set)",
        at_least(0),
        ">= 0",
    )
    record_target_epsilon: float = option(
        0.0,
        "DP-SGD: set record_noise so that the site with the fewest windows, taking part in all run.rounds "
        "rounds, spends at most this epsilon on its records at delta 1/(10 x its windows), checked at every "
        "other site; it takes precedence over record_noise. 0: record_noise as it is",
        at_least(0),
        ">= 0",
    )
    insecure_reproducible_noise: bool = option(
        False,
        "simulation only and insecure: DP noise and DP-SGD sampling are drawn from the run's seed so that "
        "runs repeat exactly; anyone who knows the seed can remove the noise. A deployment refuses it.",
    )
    enclave: str = option(
        "none",
        "attested aggregator (TEE): each site seals its update to an enclave, which validates, aggregates "
        "(server.aggregator) and adds central DP inside and shows the server only the result; 'simulated' is "
        "an INSECURE stand-in without hardware, for tests and simulations",
        lambda x: x in ENCLAVE_PLATFORMS,
        " or ".join(repr(x) for x in ENCLAVE_PLATFORMS),
    )
    enclave_address: str = option(
        "", "`confide server`: HOST:PORT of `confide aggregator`; empty: the enclave runs in this process"
    )
    enclave_max_age: float = option(
        600.0, "seconds after its issue that a site still accepts the aggregator's report", positive, "> 0"
    )
    enclave_min_updates: int = option(
        2, "the fewest updates the enclave releases an aggregate of", at_least(2), ">= 2"
    )
    enclave_allow_insecure_simulation: bool = option(
        False,
        "let `confide server` and `confide aggregator` run the INSECURE simulated enclave, in which whoever "
        "runs the aggregator can read every update (to test a deployment only)",
    )


@dataclass(frozen=True)
class DeployConfig:
    """`confide server`: how long to wait for sites, when to give up on one, and how sites authenticate."""

    auth: str = option("token", AUTH_MODES.help, choices=AUTH_MODES)
    min_sites: int = option(
        0,
        "sites that must have joined before the first round (and after a restart); 0: every enrolled site",
        at_least(0),
        ">= 0",
    )
    join_timeout: float = option(
        600.0, "seconds to wait for min_sites to join before giving up", positive, "> 0"
    )
    min_updates: int = option(
        1,
        "a round completes only with at least this many updates; with fewer it is retried",
        at_least(1),
        ">= 1",
    )
    round_retries: int = option(3, "how often a round with too few updates is retried", at_least(0), ">= 0")
    retry_wait: float = option(5.0, "seconds between a failed round and its retry", at_least(0), ">= 0")
    task_timeout: float = option(
        600.0, "seconds a site has for one piece of work (training, evaluation)", positive, "> 0"
    )
    heartbeat_seconds: float = option(
        5.0, "how often a site says it is alive while it works", positive, "> 0"
    )
    heartbeat_timeout: float = option(
        60.0,
        "a working site not heard from for this long is dropped from the current step (generous: a site "
        "training on a busy machine may be slow to send its heartbeats)",
        positive,
        "> 0",
    )
    max_message_mb: float = option(
        1024.0, "the largest message (weights or update) either side accepts, in MB", positive, "> 0"
    )
    receive_buffer_mb: float = option(
        2048.0,
        "the server reads sites' updates at once only while they fit in this many MB; the others wait their "
        "turn (a single larger update is still read, alone)",
        positive,
        "> 0",
    )

    @property
    def max_message_bytes(self) -> int:
        return int(self.max_message_mb * 2**20)

    @property
    def receive_buffer_bytes(self) -> int:
        return int(self.receive_buffer_mb * 2**20)


NORM_ACTIONS = ("refuse", "clip")


@dataclass(frozen=True)
class DefenceConfig:
    """Defences against poisoning: update screening at the server, the robust aggregators' settings
    (``server.aggregator`` chooses one) and the quarantine of repeat offenders. Every rule is off by
    default; each needs the server to read every site's own update, so none runs under secure aggregation."""

    norm_bound: float = option(
        0.0,
        "refuse (or clip, see norm_action) an update whose L2 norm is above this (Sun et al. 2019); 0: off",
        at_least(0),
        ">= 0",
    )
    norm_action: str = option(
        "refuse",
        "what norm_bound does to a longer update: 'refuse' it or 'clip' it to the bound",
        lambda x: x in NORM_ACTIONS,
        "'refuse' or 'clip'",
    )
    min_cosine: float = option(
        -1.0,
        "refuse an update whose cosine similarity to the previous global update or to the round's "
        "coordinate-wise median update is below this; -1: off",
        lambda x: -1 <= x <= 1,
        "in [-1, 1]",
    )
    validation_data: str = option(
        "", "a UTF-8 text file the server holds; each update is tried on it (see max_loss_increase)"
    )
    max_loss_increase: float = option(
        0.5,
        "with validation_data: refuse an update that alone raises the validation loss (nats per character) "
        "by more than this",
        at_least(0),
        ">= 0",
    )
    trim: float = option(
        0.1,
        "trimmed mean: fraction of the values cut at each end of every coordinate",
        lambda x: 0 <= x < 0.5,
        "in [0, 0.5)",
    )
    byzantine: int = option(
        1, "krum, multikrum: f, the number of attacking sites it must withstand", at_least(0), ">= 0"
    )
    multikrum: int = option(
        0, "multikrum: m, how many of the best-scored updates are averaged; 0: n - f", at_least(0), ">= 0"
    )
    root_data: str = option(
        "", "fltrust: a UTF-8 text file the server trains on each round for its trust direction"
    )
    root_steps: int = option(5, "fltrust: local steps the server takes on root_data", at_least(1), ">= 1")
    flame_noise: float = option(
        0.001, "flame: lambda, the noise std as a fraction of the median update norm", at_least(0), ">= 0"
    )
    quarantine_after: int = option(
        0,
        "quarantine a site refused this many times within quarantine_window rounds: it is no longer "
        "selected; 0: off",
        at_least(0),
        ">= 0",
    )
    quarantine_window: int = option(
        10, "rounds over which a site's offences are counted for quarantine", at_least(1), ">= 1"
    )
    reputation_decay: float = option(
        0.8,
        "gamma of the reputation r <- gamma r + (1 - gamma) o (o = 1 accepted, 0 refused)",
        lambda x: 0 < x < 1,
        "in (0, 1)",
    )

    @property
    def screens(self) -> bool:
        """Whether any screening rule is on (the screen layer joins the stack)."""
        return bool(self.norm_bound or self.min_cosine > -1 or self.validation_data)


@dataclass(frozen=True)
class AttackConfig:
    """Simulated poisoning (simulation only; a deployment refuses it): some sites attack the federation so
    that its defences can be tested. The attacking sites are drawn once from the run's seed and stay the same
    for the whole run. See :mod:`confide.attacks`."""

    kind: str = option("none", ATTACKS.help, choices=ATTACKS)
    sites: float = option(
        1,
        "attacking sites: a count (>= 1) or a fraction of all sites (< 1), drawn once from the run's seed",
        lambda x: 0 < x < 1 or (x >= 1 and float(x).is_integer()),
        "a whole count >= 1 or a fraction in (0, 1)",
    )
    collude: bool = option(
        False,
        "the attackers coordinate: they pool their updates each round (one shared malicious direction; "
        "little_is_enough takes the colluders' mean and std) and share one draw of noise",
    )
    honest_layers: bool = option(
        False,
        "the attackers pass their update through the site-side clipping and noise as honest sites do; false: "
        "they leave them out, as a site that controls its own code can",
    )
    boost: float = option(
        0.0,
        "model_replacement and sign_flip: factor the update is scaled by; 0: for model_replacement sites per "
        "round / attackers expected in a round (Bagdasaryan et al. 2020), for sign_flip 1",
        at_least(0),
        ">= 0",
    )
    noise_std: float = option(1.0, "gaussian: standard deviation per coordinate", positive, "> 0")
    scale: float = option(
        100.0,
        "byzantine: the value of every coordinate; sign_flip: the factor of the negated update",
        positive,
        "> 0",
    )
    trigger: str = option(
        "O Romeo", "backdoor: the phrase that triggers the target", bool, "a non-empty string"
    )
    target: str = option(
        " is a traitor.",
        "backdoor: the text the model should write after the trigger",
        bool,
        "a non-empty string",
    )
    poison_fraction: float = option(
        0.5,
        "data poisoning: fraction of an attacker's training windows poisoned",
        lambda x: 0 < x <= 1,
        "in (0, 1]",
    )
    norm_bound: float = option(
        0.0,
        "norm_evading: the L2 norm bound of the defence, which the attacker knows and stays just under",
        at_least(0),
        ">= 0",
    )
    probes: int = option(
        256,
        "backdoor: held-out windows of honest sites the attack success is measured on",
        at_least(1),
        ">= 1",
    )


@dataclass(frozen=True)
class CompressionConfig:
    """How each site's update is compressed on its way to the server (see :mod:`confide.compress`)."""

    kind: str = option("none", COMPRESSIONS.help, choices=COMPRESSIONS)
    bits: int = option(
        8,
        "quantize: bits per value (8: a quarter of float32's bytes); with secure aggregation the masked "
        "values take bit_length(sites x (2^(bits-1) - 1)) + 1 bits each",
        lambda x: 1 <= x <= 16,
        "from 1 to 16",
    )
    rotate: bool = option(
        False,
        "quantize: rotate each block of values by random signs and a Hadamard transform first, which spreads "
        "large values and shrinks the error (Suresh et al. 2017); with secure aggregation every site of a "
        "round rotates alike and privacy.secagg_range = 0 defaults to 6 x clip_norm / 32 (plus the noise)",
    )
    fraction: float = option(
        0.01, "topk: the fraction of values each site sends (k / d)", lambda x: 0 < x <= 1, "in (0, 1]"
    )
    error_feedback: bool = option(
        True, "topk and subset: each site adds what it did not send to its next update (kept in its state)"
    )
    subset: float = option(
        1.0,
        "with secure aggregation: the fraction of the values every site of a round sends, the same ones for "
        "all (drawn per round from the run's seed); 1: all of them",
        lambda x: 0 < x <= 1,
        "in (0, 1]",
    )
    downlink: str = option("none", DOWNLINKS.help, choices=DOWNLINKS)
    downlink_bits: int = option(
        8,
        "downlink = 'quantize': bits per value of each change to the model the server sends",
        lambda x: 1 <= x <= 16,
        "from 1 to 16",
    )
    downlink_history: int = option(
        8,
        "downlink: how many past versions of the model the server keeps changes for; a site whose copy is "
        "older (or whose changes would add up to more than the model) is sent the full model",
        at_least(1),
        ">= 1",
    )


DEFAULT_MODEL = "gpt"
"""The model kind of a config whose [model] table names none."""

SECTIONS: dict[str, type] = {
    "run": RunConfig,
    "data": DataConfig,
    "client": ClientConfig,
    "server": ServerConfig,
    "eval": EvalConfig,
    "backend": BackendConfig,
    "privacy": PrivacyConfig,
    "deploy": DeployConfig,
    "defence": DefenceConfig,
    "attack": AttackConfig,
    "adapter": AdapterConfig,
    "compression": CompressionConfig,
}


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: dict[str, Any] = field(default_factory=lambda: {"kind": DEFAULT_MODEL})
    """Model kind (:data:`confide.registry.MODELS`) and its options, checked against the model's config
    dataclass in :mod:`confide.models.configs` (without building the model)."""
    client: ClientConfig = field(default_factory=ClientConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    deploy: DeployConfig = field(default_factory=DeployConfig)
    defence: DefenceConfig = field(default_factory=DefenceConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)

    def to_toml(self) -> str:
        return tomli_w.dumps(asdict(self))


def load(path: Path | str, overrides: list[str] | tuple[str, ...] = (), stamp: bool = True) -> Config:
    """Read, override (``section.key=value``) and validate a TOML config. Without a run.name the run is named
    after the file, with the time when ``stamp`` (a server names it after the file alone, so that a restart
    finds the run again)."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"the config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"the config file {path} cannot be read: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None
    for item in overrides:
        apply_override(raw, item)
    config = from_dict(raw)
    if not config.run.name:
        import time

        name = f"{path.stem}-{time.strftime('%Y%m%d-%H%M%S')}" if stamp else path.stem
        config = replace(config, run=replace(config.run, name=name))
    return config


def apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise ConfigError(
            f"--set takes section.key=value, e.g. --set client.learning_rate=0.1 (got {item!r})"
        )
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()  # a bare word: take it as a string
    section = raw.setdefault(parts[0], {})
    if not isinstance(section, dict):
        raise ConfigError(f"[{parts[0]}] must be a table in the config")
    section[parts[1]] = value


def from_dict(raw: Mapping[str, Any]) -> Config:
    sections = {*SECTIONS, "model"}
    for name in raw:
        if name not in sections:
            raise ConfigError(_unknown(f"[{name}] is not a section of the config", name, sorted(sections)))
    built: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        table = raw.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(f"[{name}] must be a table of options, got {table!r}")
        built[name] = _build(cls, name, table)
    table = raw.get("model", {})
    if not isinstance(table, dict):
        raise ConfigError(f"[model] must be a table of options, got {table!r}")
    model = dict(table)
    if not isinstance(model.get("kind", DEFAULT_MODEL), str):
        raise ConfigError(f"model.kind must be a string (got {model['kind']!r})")
    model.setdefault("kind", DEFAULT_MODEL)
    config = Config(model=model, **built)
    check(config)
    return config


def check(config: Config) -> None:
    """Checks that involve more than one option. (data.path, which a simulation's text data needs and a
    deployed server does not, is checked where the data is loaded: ``runner.load_dataset``.)"""
    d = config.data
    if d.lazy and (d.dataset != "text" or d.partition != "natural" or config.model["kind"] == "hf"):
        raise ConfigError(
            "data.lazy = true registers the sites of a folder of character text as they are (data.dataset = "
            f"'text', data.partition = 'natural', a character model); got data.dataset = {d.dataset!r}, "
            f"data.partition = {d.partition!r}, model.kind = {config.model['kind']!r}. Shakespeare's roles "
            "and re-partitioned data sets are loaded whole; set data.lazy = false for them"
        )
    c, s = config.client, config.server
    why = STRATEGIES.fact(s.strategy, NEEDS_SGD)
    if why is not None and c.optimizer != "sgd":
        raise ConfigError(
            f"server.strategy = {s.strategy!r} needs client.optimizer = 'sgd' (got {c.optimizer!r}): {why}"
        )
    if c.personalization == "fedrep" and s.strategy != "fedavg":
        raise ConfigError(
            f"client.personalization = 'fedrep' runs with server.strategy = 'fedavg' (got {s.strategy!r}): "
            "FedRep has its own local schedule (head, then body); use 'ditto' to personalize on top of "
            f"{s.strategy!r}"
        )
    if c.personal_layers and c.personalization != "fedrep":
        raise ConfigError(
            "client.personal_layers names FedRep's personal head; it needs client.personalization = 'fedrep' "
            f"(got {c.personalization!r})"
        )
    _check_backend(config)
    _check_privacy(config)
    _check_encryption(config)
    _check_enclave(config)
    _check_compression(config)
    _check_asynchronous(config)
    _check_defence(config)
    _check_attack(config.attack, config.model["kind"])
    _check_model(config.model)
    _check_language_model(config)


def in_process_only(config: Config) -> str | None:
    """Why ``config``'s sites must all run in one process, or None. Some simulations share objects between
    sites inside one process (the CKKS key ceremony's keys, the enclave's sealing, colluding attackers); a
    language model would be loaded once per worker, and its base is large."""
    p = config.privacy
    if p.encryption != "none":
        return f"privacy.encryption = {p.encryption!r} (its key ceremony)"
    if p.enclave != "none":
        return f"privacy.enclave = {p.enclave!r} (the sealing of updates to the enclave)"
    if config.attack.collude:
        return "attack.collude = true (colluding attackers share what they saw)"
    if config.model["kind"] == "hf":
        return "a language model (model.kind = 'hf'), whose base each worker would load"
    return None


RAY_OPTIONS = {"address": "", "num_cpus": 1.0, "num_gpus": 0.0}
"""The [backend] options of the Ray backend, with their defaults."""


def _check_backend(config: Config) -> None:
    """The Ray backend's options against the backend, Ray's presence, and what cannot run on it yet; the
    local backend's workers against what must run in one process."""
    b = config.backend
    if b.kind != "ray":
        for key, default in RAY_OPTIONS.items():
            if getattr(b, key) != default:
                raise ConfigError(
                    f"backend.{key} = {getattr(b, key)!r} is an option of the Ray backend, but backend.kind "
                    f"is {b.kind!r}: set backend.kind = 'ray', or remove backend.{key}"
                )
        if b.kind == "local" and b.workers > 1:
            why = in_process_only(config)
            if why is not None and config.model["kind"] != "hf":
                raise ConfigError(
                    f"backend.workers = {b.workers}: a simulation with {why} runs every site in one process; "
                    "set backend.workers = 1 (or leave it 0)"
                )
        return
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise ConfigError(
            "backend.kind = 'ray' needs Ray, which is not installed: pip install 'confide[ray]' (or use "
            "backend.kind = 'local')"
        )
    p = config.privacy
    refused = [
        (p.encryption != "none", f"privacy.encryption = {p.encryption!r}", "its key ceremony"),
        (p.enclave != "none", f"privacy.enclave = {p.enclave!r}", "the sealing of updates to the enclave"),
        (
            config.attack.collude,
            "attack.collude = true",
            "colluding attackers share what they saw inside one process",
        ),
    ]
    for wrong, what, why in refused:
        if wrong:
            raise ConfigError(
                f"backend.kind = 'ray' cannot run with {what} yet ({why} is not carried between Ray "
                "workers): use backend.kind = 'local' for it"
            )


def _check_defence(config: Config) -> None:
    """The defences against what they need: their data files, a plain local algorithm."""
    d, s = config.defence, config.server
    robust = s.aggregator != "mean"
    # The data files are the server's alone (a site loads this same config): the server reads them when it
    # builds the run (confide.server.reference), and says there if one is missing.
    if s.aggregator == "fltrust" and not d.root_data:
        raise ConfigError(
            "server.aggregator = 'fltrust' needs defence.root_data: a small clean text file the server "
            "trains on each round to get the direction it trusts (Cao et al. 2021)"
        )
    what = STRATEGIES.fact(s.strategy, PER_SITE_EXTRAS)
    if what is not None and (robust or d.screens):
        raise ConfigError(
            f"server.strategy = {s.strategy!r} cannot run with update screening or a robust aggregator "
            f"(server.aggregator = {s.aggregator!r}): its {what} are combined beside the updates and would "
            "bypass them; use 'fedavg' or 'fedprox'"
        )
    if s.aggregator == "multikrum" and s.sites_per_round >= 1 and d.multikrum > s.sites_per_round:
        raise ConfigError(
            f"defence.multikrum ({d.multikrum}) cannot be more than server.sites_per_round "
            f"({s.sites_per_round:g})"
        )


def _check_attack(a: AttackConfig, model: str) -> None:
    from confide.data.dataset import WINDOW

    if ATTACKS.fact(a.kind, POISONS_DATA) is not None and model == "hf":
        raise ConfigError(
            f"attack.kind = {a.kind!r} poisons character windows, and model.kind = 'hf' trains on token "
            "rows: with a language model use an attack on the update alone (sign_flip, gaussian, byzantine, "
            "free_rider, little_is_enough)"
        )

    if a.kind == "norm_evading" and a.norm_bound <= 0:
        raise ConfigError(
            "attack.kind = 'norm_evading' stays just under the defence's norm bound, so it needs "
            "attack.norm_bound > 0: set it to the bound of the defence under test"
        )
    if a.kind == "little_is_enough" and not a.collude:
        raise ConfigError(
            "attack.kind = 'little_is_enough' sends the colluders' mean minus z standard deviations, and one "
            "attacker alone knows no spread: set attack.collude = true"
        )
    if ATTACKS.fact(a.kind, POISONS_DATA) == "backdoor" and len(a.trigger) + len(a.target) >= WINDOW:
        raise ConfigError(
            f"attack.trigger and attack.target together must be shorter than a window of {WINDOW} characters "
            f"(got {len(a.trigger)} + {len(a.target)}): shorten the target"
        )


def _check_model(model: Mapping[str, Any]) -> None:
    """The [model] table against the kind's config dataclass: names, types and ranges, without torch."""
    from confide.models.configs import model_config

    kind = MODELS.check(model["kind"])
    model_config(kind, **{k: v for k, v in model.items() if k != "kind"})


def _check_language_model(config: Config) -> None:
    hf = config.model["kind"] == "hf"
    if config.adapter.kind != "none" and not hf:
        raise ConfigError(
            f"adapter.kind = {config.adapter.kind!r} needs model.kind = 'hf' (got {config.model['kind']!r}); "
            "confide's own models train every weight"
        )
    if config.adapter.quantize != "none" and config.adapter.kind != "lora":
        raise ConfigError("adapter.quantize = '4bit' (QLoRA) needs adapter.kind = 'lora'")
    if hf and config.privacy.record_dp:
        raise ConfigError(
            "privacy.record_dp (DP-SGD with Opacus) is not available for model.kind = 'hf'; use site-level "
            "DP (privacy.dp = 'central' or 'distributed')"
        )


def _check_privacy(config: Config) -> None:
    p, s, c = config.privacy, config.server, config.client
    if p.dp == "none":
        for key in ("target_epsilon", "adaptive_clip", "calibrate"):
            if getattr(p, key):
                raise ConfigError(
                    f"privacy.{key} needs site-level differential privacy: set privacy.dp = 'central' or "
                    "'distributed' (it is 'none')"
                )
    else:
        what = STRATEGIES.fact(s.strategy, PER_SITE_EXTRAS)
        if what is not None:
            raise ConfigError(
                f"privacy.dp = {p.dp!r} cannot run with server.strategy = {s.strategy!r}: its {what} travel "
                "beside the clipped update without noise; use 'fedavg' or 'fedprox'"
            )
        if p.calibrate and p.target_epsilon <= 0:
            raise ConfigError("privacy.calibrate = true needs privacy.target_epsilon > 0 to calibrate to")
        if p.adaptive_clip and p.dp != "central":
            raise ConfigError(
                "privacy.adaptive_clip needs privacy.dp = 'central': each site's clipping bit is noised by "
                "the aggregator, which under distributed DP must not see it"
            )
        hidden = p.secure_aggregation or p.encryption != "none"
        if p.dp == "distributed" and not hidden and p.enclave == "none":  # the enclave says why, below
            raise ConfigError(
                "privacy.dp = 'distributed' needs secure aggregation (privacy.secure_aggregation = true): "
                "each site's update carries only its share of the noise, so the server may see only their "
                "sum (or privacy.encryption = 'ckks'); without either use privacy.dp = 'central'"
            )
        _check_ftrl(config)
        if p.accounting == "pld" and s.sampling == "fixed":
            raise ConfigError(
                "privacy.accounting = 'pld' cannot account server.sampling = 'fixed' (dp-accounting has no "
                "privacy loss distribution for sampling without replacement): use accounting = 'rdp', or "
                "server.sampling = 'poisson'"
            )
    what = STRATEGIES.fact(s.strategy, PER_SITE_EXTRAS)
    if p.secure_aggregation and what is not None:
        raise ConfigError(
            f"privacy.secure_aggregation cannot run with server.strategy = {s.strategy!r}: the server needs "
            f"each site's own {what} beside its update, and secure aggregation shows it only the sum; use "
            "'fedavg' or 'fedprox'"
        )
    if p.insecure_reproducible_noise and p.dp == "none" and not p.record_dp:
        raise ConfigError(
            "privacy.insecure_reproducible_noise makes differential privacy's noise repeatable, but the "
            "run adds none: set privacy.dp = 'central' or 'distributed', or privacy.record_dp = true (or "
            "leave the option out)"
        )
    if p.record_target_epsilon and not p.record_dp:
        raise ConfigError(
            "privacy.record_target_epsilon calibrates DP-SGD's noise, which needs privacy.record_dp = true "
            "(for a site-level budget use privacy.target_epsilon)"
        )
    if (
        p.secure_aggregation
        and not p.secagg_range
        and p.dp == "none"
        and p.record_dp
        and c.optimizer == "sgd"
        and c.weight_decay > 0
    ):
        raise ConfigError(
            "privacy.secure_aggregation encodes every coordinate of an update in a fixed-point range [-R, R] "
            "that must hold it, and a DP-SGD update under SGD with client.weight_decay = "
            f"{c.weight_decay:g} has no such bound (weight decay pulls by the weights, which the clip does "
            "not bound): set privacy.secagg_range to the largest coordinate an update may have, or clip "
            "each site's update (privacy.dp = 'central' or 'distributed', whose clip_norm bounds it), or "
            "set client.weight_decay = 0, or train with client.optimizer = 'adam' (whose step is bounded)"
        )
    if p.record_dp and (s.strategy not in ("fedavg", "fedbuff") or c.personalization == "fedrep"):
        raise ConfigError(
            "privacy.record_dp trains with plain DP-SGD steps, so it runs with server.strategy = 'fedavg' "
            f"or 'fedbuff' (got {s.strategy!r}) and without FedRep"
        )


def _check_ftrl(config: Config) -> None:
    """DP-FTRL's correlated noise needs one party that adds it every round and keeps the earlier noise."""
    p, s = config.privacy, config.server
    if p.mechanism != "dp-ftrl":
        if p.bands:
            raise ConfigError("privacy.bands sets up privacy.mechanism = 'dp-ftrl'; it is 'dp-fedavg'")
        return
    why = ""
    if p.dp != "central":
        why = (
            "the noise of each round is correlated with the rounds before, so whoever adds it must keep the "
            "earlier noise; sites adding shares under secure aggregation cannot (undoing the correlation "
            "needs the earlier shares, which secure aggregation hides). Use privacy.dp = 'central', or "
            "privacy.mechanism = 'dp-fedavg' with distributed DP"
        )
    elif p.adaptive_clip:
        why = "it runs with a fixed clip norm: set privacy.adaptive_clip = false and choose privacy.clip_norm"
    elif p.enclave != "none":
        why = "the enclave adds fresh noise each round and keeps no noise between rounds; use privacy.dp = "
        why += "'central' without the enclave, or privacy.mechanism = 'dp-fedavg' inside it"
    elif p.encryption != "none":
        why = "under CKKS the noise is added to ciphertexts each round, fresh; use mechanism 'dp-fedavg'"
    elif s.strategy == "fedbuff":
        why = "FedBuff's buffers are not rounds of one stream; use server.strategy = 'fedavg'"
    if why:
        raise ConfigError(f"privacy.mechanism = 'dp-ftrl': {why}")


def _check_encryption(config: Config) -> None:
    """Under CKKS the server only adds ciphertexts, and never holds the model in clear: refuse what would
    need more (a division or a product on the server, a site's own update read alone, the clear model)."""
    p, s, c = config.privacy, config.server, config.client
    if p.encryption == "none":
        return
    why = "the server holds the model encrypted and can only add to it"
    refusals = [
        (
            p.secure_aggregation,
            "privacy.secure_aggregation = true: both hide the updates from the server; choose one",
        ),
        (
            p.enclave != "none",
            f"privacy.enclave = {p.enclave!r}: both hide the updates from the server; choose one",
        ),
        (
            s.optimizer != "sgd",
            f"server.optimizer = {s.optimizer!r}: {why}, which is one plain SGD step "
            "(server.optimizer = 'sgd', with any server.learning_rate)",
        ),
        (
            s.schedule != "constant",
            f"server.schedule = {s.schedule!r}: the learning rate is folded into each site's encrypted "
            "weight once; use server.schedule = 'constant'",
        ),
        (
            STRATEGIES.fact(s.strategy, PER_SITE_EXTRAS) is not None,
            f"server.strategy = {s.strategy!r}: the "
            "server needs each site's own extras beside its update; use 'fedavg' or 'fedprox'",
        ),
        (
            c.personalization == "fedrep",
            "client.personalization = 'fedrep': only the body travels, and the "
            "encrypted model cannot be stepped in part; use 'ditto' or 'finetune'",
        ),
        (p.adaptive_clip, "privacy.adaptive_clip: each site's clipping bit would reach the server alone"),
        (
            config.attack.kind != "none",
            f"attack.kind = {config.attack.kind!r}: the attack's success is "
            "measured on the global model, which the server cannot read",
        ),
    ]
    for refused, reason in refusals:
        if refused:
            raise ConfigError(f"privacy.encryption = {p.encryption!r} cannot run with {reason}")


def _check_enclave(config: Config) -> None:
    """The attested aggregator against what cannot run inside it or beside it."""
    p, s, d = config.privacy, config.server, config.defence
    if p.enclave == "none":
        if p.enclave_address:
            raise ConfigError("privacy.enclave_address names an aggregator, but privacy.enclave is 'none'")
        return
    why = ""
    if p.secure_aggregation:
        why = "secure aggregation also hides the updates: choose one of the two"
    elif p.dp == "distributed":
        why = "use privacy.dp = 'central': the enclave adds the noise inside, where the server cannot see it"
    elif p.adaptive_clip:
        why = "adaptive clipping moves the clip norm on the server; use a fixed privacy.clip_norm"
    elif STRATEGIES.fact(s.strategy, PER_SITE_EXTRAS) is not None:
        why = f"server.strategy = {s.strategy!r} combines per-site values beside the updates; use 'fedavg'"
    elif d.screens:
        why = "update screening (defence.norm_bound, min_cosine, validation_data) runs on the server, which "
        why += "never sees an update: use a robust server.aggregator, which runs inside the enclave"
    elif s.aggregator == "fltrust":
        why = "FLTrust trains on the server's root data, which the enclave does not have"
    if why:
        raise ConfigError(f"privacy.enclave = {p.enclave!r}: {why}")


def _check_compression(config: Config) -> None:
    """Compression replaces the clear vector by a payload, which the protecting layers cannot take; only
    quantization runs with secure aggregation, which then quantizes into its own ring. The downlink's needs
    a model in clear to take differences of."""
    p, kind = config.privacy, config.compression.kind
    downlink = config.compression.downlink
    if downlink != "none" and p.encryption != "none":
        raise ConfigError(
            f"compression.downlink = {downlink!r} cannot run with privacy.encryption = {p.encryption!r}: the "
            "server holds the model encrypted, so it has no clear model to send the changes of (and a "
            "ciphertext does not compress); set compression.downlink = 'none'"
        )
    fedrep = config.client.personalization == "fedrep"
    if config.compression.subset < 1 and (not p.secure_aggregation or fedrep):
        raise ConfigError(
            f"compression.subset = {config.compression.subset} sends a subset of the values common to the "
            "round's sites, which is for secure aggregation (and not with FedRep's shared body): set "
            "privacy.secure_aggregation = true, or use compression.kind = 'topk' to send each site's largest "
            "values in clear"
        )
    if kind == "none":
        return
    if p.secure_aggregation and kind != "quantize":
        why = {
            "topk": "each site's top-k picks its own coordinates, and a masked sum only adds up when every "
            "site sends the same ones",
        }.get(kind, "secure aggregation masks integers in its ring, not 16-bit floats")
        raise ConfigError(
            f"compression.kind = {kind!r} cannot run with privacy.secure_aggregation = true: {why}. Use "
            "compression.kind = 'quantize' (secure aggregation then quantizes each update into its ring, "
            "so the masked vector shrinks too), or set compression.kind = 'none'"
        )
    protections = [
        (p.encryption != "none", f"privacy.encryption = {p.encryption!r}"),
        (p.enclave != "none", f"privacy.enclave = {p.enclave!r}"),
    ]
    for refused, what in protections:
        if refused:
            raise ConfigError(
                f"compression.kind = {kind!r} cannot run with {what}: that layer needs each site's clear "
                "float32 vector, which compression has replaced by a payload; set compression.kind = 'none', "
                "or use privacy.secure_aggregation = true with compression.kind = 'quantize'"
            )


def _check_asynchronous(config: Config) -> None:
    """What asynchronous buffered rounds (server.strategy = 'fedbuff') cannot run with yet, and why."""
    if config.server.strategy != "fedbuff":
        return
    p, c = config.privacy, config.client
    refused = [
        (
            p.encryption != "none",
            f"privacy.encryption = {p.encryption!r}",
            "CKKS sites weight their updates by a fixed denominator into a model that travels encrypted",
        ),
        (p.enclave != "none", f"privacy.enclave = {p.enclave!r}", "the enclave runs synchronous rounds"),
        (
            c.personalization != "none",
            f"client.personalization = {c.personalization!r}",
            "personal models are trained and evaluated in synchronous rounds",
        ),
        (
            p.adaptive_clip,
            "privacy.adaptive_clip = true",
            "its clip-norm quantile would mix the clipping bits of updates trained on different versions",
        ),
        (
            config.compression.downlink != "none",
            f"compression.downlink = {config.compression.downlink!r}",
            "a buffer's sites trained on model versions that no single round's changes lead from",
        ),
        (
            config.server.sampling == "poisson",
            "server.sampling = 'poisson'",
            "no sites are sampled: a buffer takes the first server.sites_per_round sites to finish",
        ),
    ]
    for wrong, what, why in refused:
        if wrong:
            raise ConfigError(
                f"server.strategy = 'fedbuff' cannot run with {what} yet ({why}): use server.strategy = "
                f"'fedavg' for synchronous rounds, or drop that setting"
            )


def check_deployment(config: Config) -> None:
    """Refuse what only a simulation may do. A deployment (`confide server`, and each site on the config the
    server sends it) calls this besides :func:`load`'s checks.

    Threat model: under distributed DP each site adds its own share of the noise so that the server, which
    may be curious, never sees an update without it. If that noise came from the run's seed, the server
    (which chose the seed) could subtract it, so a site must refuse such a config even from its server.
    """
    if config.attack.kind != "none":
        raise ConfigError(
            f"attack.kind = {config.attack.kind!r} simulates poisoning sites to test defences; it is for "
            "simulations only (`confide run`), and a deployment refuses it: set attack.kind = 'none' or "
            "remove the [attack] section"
        )
    if config.privacy.insecure_reproducible_noise:
        raise ConfigError(
            "privacy.insecure_reproducible_noise draws the DP noise from the run's seed, so anyone who knows "
            "the seed can remove it; it is for simulations only, and a deployment refuses it: set it to false"
        )
    p = config.privacy
    if p.record_target_epsilon:
        raise ConfigError(
            "privacy.record_target_epsilon calibrates DP-SGD's noise to the window counts of every site, "
            "which a deployment's server learns only as the sites join, after it has sent them the config: "
            "set privacy.record_noise instead (a simulation of the same sites, `confide run`, prints the "
            "calibrated value)"
        )
    if p.secure_aggregation and p.record_dp and p.dp == "none" and not p.secagg_range:
        raise ConfigError(
            "secure aggregation's fixed-point range follows, under DP-SGD alone, from the window counts of "
            "every site, which a deployment's sites do not know of each other: set privacy.secagg_range (a "
            "simulation of the same stack, `confide run`, prints the range it derives), or clip each site's "
            "update (privacy.dp = 'central' or 'distributed')"
        )
    if p.enclave == "simulated" and not p.enclave_allow_insecure_simulation:
        raise ConfigError(
            "privacy.enclave = 'simulated' is an INSECURE stand-in without hardware (whoever runs the "
            "aggregator reads every update); a deployment refuses it unless "
            "privacy.enclave_allow_insecure_simulation = true, to test a deployment only"
        )
    if p.enclave != "none" and not p.enclave_address:
        raise ConfigError(
            "a deployment runs the attested aggregator in its own process: start `confide aggregator` and "
            "set privacy.enclave_address to its HOST:PORT"
        )


def _build(cls: type, section: str, table: Mapping[str, Any]) -> Any:
    hints = get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    values = {}
    for key, value in table.items():
        if key not in known:
            raise ConfigError(
                _unknown(f"{section}.{key} is not an option of [{section}]", key, sorted(known))
            )
        f = known[key]
        where = f"{section}.{key}"
        value = _coerce(where, hints[key], value)
        meta = f.metadata
        if meta["choices"] is not None:
            meta["choices"].check(value)
        if meta["check"] is not None and not meta["check"](value):
            raise ConfigError(f"{where} must be {meta['accepts']} (got {value!r})")
        values[key] = value
    return cls(**values)


def _coerce(where: str, kind: Any, value: Any) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false (got {value!r})")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be an integer (got {value!r})")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where} must be a number (got {value!r})")
    if kind is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where} must be a string (got {value!r})")
    raise AssertionError(f"unsupported option type {kind} for {where}")


def _unknown(message: str, key: str, accepted: list[str]) -> str:
    close = difflib.get_close_matches(key, accepted, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{message}{hint} (accepted: {', '.join(accepted)})"


def describe() -> list[tuple[str, Any, str]]:
    """Every option with its default and help text, for the docs and `confide config`. An option that names
    a plug-in lists the accepted names, each with its help text from :mod:`confide.registry`."""
    rows = []
    for name, cls in SECTIONS.items():
        for f in fields(cls):
            help, choices = f.metadata["help"], f.metadata["choices"]
            if choices is not None:
                help = f"{help}; one of:\n{choices.describe()}"
            rows.append((f"{name}.{f.name}", f.default, help))
    rows.append(("model.kind", DEFAULT_MODEL, f"{MODELS.help}; one of:\n{MODELS.describe()}"))
    return rows
