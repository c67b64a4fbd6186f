"""Every source of randomness in confide, of three kinds that are never mixed.

* **Public** randomness (which sites a round asks, the data partition, initial weights, shuffling, dropout)
  comes from the run's seed through :func:`public_rng`, one independent stream per purpose and round: round
  r draws the same numbers whether or not the rounds before it ran in this process, so a resumed run
  repeats them. Anyone who knows the config knows these numbers; that is the point.
* **Secret** randomness (DP noise, a site's DP-SGD batch sampling, the noise on the adaptive-clipping bits)
  comes from :class:`SecretRandomness`: an AES-CTR keystream under a fresh key from the operating system's
  cryptographic generator (``os.urandom``), never derived from the config or the seed. A server that knows
  everything it sent cannot recompute it. Keys and masks of secure aggregation draw from ``os.urandom``
  directly (:mod:`confide.privacy.secagg`).
* **Insecure reproducible** noise (:class:`SeededRandomness`) exists only for simulations that must repeat
  bit for bit (a regression test, a paper figure): it draws the DP noise from the run's seed, so anyone who
  knows the seed can subtract it. It is chosen only by ``privacy.insecure_reproducible_noise = true``, which
  a deployment refuses and every report labels.

The streams are listed once, in :class:`Stream`, so no two purposes share one by accident.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from enum import IntEnum
from typing import Protocol

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes


class Stream(IntEnum):
    """The public random streams of a run: ``public_rng(seed, round, stream)``. The numbers are part of what
    a seeded simulation repeats, so an existing one never changes."""

    MODEL_INIT = 0
    SELECT = 1
    SITE_PLAN = 2
    EVAL = 3
    DATA = 4
    STRAGGLER = 5
    CENTRAL_NOISE = 6
    """Insecure reproducible noise only: the central DP noise of a round."""
    SITE_NOISE = 7
    """Insecure reproducible noise only: a site's layer noise (seeded with the site's plan seed)."""
    BITS_NOISE = 8
    """Insecure reproducible noise only: the noise on the adaptive-clipping bits."""
    AUDIT = 9
    SECAGG_SESSION = 10
    """The server's contribution to a secure-aggregation round's session value."""
    DROPOUT = 11
    """Simulated dropouts of the local backend."""
    DPSGD = 12
    """Insecure reproducible noise only: a site's DP-SGD batch sampling and noise."""
    ATTACK = 13
    """Simulated poisoning only: which sites attack, and which of their training windows are poisoned."""
    CLOCK = 14
    """Simulation only: each site's compute speed and network delay on the virtual clock."""
    ASYNC = 15
    """Asynchronous rounds: which idle site is sent work next, and the seed of its plan."""
    SUBSET = 16
    """Compression under secure aggregation: the coordinates every site of a round sends."""


def public_rng(seed: int, round: int, stream: Stream | int) -> np.random.Generator:
    """The public generator of ``stream`` in ``round`` of a run seeded ``seed``."""
    return np.random.default_rng([seed, round, int(stream)])


class Randomness(Protocol):
    """Where noise comes from: a secret source in every real run, a seeded one only in insecure simulation."""

    secret: bool
    """True when no one who knows the config and the seed can predict the draws."""

    def normal(self, size: int, std: float) -> np.ndarray:
        """``size`` float32 draws from N(0, std²)."""
        ...

    def uniform(self, size: int) -> np.ndarray:
        """``size`` float64 draws, uniform on [0, 1)."""
        ...


_KEYSTREAM_CHUNK = 1 << 22
"""Bytes of keystream produced per call into the cipher: bounds the temporary memory of a large draw."""


class SecretRandomness:
    """Draws from the OS's cryptographic generator, stretched by AES-128 in counter mode.

    One instance is keyed once from ``os.urandom`` (a 128-bit key and a random initial counter) and reads its
    keystream onwards, so a draw of millions of values costs one AES pass (several GB/s with AES-NI) rather
    than millions of system calls. AES-CTR under a uniformly random key is a pseudorandom generator as long
    as AES is a pseudorandom permutation, so nothing short of breaking AES predicts a draw, and nothing about
    the key is derivable from the config, the seed or any message. Gaussians come from the Box-Muller
    transform of 53-bit uniforms, computed in float64 and rounded to float32.

    The floating-point Gaussian leaks through its low bits (Mironov 2012); like Opacus without its secure
    mode, this module does not defend against that.
    """

    secret = True

    def __init__(self) -> None:
        key = os.urandom(16)
        counter = os.urandom(16)
        self._cipher = Cipher(algorithms.AES128(key), modes.CTR(counter)).encryptor()

    def _words(self, count: int) -> np.ndarray:
        """``count`` uniform uint64 words of keystream."""
        out = np.empty(count, dtype=np.uint64)
        view = out.view(np.uint8)
        for start in range(0, view.size, _KEYSTREAM_CHUNK):
            stop = min(start + _KEYSTREAM_CHUNK, view.size)
            view[start:stop] = np.frombuffer(self._cipher.update(bytes(stop - start)), dtype=np.uint8)
        return out

    def uniform(self, size: int) -> np.ndarray:
        return (self._words(size) >> np.uint64(11)).astype(np.float64) * 2.0**-53

    def normal(self, size: int, std: float) -> np.ndarray:
        pairs = (size + 1) // 2
        u = self.uniform(2 * pairs)
        radius = np.sqrt(-2.0 * np.log1p(-u[:pairs]))  # 1 - u lies in (0, 1]: no log(0)
        angle = (2.0 * math.pi) * u[pairs:]
        out = np.empty(2 * pairs, dtype=np.float32)
        np.multiply(radius, np.cos(angle), out=out[:pairs], casting="same_kind")
        np.multiply(radius, np.sin(angle), out=out[pairs:], casting="same_kind")
        result = out[:size]
        result *= np.float32(std)
        return result

    def __repr__(self) -> str:
        return "SecretRandomness(os.urandom-keyed AES-CTR)"


class SeededRandomness:
    """INSECURE, simulation only: noise drawn from a seed, so a run repeats bit for bit and anyone who knows
    the seed can recompute (and subtract) the noise. Chosen only by
    ``privacy.insecure_reproducible_noise``."""

    secret = False

    def __init__(self, seed: Sequence[int] | int) -> None:
        self._rng = np.random.default_rng(seed)

    def uniform(self, size: int) -> np.ndarray:
        return self._rng.random(size)

    def normal(self, size: int, std: float) -> np.ndarray:
        out = self._rng.standard_normal(size, dtype=np.float32)
        out *= np.float32(std)
        return out

    def __repr__(self) -> str:
        return "SeededRandomness(INSECURE: reproducible from the run's seed)"


def noise_source(insecure_seed: Sequence[int] | None) -> Randomness:
    """Secret randomness, or (only with ``insecure_seed``, which the insecure simulation setting provides)
    noise reproducible from that seed."""
    return SecretRandomness() if insecure_seed is None else SeededRandomness(list(insecure_seed))
