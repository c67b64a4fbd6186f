"""Federated text data: a fixed character vocabulary, windowed sites, loaders and re-partitioners.

Every loader returns a :class:`FederatedDataset` whose sites hold ``(n, WINDOW + 1)`` uint8 windows over the
shared :data:`DEFAULT_TOKENIZER` vocabulary, so models and training code never see where the text came from.
"""

from __future__ import annotations

from confide.data import shakespeare
from confide.data.dataset import (
    PAD,
    WINDOW,
    FederatedDataset,
    SiteData,
    cache_dir,
    has_test_window,
    make_site,
    split_text,
    windows,
)
from confide.data.partition import SCHEMES, dirichlet, iid, natural, partition, quantity
from confide.data.text import load_text, read_sites
from confide.data.tokenize import DEFAULT_TOKENIZER, CharTokenizer, Tokenizer

__all__ = [
    "DEFAULT_TOKENIZER",
    "PAD",
    "SCHEMES",
    "WINDOW",
    "CharTokenizer",
    "FederatedDataset",
    "SiteData",
    "Tokenizer",
    "cache_dir",
    "dirichlet",
    "has_test_window",
    "iid",
    "load_text",
    "make_site",
    "natural",
    "partition",
    "quantity",
    "read_sites",
    "shakespeare",
    "split_text",
    "windows",
]
