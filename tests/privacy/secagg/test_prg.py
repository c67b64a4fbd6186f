"""Mask expansion: deterministic per seed, uniform, and add_masks equal to adding each mask in turn."""

from __future__ import annotations

import os

import numpy as np
import pytest
from scipy.stats import chisquare

from confide.privacy.secagg import prg


def test_a_seed_always_expands_to_the_same_mask_and_seeds_differ() -> None:
    seed = bytes(range(32))
    first = prg.expand(seed, 1000, np.uint32)
    assert np.array_equal(first, prg.expand(seed, 1000, np.uint32))
    assert np.array_equal(first[:10], prg.expand(seed, 10, np.uint32))  # a prefix of the same stream
    assert not np.array_equal(first, prg.expand(bytes(31) + b"\x01", 1000, np.uint32))
    with pytest.raises(ValueError, match="32 bytes"):
        prg.expand(seed[:16], 10, np.uint32)


def test_mask_bytes_are_uniform() -> None:
    mask = prg.expand(b"\x00" * 32, 100_000, np.uint32)  # the all-zero seed: no help from a random key
    counts = np.bincount(np.frombuffer(mask.tobytes(), dtype=np.uint8), minlength=256)
    assert chisquare(counts).pvalue > 1e-3


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
@pytest.mark.parametrize("size", [1, 1000, prg.BLOCK_BYTES // 4 * 2 + 17])
def test_add_masks_equals_one_mask_at_a_time(dtype: type, size: int) -> None:
    seeds = [os.urandom(32) for _ in range(5)]
    signs = [1, -1, -1, 1, 1]
    start = np.arange(size, dtype=dtype)
    expected = start.copy()
    for seed, sign in zip(seeds, signs, strict=True):
        mask = prg.expand(seed, size, dtype)
        expected = expected + mask if sign > 0 else expected - mask  # numpy wraps mod 2^32 / 2^64
    total = start.copy()
    prg.add_masks(total, seeds, signs)
    assert np.array_equal(total, expected)
    # A mask and its negation cancel exactly.
    prg.add_masks(total, seeds, [-s for s in signs])
    assert np.array_equal(total, start)


def test_add_masks_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unsigned"):
        prg.add_masks(np.zeros(4, dtype=np.int32), [bytes(32)], [1])
    with pytest.raises(ValueError, match="one sign per seed"):
        prg.add_masks(np.zeros(4, dtype=np.uint32), [bytes(32)], [1, 1])
    with pytest.raises(ValueError, match=r"\+1 or -1"):
        prg.add_masks(np.zeros(4, dtype=np.uint32), [bytes(32)], [2])


@pytest.mark.parametrize("counter", [bytes(16), b"\xff" * 16])
def test_masks_added_in_parallel_parts_equal_the_whole_masks(counter: bytes) -> None:
    # Parts start mid-stream by advancing the CTR counter; near 2^128 it must wrap as AES-CTR does.
    seeds = [bytes([i]) * 16 + counter for i in range(1, 5)]
    signs = [1, -1, -1, 1]
    size = 3 * prg.BLOCK_BYTES // 4 * 3 + 5  # several blocks, the last one short
    whole = np.zeros(size, dtype=np.uint32)
    for seed, sign in zip(seeds, signs, strict=True):
        mask = prg.expand(seed, size, np.uint32)
        whole = whole + mask if sign > 0 else whole - mask
    for workers in (1, 3):
        total = np.zeros(size, dtype=np.uint32)
        original = prg.PARALLEL_BYTES
        prg.PARALLEL_BYTES = 0  # take the threaded path even for this small vector
        try:
            prg.add_masks(total, seeds, signs, workers=workers)
        finally:
            prg.PARALLEL_BYTES = original
        np.testing.assert_array_equal(total, whole)
