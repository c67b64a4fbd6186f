"""How much a trained model has memorised of a secret it saw: canaries and their exposure.

Carlini et al. 2019 ("The Secret Sharer: Evaluating and Testing Unintended Memorization in Neural
Networks"): plant random secrets of a fixed format ("my secret number is 381907") in the training text,
train, then rank each planted canary among all the secrets of the same format by the model's
log-perplexity of it. A model that memorised nothing ranks a canary anywhere; one that memorised it ranks it
first. The *exposure* of a canary is

    exposure = log2 |R| − log2 rank

in bits, where R is the space of secrets (10^6 for six digits) and rank is the canary's position (1 for the
likeliest) among them. A random canary has expected exposure about 1.44 bits (1 / ln 2); the maximum,
log2 |R|, means the model would give the secret away first when asked to complete the prefix.

Ranking against all of R costs |R| scorings. :func:`exposure` ranks against a sample of candidates, which
estimates the exposure up to log2 of the sample size; :func:`estimated_exposure` fits a skew-normal
distribution to the candidates' log-perplexities and reads the canary's tail probability from it
(Carlini et al., section 4.3), which extrapolates beyond the sample: exposure ≈ −log2 CDF(canary score).

The scoring function is the caller's: any ``list[str] -> np.ndarray`` of log-perplexities (in bits, lower is
likelier). :func:`score_with_model` builds it for confide's character models.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from confide.data.tokenize import PAD, Tokenizer

DIGITS = "0123456789"
PREFIX = "my secret number is "

LogPerplexity = Callable[[list[str]], np.ndarray]
"""Scores texts: the log-perplexity (bits) of each, or of its secret part; lower means likelier."""

# Secret spaces up to this size are sampled by index (exactly, without repeats); larger ones symbol by symbol.
_INDEXABLE = 2**62


@dataclass(frozen=True)
class Canary:
    """A planted secret: ``prefix`` followed by ``secret``, whose symbols are drawn from ``alphabet``."""

    prefix: str
    secret: str
    alphabet: str = DIGITS

    def __post_init__(self) -> None:
        if not self.secret or any(symbol not in self.alphabet for symbol in self.secret):
            raise ValueError(f"the secret {self.secret!r} must be non-empty and spelled in {self.alphabet!r}")

    @property
    def text(self) -> str:
        return self.prefix + self.secret

    @property
    def space_size(self) -> int:
        """|R|: how many secrets of this format there are."""
        return len(self.alphabet) ** len(self.secret)

    def candidates(self, n: int, rng: np.random.Generator) -> list[str]:
        """Up to ``n`` other texts of this format, distinct and never the canary itself, drawn uniformly.

        When ``n`` reaches |R| − 1 they are every other secret, and :func:`exposure` is exact.
        """
        secrets = _secrets(n, rng, self.alphabet, len(self.secret), exclude=self.secret)
        return [self.prefix + s for s in secrets]


def _spell(indices: np.ndarray, alphabet: str, length: int) -> list[str]:
    """Secrets numbered ``indices`` in base len(alphabet), most significant symbol first."""
    base = len(alphabet)
    powers = base ** np.arange(length - 1, -1, -1, dtype=np.int64)
    symbols = np.array(list(alphabet))[(indices[:, None] // powers) % base]
    return ["".join(row) for row in symbols]


def _secrets(n: int, rng: np.random.Generator, alphabet: str, length: int, exclude: str | None) -> list[str]:
    if n < 0:
        raise ValueError(f"the number of secrets must be at least 0, got {n}")
    if len(set(alphabet)) != len(alphabet) or len(alphabet) < 2 or length < 1:
        raise ValueError(
            f"a canary needs an alphabet of at least 2 distinct symbols and a length of at least 1 "
            f"(got {alphabet!r}, length {length})"
        )
    space = len(alphabet) ** length
    if space <= _INDEXABLE:
        # Draw from the space without the excluded secret, then skip over its index: uniform and exact.
        available = space - (exclude is not None)
        indices = rng.choice(available, size=min(n, available), replace=False).astype(np.int64)
        if exclude is not None:
            position = {s: i for i, s in enumerate(alphabet)}
            excluded = 0
            for symbol in exclude:
                excluded = excluded * len(alphabet) + position[symbol]
            indices[indices >= excluded] += 1
        return _spell(indices, alphabet, length)
    # A space this large repeats a draw with negligible probability (n² / 2^63).
    drawn = rng.integers(0, len(alphabet), size=(n, length))
    symbols = np.array(list(alphabet))
    out = ["".join(symbols[row]) for row in drawn]
    return [s for s in out if s != exclude]


def make_canaries(
    n: int,
    rng: np.random.Generator,
    alphabet: str = DIGITS,
    length: int = 6,
    prefix: str = PREFIX,
) -> list[Canary]:
    """``n`` distinct random canaries such as "my secret number is 381907"."""
    return [Canary(prefix, s, alphabet) for s in _secrets(n, rng, alphabet, length, exclude=None)]


def plant(texts: Sequence[str], canaries: Sequence[str], repeats: int) -> list[str]:
    """``texts`` with each canary text inserted ``repeats`` times, spread evenly, as texts of their own.

    The order of ``texts`` is kept; copies of different canaries alternate, so no canary is clustered.
    In a site's data each inserted text becomes a line (or a document) of its own.
    """
    if repeats < 0:
        raise ValueError(f"repeats must be at least 0, got {repeats}")
    copies = [c for _ in range(repeats) for c in canaries]
    out: list[str] = []
    # Copy j goes before the text at position round((j + 1) · len(texts) / (len(copies) + 1)).
    slots = [round((j + 1) * len(texts) / (len(copies) + 1)) for j in range(len(copies))]
    j = 0
    for i, text in enumerate(texts):
        while j < len(copies) and slots[j] <= i:
            out.append(copies[j])
            j += 1
        out.append(text)
    out.extend(copies[j:])
    return out


def rank_exposure(canary_score: float, candidate_scores: np.ndarray) -> float:
    """log2 |R| − log2 rank, with R the candidates and the canary, and rank counting every candidate whose
    log-perplexity is at most the canary's (ties rank against the canary, as in the paper's definition)."""
    scores = np.asarray(candidate_scores, dtype=np.float64)
    rank = 1 + int(np.count_nonzero(scores <= canary_score))
    return math.log2(scores.size + 1) - math.log2(rank)


def fitted_exposure(canary_score: float, candidate_scores: np.ndarray) -> float:
    """−log2 P(score <= canary's) under a skew-normal fitted to the candidates' scores (section 4.3)."""
    scores = np.asarray(candidate_scores, dtype=np.float64)
    if scores.size < 3:
        raise ValueError(f"fitting a skew-normal needs at least 3 candidate scores, got {scores.size}")
    shape, loc, scale = stats.skewnorm.fit(scores)
    return max(0.0, float(-stats.skewnorm.logcdf(canary_score, shape, loc, scale)) / math.log(2))


def _score(log_perplexity_fn: LogPerplexity, canary: str, candidates: Sequence[str]) -> np.ndarray:
    if not candidates:
        raise ValueError("exposure needs candidates to rank the canary against")
    scores = np.asarray(log_perplexity_fn([canary, *candidates]), dtype=np.float64)
    if scores.shape != (len(candidates) + 1,):
        raise ValueError(
            f"the scoring function returned shape {scores.shape} for {len(candidates) + 1} texts; "
            "it must return one log-perplexity per text"
        )
    return scores


def exposure(log_perplexity_fn: LogPerplexity, canary: str, candidates: Sequence[str]) -> float:
    """The canary's exposure by its rank among ``candidates`` (texts of the same format, not the canary).

    With a sample of m candidates the result is at most log2(m + 1); with every other secret it is exact.
    """
    scores = _score(log_perplexity_fn, canary, candidates)
    return rank_exposure(float(scores[0]), scores[1:])


def estimated_exposure(log_perplexity_fn: LogPerplexity, canary: str, candidates: Sequence[str]) -> float:
    """The canary's exposure from a skew-normal fit to the candidates' scores, not capped by their count."""
    scores = _score(log_perplexity_fn, canary, candidates)
    return fitted_exposure(float(scores[0]), scores[1:])


@torch.no_grad()
def score_with_model(
    model: nn.Module, tokenizer: Tokenizer, texts: Sequence[str], prefix: str, batch_size: int = 256
) -> np.ndarray:
    """Log-perplexity in bits of what follows ``prefix`` in each text, under a character model.

    Every text must begin with ``prefix`` (after the tokenizer's normalisation); the score is
    −Σ log2 P(character | all characters before it) over the characters after the prefix, so texts that share
    the prefix compare by their secrets alone. Texts must fit the model's context (the GPT refuses longer
    ones). Runs in eval mode and restores the mode after.
    """
    head = tokenizer.encode(prefix)
    if head.size == 0:
        raise ValueError(
            "the prefix must hold at least one character: the first secret character needs context"
        )
    encoded = [tokenizer.encode(t) for t in texts]
    for text, codes in zip(texts, encoded, strict=True):
        if codes.size <= head.size or not np.array_equal(codes[: head.size], head):
            raise ValueError(f"the text {text!r} does not start with the prefix {prefix!r} and a secret")
    was_training = model.training
    model.eval()
    try:
        out = np.empty(len(texts), dtype=np.float64)
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start : start + batch_size]
            width = max(c.size for c in chunk)
            rows = np.full((len(chunk), width), PAD, dtype=np.int64)
            for i, codes in enumerate(chunk):
                rows[i, : codes.size] = codes
            windows = torch.from_numpy(rows)
            inputs = windows[:, :-1].masked_fill(windows[:, :-1] == PAD, 0)
            targets = windows[:, 1:]
            logits, _ = model(inputs)
            scored = targets != PAD
            scored[:, : head.size - 1] = False  # the prefix's own characters are context, not secret
            log_probs = F.log_softmax(logits.float(), dim=-1)
            picked = log_probs.gather(-1, targets.masked_fill(~scored, 0).unsqueeze(-1)).squeeze(-1)
            bits = -(picked * scored).sum(dim=1).double() / math.log(2)
            out[start : start + len(chunk)] = bits.numpy()
        return out
    finally:
        model.train(was_training)
