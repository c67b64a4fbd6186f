"""The core types every part of confide speaks: flat vectors and their Layout, Plan, Task, Update,
SiteEvaluation and Traffic (the layers of a round are in :mod:`confide.pipeline`).

The unit of exchange between server and sites is one flat ``float32`` numpy vector holding the trainable
parameters, in the order a :class:`Layout` gives. Aggregation, privacy and compression all work on these
vectors, so they are the same code for every model. Moving weights in and out of a model goes through the
Layout with whole-tensor copies; no module is rebuilt.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from confide.errors import UpdateError

Vector = np.ndarray
"""A flat float32 numpy vector of model parameters (or of an update to them)."""


ENCRYPTED_MAGIC = b"CKKS1"
"""The first bytes of a vector of CKKS ciphertexts (:mod:`confide.privacy.he.ckks`): a model the server
holds encrypted is such a uint8 vector."""


def is_encrypted(vector: Any) -> bool:
    """Whether a model vector is held encrypted (CKKS ciphertexts as bytes) rather than in clear."""
    return (
        isinstance(vector, np.ndarray)
        and vector.dtype == np.uint8
        and bytes(vector[: len(ENCRYPTED_MAGIC)]) == ENCRYPTED_MAGIC
    )


def round_size(sites_per_round: float, population: int) -> int:
    """How many sites a round asks: a fraction of the population (below 1), or a count (at most all)."""
    if sites_per_round < 1:
        return max(1, round(sites_per_round * population))
    return min(int(sites_per_round), population)


@dataclass(frozen=True)
class Entry:
    """Where one named tensor lives inside a flat vector."""

    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Layout:
    """Names, shapes and offsets of the tensors packed into a flat vector.

    Two parties agree on a Layout once (it is part of the model, not of each message); after that only the
    flat vectors travel.
    """

    entries: tuple[Entry, ...]

    @classmethod
    def of(cls, named: Iterable[tuple[str, torch.Tensor]]) -> Layout:
        entries = []
        offset = 0
        for name, tensor in named:
            shape = tuple(tensor.shape)
            entries.append(Entry(name, shape, offset))
            offset += math.prod(shape)
        return cls(tuple(entries))

    @classmethod
    def of_module(cls, module: torch.nn.Module) -> Layout:
        """The layout of a module's trainable parameters, in registration order."""
        return cls.of((n, p) for n, p in module.named_parameters() if p.requires_grad)

    @property
    def size(self) -> int:
        if not self.entries:
            return 0
        last = self.entries[-1]
        return last.offset + last.size

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.entries)

    def index(self, names: Iterable[str]) -> np.ndarray:
        """Positions in the flat vector of the named tensors, in layout order (for slicing out a part)."""
        wanted = set(names)
        unknown = wanted - set(self.names)
        if unknown:
            raise KeyError(f"not in this layout: {', '.join(sorted(unknown))}")
        parts = [np.arange(e.offset, e.offset + e.size) for e in self.entries if e.name in wanted]
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

    def zeros(self) -> Vector:
        return np.zeros(self.size, dtype=np.float32)

    def flatten(self, tensors: Mapping[str, torch.Tensor], out: Vector | None = None) -> Vector:
        """Pack named tensors into one float32 vector (into ``out`` when given, without allocating)."""
        vector = self.zeros() if out is None else out
        view = torch.from_numpy(vector)
        for e in self.entries:
            view[e.offset : e.offset + e.size].copy_(tensors[e.name].detach().reshape(-1))
        return vector

    def unflatten(self, vector: Vector) -> dict[str, torch.Tensor]:
        """Views of ``vector`` as named tensors (no copy: writes to them write to the vector)."""
        self.check(vector)
        flat = torch.from_numpy(vector)
        return {e.name: flat[e.offset : e.offset + e.size].view(e.shape) for e in self.entries}

    def read(self, module: torch.nn.Module, out: Vector | None = None) -> Vector:
        """The module's trainable parameters as a flat vector."""
        params = dict(module.named_parameters())
        return self.flatten(params, out)

    def write(self, module: torch.nn.Module, vector: Vector) -> None:
        """Copy a flat vector into the module's parameters, in place."""
        self.check(vector)
        flat = torch.from_numpy(vector)
        params = dict(module.named_parameters())
        with torch.no_grad():
            for e in self.entries:
                params[e.name].copy_(flat[e.offset : e.offset + e.size].view(e.shape))

    def check(self, vector: Any, what: str = "vector") -> None:
        """Raise UpdateError unless ``vector`` is a 1-D float32 array of this layout's size."""
        if not isinstance(vector, np.ndarray):
            raise UpdateError(f"the {what} must be a numpy array, got {type(vector).__name__}")
        if is_encrypted(vector):
            raise UpdateError(
                f"the {what} are encrypted with CKKS (privacy.encryption = 'ckks'): the server never holds "
                "them in clear, and only the sites hold the key that decrypts them"
            )
        if vector.dtype != np.float32 or vector.ndim != 1 or vector.size != self.size:
            raise UpdateError(
                f"the {what} must be a flat float32 array of {self.size} values for this model, "
                f"got dtype {vector.dtype} and shape {vector.shape}"
            )


@dataclass(frozen=True)
class Plan:
    """What the server asks of a site for one round of local training."""

    round: int
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 10
    learning_rate: float = 0.1
    seed: int = 0
    """Seed for this site in this round: shuffling and dropout are drawn from it, so a rerun is identical."""
    work: float = 1.0
    """Fraction of the full local work (epochs, capped by max_steps) to do; below 1 for stragglers."""
    algorithm: str = "fedavg"
    """The local algorithm: 'fedavg', 'fedprox' (adds the proximal term), 'scaffold', 'fednova'."""
    mu: float = 0.0
    """FedProx: weight of the proximal term mu/2 * ||w - w_global||^2."""
    personalization: str = "none"
    """'none', 'ditto', 'fedrep' or 'finetune': how the site makes a model of its own."""
    personal_steps: int = 0
    """Ditto: steps on the personal model; FedRep: steps on the head; finetune: fine-tuning steps."""
    personal_learning_rate: float = 0.0
    """Learning rate of personal training (0: the plan's learning_rate)."""
    personal_lambda: float = 0.0
    """Ditto: how strongly the personal model is pulled towards the global one (inf: it is the global one)."""
    clip_norm: float = 0.0
    """Site-level DP: the L2 norm to clip the update to this round (it moves under adaptive clipping); 0: the
    clipping layer's own."""
    record_clip: float = 0.0
    """Record-level DP-SGD: the L2 norm each window's gradient is clipped to; 0: no DP-SGD."""
    record_noise: float = 0.0
    """Record-level DP-SGD: the noise multiplier of each step."""
    hold: bool = False
    """Asynchronous rounds (FedBuff): train, keep the update at the site and answer only that it is ready;
    the update leaves the site when a later task releases it (:mod:`confide.runtime.buffered`)."""
    release: bool = False
    """Asynchronous rounds: train nothing; send the update held since the last ``hold`` task, through the
    layers of this plan's round (the buffer's secure aggregation, its noise)."""
    staleness_weight: float = 1.0
    """Asynchronous rounds: the factor a released update is scaled by after clipping, for the model versions
    the server moved on since the site's copy (FedBuff: 1 / sqrt(1 + staleness)); 1 for a fresh update."""

    def local_steps(self, num_examples: int) -> int:
        """The number of optimizer steps this plan asks of a site with ``num_examples`` windows."""
        full = self.epochs * math.ceil(num_examples / self.batch_size)
        if self.max_steps is not None:
            full = min(full, self.max_steps)
        return max(1, math.ceil(self.work * full)) if full > 0 else 0


@dataclass
class Update:
    """What a site sends back: its delta (local − global weights) or a protected form of it.

    ``vector`` is None once a layer has replaced it by a protected ``payload`` that only the matching server
    layer can read.
    """

    site: str
    round: int
    num_examples: int
    vector: Vector | None
    model_version: int
    metrics: dict[str, float] = field(default_factory=dict)
    """What the site reports about itself in clear (its loss, steps, clipping bit, ...). A layer that hides
    the update from the server (secure aggregation) removes them: they would tell it about one site."""
    payload: dict[str, Any] = field(default_factory=dict)
    sums: dict[str, float] = field(default_factory=dict)
    """Values the server needs only summed over the round's sites (:data:`SUMMED`): under secure aggregation
    they travel inside the masked vector, otherwise in clear beside it."""

    def readable(self, size: int) -> Vector:
        """The update's vector, checked to hold ``size`` values (UpdateError for a protected or wrong one)."""
        if self.vector is None:
            raise UpdateError(f"the update of site {self.site!r} has no readable vector to aggregate")
        if self.vector.shape != (size,):
            raise UpdateError(f"site {self.site!r} sent {self.vector.size} values; the model has {size}")
        return self.vector

    def sealed(self, name: str, data: bytes) -> Update:
        """The update as a layer that hides everything sends it: ``data`` as the one payload entry ``name``,
        and nothing else about the site in clear (no vector, examples, metrics or sums)."""
        return Update(
            site=self.site,
            round=self.round,
            num_examples=0,
            vector=None,
            model_version=self.model_version,
            payload={name: np.frombuffer(data, dtype=np.uint8)},
        )


EXAMPLES = "examples"
LOSS_SUM = "loss_sum"
STEPS = "steps"
COMPUTE_SECONDS = "compute_seconds"
SUMMED = (EXAMPLES, LOSS_SUM, STEPS, COMPUTE_SECONDS)
"""The sums every round reports: the sites' examples (from each update's ``num_examples``), their training
loss times their examples, optimizer steps and seconds of computation (from each update's ``sums``). Layers
may add their own (the clipping bit)."""


@dataclass(frozen=True)
class Task:
    """What the server sends one site for one round: the plan, and with the global weights (carried by the
    backend, shared by all tasks of the round) any extra vectors the algorithm needs (SCAFFOLD's c)."""

    site: str
    plan: Plan
    model_version: int
    extras: Mapping[str, Vector] = field(default_factory=dict)


@dataclass(frozen=True)
class SiteEvaluation:
    """A site's evaluation of a model on its held-out windows, as sums that add up across sites.

    Under secure aggregation the sums travel only inside ``masked`` (the site's masked input to the
    evaluation's secure sum) and the three clear fields are zero."""

    site: str
    loss_sum: float
    correct: int
    targets: int
    masked: np.ndarray | None = None
    """The masked input (uint8 bytes) to the evaluation's secure sum, or None when it travels in clear."""


@dataclass(frozen=True)
class Traffic:
    """Bytes of messages moved each way, seen from the server: ``sent`` to sites, ``received`` from them.
    Backends count them where messages are serialized (cumulative: a round's bytes are the difference of
    two readings)."""

    sent: int = 0
    received: int = 0

    def __add__(self, other: Traffic) -> Traffic:
        return Traffic(self.sent + other.sent, self.received + other.received)

    def __sub__(self, other: Traffic) -> Traffic:
        return Traffic(self.sent - other.sent, self.received - other.received)
