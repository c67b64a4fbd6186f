"""Masks: a 32-byte seed expanded by AES-CTR into a vector of uniform unsigned integers.

The seed is an AES-128 key (its first 16 bytes) and the initial counter block (its last 16). AES-128 matches
the 128-bit security of X25519, and with AES-NI it expands about 20% faster than AES-256, which matters
because expansion is most of the cost of secure aggregation: a site expands one mask per neighbour plus its
self mask, and the server one per survivor plus one per (dropped site, surviving neighbour) pair.

The keystream is read as little-endian uint32 or uint64 with ``np.frombuffer``: no Python loop per element.
Uniform words mod 2^32 (or 2^64) stay uniform mod any 2^b that divides it, so one expansion serves every
modulus of :mod:`~confide.privacy.secagg.fixedpoint`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

SEED_BYTES = 32
BLOCK_BYTES = 1 << 18
"""Masks are added a block at a time: 256 KiB of every stream and of the sum stay in the L2 cache, which
makes :func:`add_masks` about 1.5x faster than expanding each whole mask and then adding it."""

_AES_BLOCK = 16
PARALLEL_BYTES = 16 << 20
"""Below this much keystream in all, threads cost more than they save."""


def _stream(seed: bytes, offset: int = 0) -> CipherContext:
    """The keystream of ``seed`` from byte ``offset`` on (a multiple of the AES block): CTR mode can start
    anywhere by advancing the counter, which lets parts of one mask be expanded in parallel."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a mask seed has {SEED_BYTES} bytes, got {len(seed)}")
    counter = seed[16:]
    if offset:
        start = (int.from_bytes(counter, "big") + offset // _AES_BLOCK) % (1 << 128)
        counter = start.to_bytes(16, "big")
    return Cipher(algorithms.AES128(seed[:16]), modes.CTR(counter)).encryptor()


def expand(seed: bytes, size: int, dtype: np.dtype | str) -> np.ndarray:
    """The mask of ``size`` uniform words of unsigned ``dtype`` that ``seed`` stands for."""
    kind = np.dtype(dtype).newbyteorder("<")
    keystream = _stream(seed).update(bytes(size * kind.itemsize))
    return np.frombuffer(keystream, dtype=kind, count=size)


def add_masks(
    total: np.ndarray, seeds: Sequence[bytes], signs: Sequence[int], workers: int | None = None
) -> None:
    """total += sum_i signs[i] * expand(seeds[i]), in place, modulo 2^(8 * itemsize) (signs are +1 or -1).

    Equivalent to adding each :func:`expand` in turn, but block by block over all the streams at once, and
    for large vectors in ``workers`` threads (default: one per core, up to 4), each over its own part of the
    vector: AES in ``cryptography`` and numpy's additions release the GIL, so the parts run in parallel.
    """
    if len(seeds) != len(signs):
        raise ValueError("add_masks needs one sign per seed")
    if any(s not in (1, -1) for s in signs):
        raise ValueError("mask signs must be +1 or -1")
    if total.dtype.kind != "u" or total.ndim != 1:
        raise ValueError(f"masks add to a flat unsigned array, got {total.dtype} of shape {total.shape}")
    if not seeds or total.size == 0:
        return
    kind = total.dtype.newbyteorder("<")
    block = max(1, BLOCK_BYTES // kind.itemsize)
    if workers is None:
        workers = min(os.cpu_count() or 1, 4)
    parts = min(workers, -(-total.size // block))
    if parts <= 1 or len(seeds) * total.nbytes < PARALLEL_BYTES:
        _add_range(total, 0, total.size, seeds, signs, block)
        return
    # Whole blocks per part, so that every part starts on an AES block boundary.
    per_part = -(-total.size // (parts * block)) * block
    ranges = [(start, min(start + per_part, total.size)) for start in range(0, total.size, per_part)]
    with ThreadPoolExecutor(len(ranges)) as pool:
        for future in [pool.submit(_add_range, total, a, b, seeds, signs, block) for a, b in ranges]:
            future.result()


def _add_range(
    total: np.ndarray, first: int, last: int, seeds: Sequence[bytes], signs: Sequence[int], block: int
) -> None:
    """total[first:last] += the masks' words first..last (first on an AES block boundary)."""
    kind = total.dtype.newbyteorder("<")
    streams = [(_stream(seed, first * kind.itemsize), sign) for seed, sign in zip(seeds, signs, strict=True)]
    zeros = memoryview(bytes(block * kind.itemsize))
    # update_into may write up to one AES block beyond the input's length.
    buffer = bytearray(block * kind.itemsize + _AES_BLOCK)
    for start in range(first, last, block):
        part = total[start : min(start + block, last)]
        nbytes = part.size * kind.itemsize
        words = np.frombuffer(buffer, dtype=kind, count=part.size)
        for stream, sign in streams:
            stream.update_into(zeros[:nbytes], buffer)
            if sign > 0:
                np.add(part, words, out=part)
            else:
                np.subtract(part, words, out=part)
