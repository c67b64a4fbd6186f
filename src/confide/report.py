"""One self-contained HTML page that tells how a run went: ``RUN_DIR/report.html``.

The page is meant to be mailed, attached to a ticket or opened from an air-gapped site, so it carries
everything inside itself: plots as base64 PNG, inline CSS, no scripts, no fonts or images fetched from
anywhere. It reads only the run store, never the model: the caller (``confide run`` or ``confide report``)
generates the sample passages and hands them in, so this module stays free of torch and quick to import.
Matplotlib is imported only when a page is drawn, and only through ``Figure`` + ``FigureCanvasAgg``, so the
report never touches pyplot's global state (a caller may well have pyplot open in a notebook).

Everything that comes out of the store (names, messages, the config text) goes through ``html.escape``:
site names and event messages are free text and the page must not be something they can inject into.

One file for one page: its sections, plots and stylesheet are read together, hence the length.

Over ~400 lines because each plot is a function of its own beside the page that holds them.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from confide import config as config_module
from confide.errors import ConfigError
from confide.runtime.auditpage import audit_page_for
from confide.runtime.store import Store
from confide.server.reputation import outcomes, reputations

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

REPORT_NAME = "report.html"

# One colour per quantity, the same in every plot, so a reader learns them once.
_POOLED = "#1f77b4"
_TRAIN = "#ff7f0e"
_SITE_MEAN = "#2ca02c"
_WORST = "#d62728"
_BASELINE = "#7f7f7f"

# Few points get markers (a single evaluated round would otherwise draw an invisible zero-length line).
_MARKERS_UP_TO = 40


def write_report(run_dir: Path, samples: Sequence[tuple[str, str]] = ()) -> Path:
    """Write ``run_dir/report.html`` from the run store and return its path.

    ``samples`` are ``(prompt, continuation)`` pairs: the prompt is shown in bold, followed by the text the
    model wrote after it. The file is written under a temporary name and renamed, so a reader (or a browser
    refreshing the page while a run is still going) never sees half a report.
    """
    run_dir = Path(run_dir)
    store = Store.open(run_dir)
    try:
        page = _render(run_dir, store, samples)
    finally:
        store.close()
    path = run_dir / REPORT_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path


# -- the page ----------------------------------------------------------------------------------------------


def _render(run_dir: Path, store: Store, samples: Sequence[tuple[str, str]]) -> str:
    name = run_dir.resolve().name
    config_text = _read_text(run_dir / "config.toml")
    config = _stored_config(run_dir)
    evaluations = store.evaluations()
    rounds = store.rounds()
    last_round, last = evaluations[-1] if evaluations else (None, {})
    per_site = store.site_metrics(last_round) if last_round is not None else []
    personal = store.site_metrics(last_round, personal=True) if last_round is not None else []

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>confide run {_e(name)}</title>",
        f"<style>{_CSS}</style>",
        "</head><body>",
        f"<h1>confide run <code>{_e(name)}</code></h1>",
        _header(store, rounds, None if config is None else config.run.rounds),
        _audits(run_dir),
        _final_metrics(rounds, evaluations, last_round, last),
        "<h2>Training curves</h2>",
        _plots(
            evaluations,
            rounds,
            per_site,
            last_round,
            personal,
            store.ledger(),
            0.0 if config is None else config.privacy.target_epsilon,
        ),
        _samples(samples),
        _config(config_text),
        _defences(store, 0.8 if config is None else config.defence.reputation_decay),
        _events(store.events()),
        f"<footer>Written {_e(_when(time.time()))} by confide from {_e(str(run_dir.resolve()))}.</footer>",
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p) + "\n"


def _audits(run_dir: Path) -> str:
    """A link to the privacy audits of this run's config (``confide audit ...``), when they have been run."""
    page = audit_page_for(run_dir)
    if page is None:
        return ""
    link = os.path.relpath(page, run_dir.resolve())
    return (
        f"<p>Privacy audits of this config (canaries, gradient inversion, membership inference): "
        f'<a href="{_e(link)}">{_e(link)}</a></p>'
    )


def _header(store: Store, rounds: list[dict[str, Any]], planned: int | None) -> str:
    """Where the run stands: status, progress against the configured rounds (``planned``, None when the
    stored config cannot be read), the data it runs on."""
    status = store.meta("status") or "unknown"
    done = max((int(r["round"]) for r in rounds), default=0)
    progress = f"{done} of {planned}" if planned is not None else str(done)
    num_sites = int(store.db.execute("SELECT COUNT(*) FROM sites").fetchone()[0])
    checkpoint = store.db.execute("SELECT MAX(round) FROM checkpoints").fetchone()[0]
    created = store.meta("created")
    rows = [
        ("Status", f'<span class="status status-{_e(status)}">{_e(status)}</span>'),
        ("Rounds done", _e(progress)),
        ("Sites in the data set", _e(f"{num_sites:,}")),
        ("Last checkpoint", "none yet" if checkpoint is None else _e(f"round {int(checkpoint)}")),
    ]
    if created is not None:
        try:
            rows.append(("Started", _e(_when(float(created)))))
        except ValueError:
            rows.append(("Started", _e(created)))
    cells = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="facts">{cells}</table>'


def _final_metrics(
    rounds: list[dict[str, Any]],
    evaluations: list[tuple[int, dict[str, Any]]],
    last_round: int | None,
    last: Mapping[str, Any],
) -> str:
    """The headline numbers of the last evaluation, plus what the whole run cost so far."""
    sent, received, seconds = _totals(rounds, evaluations)
    if last_round is None:
        heading = "<h2>Final metrics</h2>"
    else:
        heading = f"<h2>Final metrics <small>(evaluated at round {last_round})</small></h2>"
    rows = [
        ("Accuracy (pooled over all held-out characters)", _num(last.get("accuracy"))),
        ("Loss (pooled, nats per character)", _num(last.get("loss"))),
        ("Perplexity (pooled)", _num(last.get("perplexity"), 2)),
        ("Worst-decile site accuracy (10th percentile over sites)", _num(last.get("site_accuracy_p10"))),
        (
            "Unigram baseline accuracy (always the most frequent character)",
            _num(last.get("unigram_accuracy")),
        ),
        ("Sites evaluated", _count(last.get("eval_sites"))),
    ]
    if "epsilon" in last:
        rows += [
            (
                "Site-level epsilon the budget holds (from the privacy ledger)",
                _e(f"{last['epsilon']:.3f} at delta {last['delta']:.1e}"),
            ),
            (
                "Worst site, against a server that knows who took part",
                _num(last.get("epsilon_worst_site")),
            ),
            ("Median site, against the same server", _num(last.get("epsilon_median_site"))),
            (
                "Amplified by sampling, against anyone who cannot know who took part",
                _num(last.get("epsilon_amplified")),
            ),
            (
                "Noise multiplier and clip norm",
                _e(f"{last['noise_multiplier']:.4g}, {last['clip_norm']:.3g}"),
            ),
        ]
    if "record_epsilon_max" in last:
        rows += [
            ("Record-level epsilon (DP-SGD), worst site", _num(last.get("record_epsilon_max"))),
            ("Record-level epsilon (DP-SGD), median site", _num(last.get("record_epsilon_median"))),
            ("Sites that trained with DP-SGD so far", _count(last.get("record_dp_sites"))),
        ]
    if "personal_accuracy" in last:
        rows += [
            ("Personalized accuracy (each site's own model, pooled)", _num(last.get("personal_accuracy"))),
            ("Personalized worst-decile site accuracy", _num(last.get("personal_site_accuracy_p10"))),
            ("Sites holding a personal model", _count(last.get("personalized_sites"))),
        ]
    if "attackers" in last:
        rows.append(("Simulated attacking sites", _count(last.get("attackers"))))
    if "attack_success" in last:
        rows += [
            (
                "Backdoor attack success (greedy continuation after the trigger is the whole target, on "
                "honest sites' held-out text)",
                _num(last.get("attack_success")),
            ),
            ("Backdoor target characters predicted right", _num(last.get("attack_char_accuracy"))),
        ]
    if "update_bytes" in last:  # a language model (model.kind = 'hf')
        rows += [
            (
                "One site's update per round: adapters against every weight (full fine-tuning)",
                _e(
                    f"{human_bytes(last['update_bytes'])} against {human_bytes(last['full_model_bytes'])} "
                    f"({100 * last['update_fraction']:.2f}%)"
                ),
            ),
            (
                "Peak memory of a site's training (largest site)",
                _e(human_bytes(last.get("site_peak_memory_max", 0))),
            ),
        ]
        if "rouge_l" in last:
            rows.append(("ROUGE-L of greedy answers on held-out examples", _num(last.get("rouge_l"))))
    rows += [
        ("Total bytes sent (server to sites)", _e(human_bytes(sent))),
        ("Total bytes received (sites to server)", _e(human_bytes(received))),
        ("Total training time", _e(_duration(seconds))),
    ]
    cells = "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f'{heading}<table class="metrics">{cells}</table>'


def _plots(
    evaluations: list[tuple[int, dict[str, Any]]],
    rounds: list[dict[str, Any]],
    per_site: list[tuple[str, float, float, int]],
    last_round: int | None,
    personal: Sequence[tuple[str, float, float, int]] = (),
    ledger: Sequence[tuple[int, float, str, float, int, float]] = (),
    budget: float = 0.0,
) -> str:
    if not evaluations:
        trained = len(rounds)
        what = {0: "no round has been trained yet", 1: "1 round trained so far"}.get(
            trained, f"{trained} rounds trained so far"
        )
        return (
            '<p class="note">No round has been evaluated yet, so there is nothing to plot '
            f"({_e(what)}). Evaluations happen every <code>eval.every</code> rounds and after the last.</p>"
        )
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def figure() -> Figure:
        fig = Figure(figsize=(6.4, 4.0), dpi=110, layout="constrained")
        FigureCanvasAgg(fig)
        return fig

    figures = [
        _loss_plot(figure(), evaluations, rounds),
        _accuracy_plot(figure(), evaluations),
        _perplexity_plot(figure(), evaluations),
    ]
    if per_site:
        baseline = evaluations[-1][1].get("unigram_accuracy")
        figures.append(_spread_plot(figure(), per_site, last_round, baseline))
    if per_site and personal:
        figures.append(_personal_plot(figure(), per_site, personal, last_round))
    if ledger:
        figures.append(_privacy_plot(figure(), ledger, evaluations, budget))
    if _series(evaluations, "attack_success"):
        figures.append(_attack_plot(figure(), evaluations))
    images = "".join(f'<figure><img alt="{_e(alt)}" src="{_png(fig)}"></figure>' for fig, alt in figures)
    note = (
        ""
        if per_site
        else f'<p class="note">No per-site metrics were stored for round {last_round}, so the spread '
        "over sites is not shown.</p>"
    )
    return f'<div class="plots">{images}</div>{note}'


def _samples(samples: Sequence[tuple[str, str]]) -> str:
    if not samples:
        return ""
    blocks = "".join(f'<pre class="sample"><b>{_e(prompt)}</b>{_e(text)}</pre>' for prompt, text in samples)
    return f"<h2>Passages written by the federated model</h2>{blocks}"


def _config(config_text: str) -> str:
    return (
        "<h2>Configuration</h2>"
        "<details><summary>config.toml (every default filled in)</summary>"
        f"<pre>{_e(config_text)}</pre></details>"
    )


def _defences(store: Store, decay: float) -> str:
    """The quarantined sites with why, and every refused site's reputation (see confide.server.reputation)."""
    history = store.score_history()
    if not history:
        return ""
    reputation = reputations(outcomes(history), decay)
    quarantined = store.quarantined()
    refused: dict[str, int] = {}
    for _, site, _, was_refused, _ in history:
        refused[site] = refused.get(site, 0) + int(was_refused)
    parts = ["<h2>Defences</h2>"]
    if quarantined:
        rows = "".join(
            f"<tr><td>{_e(site)}</td><td>{r}</td><td>{_num(reputation.get(site, 1.0))}</td>"
            f"<td>{_e(why)}</td></tr>"
            for site, (r, why) in quarantined.items()
        )
        parts.append(
            "<h3>Quarantined sites</h3><p>No longer selected after the round shown.</p>"
            '<table class="events"><tr><th>Site</th><th>After round</th><th>Reputation</th><th>Why</th></tr>'
            f"{rows}</table>"
        )
    offenders = sorted((site for site, n in refused.items() if n), key=lambda s: reputation.get(s, 1.0))
    if offenders:
        rows = "".join(
            f"<tr><td>{_e(site)}</td><td>{refused[site]}</td><td>{_num(reputation.get(site, 1.0))}</td></tr>"
            for site in offenders
        )
        parts.append(
            f"<h3>Refused sites</h3><p>Reputation r starts at 1 and after each screened round becomes "
            f"{decay:g}·r + {1 - decay:g}·(1 if accepted, else 0).</p>"
            '<table class="events"><tr><th>Site</th><th>Refusals</th><th>Reputation</th></tr>'
            f"{rows}</table>"
        )
    else:
        parts.append(f"<p>{len({site for _, site, _, _, _ in history})} sites screened; none refused.</p>")
    return "".join(parts)


def _events(events: list[tuple[float, int | None, str, str]]) -> str:
    if not events:
        return ""
    rows = "".join(
        f"<tr><td>{_e(_when(t))}</td><td>{'' if r is None else _e(str(r))}</td>"
        f"<td>{_e(kind)}</td><td>{_e(message)}</td></tr>"
        for t, r, kind, message in events
    )
    return (
        "<h2>Events</h2>"
        '<table class="events"><tr><th>Time</th><th>Round</th><th>Kind</th><th>Message</th></tr>'
        f"{rows}</table>"
    )


# -- the plots ---------------------------------------------------------------------------------------------


def _loss_plot(
    fig: Figure, evaluations: list[tuple[int, dict[str, Any]]], rounds: list[dict[str, Any]]
) -> tuple[Figure, str]:
    """Held-out loss against training loss: a widening gap is the first sign of overfitting."""
    ax = fig.add_subplot()
    # Training loss is recorded for every round, so prefer the rounds table; fall back to the evaluations
    # for a store whose rounds are missing.
    train = [(int(r["round"]), r["train_loss"]) for r in rounds]
    if not _finite(train):
        train = [(r, m.get("train_loss")) for r, m in evaluations]
    _line(ax, _finite(train), "training loss (mean over the round's sites)", _TRAIN, alpha=0.8)
    _line(ax, _series(evaluations, "loss"), "held-out loss (pooled)", _POOLED, zorder=3)
    _line(
        ax,
        _series(evaluations, "site_loss_p90"),
        "worst-decile site loss (90th percentile)",
        _WORST,
        linestyle=":",
    )
    _finish(ax, "Loss per round", "loss (nats per character)")
    return fig, "Held-out and training loss per round"


def _attack_plot(fig: Figure, evaluations: list[tuple[int, dict[str, Any]]]) -> tuple[Figure, str]:
    """A simulated backdoor: what the attack achieves beside what the federation keeps."""
    ax = fig.add_subplot()
    _line(ax, _series(evaluations, "attack_success"), "backdoor attack success", _WORST, zorder=3)
    _line(ax, _series(evaluations, "attack_char_accuracy"), "target characters right", _WORST, linestyle="--")
    _line(ax, _series(evaluations, "accuracy"), "main-task accuracy (pooled)", _POOLED)
    ax.set_ylim(-0.02, 1.02)
    _finish(ax, "Simulated backdoor per round", "fraction")
    return fig, "Backdoor attack success and main-task accuracy per round"


def _accuracy_plot(fig: Figure, evaluations: list[tuple[int, dict[str, Any]]]) -> tuple[Figure, str]:
    """Pooled accuracy hides sites the model serves badly, so the site mean and worst decile come along."""
    ax = fig.add_subplot()
    mean = _series(evaluations, "site_accuracy_mean")
    worst = _series(evaluations, "site_accuracy_p10")
    band = dict(mean)
    shared = [(r, w, band[r]) for r, w in worst if r in band]
    if len(shared) > 1:
        ax.fill_between(
            [r for r, _, _ in shared],
            [w for _, w, _ in shared],
            [m for _, _, m in shared],
            color=_WORST,
            alpha=0.12,
            linewidth=0,
            label="between worst decile and site mean",
        )
    _line(ax, _series(evaluations, "accuracy"), "accuracy (pooled)", _POOLED, zorder=3)
    _line(ax, mean, "site accuracy, mean over sites", _SITE_MEAN)
    _line(ax, worst, "site accuracy, 10th percentile (worst decile)", _WORST)
    _line(
        ax,
        _series(evaluations, "personal_accuracy"),
        "personalized accuracy (pooled)",
        _POOLED,
        linestyle="--",
    )
    _line(
        ax,
        _series(evaluations, "personal_site_accuracy_p10"),
        "personalized, worst decile",
        _WORST,
        linestyle="--",
    )
    baseline = _finite([(0, evaluations[-1][1].get("unigram_accuracy"))])
    if baseline:
        ax.axhline(
            baseline[0][1],
            color=_BASELINE,
            linestyle="--",
            linewidth=1.2,
            label="unigram baseline (most frequent character)",
        )
    _finish(ax, "Next-character accuracy per round", "accuracy (fraction of characters right)")
    return fig, "Accuracy per round: pooled, site mean, worst decile, unigram baseline"


def _perplexity_plot(fig: Figure, evaluations: list[tuple[int, dict[str, Any]]]) -> tuple[Figure, str]:
    """Perplexity falls by orders of magnitude early on, so it goes on a log axis when the range is wide."""
    ax = fig.add_subplot()
    pooled = _series(evaluations, "perplexity")
    worst = _series(evaluations, "site_perplexity_p90")
    _line(ax, pooled, "perplexity (pooled)", _POOLED, zorder=3)
    _line(ax, _series(evaluations, "site_perplexity_mean"), "site perplexity, mean over sites", _SITE_MEAN)
    _line(ax, worst, "site perplexity, 90th percentile (worst decile)", _WORST, linestyle=":")
    values = [v for _, v in pooled + worst if v > 0]
    if values and max(values) / min(values) > 20:
        ax.set_yscale("log")
    _finish(ax, "Perplexity per round (lower is better)", "perplexity (characters)")
    return fig, "Perplexity per round"


def _spread_plot(
    fig: Figure,
    per_site: list[tuple[str, float, float, int]],
    last_round: int | None,
    baseline: Any,
) -> tuple[Figure, str]:
    """How the sites fare at the last evaluation: one pooled number can hide a long tail of bad sites."""
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    ax = fig.add_subplot()
    accuracies = np.array([a for _, _, a, _ in per_site], dtype=np.float64)
    accuracies = accuracies[np.isfinite(accuracies)]
    bins = int(min(40, max(8, math.sqrt(len(accuracies)) * 2)))
    if len(accuracies):
        ax.hist(
            accuracies, bins=bins, range=_bin_range(accuracies), color=_POOLED, alpha=0.75, edgecolor="white"
        )
        mean = float(accuracies.mean())
        worst = float(np.percentile(accuracies, 10))  # the same definition the runner stores
        ax.axvline(mean, color=_SITE_MEAN, linewidth=2, label=f"mean over sites {mean:.3f}")
        ax.axvline(worst, color=_WORST, linewidth=2, label=f"10th percentile {worst:.3f}")
    if _finite([(0, baseline)]):
        ax.axvline(
            float(baseline),
            color=_BASELINE,
            linestyle="--",
            linewidth=1.2,
            label=f"unigram baseline {float(baseline):.3f}",
        )
    left, right = ax.get_xlim()
    ax.set_xlim(max(0.0, left), min(1.0, right))  # an accuracy axis past 0 or 1 only confuses
    ax.set_title(f"Accuracy of each site at round {last_round} ({len(accuracies)} sites)")
    ax.set_xlabel("site accuracy (fraction of characters right)")
    ax.set_ylabel("number of sites")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    return fig, f"Histogram of per-site accuracy at round {last_round}"


def _privacy_plot(
    fig: Figure,
    ledger: Sequence[tuple[int, float, str, float, int, float]],
    evaluations: list[tuple[int, dict[str, Any]]],
    budget: float,
) -> tuple[Figure, str]:
    """Epsilon spent after each round (the ledger), the budget (privacy.target_epsilon; 0: none), and
    accuracy beside it: what privacy cost."""
    ax = fig.add_subplot()
    rounds = [r for r, *_ in ledger]
    epsilons = [e for *_, e in ledger]
    ax.plot(rounds, epsilons, color=_WORST, linewidth=1.8, label="epsilon the budget holds (ledger)")
    for key, label, style in (
        ("epsilon_worst_site", "worst site (server knows who took part)", ":"),
        ("epsilon_median_site", "median site (same server)", "-."),
        ("epsilon_amplified", "amplified by sampling", "--"),
    ):
        points = _series(evaluations, key)
        if points:
            ax.plot(*zip(*points, strict=True), color=_WORST, linewidth=1.0, linestyle=style, label=label)
    if budget:
        ax.axhline(float(budget), color=_BASELINE, linestyle="--", linewidth=1.2, label=f"budget {budget:g}")
    ax.set_xlabel("round")
    ax.set_ylabel("epsilon")
    right = ax.twinx()
    _line(right, _series(evaluations, "accuracy"), "accuracy (pooled)", _POOLED)
    right.set_ylabel("accuracy")
    delta = evaluations[-1][1].get("delta") if evaluations else None
    where = f", delta {float(delta):.1e}" if isinstance(delta, int | float) else ""
    ax.set_title(f"Privacy spent and accuracy per round{where}")
    ax.grid(True, alpha=0.3)
    lines = ax.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize="small", loc="center right")
    return fig, "Epsilon spent per round, from the privacy ledger, beside accuracy"


def _personal_plot(
    fig: Figure,
    per_site: list[tuple[str, float, float, int]],
    personal: Sequence[tuple[str, float, float, int]],
    last_round: int | None,
) -> tuple[Figure, str]:
    """Each site's accuracy with the global model against its personalized one: above the diagonal, the
    site gained from personalizing; the sites at the bottom left are the ones nobody serves well."""
    ax = fig.add_subplot()
    mine = {site: acc for site, _, acc, _ in personal}
    pairs = [(acc, mine[site]) for site, _, acc, _ in per_site if site in mine]
    if pairs:
        xs, ys = zip(*pairs, strict=True)
        ax.scatter(xs, ys, s=14, color=_POOLED, alpha=0.7, label="one site")
        low, high = min(xs + ys), max(xs + ys)
        ax.plot([low, high], [low, high], color=_BASELINE, linestyle="--", linewidth=1, label="no change")
        better = sum(y > x for x, y in pairs)
        ax.set_title(f"Global vs personalized, round {last_round}: {better} of {len(pairs)} sites gain")
    ax.set_xlabel("site accuracy, global model")
    ax.set_ylabel("site accuracy, personalized model")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return fig, f"Per-site accuracy of the global and the personalized models at round {last_round}"


def _bin_range(values: Any) -> tuple[float, float]:
    """The histogram's range: the data's, at least two points of accuracy wide, and inside [0, 1].

    Left to itself matplotlib spans one whole unit around sites that all score the same, which on an
    accuracy axis draws bins past 100%.
    """
    lo, hi = float(values.min()), float(values.max())
    if hi - lo < 0.02:
        mid = (lo + hi) / 2
        lo, hi = mid - 0.01, mid + 0.01
    if hi > 1.0:
        lo, hi = lo - (hi - 1.0), 1.0
    if lo < 0.0:
        lo, hi = 0.0, hi - lo
    return lo, hi


def _line(ax: Axes, points: list[tuple[int, float]], label: str, color: str, **style: Any) -> None:
    if not points:
        return
    marker = "o" if len(points) <= _MARKERS_UP_TO else None
    # The pooled series is drawn above the site mean (zorder), which it often nearly covers.
    ax.plot(
        [r for r, _ in points],
        [v for _, v in points],
        label=label,
        color=color,
        marker=marker,
        markersize=4,
        linewidth=1.6,
        **style,
    )


def _finish(ax: Axes, title: str, ylabel: str) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    first, last = ax.dataLim.x0, ax.dataLim.x1
    if last - first < 2:  # one or two rounds: without this the axis ticks at fractions of a round
        ax.set_xlim(first - 1, last + 1)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


def _png(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _series(evaluations: list[tuple[int, dict[str, Any]]], key: str) -> list[tuple[int, float]]:
    return _finite([(r, m.get(key)) for r, m in evaluations])


def _finite(points: list[tuple[int, Any]]) -> list[tuple[int, float]]:
    """The points with a real value: a missing key, a null or a NaN (a diverged round) is left out."""
    out = []
    for r, v in points:
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            out.append((r, float(v)))
    return out


# -- formatting --------------------------------------------------------------------------------------------


def _totals(
    rounds: list[dict[str, Any]], evaluations: list[tuple[int, dict[str, Any]]]
) -> tuple[float, float, float]:
    """Bytes and seconds over the whole run, counted the way the runner counts them (rounds + evaluations).

    Summing the rounds table, not taking the last evaluation's totals, also counts rounds trained after it.
    """
    sent = sum(r["bytes_sent"] for r in rounds) + sum(m.get("eval_bytes_sent", 0) for _, m in evaluations)
    received = sum(r["bytes_received"] for r in rounds) + sum(
        m.get("eval_bytes_received", 0) for _, m in evaluations
    )
    seconds = sum(r["seconds"] for r in rounds)
    return float(sent), float(received), float(seconds)


def _num(value: Any, digits: int = 3) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value):
        return _e(f"{value:.{digits}f}")
    return "&mdash;"


def _count(value: Any) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return _e(f"{int(value):,}")
    return "&mdash;"


def human_bytes(n: float) -> str:
    """Bytes in decimal units, as the command line prints them."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _stored_config(run_dir: Path) -> config_module.Config | None:
    """The run's config, read by the config loader (which imports no torch); None when it is missing or no
    longer valid (a run of an older confide), in which case the page leaves out what needs it."""
    try:
        return config_module.load(run_dir / "config.toml", stamp=False)
    except ConfigError as e:
        log.warning("the report leaves out the planned rounds and the privacy budget: %s", e)
        return None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        return f"(could not read {path}: {e})"


def _e(text: str) -> str:
    return html.escape(text, quote=True)


_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2rem auto;
       max-width: 1200px; padding: 0 1rem; color: #222; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: 0.6rem; }
h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #ddd; padding-bottom: 0.2rem; }
h2 small { font-weight: normal; color: #666; font-size: 0.85rem; }
table { border-collapse: collapse; font-size: 0.92rem; }
th, td { text-align: left; padding: 0.25rem 0.8rem 0.25rem 0; vertical-align: top; }
table.facts th, table.metrics th { font-weight: normal; color: #555; }
table.metrics td { font-variant-numeric: tabular-nums; font-weight: 600; }
table.events { width: 100%; }
table.events th { border-bottom: 1px solid #ccc; }
table.events td { border-bottom: 1px solid #eee; }
table.events td:first-child { white-space: nowrap; font-variant-numeric: tabular-nums; }
.status { padding: 0.05rem 0.5rem; border-radius: 0.6rem; background: #eee; }
.status-finished { background: #d9f2d9; }
.status-running { background: #fff1c9; }
.plots { display: grid; grid-template-columns: repeat(auto-fit, minmax(480px, 1fr)); gap: 1rem; }
figure { margin: 0; }
figure img { width: 100%; height: auto; border: 1px solid #eee; }
pre { background: #f7f7f7; border: 1px solid #e3e3e3; padding: 0.7rem; overflow-x: auto;
      white-space: pre-wrap; font-size: 0.88rem; }
pre.sample b { color: #1f4e9c; }
.note { background: #fff8e1; border-left: 4px solid #f0c040; padding: 0.6rem 0.8rem; }
details summary { cursor: pointer; }
footer { margin-top: 2.5rem; color: #888; font-size: 0.8rem; }
"""
