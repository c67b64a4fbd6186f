"""A round as a pipeline of layers: what each layer does on the site and on the server, and what it needs.

A site trains, then passes its :class:`~confide.core.Update` through the layers in stack order (``encode``:
clip, noise, protect); the server takes each update back through them in reverse (``decode``), folds what
comes out into the aggregate, and after the last update lets each layer finish its part of the round
(``close``: secure aggregation unmasks the sum there). After the model step, ``finish`` lets a layer keep
state across rounds (SCAFFOLD's control variate, the adaptive clip norm). An evaluation goes through the
same stack: a site's sums pass ``encode_evaluation``, and the server takes them back through
``begin_evaluation``, ``decode_evaluation`` and ``close_evaluation`` (secure aggregation sums them there, so
that what hides a site's update hides its evaluation too). A layer is one module behind this
one interface; the round loop (:class:`confide.runtime.federation.Federation`) knows none of them by name.

Each layer declares, in its :class:`Traits`, what the server sees after it and what it needs from the layers
around it. The allowed stacks follow from those declarations (:func:`check_stack`), so a new layer never
edits a hand-written list of combinations:

* a layer that ``hides_updates`` (secure aggregation, encryption) leaves the server only the sum;
* a layer or aggregator that ``needs_individual_updates`` (validation, robust aggregation, SCAFFOLD's
  control variates) cannot follow one that hides them;
* a layer that ``needs_hidden_updates`` (distributed noise: one site's share of the noise protects nothing
  on its own) needs one that hides them;
* a hiding layer that ``reads_updates_inside`` (the attested aggregator, :mod:`confide.privacy.tee`) hides
  each update from the server but reads it inside the enclave, so what needs individual updates runs there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np

from confide.core import EXAMPLES, Plan, SiteEvaluation, Task, Update, Vector
from confide.errors import ConfideError, ConfigError
from confide.randomness import Randomness


@dataclass(frozen=True)
class Traits:
    """What a layer (or aggregator) declares about itself: the stack check reads only these."""

    hides_updates: bool = False
    """After this layer the server can no longer read any one site's update, only their sum."""
    needs_individual_updates: bool = False
    """It must read each site's own update (or its own payload) on the server."""
    needs_hidden_updates: bool = False
    """Its output is safe only if the server never sees it alone, so a later layer must hide updates."""
    hides_model: bool = False
    """The server holds the global model only in a form it cannot read (CKKS): the layer steps the model
    itself (:meth:`Layer.apply`) and the sites open it (:meth:`Layer.open_model`)."""
    reads_updates_inside: bool = False
    """With ``hides_updates``: the server never reads an update, but the layer reads each one inside a
    trusted aggregator (the attested enclave), where validation and robust aggregation run instead."""


class RoundAbandoned(ConfideError):
    """A layer cannot complete the round (too few sites, a failed protocol): the model stays unchanged and
    nothing is charged to the privacy ledger."""


class Aggregator(Protocol):
    """Folds updates into a running state as they arrive, then gives the round's aggregate delta.

    Aggregators follow FedJAX's shape: explicit state, ``init`` → ``add`` per update (or ``add_sum`` for a sum
    of updates that arrived only summed) → ``result``.
    """

    name: str
    traits: Traits

    def init(self, size: int) -> Any: ...

    def add(self, state: Any, update: Update) -> None: ...

    def add_sum(self, state: Any, total: Vector, count: int) -> None:
        """Fold in the sum of ``count`` updates that only arrived summed (secure aggregation): each of those
        sites weighs one, whatever its number of examples."""
        ...

    def result(self, state: Any, randomness: Randomness) -> Vector:
        """The round's aggregate; ``randomness`` serves aggregators that add noise (central DP)."""
        ...

    def sensitivity(self, clip_norm: float) -> float | None:
        """How far one site's update, clipped to ``clip_norm``, can move the result (L2); None when it is
        unbounded (an example-weighted mean). Central DP noises the result in these units."""
        ...


@dataclass
class SiteContext:
    """What a site layer may use while it encodes one update."""

    site: str
    plan: Plan
    randomness: Randomness
    """The site's secret randomness (seeded only in an insecure simulation)."""
    sessions: dict[str, Any]
    """The site's protocol state, one entry per layer that keeps one (secure aggregation's session)."""
    state: Any = None
    """The site's durable state (:class:`~confide.client.state.SiteState`): keys a layer keeps across rounds
    and restarts (the CKKS key)."""
    skip: set[str] = field(default_factory=set)
    """Names of later layers this site leaves out for this update: only a simulated attacking site, which
    controls its own code, skips the site-side steps honest sites take (:mod:`confide.attacks.layer`)."""


Exchange = Callable[[Mapping[str, bytes]], Iterator[tuple[str, bytes]]]
"""Carries one protocol message to each named site and yields (site, answer) for each site that answers."""


@dataclass
class RoundContext:
    """The server's view of one round while the layers work on it."""

    round: int
    sites: list[str]
    tasks: dict[str, Task]
    """Each site's task; a layer may replace a task in ``begin`` (a clip norm in the plan, extras)."""
    weights: Vector
    """The global weights the round starts from (read only)."""
    server_state: dict[str, Vector]
    """The server's state that is checkpointed with the model (optimizer moments, control variate, C)."""
    exchange: Exchange
    min_updates: int
    """The fewest updates the round may be completed with."""
    randomness: Randomness
    """The server's secret randomness (for noise it adds, such as central DP's)."""
    population: int
    """How many sites the federation has (SCAFFOLD averages its control variates over all of them)."""
    aggregator: Aggregator
    aggregate: Any
    """The aggregator's running state."""
    rejected: list[tuple[str, str]] = field(default_factory=list)
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    """Each screened site's scores this round (norm, cosines, validation loss increase, refused), for the
    run's anomaly history (:mod:`confide.server.screen`)."""
    accepted: dict[str, dict[str, float]] = field(default_factory=dict)
    """Each site whose update reached the aggregate in clear, with the metrics it reported."""
    summed: list[str] = field(default_factory=list)
    """Sites whose updates reached the aggregate only inside a sum (secure aggregation's survivors)."""
    sums: dict[str, float] = field(default_factory=dict)
    """The round's sums of the sites' :attr:`~confide.core.Update.sums`."""
    shared: np.ndarray | None = None
    """Positions of the parameters the sites share (FedRep's body); None: all of them."""
    scratch: dict[str, Any] = field(default_factory=dict)
    """Layers' working state for this round only (dropped with it), keyed by layer name."""
    delta: Vector | None = None
    """The aggregate delta, once the round has one (for ``finish``)."""
    broadcast: Vector | None = None
    """What every task of the round carries as its weights, when a layer replaced the global model in
    ``begin`` (downlink compression sends an empty vector, and each site its own payload in its task's
    extras); None: the global weights."""

    @property
    def participants(self) -> list[str]:
        """Every site whose update is in the aggregate."""
        return sorted([*self.accepted, *self.summed])

    def add(self, update: Update) -> None:
        """Fold one readable update into the aggregate (raises UpdateError, leaving no trace, if refused)."""
        self.aggregator.add(self.aggregate, update)
        self.accepted[update.site] = dict(update.metrics)
        self.add_sums({EXAMPLES: float(update.num_examples), **update.sums})

    def add_sum(self, total: Vector, sites: Sequence[str], sums: Mapping[str, float]) -> None:
        """Fold in the sum of ``sites``' updates, which arrived only summed, with the sum of their sums."""
        self.aggregator.add_sum(self.aggregate, total, len(sites))
        self.summed.extend(sites)
        self.add_sums(sums)

    def add_sums(self, sums: Mapping[str, float]) -> None:
        for key, value in sums.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)


GLOBAL_EVALUATION = "global"
"""The evaluation of the global model (an :class:`EvaluationContext`'s ``kind``)."""
PERSONAL_EVALUATION = "personal"
"""The evaluation of each site's personalization of the global model."""


@dataclass
class EvaluationContext:
    """The server's view of one evaluation while the layers work on it."""

    round: int
    sites: list[str]
    exchange: Exchange
    kind: str = GLOBAL_EVALUATION
    """:data:`GLOBAL_EVALUATION` or :data:`PERSONAL_EVALUATION`: the sites know which one they answer."""
    evaluations: list[SiteEvaluation] = field(default_factory=list)
    """The evaluations the server can read, one per site."""
    total: SiteEvaluation | None = None
    """The sum of the evaluations that arrived only summed (secure aggregation), if any."""
    summed: list[str] = field(default_factory=list)
    """The sites in ``total``."""
    rejected: list[tuple[str, str]] = field(default_factory=list)
    scratch: dict[str, Any] = field(default_factory=dict)


def evaluation_kind(plan: Plan | None) -> str:
    """Which evaluation a site answers: of its personalization when the plan personalizes, else global."""
    personal = plan is not None and plan.personalization != "none"
    return PERSONAL_EVALUATION if personal else GLOBAL_EVALUATION


@dataclass(frozen=True)
class StackContext:
    """What a layer may need to build itself from a run's config (the same on the server and the sites)."""

    config: Any
    """The run's :class:`~confide.config.Config`."""
    dp: Any = None
    """The run's site-level DP policy (:class:`~confide.privacy.policy.SiteDP`), or None."""
    secure: Any = None
    """Secure aggregation's settings (:class:`~confide.privacy.secure.SecureAggregation`), or None."""
    identities: Mapping[str, Any] = field(default_factory=dict)
    """Simulated sites' long-term signing keys (a deployed site holds only its own)."""
    update_size: int = 0
    """How many values a site's update has (the model's trainable parameters, or the part it shares)."""
    sites: tuple[str, ...] = ()
    """The federation's site names, where the builder knows them (a simulation; the attack layer draws its
    attackers from them)."""
    population: int = 0
    """How many sites the federation has (a round asks a fraction of them)."""
    registry: Mapping[str, bytes] | None = None
    """Every site's enrolled Ed25519 identity public key, where the builder knows them (a deployed site checks
    other sites' signatures against it); None in a simulation, where ``identities`` hold every key."""


class Layer:
    """One step of the update pipeline, on both sides. Subclasses override what they do; the defaults pass
    the update through unchanged. Both sides build the same stack from the run's config, so the server's
    half and the site's half of a layer agree on their settings."""

    name: ClassVar[str] = "layer"
    traits: ClassVar[Traits] = Traits()

    @classmethod
    def from_config(cls, stack: StackContext) -> Layer | None:
        """The layer the run's config asks for, or None when it asks for none (a registered layer's way of
        joining the stack: see :data:`confide.registry.LAYERS`)."""
        return None

    def init_state(self, size: int) -> dict[str, Vector]:
        """Server state this layer keeps across rounds, checkpointed with the model (a fresh run's)."""
        return {}

    def encode(self, update: Update, site: SiteContext) -> Update:
        """On the site: transform the update on its way out."""
        return update

    def begin(self, round: RoundContext) -> None:
        """On the server, before any site trains: adjust the tasks, run exchanges that precede training."""

    def decode(self, update: Update, round: RoundContext) -> Update | None:
        """On the server, for each update as it arrives: undo this layer's encoding, check what it must, or
        keep the update for itself (return None: it will add to the aggregate in ``close``)."""
        return update

    def apply(self, round: RoundContext, weights: Vector) -> Vector | None:
        """On the server, once a round has its participants: the next global model, for a layer that holds
        the round's aggregate itself and steps the model as only it can (CKKS adds the encrypted sum to the
        encrypted model); None: the aggregator and the server optimizer take the step."""
        return None

    def receive(self, weights: Vector, task: Task, site: str) -> tuple[Vector, Task]:
        """On the site, before it opens the model: the model that ``task``'s message carries. A layer that
        sends each site a payload of its own in the task's extras (downlink compression: the changes to the
        model the site holds) rebuilds the model here, and returns the task without that payload."""
        return weights, task

    def open_model(self, weights: Vector, site: str, sessions: dict[str, Any], state: Any) -> Vector:
        """On the site: the global model in clear from the form the server holds it in (CKKS decrypts)."""
        return weights

    def accept(self, update: Update, round: RoundContext) -> None:
        """On the server, for an update that passed every layer and reached the aggregate: commit what
        ``decode`` only checked (so that a refused update leaves no trace)."""

    def close(self, round: RoundContext) -> None:
        """On the server, once every update is in: add what it kept to the aggregate (secure aggregation's
        sum), or raise :class:`RoundAbandoned`."""

    def finish(self, round: RoundContext) -> None:
        """On the server, after the model step of a completed round: keep state for the next round."""

    def encode_evaluation(
        self, evaluation: SiteEvaluation, kind: str, sessions: dict[str, Any]
    ) -> SiteEvaluation:
        """On the site: transform an evaluation (of ``kind``) on its way out."""
        return evaluation

    def begin_evaluation(self, evaluation: EvaluationContext) -> None:
        """On the server, before any site evaluates: run exchanges that precede it."""

    def decode_evaluation(
        self, evaluation: SiteEvaluation, context: EvaluationContext
    ) -> SiteEvaluation | None:
        """On the server, for each evaluation as it arrives: undo the encoding, or keep it (return None)."""
        return evaluation

    def close_evaluation(self, evaluation: EvaluationContext) -> None:
        """On the server, once every evaluation is in: set what it kept (a sum) on the context, or raise
        :class:`RoundAbandoned`."""


def check_stack(layers: Sequence[Layer], aggregator: Aggregator | None = None) -> None:
    """Refuse a stack whose layers' declarations contradict each other, naming the layers and why."""
    hiding = [layer.name for layer in layers if layer.traits.hides_updates]
    for position, layer in enumerate(layers):
        if layer.traits.needs_hidden_updates and not any(
            later.traits.hides_updates for later in layers[position + 1 :]
        ):
            raise ConfigError(
                f"the layer {layer.name!r} is safe only if the server never sees one site's update alone, "
                "and no layer after it hides the updates: add secure aggregation after it "
                f"(layers now: {describe(layers)})"
            )
    if not hiding:
        return
    if all(layer.traits.reads_updates_inside for layer in layers if layer.traits.hides_updates):
        return  # the enclave runs validation and the robust aggregator on each update, inside
    needy: list[tuple[str, str]] = [
        ("layer", layer.name) for layer in layers if layer.traits.needs_individual_updates
    ]
    if aggregator is not None and aggregator.traits.needs_individual_updates:
        needy.append(("aggregator", aggregator.name))
    if needy:
        kind, name = needy[0]
        raise ConfigError(
            f"the {kind} {name!r} must see each site's own update, but {' and '.join(map(repr, hiding))} "
            f"shows the server only their sum. Options: {_HIDDEN_OPTIONS[kind]}"
        )


_BOUNDING = (
    "bound each site's influence at the site instead: site-side norm bounding (privacy.dp clips each "
    "update to privacy.clip_norm before it is masked) with the sum checked for range (each coordinate "
    "a site masks lies in [-privacy.secagg_range, privacy.secagg_range], and the server refuses an unmasked "
    "sum outside what that many clipped updates can add up to), which limits but does not detect a "
    "poisoned update"
)
_HIDDEN_OPTIONS = {
    "aggregator": (
        "run the robust aggregator inside the attested aggregator (privacy.enclave instead of secure "
        "aggregation), which reads each update in an enclave and shows the server only the result; or use "
        f"server.aggregator = 'mean' and {_BOUNDING}; or turn secure aggregation off"
    ),
    "layer": (
        "run the check inside the attested aggregator (privacy.enclave instead of secure aggregation), "
        f"which reads each update in an enclave; or drop it and {_BOUNDING}; or turn secure aggregation off"
    ),
}


def describe(layers: Iterable[Layer]) -> str:
    names = [layer.name for layer in layers]
    return " -> ".join(names) if names else "none"
