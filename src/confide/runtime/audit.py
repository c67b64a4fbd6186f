"""The canary audit: does the trained model give away a secret that one site's text held?

``confide audit canaries CONFIG`` plants random canaries ("my secret number is 381907", Carlini et al. 2019)
in the training text of a few seeded sites, trains the config twice on the same planted data (once with the
config's differential privacy, once without any), and measures each canary's exposure in both models: how
far up it ranks among every secret of its format. Without DP a canary seen often enough ranks near the top
(exposure close to log2 of the secret space); with site-level DP its exposure should look like that of a
secret the model never saw.

Each planted copy is a window of its own that starts with the canary, as a line of text would; the model is
scored on the secret's characters given the prefix, exactly as it saw them in training.

The results go to ``canaries.json`` and a self-contained page, ``canaries.html`` (the chart inline as base64
PNG, no scripts, nothing fetched), written here rather than by :mod:`confide.report`, which sits above the
runtime and imports it.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from confide.audit.canaries import Canary, fitted_exposure, make_canaries, rank_exposure, score_with_model
from confide.config import Config
from confide.data import DEFAULT_TOKENIZER, FederatedDataset
from confide.data.dataset import windows
from confide.errors import ConfigError
from confide.randomness import Stream, public_rng
from confide.runtime.runner import Observer, Runner, load_dataset

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def audit_folder(config: Config) -> Path:
    """Where every audit of ``config`` writes: ``OUTPUT/NAME-audit/`` (its training runs, numbers and page)."""
    return Path(config.run.output) / f"{config.run.name}-audit"


@dataclass(frozen=True)
class CanaryExposure:
    secret: str
    site: str
    rounds_trained: int
    """How many rounds the canary's site was selected in: a site never selected cannot leak."""
    exposure: float
    """log2(candidates + 1) - log2(rank) among the sampled candidates (at most log2 of their number + 1)."""
    fitted_exposure: float
    """-log2 of the canary's tail probability under a skew-normal fitted to the candidates' scores."""


@dataclass(frozen=True)
class AuditRun:
    label: str
    run_dir: str
    epsilon: float | None
    delta: float | None
    accuracy: float
    canaries: list[CanaryExposure]


def plant(
    dataset: FederatedDataset, canaries: list[Canary], sites: list[str], repeats: int
) -> FederatedDataset:
    """``dataset`` with ``repeats`` windows of each canary added to the training windows of its site."""
    by_site = dict(zip(sites, canaries, strict=True))
    out = []
    for site in dataset.sites:
        canary = by_site.get(site.name)
        if canary is None:
            out.append(site)
            continue
        window = windows(DEFAULT_TOKENIZER.encode(canary.text + "\n"))
        planted = np.concatenate([site.train, np.repeat(window, repeats, axis=0)])
        out.append(site.with_train(planted))
    return replace(dataset, sites=tuple(out))


def audit_canaries(
    config: Config,
    num_canaries: int = 4,
    repeats: int = 20,
    candidates: int = 2000,
    observer: Callable[[str, Runner], Observer] | None = None,
) -> tuple[Path, list[AuditRun]]:
    """Train ``config`` with and without its DP on data with planted canaries; measure their exposure.

    Writes ``OUTPUT/NAME-canaries/`` with the two run directories and ``canaries.json``; returns that folder
    and the two runs' results (without DP first).
    """
    if config.privacy.dp == "none":
        raise ConfigError(
            "the canary audit compares the config's differential privacy with none: set privacy.dp = "
            "'central' (and its noise_multiplier or target_epsilon) in the config or with --set"
        )
    if num_canaries < 1 or repeats < 1 or candidates < 10:
        raise ConfigError("the audit needs at least 1 canary, 1 repeat and 10 candidates")
    rng = public_rng(config.run.seed, 0, Stream.AUDIT)
    dataset = load_dataset(config)
    if num_canaries > len(dataset.sites):
        raise ConfigError(
            f"{num_canaries} canaries need as many sites; the data set has {len(dataset.sites)}"
        )
    canaries = make_canaries(num_canaries, rng)
    chosen = [
        dataset.sites[i].name for i in np.sort(rng.choice(len(dataset.sites), num_canaries, replace=False))
    ]
    planted = plant(dataset, canaries, chosen, repeats)
    pools = [c.candidates(candidates, rng) for c in canaries]

    folder = Path(config.run.output) / f"{config.run.name}-canaries"
    runs = []
    for label, privacy in (
        (
            "without DP",
            replace(config.privacy, dp="none", target_epsilon=0.0, calibrate=False, adaptive_clip=False),
        ),
        ("with DP", config.privacy),
    ):
        name = "no-dp" if privacy.dp == "none" else "dp"
        run_config = replace(config, privacy=privacy, run=replace(config.run, output=str(folder), name=name))
        runner = Runner.start(run_config, planted)
        try:
            runner.run(observer(label, runner) if observer else None)
            evaluations = runner.store.evaluations()
            accuracy = float(evaluations[-1][1]["accuracy"]) if evaluations else math.nan
            trained = Counter(site for row in runner.store.rounds() for site in row["sites"])
        finally:
            runner.store.close()
        runner.layout.write(runner.model, runner.state.weights)
        results = []
        for canary, site, pool in zip(canaries, chosen, pools, strict=True):
            scores = score_with_model(runner.model, DEFAULT_TOKENIZER, [canary.text, *pool], canary.prefix)
            results.append(
                CanaryExposure(
                    canary.secret,
                    site,
                    trained[site],
                    rank_exposure(float(scores[0]), scores[1:]),
                    fitted_exposure(float(scores[0]), scores[1:]),
                )
            )
        dp = runner.dp
        runs.append(
            AuditRun(
                label,
                str(runner.store.run_dir),
                dp.epsilon() if dp else None,
                dp.delta if dp else None,
                accuracy,
                results,
            )
        )
    summary = {
        "repeats": repeats,
        "candidates": candidates,
        "secret_space": canaries[0].space_size,
        "runs": [asdict(r) for r in runs],
    }
    (folder / "canaries.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    write_canary_report(folder, summary)
    return folder, runs


# -- the page ------------------------------------------------------------------------------------------------

# One colour per run, as the run report draws worst / pooled / site mean; grey for reference lines.
_RUN_COLORS = ("#d62728", "#1f77b4", "#2ca02c")
_REFERENCE = "#7f7f7f"

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2rem auto;
       max-width: 1200px; padding: 0 1rem; color: #222; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: 0.6rem; }
table { border-collapse: collapse; font-size: 0.92rem; }
th, td { text-align: left; padding: 0.25rem 0.8rem 0.25rem 0; vertical-align: top; }
table.metrics th { font-weight: normal; color: #555; }
table.metrics td { font-variant-numeric: tabular-nums; font-weight: 600; }
figure { margin: 0; }
figure img { width: 100%; height: auto; border: 1px solid #eee; }
"""


def write_canary_report(folder: Path, summary: Mapping[str, Any]) -> Path:
    """``folder/canaries.html``: each canary's exposure with and without DP, as a chart and a table.

    ``summary`` is what ``canaries.json`` holds. Everything from it is escaped: labels are free text.
    """
    runs = summary["runs"]
    secrets = [c["secret"] for c in runs[0]["canaries"]]
    rows = "".join(
        f"<tr><th>{_e(run['label'])}</th><td>{_num(run['accuracy'])}</td><td>"
        + ("none" if run["epsilon"] is None else _e(f"{run['epsilon']:.3f} at delta {run['delta']:.1e}"))
        + f"</td><td>{_num(sum(c['exposure'] for c in run['canaries']) / len(run['canaries']), 2)}</td></tr>"
        for run in runs
    )
    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>confide canary audit</title>'
        f"<style>{_CSS}</style></head><body><h1>Canary audit</h1>"
        f'<p>{len(secrets)} random secrets of the form "my secret number is NNNNNN" were planted in one site '
        f"each, {summary['repeats']} times; the model was trained with and without differential privacy, "
        f"and each secret ranked among {summary['candidates']} random ones by the model's likelihood "
        "(Carlini et al. 2019). Exposure is log2(candidates + 1) − log2(rank).</p>"
        f'<figure><img alt="exposure per canary" src="{_png(_exposure_chart(summary))}"></figure>'
        '<table class="metrics"><tr><th>run</th><th>accuracy</th><th>site-level epsilon</th>'
        f"<th>mean exposure</th></tr>{rows}</table></body></html>\n"
    )
    path = folder / "canaries.html"
    path.write_text(page, encoding="utf-8")
    return path


def _exposure_chart(summary: Mapping[str, Any]) -> Figure:
    """Bars of each canary's exposure, one per run, against the most measurable and an unseen secret's."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = summary["runs"]
    fig = Figure(figsize=(7.0, 4.0), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)  # a canvas of its own: pyplot's global state is never touched
    ax = fig.add_subplot()
    secrets = [c["secret"] for c in runs[0]["canaries"]]
    width = 0.8 / len(runs)
    for k, run in enumerate(runs):
        xs = [i + (k - (len(runs) - 1) / 2) * width for i in range(len(secrets))]
        label = run["label"] + ("" if run["epsilon"] is None else f" (epsilon {run['epsilon']:.2f})")
        color = _RUN_COLORS[k % len(_RUN_COLORS)]
        ax.bar(xs, [c["exposure"] for c in run["canaries"]], width, label=label, color=color)
    most = math.log2(summary["candidates"] + 1)
    ax.axhline(most, color=_REFERENCE, linestyle="--", linewidth=1, label="most measurable (ranked first)")
    ax.axhline(
        1 / math.log(2), color=_REFERENCE, linestyle=":", linewidth=1, label="a secret never seen (mean)"
    )
    ax.set_xticks(
        range(len(secrets)), [f"{s}\n{c['site']}" for s, c in zip(secrets, runs[0]["canaries"], strict=True)]
    )
    ax.set_ylabel("exposure (bits)")
    ax.set_title(f"Exposure of planted secrets ({summary['repeats']} copies each)")
    ax.legend(fontsize="small")
    return fig


def _png(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _num(value: Any, digits: int = 3) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return _e(f"{value:.{digits}f}")
    return "&mdash;"


def _e(text: str) -> str:
    return html.escape(text, quote=True)
