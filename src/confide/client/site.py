"""One site: the one implementation of "a site answers a task" that every backend uses unchanged.

A :class:`Site` trains on its own windows as the plan's algorithm says, keeps its own state, passes its
update through the layers of the run's stack (clip, noise, mask), evaluates models on its held-out windows,
and answers the protocol messages of layers that have them (secure aggregation). The local backend plays
many Sites in one process; a deployed client is one Site behind a gRPC connection. A backend only moves what
a Site takes and gives.

The local algorithms (FedAvg, FedProx, SCAFFOLD, FedNova) differ only in what the site adds to plain local
training and what it sends besides its delta: each is a plug-in of :mod:`confide.algorithms`, asked by name.
"""

from __future__ import annotations

import resource
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from confide.algorithms import FitContext, algorithm
from confide.client.dpsgd import DPSGD, record_accountant
from confide.client.personalize import FEDREP_KEY, Personal, personal_weights, train_ditto, train_head
from confide.client.state import MemorySiteState
from confide.client.trainer import FitResult, Objective, Trainer
from confide.core import (
    COMPUTE_SECONDS,
    LOSS_SUM,
    STEPS,
    Plan,
    SiteEvaluation,
    Task,
    Update,
    Vector,
)
from confide.data.dataset import SiteData
from confide.errors import UpdateError
from confide.pipeline import Layer, SiteContext, evaluation_kind
from confide.randomness import Randomness, SecretRandomness, SeededRandomness, Stream

DPSGD_STEPS_KEY = "dpsgd.steps"
READY = "ready"
"""The one metric of a site's answer to a ``hold`` task: its update is trained and kept, not sent."""
DPSGD_EPSILON_KEY = "dpsgd.epsilon"


def fit_private(
    dpsgd: DPSGD,
    site: str,
    windows: np.ndarray,
    weights: Vector,
    plan: Plan,
    personal: Personal,
    metrics: dict[str, float],
    randomness: Randomness,
) -> FitResult:
    """Local training with record-level DP-SGD; the site's epsilon for its own records goes into ``metrics``.

    A site's sampling rate (batch size over its windows) and noise stay the same from round to round, so its
    whole ledger is one number, the steps taken so far, kept in its state. Its delta is 1 / (10 x windows).
    """
    n = len(windows)
    accountant = record_accountant(max(n, 1), 1.0 / (10 * max(n, 1)))
    before = personal.state.get(site, DPSGD_STEPS_KEY)
    taken = int(before[0]) if before is not None else 0
    if taken and n:
        accountant.spend(dpsgd.noise_multiplier, min(1.0, plan.batch_size / n), taken)
    # The batch sampling and noise are secret from the server, which chose the plan's seed.
    result = dpsgd.fit(weights, windows, plan, randomness, accountant)
    personal.state.put(site, DPSGD_STEPS_KEY, plan.round, np.array([taken + result.steps], dtype=np.float32))
    if result.epsilon is not None:
        metrics["record_epsilon"] = result.epsilon
        personal.state.put(site, DPSGD_EPSILON_KEY, plan.round, np.array([result.epsilon], dtype=np.float32))
    return result


def run_task(
    trainer: Trainer,
    site: str,
    windows: np.ndarray,
    weights: Vector,
    plan: Plan,
    model_version: int,
    *,
    extras: Mapping[str, Vector] | None = None,
    personal: Personal | None = None,
    shared: np.ndarray | None = None,
    dpsgd: DPSGD | None = None,
    randomness: Randomness | None = None,
) -> Update:
    """Train from ``weights`` on ``windows`` and return the update before any layer (the delta, its sums and
    metrics, and what the algorithm sends besides).

    ``extras`` are the vectors the server sent with the task (SCAFFOLD's control variate); ``personal`` is the
    site's own state; ``shared`` the positions of the parameters the federation shares (FedRep sends only
    those); ``randomness`` the site's secret randomness (DP-SGD draws its batches and noise from it).
    """
    personal = personal or Personal(MemorySiteState(), np.empty(0, dtype=np.int64))
    extras = extras or {}
    metrics: dict[str, float] = {}
    seconds = 0.0

    start = weights
    context = FitContext(site, weights, plan, extras, personal.state, trainer.config.momentum)
    fit = algorithm(plan.algorithm).local(context)
    objective = fit.objective
    if plan.personalization == "fedrep":
        start, seconds = train_head(trainer, site, windows, weights, plan, personal)
        objective = Objective(frozen=personal.head_names)

    if plan.record_clip > 0:
        if dpsgd is None:
            raise UpdateError(f"site {site!r} was asked for DP-SGD but has no DP-SGD trainer")
        result = fit_private(
            dpsgd, site, windows, start, plan, personal, metrics, randomness or SecretRandomness()
        )
    else:
        result = trainer.fit(start, windows, plan, objective)
    seconds += result.seconds
    # The update is the trainer's delta as it is. Under FedRep the start differs from the global weights only
    # in the head (trained first), which the body's training leaves frozen and the site never sends.
    delta = result.delta

    payload, extra = fit.finish(delta, result.steps)
    metrics.update(extra)
    if plan.personalization == "fedrep":
        personal.state.put(site, FEDREP_KEY, plan.round, start[personal.head] + delta[personal.head])
    elif plan.personalization == "ditto":
        seconds += train_ditto(trainer, site, windows, weights, plan, personal)

    vector = delta if shared is None else delta[shared]
    return _update(site, plan.round, model_version, result, vector, seconds, metrics, payload)


def _update(
    site: str,
    round: int,
    model_version: int,
    result: FitResult,
    vector: Vector,
    seconds: float,
    metrics: dict[str, float],
    payload: dict[str, np.ndarray],
) -> Update:
    """The update of a fit: its delta, what the site reports in clear, and what the server needs summed."""
    return Update(
        site=site,
        round=round,
        num_examples=result.num_examples,
        vector=vector,
        model_version=model_version,
        metrics={
            "train_loss": result.loss,
            "steps": float(result.steps),
            "compute_seconds": seconds,
            **metrics,
        },
        payload=payload,
        sums={
            LOSS_SUM: result.num_examples * result.loss,
            STEPS: float(result.steps),
            COMPUTE_SECONDS: seconds,
        },
    )


def peak_memory(cuda: bool) -> int:
    """Peak bytes: on CUDA, the most the device held since the last reset (one site's training); on the CPU,
    the process's peak resident size (ru_maxrss, KiB on Linux), which covers every site a process plays."""
    if cuda:
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass(frozen=True)
class SiteKit:
    """What a site trains with: one per process, whether it plays one site (a deployment) or all of them."""

    trainer: Trainer
    personal: Personal = field(default_factory=lambda: Personal(MemorySiteState(), np.empty(0, np.int64)))
    shared: np.ndarray | None = None
    dpsgd: DPSGD | None = None
    layers: tuple[Layer, ...] = ()
    """The run's layer stack (clip, noise share, secure aggregation), as the config builds it on both
    sides."""
    eval_batch_size: int = 256
    insecure_seed: int | None = None
    """Only under ``privacy.insecure_reproducible_noise``: the run's seed, from which (with each plan's seed)
    the site's noise is drawn so that a simulation repeats. None (always in a deployment): secret noise."""

    def randomness(self, plan: Plan, stream: Stream) -> Randomness:
        """The site's randomness for ``plan``: secret, unless the run is an insecure simulation."""
        if self.insecure_seed is None:
            return SecretRandomness()
        return SeededRandomness([plan.seed, int(stream)])


class Site:
    """One site: its name, data, kit and protocol sessions; it answers tasks and protocol messages."""

    def __init__(self, name: str, data: SiteData, kit: SiteKit) -> None:
        self.name = name
        self.data = data
        self.kit = kit
        self.sessions: dict[str, object] = {}
        """Protocol state of the layers that keep one (secure aggregation), by layer name."""
        self.peak_memory = 0
        """Peak memory of this site's last training, in bytes (see :func:`peak_memory`)."""
        self.steps = 0
        """Local steps of this site's last training (the simulation's virtual clock charges for them)."""
        self.held: Update | None = None
        """Asynchronous rounds: the update trained for a ``hold`` task, kept until a task releases it."""

    def train(self, weights: Vector, task: Task) -> Update:
        """Train on the task and return the update, encoded by every layer of the stack in order.

        Asynchronous rounds split this in two (:mod:`confide.runtime.buffered`): a ``hold`` task trains and
        keeps the update, answering only that it is ready; a ``release`` task (which carries no weights)
        sends the kept update through the layers of the buffer's round."""
        kit, plan = self.kit, task.plan
        if plan.release:
            return self._release(task)
        for layer in kit.layers:
            weights, task = layer.receive(weights, task, self.name)
        weights = self.open(weights)
        cuda = any(p.is_cuda for p in kit.trainer.params[:1])
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        update = run_task(
            kit.trainer,
            self.name,
            self.data.train,
            weights,
            plan,
            task.model_version,
            extras=task.extras,
            personal=kit.personal,
            shared=kit.shared,
            dpsgd=kit.dpsgd,
            randomness=kit.randomness(plan, Stream.DPSGD),
        )
        self.peak_memory = peak_memory(cuda)
        self.steps = int(update.metrics.get(STEPS, 0))
        if plan.hold:
            self.held = update
            return Update(self.name, plan.round, 0, None, task.model_version, metrics={READY: 1.0})
        return self._encode(update, plan)

    def _release(self, task: Task) -> Update:
        """The update held since the last ``hold`` task, as of the releasing plan's round, encoded."""
        held, self.held = self.held, None
        if held is None:
            raise UpdateError(
                f"site {self.name!r} was asked to release an update it does not hold (it restarted since it "
                "trained, or the update was released already); it will train again when asked"
            )
        return self._encode(replace(held, round=task.plan.round), task.plan)

    def _encode(self, update: Update, plan: Plan) -> Update:
        """``update`` through every layer of the stack, in order, for the round of ``plan``."""
        kit = self.kit
        randomness = kit.randomness(plan, Stream.SITE_NOISE)
        context = SiteContext(self.name, plan, randomness, self.sessions, kit.personal.state)
        for layer in kit.layers:
            if layer.name not in context.skip:
                update = layer.encode(update, context)
        return update

    def evaluate(self, weights: Vector, plan: Plan | None = None) -> SiteEvaluation:
        """Sums of loss, correct predictions and targets of ``weights`` (or, with a personalizing ``plan``,
        of this site's personalization of them) on the site's held-out windows."""
        kit = self.kit
        weights = self.open(weights)
        if plan is not None and plan.personalization != "none":
            site_plan = replace(plan, seed=zlib.crc32(f"{plan.seed}:{self.name}".encode()))
            weights = personal_weights(
                kit.trainer, self.name, self.data.train, weights, site_plan, kit.personal
            )
        loss_sum, correct, targets = kit.trainer.evaluate(weights, self.data.test, kit.eval_batch_size).sum(0)
        return self.seal(SiteEvaluation(self.name, float(loss_sum), int(correct), int(targets)), plan)

    def open(self, weights: Vector) -> Vector:
        """The global model in clear, from the form the server holds it in (CKKS: encrypted)."""
        for layer in self.kit.layers:
            weights = layer.open_model(weights, self.name, self.sessions, self.kit.personal.state)
        return weights

    def seal(self, evaluation: SiteEvaluation, plan: Plan | None = None) -> SiteEvaluation:
        """The evaluation as it leaves the site: through every layer of the stack (secure aggregation masks
        its sums)."""
        kind = evaluation_kind(plan)
        for layer in self.kit.layers:
            evaluation = layer.encode_evaluation(evaluation, kind, self.sessions)
        return evaluation

    def answer(self, data: bytes) -> bytes:
        """The answer to one protocol message from the server (empty when none is due)."""
        for layer in self.kit.layers:
            answer: Callable[..., bytes] | None = getattr(layer, "answer", None)
            accepts: Callable[[bytes], bool] | None = getattr(layer, "accepts", None)
            if answer is not None and (accepts is None or accepts(data)):
                return answer(data, self.name, self.sessions, self.kit.personal.state)
        raise UpdateError(
            f"site {self.name!r} got a protocol message, but its run has no layer that exchanges messages"
        )


def evaluate_many(kit: SiteKit, sites: Sequence[Site], weights: Vector) -> list[SiteEvaluation]:
    """Every site's evaluation of the same global ``weights``, computed in large batches across the sites and
    split back per site: the sums equal each site's own :meth:`Site.evaluate` (sealed by the same layers),
    much faster in one process."""
    parts = [site.data.test for site in sites]
    if not parts:
        return []
    starts = np.cumsum([0] + [len(p) for p in parts[:-1]])
    weights = sites[0].open(weights)
    scores = kit.trainer.evaluate(weights, np.concatenate(parts), kit.eval_batch_size)
    sums = np.add.reduceat(scores, starts, axis=0)
    return [
        site.seal(SiteEvaluation(site.name, float(loss_sum), int(correct), int(targets)))
        for site, (loss_sum, correct, targets) in zip(sites, sums, strict=True)
    ]
