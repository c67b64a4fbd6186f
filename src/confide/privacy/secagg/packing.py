"""Masked vectors packed at exactly b bits per value, as the ring Z_(2^b) needs, instead of whole words.

A masked vector is uniform in Z_(2^b) (:mod:`~confide.privacy.secagg.fixedpoint`), with b often 20 to 28 for
the fixed-point encoding and 4 to 12 when the update is quantized into the ring; the words it is computed in
(uint32 or uint64) carry 32 or 64 bits per value whatever b is. Packing sends b bits: value i occupies bits
[i b, (i + 1) b) of the byte string, least significant bit first (the little-endian bit order of
``np.packbits(bitorder="little")``), and the last byte is padded with zero bits. Packing is lossless and
reveals nothing new: the size d b / 8 is fixed by the round's public parameters, and every value of Z_(2^b)
has one packing. Unpacking refuses non-zero padding, so every packed string has exactly one meaning.

Whole arrays are packed chunk by chunk (a multiple of 8 values, so every chunk starts on a byte boundary):
numpy's bit (un)packing is vectorised, and the chunks bound its temporary memory (8 bytes per bit of a
chunk) for a vector of any size.
"""

from __future__ import annotations

import math

import numpy as np

CHUNK = 1 << 16
"""Values (un)packed per step: a multiple of 8, so that every chunk starts on a byte boundary."""


def packed_size(count: int, bits: int) -> int:
    """Bytes that ``count`` values of ``bits`` bits take: ceil(count * bits / 8)."""
    return math.ceil(count * bits / 8)


def word_dtype(bits: int) -> np.dtype:
    """The little-endian unsigned words that hold values of ``bits`` bits (1 to 64)."""
    return np.dtype("<u4") if bits <= 32 else np.dtype("<u8")


def pack(values: np.ndarray, bits: int) -> bytes:
    """``values`` (flat unsigned integers below 2^bits) as ``bits`` bits each; higher bits are dropped."""
    if values.ndim != 1 or values.dtype.kind != "u" or values.dtype.itemsize not in (4, 8):
        raise ValueError(f"packing takes a flat uint32 or uint64 array, got {values.dtype} {values.shape}")
    width = values.dtype.itemsize * 8
    if not 1 <= bits <= width:
        raise ValueError(f"values of {width}-bit words are packed at 1 to {width} bits, not {bits}")
    little = np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<"))
    if bits in (8, 16, 32, 64):  # whole bytes: a plain cast keeps the low bytes
        return np.ascontiguousarray(little, dtype=np.dtype(f"<u{bits // 8}")).tobytes()
    out = bytearray(packed_size(values.size, bits))
    for start in range(0, values.size, CHUNK):
        part = little[start : start + CHUNK]
        digits = np.unpackbits(part.view(np.uint8).reshape(-1, width // 8), axis=1, bitorder="little")
        packed = np.packbits(digits[:, :bits].reshape(-1), bitorder="little")
        offset = start * bits // 8
        out[offset : offset + packed.size] = packed.tobytes()
    return bytes(out)


def unpack(data: bytes | memoryview, bits: int, count: int) -> np.ndarray:
    """The ``count`` values of ``bits`` bits that :func:`pack` wrote into ``data``, as :func:`word_dtype`
    words. ValueError if ``data`` is not exactly their packed size or its padding bits are not zero."""
    if not 1 <= bits <= 64:
        raise ValueError(f"values are packed at 1 to 64 bits, not {bits}")
    raw = np.frombuffer(data, dtype=np.uint8)
    if raw.size != packed_size(count, bits):
        raise ValueError(
            f"{count} values of {bits} bits take {packed_size(count, bits)} bytes, not {raw.size}"
        )
    spare = raw.size * 8 - count * bits
    if spare and int(raw[-1]) >> (8 - spare):
        raise ValueError("the padding bits after the last value are not zero")
    dtype = word_dtype(bits)
    if bits in (8, 16, 32, 64):
        return np.frombuffer(raw.tobytes(), dtype=np.dtype(f"<u{bits // 8}")).astype(dtype)
    width = dtype.itemsize * 8
    out = np.empty(count, dtype=dtype)
    for start in range(0, count, CHUNK):
        size = min(CHUNK, count - start)
        first = start * bits // 8
        segment = raw[first : first + packed_size(size, bits)]
        digits = np.zeros((size, width), dtype=np.uint8)
        digits[:, :bits] = np.unpackbits(segment, count=size * bits, bitorder="little").reshape(size, bits)
        out[start : start + size] = np.packbits(digits, axis=1, bitorder="little").view(dtype).reshape(-1)
    return out
