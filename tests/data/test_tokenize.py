"""The shared character vocabulary and the windowing every site's text goes through."""

from __future__ import annotations

import numpy as np
import pytest

from confide.data import DEFAULT_TOKENIZER, PAD, WINDOW, CharTokenizer, split_text, windows
from confide.errors import DataError

ASCII_TEXT = "Who's there?\nNay, answer me: stand, and unfold yourself.\n~{|}`@#$%^&*()_+ 0123456789\n"


def test_vocab_is_fixed() -> None:
    tok = CharTokenizer()
    assert tok.vocab_size == 97
    assert tok.name == "char-ascii-v1"
    codes = tok.encode("\n !~")
    assert codes.tolist() == [0, 1, 2, 95]
    assert tok.unknown == 96


def test_ascii_round_trip() -> None:
    codes = DEFAULT_TOKENIZER.encode(ASCII_TEXT)
    assert codes.dtype == np.uint8
    assert codes.shape == (len(ASCII_TEXT),)
    assert codes.max() < 96
    assert DEFAULT_TOKENIZER.decode(codes) == ASCII_TEXT


def test_every_printable_character_round_trips() -> None:
    text = "\n" + "".join(chr(c) for c in range(32, 127))
    codes = DEFAULT_TOKENIZER.encode(text)
    assert codes.tolist() == list(range(96))
    assert DEFAULT_TOKENIZER.decode(codes) == text


def test_non_ascii_is_normalised_or_unknown() -> None:
    tok = DEFAULT_TOKENIZER
    assert tok.decode(tok.encode("café naïve Ångström")) == "cafe naive Angstrom"
    assert tok.decode(tok.encode("\u201cquoted\u201d \u2018it\u2019s\u2019 a\u2013b a\u2014b\u2026")) == (
        "\"quoted\" 'it's' a-b a--b..."
    )
    assert tok.decode(tok.encode("a\tb")) == "a b"
    codes = tok.encode("x日本\u0007y")
    assert codes.tolist() == [tok.encode("x")[0], 96, 96, 96, tok.encode("y")[0]]
    assert tok.decode(codes) == "x\ufffd\ufffd\ufffdy"


def test_decode_skips_pad_and_rejects_bad_codes() -> None:
    tok = DEFAULT_TOKENIZER
    assert tok.decode(np.array([41, 42, PAD, PAD], dtype=np.uint8)) == tok.decode(np.array([41, 42]))
    with pytest.raises(DataError, match=r"0\.\.96"):
        tok.decode(np.array([97]))
    assert tok.decode(np.array([], dtype=np.uint8)) == ""


@pytest.mark.parametrize("length", [0, 1, 2, 3, 79, 80, 81, 82, 160, 161, 162, 1000])
def test_windows_tile_with_overlap_of_one(length: int) -> None:
    rng = np.random.default_rng(length)
    codes = rng.integers(0, 97, size=length, dtype=np.uint8)
    w = windows(codes)
    expected = 0 if length < 2 else -(-(length - 1) // WINDOW)
    assert w.shape == (expected, WINDOW + 1)
    assert w.dtype == np.uint8
    for k in range(expected - 1):
        assert np.array_equal(w[k], codes[k * WINDOW : k * WINDOW + WINDOW + 1])
        assert w[k, -1] == w[k + 1, 0]
    if expected:
        tail = codes[(expected - 1) * WINDOW :]
        assert np.array_equal(w[-1, : tail.size], tail)
        assert (w[-1, tail.size :] == PAD).all()
        # Every code after the first is a target exactly once, in order.
        targets = w[:, 1:].reshape(-1)
        assert np.array_equal(targets[targets != PAD], codes[1:])
        assert (w[:, 0] != PAD).all()


def test_windows_of_a_smaller_width() -> None:
    w = windows(np.arange(10, dtype=np.uint8), window=4)
    assert w.tolist() == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [8, 9, PAD, PAD, PAD]]


def test_split_text_is_at_a_line_boundary_and_loses_nothing() -> None:
    text = "".join(f"line {i:02d} of the text\n" for i in range(50))
    train, test = split_text(text)
    assert train + test == text
    assert train.endswith("\n") and test
    assert abs(len(train) / len(text) - 0.8) < 0.03
    assert split_text("one line only\n") == ("one line only\n", "")
    with pytest.raises(DataError, match="train_fraction"):
        split_text(text, 1.0)
