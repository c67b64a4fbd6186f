"""The gradient-inversion audit: what the server could read of a site's text from what it sees of its update.

``confide audit inversion CONFIG`` builds the config's model and global weights, picks a victim site with the
audit's public seeded stream, takes a batch of its training windows, and computes the server's view of the
victim's update in each scenario, with confide's own training and privacy code:

- ``none``: the site's delta as :func:`~confide.client.site.run_task` returns it;
- ``dpsgd``: the delta trained with record-level DP-SGD (:class:`~confide.client.dpsgd.DPSGD`) at the
  config's ``record_clip`` and ``record_noise``;
- ``distributed-share``: with site-level DP, the delta clipped to C plus the site's own share of the noise,
  N(0, (zC)² / m) (:class:`~confide.privacy.dp.DistributedNoiseLayer`): what a server that could unmask one
  site would see. Under central DP the server reads the clipped update before it adds any noise, so the
  share is none;
- ``secagg``: the sum of the round's expected number of sites' updates (the others train on batches of
  their own from the same weights), clipped when DP is configured: what secure aggregation gives the server;
- ``secagg+dp``: that sum plus the full noise N(0, (zC)²), z as :func:`~confide.runtime.stack.build_site_dp`
  calibrates it.

The victim's batch is ``b`` of its full training windows (no padded tail), and with ``k`` local steps it
takes ``k`` full-batch steps over those same windows (``k`` epochs of one batch): the windows to recover stay
the same as the steps grow, as in Geiping et al.'s multi-step experiments. A site of a real run takes its
steps over different batches (the demo: up to 20 steps of 10 windows), which only spreads the update over
more text. The other sites of the sum train the same plan on ``b`` windows of their own.

Every view is attacked with :func:`confide.audit.inversion.invert` and scored against the victim's true
windows beside the baseline of guessing from the model's own predictions. This is a simulation of an attack:
its noise and DP-SGD sampling are drawn from seeded randomness (``SIMULATED_NOISE``), which a real site
never does. The results go to ``inversion.json``, the store and the page of the config's audit folder.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np
from torch import nn

from confide.audit.inversion import Settings, Target, baseline, invert, score
from confide.client.dpsgd import DPSGD
from confide.client.site import run_task
from confide.client.trainer import ClientOptimizer, Trainer
from confide.config import Config
from confide.core import Layout, Plan, Update, Vector
from confide.data import DEFAULT_TOKENIZER
from confide.data.dataset import SiteData
from confide.data.tokenize import PAD
from confide.errors import ConfigError
from confide.privacy.dp import clip
from confide.randomness import SeededRandomness, Stream, public_rng
from confide.runtime.audit import audit_store, finish_audit
from confide.runtime.runner import load_dataset
from confide.runtime.stack import build_model_for, build_site_dp, build_strategy, resolve_record_dp

SCENARIOS = ("none", "dpsgd", "distributed-share", "secagg", "secagg+dp")
SIMULATED_NOISE = "seeded (a simulation of the attack; a real site's noise is secret)"
EXAMPLES = 2
"""Windows per cell kept as examples (true, reconstructed, baseline text) for the page."""

DEFAULT_SETTINGS = Settings(iterations=40, restarts=1, discrete=100)
"""The audit's default attack: about a minute per cell of the demo's model on a 2-core CPU."""

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class InversionExample:
    true: str
    reconstructed: str
    baseline: str


@dataclass(frozen=True)
class InversionCell:
    scenario: str
    batch_size: int
    steps: int
    token_accuracy: float
    rouge_l: float
    baseline_token_accuracy: float
    baseline_rouge_l: float
    words: float
    """Share of the true windows' words (runs of two or more letters, counted with repeats) that appear in
    the reconstruction, in any order: what a reader of the reconstruction learns, where the positions of the
    token accuracy are strict."""
    baseline_words: float
    vocabulary: int
    """Codes the search was restricted to by the token shortcut (the whole vocabulary when none applied)."""
    distance: float
    """How well the reconstruction's update matches the observed one (cosine distance: 0 matches exactly)."""
    seconds: float
    examples: list[InversionExample] = field(default_factory=list)


@dataclass(frozen=True)
class InversionAudit:
    model: str
    victim: str
    window: int
    """Codes per window (the model reads all but the last)."""
    learning_rate: float
    sites_summed: int
    """Sites in the secure-aggregation sum (the config's expected sites per round)."""
    clip_norm: float | None
    noise_multiplier: float | None
    """z of site-level DP (the full noise of a round is N(0, (zC)²)); None without site-level DP."""
    noise_share_sites: int | None
    record_clip: float
    record_noise: float
    noise: str
    settings: dict[str, float | int | str | bool]
    cells: list[InversionCell]


def word_recall(truth: Sequence[str], guess: Sequence[str]) -> float:
    """Share of the words of ``truth`` (runs of two or more letters, with repeats) found in ``guess``."""
    wanted = Counter(w.lower() for text in truth for w in re.findall(r"[A-Za-z']{2,}", text))
    found = Counter(w.lower() for text in guess for w in re.findall(r"[A-Za-z']{2,}", text))
    total = sum(wanted.values())
    return sum((wanted & found).values()) / total if total else 0.0


def _full(windows: np.ndarray) -> np.ndarray:
    """Which windows hold text at every position (no padded tail): the ones a batch is drawn from."""
    if windows.ndim == 3:
        # A language model's rows: ids (-1 after the end) and labels (-100 where there is no loss: the prompt
        # of an instruction). A row is full when it has no padding; the attack models a loss at every
        # position, which for an instruction's prompt is an approximation (the site has none there).
        return np.asarray((windows[:, 0, :] >= 0).all(1))
    return np.asarray((windows != PAD).all(1))


def _codes(windows: np.ndarray) -> np.ndarray:
    return (windows[:, 0, :] if windows.ndim == 3 else windows).astype(np.int64)


def _text(model: nn.Module, codes: np.ndarray) -> str:
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        return str(tokenizer.decode([int(c) for c in codes]))
    return DEFAULT_TOKENIZER.decode(np.asarray(codes, dtype=np.uint8))


def audit_inversion(
    config: Config,
    batch_sizes: Sequence[int] = (1, 4, 16),
    steps: Sequence[int] = (1, 4),
    scenarios: Sequence[str] | None = None,
    weights: Vector | None = None,
    settings: Settings = DEFAULT_SETTINGS,
    sites_summed: int | None = None,
    progress: Progress | None = None,
    write: bool = True,
) -> InversionAudit:
    """Mount the inversion on each view of a victim's update, for each batch size and number of local steps.

    ``weights``: the global weights to attack at (a checkpoint's); the config's initial weights when None.
    ``scenarios``: a subset of :data:`SCENARIOS` (all that the config allows when None). ``sites_summed``:
    sites in the secure-aggregation sum (the config's expected sites per round when None). ``progress`` is
    called with (cells done, cells in all, the next cell's label). Writes ``inversion.json`` to the config's
    audit folder unless ``write`` is false.
    """
    dp_configured = config.privacy.dp != "none"
    wanted = (
        list(scenarios)
        if scenarios is not None
        else [s for s in SCENARIOS if dp_configured or s not in ("distributed-share", "secagg+dp")]
    )
    unknown = [s for s in wanted if s not in SCENARIOS]
    if unknown or not wanted:
        raise ConfigError(
            f"unknown inversion scenario(s) {', '.join(map(repr, unknown)) or '(none given)'}: choose among "
            f"{', '.join(SCENARIOS)}"
        )
    if not dp_configured and {"distributed-share", "secagg+dp"} & set(wanted):
        raise ConfigError(
            "the scenarios 'distributed-share' and 'secagg+dp' need site-level DP: set privacy.dp = "
            "'distributed' (or 'central') with its noise settings, or leave those scenarios out"
        )
    if "dpsgd" in wanted and config.model["kind"] == "hf":
        raise ConfigError("record-level DP-SGD is not available for model.kind = 'hf': leave out 'dpsgd'")
    if not batch_sizes or not steps or min(batch_sizes) < 1 or min(steps) < 1:
        raise ConfigError(
            f"the inversion needs batch sizes and local steps of at least 1 (got {list(batch_sizes)} and "
            f"{list(steps)})"
        )

    dataset = load_dataset(config)
    population = len(dataset.sites)
    # DP-SGD's noise as the run would use it (privacy.record_target_epsilon calibrates it to the sites).
    config = resolve_record_dp(config, [s.num_train for s in dataset.sites])
    summed = sites_summed if sites_summed is not None else build_strategy(config).count(population)
    if ("secagg" in wanted or "secagg+dp" in wanted) and not 2 <= summed <= population:
        raise ConfigError(
            f"the secure-aggregation sum needs 2 to {population} sites (the data set's), got {summed}"
        )
    largest = max(batch_sizes)
    rng = public_rng(config.run.seed, 0, Stream.AUDIT)
    eligible = [s for s in dataset.sites if int(_full(s.train).sum()) >= largest]
    if not eligible:
        raise ConfigError(
            f"no site has {largest} full training windows for the largest batch size: use smaller batch sizes"
        )
    victim = eligible[int(rng.integers(len(eligible)))]

    model = build_model_for(config, DEFAULT_TOKENIZER.vocab_size)
    layout = Layout.of_module(model)
    start = np.ascontiguousarray(layout.read(model).copy() if weights is None else weights, dtype=np.float32)
    layout.check(start, "weights")
    c, p = config.client, config.privacy
    optimizer = ClientOptimizer(c.optimizer, c.momentum, c.weight_decay)
    trainer = Trainer(model, optimizer)
    dp = build_site_dp(config, population) if dp_configured else None
    clip_norm = dp.clip_norm if dp is not None else None
    full_std = dp.update_noise * dp.clip_norm if dp is not None else 0.0
    share = dp.noise_share if dp is not None and dp.placement == "distributed" else None
    others = [s for s in dataset.sites if s.name != victim.name]
    chosen = [others[i] for i in rng.choice(len(others), min(summed, population) - 1, replace=False)]

    cells: list[InversionCell] = []
    total = len(batch_sizes) * len(steps) * len(wanted)
    for b in batch_sizes:
        full = np.flatnonzero(_full(victim.train))
        batch = victim.train[np.sort(rng.choice(full, b, replace=False))]
        truth = _codes(batch)
        length = truth.shape[1]
        guess = baseline(model, layout, start, truth[:, 0], length)
        base = score(truth, guess)
        true_text = [_text(model, window) for window in truth]  # the batch's, the same for every view
        baseline_words = word_recall(true_text, [_text(model, window) for window in guess])
        for k in steps:
            plan = Plan(round=0, epochs=k, max_steps=k, batch_size=b, learning_rate=c.learning_rate, seed=k)
            delta = _delta(run_task(trainer, victim.name, batch, start, plan, 0))
            views: dict[str, tuple[Vector, float]] = {}
            noise_rng = SeededRandomness([config.run.seed, b, k, int(Stream.AUDIT)])
            if "none" in wanted:
                views["none"] = (delta.copy(), 0.0)
            if "dpsgd" in wanted:
                dpsgd = DPSGD(model, p.record_clip, p.record_noise, optimizer)
                private = replace(plan, record_clip=p.record_clip, record_noise=p.record_noise)
                update = run_task(
                    trainer, victim.name, batch, start, private, 0, dpsgd=dpsgd, randomness=noise_rng
                )
                # Each step adds N(0, (sigma C)^2) to the sum of b clipped gradients, divided by b.
                std = c.learning_rate * p.record_noise * p.record_clip / b * math.sqrt(k)
                views["dpsgd"] = (_delta(update), std)
            clipped = clip(delta.copy(), clip_norm)[0] if clip_norm is not None else delta.copy()
            if "distributed-share" in wanted:
                std = share.std() if share is not None else 0.0
                noisy = clipped + noise_rng.normal(clipped.size, std) if std > 0 else clipped.copy()
                views["distributed-share"] = (noisy.astype(np.float32), std)
            if "secagg" in wanted or "secagg+dp" in wanted:
                total_update = clipped.copy()
                for other in chosen:
                    windows = _other_batch(other, b, rng)
                    vector = _delta(run_task(trainer, other.name, windows, start, plan, 0))
                    total_update += clip(vector, clip_norm)[0] if clip_norm is not None else vector
                if "secagg" in wanted:
                    views["secagg"] = (total_update.copy(), 0.0)
                if "secagg+dp" in wanted:
                    noisy = total_update + noise_rng.normal(total_update.size, full_std)
                    views["secagg+dp"] = (noisy.astype(np.float32), full_std)
            for scenario in wanted:
                if progress is not None:
                    progress(len(cells), total, f"{scenario}, batch {b}, {k} step{'s' if k > 1 else ''}")
                observed, std = views[scenario]
                began = time.perf_counter()
                target = Target(start, observed, b, length, k, c.learning_rate, std)
                found = invert(model, target, replace(settings, seed=settings.seed + b * 1000 + k))
                result = score(truth, found.windows)
                words = word_recall(true_text, [_text(model, window) for window in found.windows])
                examples = [
                    InversionExample(
                        _text(model, truth[i]),
                        _text(model, found.windows[result.order[i]]),
                        _text(model, guess[base.order[i]]),
                    )
                    for i in range(min(EXAMPLES, b))
                ]
                cells.append(
                    InversionCell(
                        scenario,
                        b,
                        k,
                        result.token_accuracy,
                        result.rouge_l,
                        base.token_accuracy,
                        base.rouge_l,
                        words,
                        baseline_words,
                        found.vocabulary,
                        found.distance,
                        time.perf_counter() - began,
                        examples,
                    )
                )
    if progress is not None:
        progress(total, total, "done")
    audit = InversionAudit(
        model=str(config.model["kind"]),
        victim=victim.name,
        window=int(victim.train.shape[-1]),
        learning_rate=c.learning_rate,
        sites_summed=summed,
        clip_norm=clip_norm,
        noise_multiplier=dp.update_noise if dp is not None else None,
        noise_share_sites=share.num_sites if share is not None else None,
        record_clip=p.record_clip,
        record_noise=p.record_noise,
        noise=SIMULATED_NOISE,
        settings=asdict(settings),
        cells=cells,
    )
    if write:
        audit_store(config).close()
        finish_audit(config, "inversion", asdict(audit))
    return audit


def _delta(update: Update) -> Vector:
    if update.vector is None:  # run_task always returns the delta; only layers replace it
        raise ValueError(f"site {update.site!r} returned no update vector")
    return update.vector


def _other_batch(site: SiteData, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` of another site's training windows (with repeats when it has fewer)."""
    windows = site.train
    return windows[rng.choice(len(windows), size, replace=len(windows) < size)]
