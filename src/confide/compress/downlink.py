"""Downlink compression: the server sends each site the change to a model it already holds, compressed.

Uplink compression (:mod:`~confide.compress.quantize`, :mod:`~confide.compress.cast`) shrinks what the sites
send; this module shrinks what the server sends them. It follows EF21-P (Gruntkowska, Tyurin and Richtárik
2023, "EF21-P and Friends: Improved Theoretical Communication Complexity for Distributed Optimization with
Bidirectional Compression", eq. 5): the server keeps beside its true model W_t a *public* model P_t that every
site can rebuild exactly,

    D_t = C(W_t - P_{t-1}),    P_t = P_{t-1} + D_t,

where C is the compressor (float16, or b-bit quantization after a random Hadamard rotation). What C leaves
out of one round's change stays in W_t - P_t and goes out with the next one (error feedback), so P tracks W
however coarse C is. Sites train on P_t, and the server steps W_t with their averaged deltas, i.e. with
pseudo-gradients taken at the public model, which is EF21-P's update.

Who gets what. A site the server knows to hold version v, with v one of the last ``history`` versions, gets
the compressed deltas D_{v+1}, ..., D_t and rebuilds P_t from its copy; every other site (new, too far
behind, or one that did not answer last time it was asked) gets P_t in full float32, as does anyone whose
deltas would together be no smaller than the model. The server learns that a site holds P_t when the site's
update of that round arrives; a site it asked that sent nothing is sent the full model next time. After a
server restart it knows nobody's copy and sends full models once. Evaluation sends the server's true model
W_t in full, so the accuracy a run reports is the true model's.

Exactness. P_t is rebuilt bit for bit: decompression is float32/float64 numpy element-wise arithmetic
(a cast, or a sum of levels and the Hadamard butterflies) in the same order on both sides, and P_t is the
float32 sum of the previous copy and the decoded delta, applied version by version. A SHA-256 digest of P_t
(and of the base copy the deltas apply to) travels with the deltas; a site whose rebuild does not match
refuses the task with an UpdateError, drops its copy, and is sent the full model next time.

Rounding. The quantizer rounds to the nearest level, not stochastically: error feedback already carries
each rounding error into the next delta, so unbiasedness buys nothing here and costs twice the error. The
rotation's signs come from the run's seed and the version (public: both sides need them).

Threat model. The downlink carries the global model, which every site it is sent to receives anyway; it
hides nothing and adds no randomness of its own. Under DP the model is already a private release, and P_t,
a function of it and of public randomness, is post-processing (Dwork and Roth 2014, Prop. 2.1): it tells a
site nothing more about another site's data than the model does. The digest catches a site whose copy
differs (lost, corrupted, or from before a server restart), not a malicious server, which can send any
model it likes in either case. Under CKKS the server has no clear model to take differences of, and the
config refuses the combination.

Memory. A site keeps the public model it holds; the local simulation's sites share one copy per version
(``history`` + 1 copies at most however many sites there are), each site remembering only its version.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import replace

import numpy as np

from confide.compress.codec import as_bytes
from confide.compress.quantize import BLOCK, hadamard, pack, packed_bytes, padded_size, unpack
from confide.core import Task, Update, Vector
from confide.errors import ConfigError, DivergedError, UpdateError
from confide.pipeline import Layer, RoundContext, StackContext

KINDS = ("float16", "quantize")
FLOAT16_MAX = float(np.finfo(np.float16).max)

PREFIX = "downlink/"
"""Prefix of the tensors a task carries for this layer (among its extras, beside an empty weights vector)."""
VERSIONS = PREFIX + "versions"
"""int64 [base, target]: the version the deltas apply to (-1 with a full model) and the one they build."""
DIGEST = PREFIX + "digest"
"""uint8 [32]: SHA-256 of the target public model's float32 little-endian bytes."""
BASE_DIGEST = PREFIX + "base_digest"
"""uint8 [32]: SHA-256 of the base model the deltas apply to."""
MODEL = PREFIX + "model"
"""float32: the target public model in full."""
DELTA = PREFIX + "delta/"
"""uint8, one per version: ``downlink/delta/<v>`` is the compressed D_v."""

PUBLIC_KEY = "downlink.public"
"""The public model P_t in the server's checkpointed state."""
VERSION_KEY = "downlink.version"
"""int64 [1]: the version of the public model in the server's state (the round that made it)."""


def digest(vector: Vector) -> bytes:
    """SHA-256 of a float32 vector's little-endian bytes."""
    return hashlib.sha256(np.ascontiguousarray(vector, dtype="<f4").data).digest()


class Codec:
    """One compressor C of the model's deltas: pure functions of the delta, the version and the run's seed,
    the same on the server and the sites."""

    def __init__(self, kind: str, bits: int = 8, seed: int = 0) -> None:
        if kind not in KINDS:
            accepted = ", ".join(map(repr, ("none", *KINDS)))
            raise ConfigError(f"compression.downlink must be one of {accepted} (got {kind!r})")
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
            raise ConfigError(f"compression.downlink_bits must be a whole number from 1 to 16 (got {bits!r})")
        self.kind, self.bits, self.seed = kind, bits, seed
        self.levels = (1 << bits) - 1

    def nbytes(self, size: int) -> int:
        """Bytes of one compressed delta of ``size`` values."""
        if self.kind == "float16":
            return 2 * size
        padded = padded_size(size)
        return 8 * (padded // BLOCK) + packed_bytes(padded, self.bits)

    def signs(self, version: int, size: int) -> np.ndarray:
        """The rotation's random signs for ``version``: public, from the run's seed (both sides need them)."""
        seed = hashlib.sha256(f"confide.compress.downlink:{self.seed}:{version}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(seed[:16], "little"))
        return rng.integers(0, 2, size=size, dtype=np.int8).astype(np.float64) * 2.0 - 1.0

    def compress(self, delta: Vector, version: int) -> np.ndarray:
        """D_version as bytes. Values beyond float16's range are clipped: error feedback sends the rest."""
        if self.kind == "float16":
            half = np.clip(delta, -FLOAT16_MAX, FLOAT16_MAX).astype(np.float16)
            return as_bytes(half.view(np.uint16), "<u2")
        size = delta.size
        flat = np.zeros(padded_size(size), dtype=np.float64)
        flat[:size] = delta
        blocks = hadamard((flat * self.signs(version, flat.size)).reshape(-1, BLOCK))
        lo = blocks.min(axis=1, keepdims=True)
        step = (blocks.max(axis=1, keepdims=True) - lo) / self.levels
        step[step == 0] = 1.0  # a constant block: every value is lo, level 0
        # float32 ranges, rounded as the sites read them, so that the levels are chosen against those.
        lo, step = lo.astype(np.float32).astype(np.float64), step.astype(np.float32).astype(np.float64)
        levels = np.clip(np.rint((blocks - lo) / step), 0, self.levels).astype(np.uint16).reshape(-1)
        ranges = np.concatenate([lo, step], axis=1).astype(np.float32).reshape(-1)
        return np.concatenate([as_bytes(ranges, "<f4"), pack(levels, self.bits)])

    def decompress(self, data: np.ndarray, version: int, size: int) -> Vector:
        """The float32 delta of ``size`` values that ``data`` holds (UpdateError if it cannot hold one)."""
        expected = self.nbytes(size)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.shape != (expected,):
            got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
            raise UpdateError(
                f"the compressed change of model version {version} must be {expected} bytes ({self.kind}, "
                f"{size} values), got {got}; the server and the site must run the same [compression] "
                "downlink settings"
            )
        data = np.ascontiguousarray(data)
        if self.kind == "float16":
            return data.view("<f2").astype(np.float32)
        padded = padded_size(size)
        head = 8 * (padded // BLOCK)
        ranges = data[:head].view("<f4").astype(np.float64).reshape(-1, 2)
        levels = unpack(data[head:], self.bits, padded).reshape(-1, BLOCK)
        blocks = ranges[:, :1] + levels * ranges[:, 1:]
        return (hadamard(blocks).reshape(-1) * self.signs(version, padded))[:size].astype(np.float32)


class PublicModel:
    """The server's half: P_t in the checkpointed server state, the last ``history`` deltas and digests (in
    memory), and which version each site holds (in memory: after a restart, everyone gets a full model)."""

    def __init__(self, codec: Codec, history: int) -> None:
        self.codec, self.history = codec, history
        self.deltas: dict[int, np.ndarray] = {}
        self.digests: dict[int, bytes] = {}
        self.held: dict[str, int] = {}

    def advance(self, weights: Vector, state: dict[str, Vector], version: int) -> Vector:
        """P_version from P_(version-1) in ``state`` and the true model ``weights``; kept in ``state``."""
        previous = state.get(PUBLIC_KEY)
        last = int(state[VERSION_KEY][0]) if VERSION_KEY in state else None
        first = previous is None or last is None or previous.shape != weights.shape or last >= version
        if first or last not in self.digests:
            # A new chain of versions (or a resumed run's: its earlier deltas are gone): every site is sent
            # the full model once.
            self.deltas.clear()
            self.digests.clear()
            self.held.clear()
        if first or previous is None:
            public = np.array(weights, dtype=np.float32)
        else:
            change = weights - previous
            if not np.isfinite(change).all():
                raise DivergedError(
                    f"the global model holds NaN or infinite values before round {version}: training "
                    "diverged; lower client.learning_rate or server.learning_rate"
                )
            data = self.codec.compress(change, version)
            public = previous + self.codec.decompress(data, version, previous.size)
            self.deltas[version] = data
        self.digests[version] = digest(public)
        for old in [v for v in self.digests if v < version - self.history]:
            self.digests.pop(old)
            self.deltas.pop(old, None)
        state[PUBLIC_KEY] = public
        state[VERSION_KEY] = np.array([version], dtype=np.int64)
        return public

    def payload(self, site: str, public: Vector, version: int) -> dict[str, np.ndarray]:
        """What ``site`` is sent to hold P_version: the deltas from its copy, or the model in full."""
        target = np.frombuffer(self.digests[version], dtype=np.uint8)
        held = self.held.pop(site, None)  # known again only once its update of this round arrives
        if held is not None and held in self.digests:
            chain = [self.deltas.get(v) for v in range(held + 1, version + 1)]
            deltas = [d for d in chain if d is not None]
            if len(deltas) == len(chain) and sum(d.size for d in deltas) < public.nbytes:
                return {
                    VERSIONS: np.array([held, version], dtype=np.int64),
                    BASE_DIGEST: np.frombuffer(self.digests[held], dtype=np.uint8),
                    DIGEST: target,
                    **{f"{DELTA}{v}": d for v, d in zip(range(held + 1, version + 1), deltas, strict=True)},
                }
        return {VERSIONS: np.array([-1, version], dtype=np.int64), DIGEST: target, MODEL: public}


Key = tuple[int, bytes]
"""A public model's (version, digest)."""


class HeldModels:
    """The sites' half: the public models the sites of this process hold, one copy per (version, digest)
    however many simulated sites hold it, and which one each site holds."""

    def __init__(self, codec: Codec, history: int) -> None:
        self.codec, self.history = codec, history
        self.copies: dict[Key, Vector] = {}
        self.holds: dict[str, Key] = {}

    def receive(self, site: str, extras: Mapping[str, np.ndarray]) -> Vector:
        """P_t from what the server sent ``site`` (and its copy), checked against the digest, then held."""
        versions = _tensor(extras, VERSIONS, np.int64, 2)
        base, target = int(versions[0]), int(versions[1])
        expected = bytes(_tensor(extras, DIGEST, np.uint8, 32))
        if self.holds.get(site) == (target, expected) and (target, expected) in self.copies:
            return self.copies[(target, expected)]  # the same task again (a redelivery): nothing to rebuild
        built = _tensor(extras, MODEL, np.float32) if base < 0 else self._rebuild(site, extras, base, target)
        got = digest(built)
        if got != expected:
            self.forget(site)
            how = "the full model" if base < 0 else f"its copy of version {base} and the server's changes"
            raise UpdateError(
                f"site {site!r} built version {target} of the global model from {how}, but its digest "
                f"{got.hex()[:16]} is not the {expected.hex()[:16]} the server sent: it drops out of this "
                "round, and the server sends it the full model next time"
            )
        key = (target, got)
        held = self.copies.get(key)
        if held is None:  # not a view of the message it came in
            held = self.copies[key] = built if base >= 0 else np.array(built, dtype=np.float32)
        self.holds[site] = key
        self._evict(target)
        return held

    def _rebuild(self, site: str, extras: Mapping[str, np.ndarray], base: int, target: int) -> Vector:
        if not 0 < target - base <= self.history:
            raise UpdateError(
                f"site {site!r} was sent the changes from version {base} to {target} of the global model; "
                f"they must span 1 to compression.downlink_history = {self.history} versions (the server and "
                "the site must run the same [compression] downlink settings)"
            )
        key = (base, bytes(_tensor(extras, BASE_DIGEST, np.uint8, 32)))
        held = self.holds.get(site)
        if held != key or key not in self.copies:
            self.forget(site)
            has = f"version {held[0]} ({held[1].hex()[:16]})" if held is not None else "no copy"
            raise UpdateError(
                f"site {site!r} was sent the changes from version {base} ({key[1].hex()[:16]}) of the global "
                f"model, but holds {has} (it restarted, or missed an earlier round): it drops out of this "
                "round, and the server sends it the full model next time"
            )
        built = self.copies[key]
        for version in range(base + 1, target + 1):
            name = f"{DELTA}{version}"
            if name not in extras:
                raise UpdateError(f"the server's changes to the model lack the one of version {version}")
            built = built + self.codec.decompress(extras[name], version, built.size)
        return built

    def forget(self, site: str) -> None:
        self.holds.pop(site, None)
        self._evict(None)

    def _evict(self, newest: int | None) -> None:
        """Drop the copies no site holds, and the holds of versions the server keeps no deltas for (those
        sites will be sent full models)."""
        if newest is not None:
            self.holds = {s: k for s, k in self.holds.items() if k[0] >= newest - self.history}
        kept = set(self.holds.values())
        self.copies = {k: v for k, v in self.copies.items() if k in kept}


def _tensor(extras: Mapping[str, np.ndarray], name: str, dtype: type, size: int | None = None) -> np.ndarray:
    array = extras.get(name)
    if (
        not isinstance(array, np.ndarray)
        or array.dtype != dtype
        or array.ndim != 1
        or (size is not None and array.size != size)
    ):
        what = f"{size} values of {np.dtype(dtype).name}" if size is not None else np.dtype(dtype).name
        raise UpdateError(
            f"the task's model is sent compressed, but its {name!r} is not a flat array of {what}; the "
            "server and the site must run the same [compression] downlink settings"
        )
    return array


class DownlinkLayer(Layer):
    """Downlink compression (EF21-P): each site is sent the compressed changes from the public model it
    holds, or the public model in full; see the module docstring."""

    name = "downlink"

    @classmethod
    def from_config(cls, stack: StackContext) -> Layer | None:
        c = stack.config.compression
        if c.downlink == "none":
            return None
        return cls(Codec(c.downlink, c.downlink_bits, stack.config.run.seed), c.downlink_history)

    def __init__(self, codec: Codec, history: int = 8) -> None:
        if isinstance(history, bool) or not isinstance(history, int) or history < 1:
            raise ConfigError(f"compression.downlink_history must be a whole number >= 1 (got {history!r})")
        self.codec = codec
        self.server = PublicModel(codec, history)
        self.sites = HeldModels(codec, history)

    def begin(self, round: RoundContext) -> None:
        public = self.server.advance(round.weights, round.server_state, round.round)
        for site in round.sites:
            task = round.tasks[site]
            payload = self.server.payload(site, public, round.round)
            round.tasks[site] = replace(task, extras={**task.extras, **payload})
        round.broadcast = np.empty(0, dtype=np.float32)  # the model travels in each task's extras
        round.scratch[self.name] = round.round

    def decode(self, update: Update, round: RoundContext) -> Update | None:
        # An update of this round means its site built and trained on this round's public model.
        version = round.scratch.get(self.name)
        if version is not None and update.site in round.tasks:
            self.server.held[update.site] = version
        return update

    def receive(self, weights: Vector, task: Task, site: str) -> tuple[Vector, Task]:
        if not any(name.startswith(PREFIX) for name in task.extras):
            if weights.size:
                return weights, task  # sent in full, not through this layer
            raise UpdateError(
                f"site {site!r} was sent a task with neither the model nor its compressed changes; the "
                "server and the site must run the same [compression] downlink settings"
            )
        model = self.sites.receive(site, task.extras)
        extras = {k: v for k, v in task.extras.items() if not k.startswith(PREFIX)}
        return model, replace(task, extras=extras)

    def describe(self) -> str:
        """One line for the run display."""
        codec = self.codec
        what = "float16" if codec.kind == "float16" else f"{codec.bits}-bit levels after a Hadamard rotation"
        per_value = 2.0 if codec.kind == "float16" else codec.bits / 8 + 8 / BLOCK
        return (
            f"model compression to the sites: each is sent the changes to the model it holds as {what} "
            f"({per_value:.3f} bytes per value instead of 4), or the full model if it holds none of the last "
            f"{self.server.history} versions"
        )

    def __repr__(self) -> str:
        return f"DownlinkLayer({self.codec.kind!r}, bits={self.codec.bits}, history={self.server.history})"
