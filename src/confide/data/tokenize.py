"""A fixed character vocabulary that every site shares.

Sites never exchange vocabularies: a vocabulary built from the data would leak which characters a site's text
contains, and two sites with different vocabularies could not average their embedding rows. So the vocabulary
is fixed in code: ``"\\n"``, the printable ASCII characters 32..126 in order, and one unknown symbol. Text is
normalised first (NFKD, combining marks dropped, curly quotes and dashes made ASCII) so that accented Latin
letters keep their base letter instead of all collapsing into the unknown symbol.
"""

from __future__ import annotations

import unicodedata
from typing import Protocol, runtime_checkable

import numpy as np

from confide.errors import DataError

PAD = 255
"""Code that fills the tail of a final, partial window; training treats a PAD target as "no target"."""

_CHARS = "\n" + "".join(chr(c) for c in range(32, 127))
_UNKNOWN_CHAR = "\ufffd"

# Typographic characters whose ASCII look-alike is the right reading; NFKD does not map these.
_TYPOGRAPHY = str.maketrans(
    {
        "\u2018": "'",  # left single quote
        "\u2019": "'",  # right single quote / apostrophe
        "\u201a": "'",
        "\u201b": "'",
        "\u2032": "'",  # prime
        "\u201c": '"',
        "\u201d": '"',
        "\u201e": '"',
        "\u201f": '"',
        "\u2033": '"',
        "\u00ab": '"',
        "\u00bb": '"',
        "\u2010": "-",
        "\u2011": "-",
        "\u2012": "-",
        "\u2013": "-",  # en dash
        "\u2014": "--",  # em dash: the Gutenberg texts write it as two hyphens
        "\u2015": "--",
        "\u2212": "-",
        "\u2026": "...",
        "\u00a0": " ",
        "\t": " ",
    }
)


@runtime_checkable
class Tokenizer(Protocol):
    """What the data loaders need from a tokenizer: a stable name (it keys caches) and uint8 codes."""

    name: str

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, codes: np.ndarray) -> str: ...


class CharTokenizer:
    """Characters to uint8 codes: 0 is newline, 1..95 are ASCII 32..126, 96 is the unknown symbol."""

    name = "char-ascii-v1"

    def __init__(self) -> None:
        self._unknown = len(_CHARS)
        table = np.full(128, self._unknown, dtype=np.uint8)
        table[ord("\n")] = 0
        table[32:127] = np.arange(1, 96, dtype=np.uint8)
        self._table = table
        self._symbols = np.array([*_CHARS, _UNKNOWN_CHAR])

    @property
    def vocab_size(self) -> int:
        return len(_CHARS) + 1

    @property
    def unknown(self) -> int:
        """The code of the unknown symbol (the last one)."""
        return self._unknown

    @staticmethod
    def normalize(text: str) -> str:
        """ASCII look-alikes for typography and accented letters; encode flags whatever is left."""
        if text.isascii():
            return text.translate(_TYPOGRAPHY) if "\t" in text else text
        text = unicodedata.normalize("NFKD", text.translate(_TYPOGRAPHY))
        return "".join(ch for ch in text if not unicodedata.combining(ch))

    def encode(self, text: str) -> np.ndarray:
        """The uint8 codes of ``text``; characters outside the vocabulary become the unknown code."""
        text = self.normalize(text)
        if text.isascii():
            points = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
            return self._table[points]
        points32 = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        codes = np.full(points32.shape, self._unknown, dtype=np.uint8)
        ascii_mask = points32 < 128
        codes[ascii_mask] = self._table[points32[ascii_mask]]
        return codes

    def decode(self, codes: np.ndarray) -> str:
        """The text of ``codes``; PAD codes (the tail of a partial window) are skipped."""
        array = np.asarray(codes).reshape(-1)
        if array.size and not np.issubdtype(array.dtype, np.integer):
            raise DataError(f"character codes must be integers, got dtype {array.dtype}")
        array = array[array != PAD]
        if array.size and (array.min() < 0 or array.max() >= self.vocab_size):
            raise DataError(
                f"character codes must lie in 0..{self.vocab_size - 1} (or be PAD={PAD}), "
                f"got values from {array.min()} to {array.max()}"
            )
        return "".join(self._symbols[array.astype(np.intp)].tolist())

    def __repr__(self) -> str:
        return f"CharTokenizer(name={self.name!r}, vocab_size={self.vocab_size})"


DEFAULT_TOKENIZER = CharTokenizer()
"""The tokenizer every loader uses unless told otherwise."""
