"""Gradient inversion: what a server that reads one site's update can reconstruct of the text it trained on.

The attack is the optimisation-based family started by Zhu et al. 2019 ("Deep Leakage from Gradients", DLG):
the attacker knows the global weights the site started from, the plan it trained with (batch size, local
steps, learning rate) and the update it sent, and searches for a dummy batch whose update, computed the same
way, matches the observed one. Text is discrete, so the dummy batch is relaxed: each position of each window
holds logits over the vocabulary, and the model reads the softmax-weighted mix of the embeddings (as LAMP,
Balunović et al. 2022, and TAG, Deng et al. 2021, relax text). Since a character model trains on windows
whose targets are the inputs shifted by one, the targets of the dummy batch are the same distributions one
position on: the relaxed window is one tensor, not inputs and labels apart.

- **Matching** (Geiping et al. 2020, "Inverting Gradients"): cosine distance between the observed update and
  the dummy batch's update, which ignores the update's scale (the learning rate, clipping); ``"l2"`` gives
  DLG's squared distance instead.
- **Several local steps**: the dummy update unrolls the site's local SGD (plain SGD on the whole dummy batch,
  as a site whose data is that batch takes its steps), differentiating through every step. For one step this
  is exactly −lr × gradient. A site that trained with Adam or momentum is matched to plain SGD's steps: an
  approximation (cosine matching makes the learning rate's scale irrelevant, not the optimizer's shape).
- **Token shortcut** (as iDLG, Zhao et al. 2020, reads the label from the last layer's gradient): an input
  embedding row changes only when its character is read, so the rows of the update's input embedding that
  are non-zero are the batch's input characters, and the output bias's negative coordinates are (for one
  step) characters among the targets. The search is restricted to their union. This holds for the character
  LSTM, whose embedding and head are separate tensors. It does not apply to the GPT, whose embedding is tied
  to its output head (every row gets the head's gradient), nor to an HF model under LoRA, whose embedding
  does not travel. Under noise a row counts only when its norm clears what the noise alone would give; under
  a sum of sites the rows give the union of all their characters, a weak restriction.
- **Prior** (LAMP): the model's own cross-entropy of the relaxed text, weighted by ``prior``, which favours
  text the model finds likely (useful from a trained checkpoint; an untrained model's prior says little).
- **Sequential search** (:func:`sequential`, ours): a causal model's loss is a mean of one term per
  position, each depending only on the text up to that position, so a one-step update is a known multiple of
  the sum of their gradients; the text is read left to right, each next character the one whose term leaves
  the smallest residual, with a beam. It needs a model that has learnt something: at random weights the
  states carry little of the characters read. Whichever of its result and the relaxation's matches better
  is refined by the discrete steps.
- **Decoding**: after the optimisation each position takes its most likely character, and among the
  restarts the discrete batch whose update matches best wins.

Models are used through their flat trainable vector and :class:`~confide.core.Layout` with
``torch.func.functional_call``, so the same attack serves the character LSTM, the GPT and an HF model with
LoRA adapters (where only the adapters are the update: the base, including the embedding, is known to the
server and is what the relaxed inputs mix). For an HF model the relaxation is over the tokenizer's whole
vocabulary; decoding to the most likely token is the projection to the nearest token.

Scoring (:func:`score`): recovered-token accuracy (positions equal) and ROUGE-L F1 (longest common
subsequence, Lin 2004) against the true windows, reconstructed windows matched to true ones by the best
assignment (Hungarian algorithm). The baseline (:func:`baseline`) guesses each window from the model's own
greedy predictions given its first character, the best an attacker does without the update.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from confide.core import Layout, Vector
from confide.data.tokenize import PAD
from confide.errors import ConfigError

DISTANCES = ("cosine", "l2")


@dataclass(frozen=True)
class Target:
    """What the attacker knows: the global weights, the site's plan, and the update it observed."""

    weights: Vector
    """The global weights the site started from (flat, the model's Layout)."""
    update: Vector
    """The update the server sees: the site's delta, or what the layers made of it (clipped, noised,
    summed)."""
    batch_size: int
    """How many windows the site trained on (the attacker reconstructs that many)."""
    length: int
    """Codes per window (the model reads ``length - 1`` and predicts the next at each)."""
    steps: int = 1
    """Local steps the site took over its windows."""
    learning_rate: float = 0.1
    noise_std: float = 0.0
    """Standard deviation per coordinate of the noise the attacker knows the update carries (0: none); it
    sets the threshold of the token shortcut."""


@dataclass(frozen=True)
class Settings:
    """The attack's knobs."""

    iterations: int = 300
    restarts: int = 2
    step_size: float = 0.1
    """Adam's learning rate on the relaxed windows' logits."""
    distance: str = "cosine"
    prior: float = 0.0
    """Weight of the model's own cross-entropy of the relaxed text (LAMP's language-model prior)."""
    shortcut: bool = True
    """Restrict the search to the characters the update's embedding rows reveal, where the model allows."""
    discrete: int = 300
    """Discrete proposals (token changes, swaps, span moves) tried on each restart's decoded windows."""
    sequential: bool = True
    """Run the sequential search (:func:`sequential`) too and keep whichever candidate matches best."""
    beam: int = 3
    """Prefixes the sequential search keeps at each position (1 for batches of several windows)."""
    sequential_batch: int = 4
    """The largest batch the sequential search is run on (0: none): its cost grows with the windows."""
    candidates: int = 24
    """Next characters the sequential search tries at each position when no shortcut restricts them (the
    model's likeliest)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.distance not in DISTANCES:
            raise ConfigError(f"the inversion distance must be one of {DISTANCES} (got {self.distance!r})")
        if self.beam < 1 or self.candidates < 1 or self.sequential_batch < 0:
            raise ConfigError(
                f"the sequential search needs a beam and candidates of at least 1 and a batch limit of at "
                f"least 0 (got {self.beam}, {self.candidates} and {self.sequential_batch})"
            )
        if self.iterations < 1 or self.restarts < 1 or self.discrete < 0:
            raise ConfigError(
                f"the inversion needs at least 1 iteration and 1 restart, and no fewer than 0 discrete "
                f"proposals (got {self.iterations}, {self.restarts} and {self.discrete})"
            )
        if not self.step_size > 0 or self.prior < 0:
            raise ConfigError(
                f"the inversion's step size must be > 0 and its prior weight >= 0 (got {self.step_size} "
                f"and {self.prior})"
            )


@dataclass(frozen=True)
class Reconstruction:
    windows: np.ndarray
    """(batch, length) int64 codes: the reconstructed windows."""
    distance: float
    """The matching distance of the chosen candidate's update to the observed one."""
    vocabulary: int
    """How many codes the search was restricted to (the whole vocabulary when no shortcut applied)."""


# -- the model, read from relaxed inputs ---------------------------------------------------------------------


def input_embedding(model: nn.Module) -> nn.Embedding:
    """The module that turns codes into vectors: the LSTM's ``embed``, the GPT's ``tok``, an HF model's."""
    lm = getattr(model, "lm", None)
    if lm is not None:
        module = lm.get_input_embeddings()
    else:
        module = getattr(model, "embed", None) or getattr(model, "tok", None)
    if not isinstance(module, nn.Embedding):
        raise ConfigError(f"the inversion does not know where {type(model).__name__} embeds its inputs")
    return module


def vocabulary_size(model: nn.Module) -> int:
    return int(input_embedding(model).num_embeddings)


def _embedding_names(model: nn.Module, layout: Layout) -> tuple[str | None, str | None]:
    """The layout's names of the input embedding and the output bias, where the token shortcut reads them.

    None for the embedding when it does not travel (LoRA) or is tied to the output head (the GPT): then its
    rows change for characters that were never read."""
    embedding = input_embedding(model)
    names = {id(p): n for n, p in model.named_parameters()}
    name = names.get(id(embedding.weight))
    head = getattr(model, "head", None)
    tied = isinstance(head, nn.Linear) and head.weight is embedding.weight
    if name not in layout.names or tied:
        return None, None
    bias = getattr(head, "bias", None) if isinstance(head, nn.Linear) else None
    bias_name = names.get(id(bias)) if bias is not None else None
    return name, bias_name if bias_name in layout.names else None


def token_set(model: nn.Module, layout: Layout, target: Target) -> np.ndarray | None:
    """The codes the update shows the batch holds (sorted), or None where the shortcut does not apply.

    Without noise the embedding rows that moved are exactly the characters read; with noise of std s a row
    of d values counts when its norm exceeds s·(sqrt(d) + 4), which noise alone rarely reaches."""
    embedding, bias = _embedding_names(model, layout)
    if embedding is None:
        return None
    tensors = layout.unflatten(np.ascontiguousarray(target.update, dtype=np.float32))
    rows = tensors[embedding].double()
    d = rows.shape[1]
    threshold = target.noise_std * (math.sqrt(d) + 4.0) if target.noise_std > 0 else 0.0
    read = rows.norm(dim=1) > threshold
    found = set(np.flatnonzero(read.numpy()).tolist())
    if bias is not None and target.steps == 1 and target.noise_std == 0:
        # One step: the bias moves by -lr * mean(p - onehot(target)), so it rises where targets lie.
        found |= set(np.flatnonzero(tensors[bias].numpy() > 0).tolist())
    if not found:
        return None
    return np.array(sorted(found), dtype=np.int64)


class _Relaxed:
    """Runs the model on relaxed windows: (batch, length, vocab) distributions instead of codes."""

    def __init__(self, model: nn.Module, layout: Layout, weights: Vector) -> None:
        self.model = model
        self.layout = layout
        self.embedding = input_embedding(model)
        self.hf = hasattr(model, "lm")
        device = self.embedding.weight.device
        self.device = device
        self.start = {
            name: tensor.clone().to(device)
            for name, tensor in layout.unflatten(np.ascontiguousarray(weights, dtype=np.float32)).items()
        }
        self._mix: Tensor | None = None
        self.handle = self.embedding.register_forward_hook(self._hook)

    def close(self) -> None:
        self.handle.remove()

    def _hook(self, module: nn.Module, args: Any, output: Tensor) -> Tensor | None:
        if self._mix is None:
            return None
        # Inside functional_call module.weight is the parameter being differentiated (or the frozen base).
        weight = cast(Tensor, module.weight)
        return (self._mix.to(weight.dtype) @ weight).to(output.dtype)

    def loss(self, params: dict[str, Tensor], soft: Tensor) -> Tensor:
        """Mean cross-entropy of the model (at ``params``) on the relaxed windows ``soft`` (B, L, V)."""
        inputs, targets = soft[:, :-1], soft[:, 1:]
        self._mix = inputs
        try:
            codes = torch.zeros(inputs.shape[:2], dtype=torch.long, device=self.device)
            logits, _ = functional_call(self.model, params, (codes,))
        finally:
            self._mix = None
        logits = logits.float()[..., : soft.size(-1)]
        return -(targets * F.log_softmax(logits, dim=-1)).sum(-1).mean()

    def update(
        self, soft: Tensor, steps: int, learning_rate: float, differentiable: bool = True
    ) -> tuple[Tensor, Tensor]:
        """The flat update ``steps`` of plain SGD on ``soft`` give from the start weights (differentiable in
        ``soft`` when asked), and the loss at the start (the prior's term)."""
        params = {n: t.detach().requires_grad_(True) for n, t in self.start.items()}
        names = list(params)
        first = None
        current = params
        for _ in range(steps):
            loss = self.loss(current, soft)
            if first is None:
                first = loss
            grads = torch.autograd.grad(
                loss, [current[n] for n in names], create_graph=differentiable, allow_unused=True
            )
            current = {
                n: current[n] - learning_rate * (g if g is not None else torch.zeros_like(current[n]))
                for n, g in zip(names, grads, strict=True)
            }
            if not differentiable:
                current = {n: t.detach().requires_grad_(True) for n, t in current.items()}
        delta = torch.cat([(current[n] - self.start[n]).reshape(-1) for n in names])
        assert first is not None
        return delta, first


def _distance(kind: str, estimate: Tensor, observed: Tensor) -> Tensor:
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(estimate, observed, dim=0, eps=1e-12)
    return ((estimate - observed) ** 2).sum() / observed.pow(2).sum().clamp(min=1e-30)


def invert(model: nn.Module, target: Target, settings: Settings = Settings()) -> Reconstruction:
    """Reconstruct the ``target.batch_size`` windows behind ``target.update`` (see the module's text)."""
    layout = Layout.of_module(model)
    layout.check(np.ascontiguousarray(target.update, dtype=np.float32), "observed update")
    if target.batch_size < 1 or target.length < 2 or target.steps < 1:
        raise ConfigError(
            f"the inversion needs a batch of at least 1 window of at least 2 codes and 1 step (got batch "
            f"{target.batch_size}, length {target.length}, steps {target.steps})"
        )
    vocab = vocabulary_size(model)
    allowed = token_set(model, layout, target) if settings.shortcut else None
    mask = torch.full((vocab,), -math.inf)
    if allowed is None:
        mask.zero_()
    else:
        mask[torch.from_numpy(allowed)] = 0.0
    was_training = model.training
    model.eval()
    relaxed = _Relaxed(model, layout, target.weights)
    device = relaxed.device
    mask = mask.to(device)
    observed = torch.from_numpy(np.ascontiguousarray(target.update, dtype=np.float32)).to(device)
    generator = torch.Generator().manual_seed(settings.seed)
    best: tuple[float, np.ndarray] | None = None
    found = None
    if settings.sequential and target.batch_size <= settings.sequential_batch:
        found = torch.from_numpy(sequential(model, target, allowed, settings)).to(device)
    shape = (target.batch_size, target.length, vocab)
    # The fused attention kernels have no second derivative: the attack differentiates the gradient.
    math_attention = sdpa_kernel(SDPBackend.MATH)
    math_attention.__enter__()
    try:
        for _ in range(settings.restarts):
            logits = torch.randn(shape, generator=generator).to(device).requires_grad_(True)
            optimizer = torch.optim.Adam([logits], lr=settings.step_size)
            for _ in range(settings.iterations):
                soft = F.softmax(logits + mask, dim=-1)
                estimate, start_loss = relaxed.update(soft, target.steps, target.learning_rate)
                objective = _distance(settings.distance, estimate, observed)
                if settings.prior > 0:
                    objective = objective + settings.prior * start_loss
                optimizer.zero_grad()
                objective.backward()
                optimizer.step()
            codes = (logits.detach() + mask).argmax(-1)
            choices = torch.flatten(torch.nonzero(mask == 0)).cpu()

            def measure(candidate: Tensor) -> float:
                hard = F.one_hot(candidate, vocab).float()
                estimate, start_loss = relaxed.update(hard, target.steps, target.learning_rate, False)
                value = _distance(settings.distance, estimate.detach(), observed)
                return float(value + settings.prior * start_loss.detach())

            if settings.sequential and found is not None and measure(found) < measure(codes):
                codes = found.clone()  # refine the better start: the sequential search's or the relaxation's
            codes, distance = _refine(codes, choices, measure, settings.discrete, generator)
            if best is None or distance < best[0]:
                best = (distance, codes.cpu().numpy().astype(np.int64))
    finally:
        math_attention.__exit__(None, None, None)
        relaxed.close()
        model.train(was_training)
    assert best is not None
    return Reconstruction(best[1], best[0], vocab if allowed is None else int(allowed.size))


def sequential(
    model: nn.Module, target: Target, allowed: np.ndarray | None, settings: Settings = Settings()
) -> np.ndarray:
    """Reconstruct the windows left to right, each next character the one that best explains what remains.

    A causal model's loss on a window is a mean of one term per position, and the term of position t depends
    only on the window's codes up to t + 1. So one SGD step's update, −lr/(B·T) × the sum of those terms'
    gradients, can be peeled: once a prefix is known, the gradient of each possible next term is computed
    (the gradient of log-sum-exp of the logits minus that of the candidate's logit: one backward pass each),
    and the candidate that leaves the smallest residual ‖G − Σ terms‖ is kept, with a beam of
    ``settings.beam`` prefixes. The terms of different positions are nearly orthogonal in a model's many
    parameters, so a wrong character leaves a residual that a right one would have removed. Windows of a
    batch are peeled one after another from the one residual. Exact for one step of plain SGD; for several
    steps the update is read as ``steps`` steps at the start weights (an approximation), and noise or a sum
    of other sites' updates stays in the residual, where it misleads the choice.
    """
    layout = Layout.of_module(model)
    was_training = model.training
    saved = layout.read(model).copy()
    layout.write(model, np.ascontiguousarray(target.weights, dtype=np.float32))
    model.eval()
    named = dict(model.named_parameters())
    params = [named[name] for name in layout.names]
    vocab = vocabulary_size(model)
    device = input_embedding(model).weight.device
    hf = hasattr(model, "lm")
    scale = target.batch_size * (target.length - 1) / (target.learning_rate * target.steps)
    residual = -torch.from_numpy(np.ascontiguousarray(target.update, dtype=np.float32)).to(device).double()
    residual *= scale

    def flat(grads: Sequence[Tensor | None]) -> Tensor:
        return torch.cat(
            [
                (g if g is not None else torch.zeros_like(p)).reshape(-1)
                for g, p in zip(grads, params, strict=True)
            ]
        ).double()

    def terms(prefix: list[int]) -> tuple[list[int], Tensor]:
        """The candidates for the code after ``prefix`` and each one's term gradient (rows)."""
        logits, _ = model(torch.tensor([prefix], dtype=torch.long, device=device))
        last = logits[0, -1].float()[:vocab]
        if allowed is not None:
            options = [int(c) for c in allowed if hf or c != PAD]
        else:
            likely = last.detach().clone()
            if not hf and vocab > PAD:
                likely[PAD] = -math.inf  # never a target: padding is left out of the loss
            options = torch.topk(likely, min(settings.candidates, vocab - (0 if hf else 1))).indices.tolist()
        lse = torch.logsumexp(last, 0)
        base = flat(torch.autograd.grad(lse, params, retain_graph=True, allow_unused=True))
        rows = [
            base - flat(torch.autograd.grad(last[c], params, retain_graph=True, allow_unused=True))
            for c in options
        ]
        return options, torch.stack(rows)

    windows = []
    try:
        firsts = [int(c) for c in allowed] if allowed is not None else list(range(vocab))
        if not hf:
            firsts = [c for c in firsts if c != PAD]
        width = settings.beam if target.batch_size == 1 else 1
        for _ in range(target.batch_size):
            # A beam of (prefix, residual norm², residual); the first code has no term of its own.
            beam: list[tuple[list[int], float, Tensor]] = [
                ([c], float(residual.dot(residual)), residual) for c in firsts
            ]
            for _ in range(target.length - 1):
                grown: list[tuple[list[int], float, Tensor]] = []
                for prefix, _, left in beam:
                    options, rows = terms(prefix)
                    after = left.unsqueeze(0) - rows
                    norms = (after * after).sum(1)
                    for k in torch.topk(-norms, min(width, len(options))).indices.tolist():
                        grown.append(([*prefix, options[k]], float(norms[k]), after[k]))
                grown.sort(key=lambda item: item[1])
                beam = grown[:width]
            prefix, _, residual = beam[0]
            windows.append(prefix)
    finally:
        layout.write(model, saved)
        model.train(was_training)
    return np.array(windows, dtype=np.int64)


def _refine(
    codes: Tensor, choices: Tensor, measure: Any, proposals: int, generator: torch.Generator
) -> tuple[Tensor, float]:
    """Discrete local search on decoded windows (LAMP's discrete steps): propose a change, keep it when the
    update it gives matches better. The changes: put another allowed code at one position, swap two
    positions, or move a span of a window elsewhere in it (the relaxation finds the characters more easily
    than their order)."""
    best = measure(codes)
    batch, length = codes.shape

    def draw(high: int) -> int:
        return int(torch.randint(high, (1,), generator=generator))

    for _ in range(proposals):
        candidate = codes.clone()
        row = draw(batch)
        kind = draw(3)
        if kind == 0:
            candidate[row, draw(length)] = choices[draw(len(choices))]
        elif kind == 1:
            i, j = draw(length), draw(length)
            candidate[row, i], candidate[row, j] = codes[row, j], codes[row, i]
        else:
            i, j = sorted((draw(length), draw(length) + 1))
            span = codes[row, i:j]
            rest = torch.cat([codes[row, :i], codes[row, j:]])
            at = draw(len(rest) + 1)
            candidate[row] = torch.cat([rest[:at], span, rest[at:]])
        if torch.equal(candidate, codes):
            continue
        value = measure(candidate)
        if value < best:
            codes, best = candidate, value
    return codes, best


# -- the baseline --------------------------------------------------------------------------------------------


@torch.no_grad()
def baseline(model: nn.Module, layout: Layout, weights: Vector, first: np.ndarray, length: int) -> np.ndarray:
    """Each window guessed from the model alone: its greedy continuation of the window's first code.

    ``first`` holds the first code of each window (given to the baseline for free); returns (len(first),
    length) codes. What an attacker who never saw the update guesses from the model the server holds."""
    was_training = model.training
    layout.write(model, np.ascontiguousarray(weights, dtype=np.float32))
    model.eval()
    try:
        codes = torch.as_tensor(np.asarray(first, dtype=np.int64).reshape(-1, 1))
        device = input_embedding(model).weight.device
        codes = codes.to(device)
        while codes.size(1) < length:
            logits, _ = model(codes)
            logits = logits[:, -1, :].float()
            if not hasattr(model, "lm") and logits.size(-1) > PAD:
                logits[:, PAD] = -math.inf
            codes = torch.cat([codes, logits.argmax(-1, keepdim=True)], dim=1)
        return codes.cpu().numpy().astype(np.int64)
    finally:
        model.train(was_training)


# -- scoring -------------------------------------------------------------------------------------------------


def lcs_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common subsequence of ``a`` and ``b`` (dynamic programming, O(len a · len b))."""
    if not len(a) or not len(b):
        return 0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(reference: Sequence[int], candidate: Sequence[int]) -> float:
    """ROUGE-L F1 (Lin 2004): the harmonic mean of LCS / len(candidate) and LCS / len(reference)."""
    lcs = lcs_length(reference, candidate)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(candidate), lcs / len(reference)
    return 2 * precision * recall / (precision + recall)


def _real(window: np.ndarray) -> np.ndarray:
    """A true window without its PAD tail (the positions that hold text)."""
    window = np.asarray(window)
    return window[window != PAD] if window.ndim == 1 else window


@dataclass(frozen=True)
class Score:
    token_accuracy: float
    """Positions of the true windows whose code the matched reconstruction has, over all positions."""
    rouge_l: float
    """Mean ROUGE-L F1 of each true window against its matched reconstruction."""
    order: tuple[int, ...]
    """order[i]: the reconstructed window matched to true window i."""


def score(truth: np.ndarray, guess: np.ndarray) -> Score:
    """Token accuracy and ROUGE-L of ``guess`` (B, L) against ``truth`` (B, L), windows matched by the
    assignment that maximises the positions equal (order does not matter in a batch)."""
    truth, guess = np.asarray(truth), np.asarray(guess)
    if truth.ndim != 2 or guess.shape != truth.shape:
        raise ValueError(f"truth and guess must both be (batch, length), got {truth.shape} and {guess.shape}")
    real = truth != PAD
    hits = ((truth[:, None, :] == guess[None, :, :]) & real[:, None, :]).sum(-1)
    rows, cols = linear_sum_assignment(-hits)
    order = np.empty(len(truth), dtype=np.int64)
    order[rows] = cols
    total = max(int(real.sum()), 1)
    accuracy = float(hits[rows, cols].sum()) / total
    rouge = float(np.mean([rouge_l(_real(truth[i]).tolist(), guess[order[i]].tolist()) for i in rows]))
    return Score(accuracy, rouge, tuple(int(i) for i in order))
