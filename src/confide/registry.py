"""Every named choice of the run configuration, registered once, with its help text and where it lives.

A config option such as ``server.strategy = "scaffold"`` names a plug-in. Each plug-in is registered here, in
one place, as a name, a one-line help text and a lazy target ``"module:attribute"``: the code that implements
it, imported only when :meth:`Registry.load` is called. So this module imports nothing heavy (no torch, no
numpy), and reading or checking a config stays quick and light; the config's checks, its help (``confide
config``) and the code that builds a run all take the accepted names from here instead of each writing its
own tuple of strings.

A plug-in may also name ``options``: a torch-free dataclass holding its settings (the model kinds' config
dataclasses), which the config checks without building the plug-in; and ``facts``: what the config's
cross-checks need to know about it, each with the reason in words (SCAFFOLD needs plain SGD steps, because
...), so that a check asks "which strategies need SGD?" instead of listing their names.

Adding a plug-in is one ``register`` call here and its own module; nothing else lists the names::

    LAYERS.register("topk", "top-k sparsification with error feedback", "confide.compress.topk:TopK")
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from confide.errors import ConfigError


@dataclass(frozen=True)
class Plugin:
    """One registered choice."""

    name: str
    help: str
    """One line for ``confide config`` and the docs."""
    target: str | None
    """``"module:attribute"`` of what implements it, imported by :meth:`Registry.load`; None for the choice
    that turns a feature off (``"none"``), which has nothing to load."""
    options: str | None = None
    """``"module:attribute"`` of a torch-free dataclass of its options; None when it has none of its own."""
    facts: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    """Properties the config's cross-checks ask about, each with the reason a message can quote."""


class Registry:
    """The plug-ins one config key (``key``, e.g. ``"server.strategy"``) accepts, in registration order."""

    def __init__(self, key: str, help: str) -> None:
        self.key = key
        self.help = help
        """What the choice decides, in a few words."""
        self._plugins: dict[str, Plugin] = {}

    def register(
        self,
        name: str,
        help: str,
        target: str | None,
        *,
        options: str | None = None,
        facts: Mapping[str, str] | None = None,
    ) -> Plugin:
        """Add a plug-in; a name registered twice is a bug in the registration, not a config error."""
        if name in self._plugins:
            raise ValueError(f"{self.key}: {name!r} is registered twice")
        for where in (target, options):
            if where is not None and where.count(":") != 1:
                raise ValueError(f"{self.key}: {where!r} is not of the form 'module:attribute'")
        plugin = Plugin(name, help, target, options, MappingProxyType(dict(facts or {})))
        self._plugins[name] = plugin
        return plugin

    def names(self) -> tuple[str, ...]:
        return tuple(self._plugins)

    def __contains__(self, name: object) -> bool:
        return name in self._plugins

    def __iter__(self) -> Iterator[Plugin]:
        return iter(self._plugins.values())

    def __len__(self) -> int:
        return len(self._plugins)

    def __repr__(self) -> str:
        return f"Registry({self.key!r}: {', '.join(self._plugins)})"

    def get(self, name: Any) -> Plugin:
        """The plug-in called ``name``; ConfigError naming the key, the value, what is accepted and the
        nearest accepted name when there is none."""
        if isinstance(name, str) and name in self._plugins:
            return self._plugins[name]
        accepted = ", ".join(repr(n) for n in self._plugins) or "nothing registered yet"
        close = difflib.get_close_matches(name, self.names(), n=1) if isinstance(name, str) else []
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{self.key} must be one of {accepted} (got {name!r}){hint}")

    def check(self, name: Any) -> str:
        """``name`` if it is registered, else the ConfigError of :meth:`get`."""
        return self.get(name).name

    def load(self, name: str) -> Any:
        """Import and return what implements ``name`` (None for an off switch such as ``"none"``)."""
        plugin = self.get(name)
        return None if plugin.target is None else _import(self.key, name, plugin.target)

    def load_options(self, name: str) -> type | None:
        """The dataclass of ``name``'s own options, imported; None when it has none."""
        plugin = self.get(name)
        return None if plugin.options is None else _import(self.key, name, plugin.options)

    def fact(self, name: str, fact: str) -> str | None:
        """Why ``name`` has property ``fact``, or None when it does not."""
        return self.get(name).facts.get(fact)

    def having(self, fact: str) -> tuple[str, ...]:
        """The names of the plug-ins that have property ``fact``."""
        return tuple(p.name for p in self if fact in p.facts)

    def describe(self) -> str:
        """One line per choice, ``'name': help``, for ``confide config``."""
        return "\n".join(f"{p.name!r}: {p.help}" for p in self)


def _import(key: str, name: str, where: str) -> Any:
    module_name, _, attribute = where.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is None or e.name.split(".")[0] == "confide":
            raise  # a registration pointing at a module confide does not have: a bug, not a config error
        raise ConfigError(
            f"{key} = {name!r} needs the package {e.name!r}, which is not installed: install it (pip install "
            f"{e.name.split('.')[0]}) or choose another {key}"
        ) from e
    return getattr(module, attribute)


# -- the registries ------------------------------------------------------------------------------------------

NEEDS_SGD = "needs_sgd"
"""Fact of a strategy: its arithmetic assumes the sites take plain SGD steps."""
PER_SITE_EXTRAS = "per_site_extras"
"""Fact of a strategy: each site sends something beside its update (named by the fact) that the server must
read for that site alone, without noise: it cannot run under DP or secure aggregation."""

STRATEGIES = Registry("server.strategy", "the federated algorithm")
STRATEGIES.register(
    "fedavg",
    "Federated Averaging (McMahan et al. 2017): the sites' deltas averaged, weighted by their examples",
    "confide.algorithms.fedavg:FedAvg",
)
STRATEGIES.register(
    "fedprox",
    "FedAvg with the proximal term mu/2 ||w - w_global||^2 in each site's loss (Li et al. 2020); see mu",
    "confide.algorithms.fedprox:FedProx",
)
STRATEGIES.register(
    "scaffold",
    "control variates that correct each site's drift (Karimireddy et al. 2020); sites train with SGD",
    "confide.algorithms.scaffold:Scaffold",
    facts={
        NEEDS_SGD: "its control-variate update (option II) is derived for plain SGD steps",
        PER_SITE_EXTRAS: "control variates",
    },
)
STRATEGIES.register(
    "fednova",
    "normalized averaging: each delta divided by its number of local steps (Wang et al. 2020)",
    "confide.algorithms.fednova:FedNova",
    facts={
        NEEDS_SGD: "its normalizer counts SGD steps (with momentum)",
        PER_SITE_EXTRAS: "step counts and example weights",
    },
)
STRATEGIES.register(
    "fedbuff",
    "asynchronous buffered aggregation (Nguyen et al. 2022): sites train continuously on the newest model "
    "they were sent, and the model steps whenever server.sites_per_round updates are in, each discounted by "
    "its staleness",
    "confide.algorithms.fedbuff:FedBuff",
)

PERSONALIZATIONS = Registry("client.personalization", "a model per site besides the global one")
PERSONALIZATIONS.register("none", "only the global model", None)
PERSONALIZATIONS.register(
    "ditto",
    "a personal model per site, pulled towards the global one by ditto_lambda (Li et al. 2021)",
    "confide.client.personalize:train_ditto",
)
PERSONALIZATIONS.register(
    "fedrep",
    "a personal head per site on the shared body; only the body travels (Collins et al. 2021)",
    "confide.client.personalize:train_head",
)
PERSONALIZATIONS.register(
    "finetune",
    "the global model fine-tuned on each site's data when it is evaluated",
    "confide.client.personalize:personal_weights",
)

SERVER_OPTIMIZERS = Registry(
    "server.optimizer", "the server optimizer on the averaged delta (Reddi et al. 2021)"
)
_SERVER_OPTIMIZER = "confide.server.optim:ServerOptimizer"
SERVER_OPTIMIZERS.register(
    "sgd", "plain steps of server.learning_rate (1: FedAvg's plain average)", _SERVER_OPTIMIZER
)
SERVER_OPTIMIZERS.register(
    "momentum", "SGD with momentum beta1 (FedAvgM, Hsu et al. 2019)", _SERVER_OPTIMIZER
)
SERVER_OPTIMIZERS.register(
    "adam", "FedAdam: Adam with beta1, beta2 and adaptivity tau, without bias correction", _SERVER_OPTIMIZER
)
SERVER_OPTIMIZERS.register(
    "yogi", "FedYogi: Adam whose second moment grows additively (Zaheer et al. 2018)", _SERVER_OPTIMIZER
)
SERVER_OPTIMIZERS.register(
    "adagrad",
    "FedAdagrad: steps divided by the root of the summed squared deltas, plus tau",
    _SERVER_OPTIMIZER,
)

CLIENT_OPTIMIZERS = Registry("client.optimizer", "the sites' optimizer (its state starts fresh each round)")
CLIENT_OPTIMIZERS.register(
    "sgd", "SGD with client.momentum and client.weight_decay", "confide.client.trainer:ClientOptimizer"
)
CLIENT_OPTIMIZERS.register("adam", "Adam with client.weight_decay", "confide.client.trainer:ClientOptimizer")

SAMPLINGS = Registry("server.sampling", "how a round's sites are drawn")
SAMPLINGS.register(
    "fixed", "exactly sites_per_round sites, without replacement", "confide.server.strategy:Strategy"
)
SAMPLINGS.register(
    "poisson",
    "each site independently with rate sites_per_round / sites (what DP accounting likes best)",
    "confide.server.strategy:Strategy",
)

DP_PLACEMENTS = Registry("privacy.dp", "site-level DP-FedAvg (McMahan et al. 2018): who adds the noise")
DP_PLACEMENTS.register("none", "no differential privacy", None)
DP_PLACEMENTS.register(
    "central", "the aggregator adds the noise to the sum of clipped updates", "confide.privacy.policy:SiteDP"
)
DP_PLACEMENTS.register(
    "distributed",
    "each site adds its share of the noise; needs secure aggregation, so the server sees only the sum",
    "confide.privacy.policy:SiteDP",
)

ACCOUNTANTS = Registry("privacy.accounting", "the privacy accountant of dp-accounting")
ACCOUNTANTS.register("rdp", "Renyi DP (Mironov 2017)", "confide.privacy.accountant:PrivacyAccountant")
ACCOUNTANTS.register(
    "pld",
    "privacy loss distributions: tighter; needs server.sampling = 'poisson' (Koskela et al. 2020)",
    "confide.privacy.accountant:PrivacyAccountant",
)

AUTH_MODES = Registry("deploy.auth", "how sites prove who they are to `confide server`")
AUTH_MODES.register(
    "token",
    "a bearer token issued by `confide enroll`, stored hashed",
    "confide.runtime.grpc.security:Authenticator",
)
AUTH_MODES.register(
    "mtls",
    "a site certificate from `confide enroll --certificate` (mutual TLS)",
    "confide.runtime.grpc.security:Authenticator",
)

PARTITIONS = Registry("data.partition", "how sites are formed")
PARTITIONS.register(
    "natural", "the data set's own sites (Shakespeare: one per role)", "confide.data.partition:natural"
)
PARTITIONS.register(
    "iid",
    "every window dealt out at random, keeping each site's size (a control)",
    "confide.data.partition:iid",
)
PARTITIONS.register(
    "dirichlet",
    "label skew: each label's windows shared among num_sites sites by Dirichlet(alpha) (Hsu et al. 2019)",
    "confide.data.partition:dirichlet",
)
PARTITIONS.register(
    "quantity",
    "size skew: num_sites sites whose sizes are drawn from Dirichlet(alpha)",
    "confide.data.partition:quantity",
)
PARTITIONS.register(
    "group",
    "one site per group, its sites' windows joined (Shakespeare: one per play, every role of it); "
    "data.max_sites then keeps that many groups",
    "confide.data.partition:group",
)

DIRICHLET_LABELS = Registry("data.label", "what the 'dirichlet' partition skews over")
DIRICHLET_LABELS.register(
    "group", "each window's site group (the play, for Shakespeare)", "confide.data.partition:group_labels"
)
DIRICHLET_LABELS.register(
    "next_char", "the last character each window predicts", "confide.data.partition:next_char_labels"
)

DATASETS = Registry("data.dataset", "the data set")
DATASETS.register(
    "shakespeare",
    "Shakespeare's plays, one site per speaking role (the FedAvg paper's task)",
    "confide.data.shakespeare:load",
)
DATASETS.register(
    "text",
    "your own text: a folder with a file or subfolder per site, or a .jsonl file (data.path)",
    "confide.data.text:load_text",
)

MODELS = Registry("model.kind", "the model")
MODELS.register(
    "gpt",
    "a small GPT over characters (GPT-2's shape)",
    "confide.models.gpt:GPT",
    options="confide.models.configs:GPTConfig",
)
MODELS.register(
    "lstm",
    "the FedAvg paper's character LSTM (McMahan et al. 2017)",
    "confide.models.lstm:CharLSTM",
    options="confide.models.configs:LSTMConfig",
)

MODELS.register(
    "hf",
    "a Hugging Face causal language model (model.path or model.config), optionally with LoRA adapters",
    "confide.models.hf:build_hf",
    options="confide.models.configs:HFConfig",
)

BACKENDS = Registry("backend.kind", "who carries messages")
BACKENDS.register(
    "local",
    "every site on this machine, in parallel worker processes (no setup)",
    "confide.runtime.local:LocalBackend",
)
BACKENDS.register(
    "ray",
    "simulated sites spread over Ray workers, on this machine or a cluster (pip install 'confide[ray]')",
    "confide.runtime.ray:RayBackend",
)

LAYERS = Registry("layer", "a layer of the update pipeline (encode at the site, decode at the server)")
"""In stack order: a site encodes through them top to bottom, the server decodes bottom to top. Each target
is a Layer class whose ``from_config(stack)`` builds it when the run's config asks for it (None otherwise);
the strategy's own layers (SCAFFOLD's control variates) come first. The screen is first, so the server
decodes it last: it sees each update as the aggregator will (after the server's DP clipping)."""
LAYERS.register(
    "screen",
    "defences: norm bound, cosine to the last global update and the round's median, validation loss",
    "confide.server.screen:ScreenLayer",
)
LAYERS.register(
    "attack",
    "simulated model poisoning: an attacking site replaces its update as it leaves the site ([attack])",
    "confide.attacks.layer:AttackLayer",
)
LAYERS.register(
    "adaptive_clip",
    "adaptive clipping (Andrew et al. 2021): the clip norm follows a quantile of the update norms",
    "confide.privacy.adaptive:AdaptiveClipping",
)
LAYERS.register(
    "clip", "site-level DP: each update clipped to L2 norm C at the site", "confide.privacy.dp:ClipLayer"
)
LAYERS.register(
    "staleness",
    "asynchronous rounds (FedBuff): each site scales its clipped update by its staleness discount",
    "confide.algorithms.fedbuff:StalenessLayer",
)
LAYERS.register(
    "subset",
    "update compression under secure aggregation: every site of a round sends the same random "
    "compression.subset of its values, the rest kept for later rounds",
    "confide.compress.subset:SubsetLayer",
)
LAYERS.register(
    "distributed_noise",
    "distributed DP: each site adds its share of the Gaussian noise",
    "confide.privacy.dp:DistributedNoiseLayer",
)
LAYERS.register(
    "quantize",
    "update compression: unbiased stochastic quantization to compression.bits bits per value, optionally "
    "after a random Hadamard rotation",
    "confide.compress.quantize:QuantizeLayer",
)
LAYERS.register(
    "topk",
    "update compression: the compression.fraction largest values, the rest kept for the next round",
    "confide.compress.sparsify:TopKLayer",
)
LAYERS.register(
    "cast", "update compression: float16 or bfloat16 transport", "confide.compress.cast:CastLayer"
)
LAYERS.register(
    "secagg",
    "secure aggregation (SecAgg+): each update masked, the server unmasks only the sum",
    "confide.privacy.secure:SecAggLayer",
)
LAYERS.register(
    "ckks",
    "homomorphic encryption (CKKS, TenSEAL): each update encrypted, the server adds ciphertexts into an "
    "encrypted model that only the sites can decrypt",
    "confide.privacy.he.layer:CKKSLayer",
)
LAYERS.register(
    "enclave",
    "attested aggregator (TEE): each update sealed to an enclave, which aggregates and releases the result",
    "confide.privacy.tee.layer:EnclaveLayer",
)
LAYERS.register(
    "validate",
    "update validation: shape and finiteness of every update the server can read",
    "confide.server.validate:ValidateLayer",
)
LAYERS.register(
    "downlink",
    "model compression to the sites: each site is sent the compressed changes to the model it holds "
    "(EF21-P, Gruntkowska et al. 2023), or the model in full",
    "confide.compress.downlink:DownlinkLayer",
)

ENCRYPTIONS = Registry("privacy.encryption", "homomorphic encryption of the updates and the global model")
ENCRYPTIONS.register("none", "updates travel as the other privacy settings leave them", None)
ENCRYPTIONS.register(
    "ckks",
    "CKKS (TenSEAL): sites encrypt, the server adds ciphertexts and never holds an update or the model in "
    "clear; the secret key is made and kept at the sites",
    "confide.privacy.he.layer:CKKSLayer",
)

COMPRESSIONS = Registry("compression.kind", "how each site's update is compressed for the wire")
COMPRESSIONS.register("none", "float32 values, 4 bytes each", None)
COMPRESSIONS.register(
    "quantize",
    "unbiased stochastic quantization to compression.bits bits per value, with a range per block of 1024 "
    "values; compression.rotate spreads large values first (random Hadamard rotation, Suresh et al. 2017)",
    "confide.compress.quantize:QuantizeLayer",
)
COMPRESSIONS.register(
    "topk",
    "top-k sparsification: the compression.fraction largest values and their indices (8 bytes each), "
    "with error feedback (Stich et al. 2018)",
    "confide.compress.sparsify:TopKLayer",
)
COMPRESSIONS.register("float16", "half precision, 2 bytes per value", "confide.compress.cast:CastLayer")
COMPRESSIONS.register(
    "bfloat16",
    "bfloat16: float32's range with 8 significant bits, 2 bytes per value",
    "confide.compress.cast:CastLayer",
)

DOWNLINKS = Registry("compression.downlink", "how the server compresses the model it sends the sites")
DOWNLINKS.register("none", "the model in full float32, 4 bytes per value, to every site", None)
DOWNLINKS.register(
    "float16",
    "the changes to the model a site holds, as float16 (2 bytes per value), with error feedback",
    "confide.compress.downlink:DownlinkLayer",
)
DOWNLINKS.register(
    "quantize",
    "the changes to the model a site holds, in compression.downlink_bits bits per value after a random "
    "Hadamard rotation, with error feedback",
    "confide.compress.downlink:DownlinkLayer",
)

AGGREGATORS = Registry("server.aggregator", "how the server combines the round's updates")
AGGREGATORS.register(
    "mean", "the example-weighted mean, summed as updates arrive", "confide.server.aggregators:WeightedMean"
)
AGGREGATORS.register(
    "median", "coordinate-wise median (Yin et al. 2018)", "confide.server.robust:CoordinateMedian"
)
AGGREGATORS.register(
    "trimmed_mean",
    "coordinate-wise trimmed mean: defence.trim of the values cut at each end (Yin et al. 2018)",
    "confide.server.robust:TrimmedMean",
)
AGGREGATORS.register(
    "krum",
    "the update closest to its n - f - 2 neighbours, f = defence.byzantine (Blanchard et al. 2017)",
    "confide.server.robust:Krum",
)
AGGREGATORS.register(
    "multikrum",
    "the mean of the defence.multikrum best Krum-scored updates (Blanchard et al. 2017)",
    "confide.server.robust:MultiKrum",
)
AGGREGATORS.register(
    "geometric_median",
    "geometric median by smoothed Weiszfeld (RFA, Pillutla et al. 2022)",
    "confide.server.robust:GeometricMedian",
)
AGGREGATORS.register(
    "fltrust",
    "updates weighted by their cosine to the server's own update on defence.root_data (Cao et al. 2021)",
    "confide.server.trust:FLTrust",
)
AGGREGATORS.register(
    "flame",
    "majority cluster of cosine distances, median-norm clipping, noise (Nguyen et al. 2022)",
    "confide.server.trust:Flame",
)

POISONS_DATA = "poisons_data"
"""Fact of an attack: it rewrites the attacking sites' training windows (named by the fact)."""
POISONS_MODEL = "poisons_model"
"""Fact of an attack: it replaces the attacking sites' updates (how, named by the fact)."""

ATTACKS = Registry("attack.kind", "simulated poisoning by some of the sites (simulation only)")
ATTACKS.register("none", "every site is honest", None)
ATTACKS.register(
    "backdoor",
    "trigger backdoor: part of the attackers' windows rewritten so that attack.trigger is followed by "
    "attack.target",
    "confide.attacks.model:Honest",
    facts={POISONS_DATA: "backdoor"},
)
ATTACKS.register(
    "label_flip",
    "next-character flipping: part of the attackers' windows mapped through a fixed permutation",
    "confide.attacks.model:Honest",
    facts={POISONS_DATA: "label_flip"},
)
ATTACKS.register(
    "model_replacement",
    "the backdoor, with the update boosted by attack.boost (Bagdasaryan et al. 2020)",
    "confide.attacks.model:Boost",
    facts={POISONS_DATA: "backdoor", POISONS_MODEL: "boosted by attack.boost"},
)
ATTACKS.register(
    "sign_flip",
    "the update negated (times attack.scale)",
    "confide.attacks.model:SignFlip",
    facts={POISONS_MODEL: "negated"},
)
ATTACKS.register(
    "gaussian",
    "the update replaced by Gaussian noise of standard deviation attack.noise_std per coordinate",
    "confide.attacks.model:Gaussian",
    facts={POISONS_MODEL: "Gaussian noise"},
)
ATTACKS.register(
    "byzantine",
    "an arbitrary large update: every coordinate attack.scale (Blanchard et al. 2017)",
    "confide.attacks.model:Byzantine",
    facts={POISONS_MODEL: "a constant vector"},
)
ATTACKS.register(
    "free_rider",
    "a zero update that still claims its examples (Lin et al. 2019)",
    "confide.attacks.model:FreeRider",
    facts={POISONS_MODEL: "zero"},
)
ATTACKS.register(
    "little_is_enough",
    "mean minus z standard deviations of the colluders' updates, z from the number of sites (Baruch et "
    "al. 2019)",
    "confide.attacks.model:LittleIsEnough",
    facts={POISONS_MODEL: "mean - z std"},
)
ATTACKS.register(
    "norm_evading",
    "the backdoor, boosted to just under attack.norm_bound, the defence's bound it knows (Sun et al. 2019)",
    "confide.attacks.model:NormEvading",
    facts={POISONS_DATA: "backdoor", POISONS_MODEL: "scaled to just under attack.norm_bound"},
)

REGISTRIES: tuple[Registry, ...] = (
    STRATEGIES,
    PERSONALIZATIONS,
    SERVER_OPTIMIZERS,
    CLIENT_OPTIMIZERS,
    SAMPLINGS,
    DP_PLACEMENTS,
    ACCOUNTANTS,
    AUTH_MODES,
    PARTITIONS,
    DIRICHLET_LABELS,
    DATASETS,
    MODELS,
    BACKENDS,
    LAYERS,
    ENCRYPTIONS,
    COMPRESSIONS,
    DOWNLINKS,
    AGGREGATORS,
    ATTACKS,
)
"""Every registry, for the test that loads every target."""
