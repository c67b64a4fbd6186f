"""One self-contained HTML page of a config's privacy audits: ``OUTPUT/NAME-audit/audit.html``.

The three audits of :mod:`confide.runtime.audit`, :mod:`confide.runtime.inversion` and
:mod:`confide.runtime.membership` write their numbers into the audit folder's run store (table ``audits``,
the latest of each kind is shown); this page is drawn from that store alone, like :mod:`confide.report`:
plots as base64 PNG, inline CSS, no scripts, nothing fetched. Everything from the store is escaped: site
names, labels and above all the reconstructed and true texts of the inversion audit are free text.

Each section says what its audit measures and against whom; the page ends with what no audit here can show.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from confide.runtime.store import Store

if TYPE_CHECKING:
    from matplotlib.figure import Figure

AUDIT_PAGE = "audit.html"

# One colour per run or scenario, as the run report draws worst / pooled / site mean; grey for references.
_COLORS = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
_REFERENCE = "#7f7f7f"

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2rem auto;
       max-width: 1200px; padding: 0 1rem; color: #222; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: 0.6rem; }
h3 { font-size: 1.0rem; margin-top: 1.2rem; }
h2 { font-size: 1.25rem; margin-top: 2.2rem; border-bottom: 1px solid #ddd; padding-bottom: 0.2rem; }
table { border-collapse: collapse; font-size: 0.92rem; margin: 0.6rem 0; }
th, td { text-align: left; padding: 0.25rem 0.8rem 0.25rem 0; vertical-align: top; }
table.metrics th { font-weight: normal; color: #555; }
table.metrics td { font-variant-numeric: tabular-nums; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 0.6rem 0; }
figure img { width: 100%; height: auto; border: 1px solid #eee; }
pre.text { background: #f6f6f6; padding: 0.4rem 0.6rem; white-space: pre-wrap; word-break: break-all;
           font-size: 0.85rem; margin: 0.1rem 0; }
.note { color: #555; font-size: 0.92rem; }
footer { margin-top: 2.5rem; color: #777; font-size: 0.85rem; }
"""


def write_audit_page(folder: Path) -> Path:
    """Write ``folder/audit.html`` from the audit store in ``folder`` and return its path.

    Written under a temporary name and renamed, so a browser refreshing it never sees half a page.
    """
    folder = Path(folder)
    store = Store.open(folder)
    try:
        audits = store.audits()
    finally:
        store.close()
    page = render(folder.resolve().name, audits)
    path = folder / AUDIT_PAGE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path


def render(name: str, audits: Mapping[str, tuple[float, Mapping[str, Any]]]) -> str:
    sections = []
    if "canaries" in audits:
        sections.append(canary_section(audits["canaries"][1], audits["canaries"][0]))
    if "inversion" in audits:
        sections.append(inversion_section(audits["inversion"][1], audits["inversion"][0]))
    if "membership" in audits:
        sections.append(membership_section(audits["membership"][1], audits["membership"][0]))
    if not sections:
        sections.append("<p>No audit has been run in this folder yet.</p>")
    parts = [
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>confide privacy audits: {_e(name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>Privacy audits of <code>{_e(name)}</code></h1>",
        '<p class="note">Each audit mounts an attack on this config\'s own model and data and measures what '
        "it recovers. An attack that fails shows what this attack could not do; it is evidence, not a "
        "proof. The proof is the (epsilon, delta) of the privacy accountant, and only against the adversary "
        "it names.</p>",
        *sections,
        _limits(),
        f"<footer>Written {_e(time.strftime('%Y-%m-%d %H:%M', time.localtime()))} by confide.</footer>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _ran(at: float) -> str:
    return f'<p class="note">Run {_e(time.strftime("%Y-%m-%d %H:%M", time.localtime(at)))}.</p>'


def _limits() -> str:
    return (
        "<h2>What no audit here can show</h2><ul>"
        "<li>An attack that recovers nothing gives a lower bound on what leaks (zero), not an upper bound: a "
        "stronger attack might recover more. Only the accountant's epsilon bounds every attack, and only "
        "under its assumptions (who draws the sample, that the noise is secret, that the sites add it).</li>"
        "<li>The audits run in simulation, with the noise of a seeded stream so they repeat; a deployment "
        "draws it from the operating system.</li>"
        "<li>They attack the server's view of one round (inversion) and the final models (canaries, "
        "membership); a server that watches many rounds of the same site sees more than one round.</li>"
        "<li>Colluding sites, a malicious server that alters the protocol, and side channels (timing, "
        "sizes) are outside these measurements.</li></ul>"
    )


# -- canaries ----------------------------------------------------------------------------------------------


def canary_section(summary: Mapping[str, Any], at: float | None = None) -> str:
    """Each planted canary's exposure with and without DP, as a chart and a table."""
    runs = summary["runs"]
    rows = "".join(
        f"<tr><th>{_e(run['label'])}</th><td>{_num(run['accuracy'])}</td><td>"
        + ("none" if run["epsilon"] is None else _e(f"{run['epsilon']:.3f} at delta {run['delta']:.1e}"))
        + f"</td><td>{_num(sum(c['exposure'] for c in run['canaries']) / len(run['canaries']), 2)}</td></tr>"
        for run in runs
    )
    secrets = [c["secret"] for c in runs[0]["canaries"]]
    return (
        "<h2>Canaries: does the model give away a secret one site's text held?</h2>"
        + (_ran(at) if at else "")
        + f'<p>{len(secrets)} random secrets of the form "my secret number is NNNNNN" were planted in one '
        f"site each, {summary['repeats']} times; the model was trained with and without differential "
        f"privacy, and each secret ranked among {summary['candidates']} random ones by the model's "
        "likelihood (Carlini et al. 2019). Exposure is log2(candidates + 1) − log2(rank). Attacker: anyone "
        "who can query the final model.</p>"
        f'<figure><img alt="exposure per canary" src="{_png(_exposure_chart(summary))}"></figure>'
        '<table class="metrics"><tr><th>run</th><th>accuracy</th><th>site-level epsilon</th>'
        f"<th>mean exposure</th></tr>{rows}</table>"
    )


def _exposure_chart(summary: Mapping[str, Any]) -> Figure:
    """Bars of each canary's exposure, one per run, against the most measurable and an unseen secret's."""
    runs = summary["runs"]
    fig, ax = _figure(7.0, 4.0)
    secrets = [c["secret"] for c in runs[0]["canaries"]]
    width = 0.8 / len(runs)
    for k, run in enumerate(runs):
        xs = [i + (k - (len(runs) - 1) / 2) * width for i in range(len(secrets))]
        label = run["label"] + ("" if run["epsilon"] is None else f" (epsilon {run['epsilon']:.2f})")
        ax.bar(xs, [c["exposure"] for c in run["canaries"]], width, label=label, color=_color(k))
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


# -- inversion ---------------------------------------------------------------------------------------------


_SCENARIOS = {
    "none": "no protection: the site's own update",
    "dpsgd": "record-level DP-SGD: the site's own update",
    "distributed-share": "site-level DP: the site's clipped update and its own share of the noise",
    "secagg": "secure aggregation: the sum of the round's updates",
    "secagg+dp": "secure aggregation and site-level DP: the noised sum",
}


def inversion_section(summary: Mapping[str, Any], at: float | None = None) -> str:
    """Recovered-token accuracy and ROUGE-L per server view, batch size and local steps, and examples."""
    cells = summary["cells"]
    if not cells:
        return "<h2>Gradient inversion</h2><p>No view was attacked.</p>"
    scenarios = list(dict.fromkeys(c["scenario"] for c in cells))
    described = "".join(
        f"<li><code>{_e(name)}</code>: {_e(_SCENARIOS.get(name, name))}</li>" for name in scenarios
    )
    rows = "".join(
        f"<tr><td><code>{_e(c['scenario'])}</code></td><td class='num'>{c['batch_size']}</td>"
        f"<td class='num'>{c['steps']}</td><td class='num'>{_num(c['token_accuracy'])}</td>"
        f"<td class='num'>{_num(c['rouge_l'])}</td><td class='num'>{_num(c['baseline_token_accuracy'])}</td>"
        f"<td class='num'>{_num(c['baseline_rouge_l'])}</td><td class='num'>{_num(c.get('words'))}</td>"
        f"<td class='num'>{_num(c.get('baseline_words'))}</td><td class='num'>{c['vocabulary']}</td>"
        f"<td class='num'>{_num(c['distance'])}</td><td class='num'>{_num(c['seconds'], 1)}</td></tr>"
        for c in cells
    )
    smallest = min(c["batch_size"] for c in cells)
    fewest = min(c["steps"] for c in cells)
    shown = [c for c in cells if c["batch_size"] == smallest and c["steps"] == fewest and c["examples"]]
    examples = "".join(
        f"<h3><code>{_e(c['scenario'])}</code>, batch {c['batch_size']}, {c['steps']} step(s)</h3>"
        + "".join(
            f"<p class='note'>true text</p><pre class='text'>{_e(x['true'])}</pre>"
            f"<p class='note'>reconstructed by the attack</p><pre class='text'>{_e(x['reconstructed'])}</pre>"
            f"<p class='note'>baseline: the model's own guess</p><pre class='text'>{_e(x['baseline'])}</pre>"
            for x in c["examples"][:1]
        )
        for c in shown
    )
    noise = summary.get("noise") or ""
    return (
        "<h2>Gradient inversion: can the server read a site's text from its update?</h2>"
        + (_ran(at) if at else "")
        + f"<p>An honest-but-curious server that knows the global weights and the plan optimises a batch of "
        f"text until its update matches what it sees of site <code>{_e(summary['victim'])}</code>'s update "
        f"in one round (model {_e(summary['model'])}): DLG (Zhu et al. 2019) with cosine matching and the "
        "token shortcut of the embedding gradient where it applies, and a sequential search that reads the "
        "text left to right, one position's term of the gradient at a time. Token accuracy is the share of "
        "positions recovered exactly; ROUGE-L the longest common subsequence F1; words recovered the share "
        "of the true text's words that the reconstruction holds, in any order. The baseline guesses each "
        "window from the model's own predictions, with no update at all: an attack no better than it has "
        f"learnt nothing from the update. What the server sees:</p><ul>{described}</ul>"
        f'<figure><img alt="words recovered per view" src="{_png(_inversion_chart(cells))}">'
        "</figure>"
        "<table class='metrics'><tr><th>view</th><th>batch</th><th>steps</th><th>token accuracy</th>"
        "<th>ROUGE-L</th><th>baseline accuracy</th><th>baseline ROUGE-L</th><th>words recovered</th>"
        "<th>baseline words</th><th>vocabulary searched</th>"
        f"<th>match distance</th><th>seconds</th></tr>{rows}</table>"
        + (f"<p class='note'>Noise in this audit: {_e(noise)}.</p>" if noise else "")
        + examples
    )


def _inversion_chart(cells: Sequence[Mapping[str, Any]]) -> Figure:
    """One panel per number of local steps: bars per view and batch size, the baseline as a tick."""
    steps = sorted({c["steps"] for c in cells})
    scenarios = list(dict.fromkeys(c["scenario"] for c in cells))
    batches = sorted({c["batch_size"] for c in cells})
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(steps) + 1.0, 4.0), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(steps), sharey=True, squeeze=False)[0]
    width = 0.8 / len(batches)
    for ax, step in zip(axes, steps, strict=True):
        for k, batch in enumerate(batches):
            found = {c["scenario"]: c for c in cells if c["steps"] == step and c["batch_size"] == batch}
            xs = [i + (k - (len(batches) - 1) / 2) * width for i in range(len(scenarios))]
            ax.bar(
                xs,
                [found[s].get("words") or 0.0 if s in found else 0.0 for s in scenarios],
                width,
                color=_color(k),
                label=f"batch {batch}",
            )
            ax.scatter(
                xs,
                [found[s].get("baseline_words") or 0.0 if s in found else math.nan for s in scenarios],
                marker="_",
                s=180,
                color="black",
                label="baseline (model's guess)" if k == 0 else None,
            )
        ax.set_xticks(range(len(scenarios)), scenarios, rotation=20)
        ax.set_ylim(0, 1)
        ax.set_title(f"{step} local step{'s' if step > 1 else ''}")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("share of the true words recovered")
    axes[-1].legend(fontsize="small")
    return fig


# -- membership --------------------------------------------------------------------------------------------


def membership_section(summary: Mapping[str, Any], at: float | None = None) -> str:
    """AUC and true-positive rates at low false-positive rates, per model, privacy and attack; ROC curves."""
    results = summary["results"]
    rows = "".join(
        f"<tr><td>{_e(r['model'])}</td><td>{_e(_privacy(r))}</td><td>{_e(r['attack'])}</td>"
        f"<td class='num'>{_num(r['auc'])}</td><td class='num'>{_rate(r['tpr_at_1pct_fpr'])}</td>"
        f"<td class='num'>{_rate(r['tpr_at_01pct_fpr'])}</td><td class='num'>{r['members']}</td>"
        f"<td class='num'>{r['nonmembers']}</td><td class='num'>{_num(r['accuracy'])}</td></tr>"
        for r in results
    )
    note = summary.get("note") or ""
    figure = f'<figure><img alt="ROC curves" src="{_png(_roc_chart(results))}"></figure>' if results else ""
    return (
        "<h2>Membership inference: can anyone tell whether a record was trained on?</h2>"
        + (_ran(at) if at else "")
        + f"<p>Records are windows of {len(summary['audited_sites'])} audited sites' text: those the model "
        "trained on (members) against the same sites' held-out text (non-members). The loss attack calls a "
        "record a member when the model's loss on it is low (Yeom et al. 2018); the reference attack "
        f"compares that loss with the loss of {summary['references']} reference model(s) trained the same "
        "way without the audited sites (difficulty calibration, Watson et al. 2022; the offline LiRA of "
        "Carlini et al. 2022 with several). Attacker: anyone who can query the model. A true-positive rate "
        "equal to the false-positive rate is guessing; at a false-positive rate of 0.1% it can only be read "
        "with at least 1,000 non-members (— otherwise).</p>"
        + figure
        + "<table class='metrics'><tr><th>model</th><th>privacy</th><th>attack</th><th>AUC</th>"
        "<th>TPR at 1% FPR</th><th>TPR at 0.1% FPR</th><th>members</th><th>non-members</th>"
        f"<th>accuracy</th></tr>{rows}</table>" + (f"<p class='note'>{_e(note)}</p>" if note else "")
    )


def _privacy(result: Mapping[str, Any]) -> str:
    if result.get("epsilon") is None:
        return "no DP" if result["privacy"] == "no-dp" else result["privacy"]
    return f"epsilon {result['epsilon']:.2f} at delta {result['delta']:.1e}"


def _rate(value: Any) -> str:
    if isinstance(value, int | float) and math.isfinite(value):
        return _e(f"{100 * value:.1f}%")
    return "&mdash;"


def _roc_chart(results: Sequence[Mapping[str, Any]]) -> Figure:
    """ROC curves on log-log axes, where the low false-positive rates that matter can be read."""
    fig, ax = _figure(6.5, 5.0)
    models = list(dict.fromkeys((r["model"], r["privacy"]) for r in results))  # one colour per trained model
    for r in results:
        points = [(f, t) for f, t in r["roc"] if f > 0 and t > 0]
        if not points:
            continue
        fs, ts = zip(*points, strict=True)
        style = "-" if r["attack"] == "loss" else "--"
        ax.plot(
            fs,
            ts,
            style,
            color=_color(models.index((r["model"], r["privacy"]))),
            label=f"{r['model']}, {_privacy(r)}, {r['attack']} (AUC {r['auc']:.2f})",
        )
    ax.plot([1e-4, 1], [1e-4, 1], ":", color=_REFERENCE, label="guessing")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(1e-3, 1)
    ax.set_ylim(1e-3, 1)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title("Membership inference, ROC")
    ax.legend(fontsize="x-small")
    return fig


# -- helpers -----------------------------------------------------------------------------------------------


def _figure(width: float, height: float) -> tuple[Figure, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)  # a canvas of its own: pyplot's global state is never touched
    return fig, fig.add_subplot()


def _color(k: int) -> str:
    return _COLORS[k % len(_COLORS)]


def _png(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _num(value: Any, digits: int = 3) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return _e(f"{value:.{digits}f}")
    return "&mdash;"


def _e(text: str) -> str:
    return html.escape(str(text), quote=True)


def audit_page_for(run_dir: Path) -> Path | None:
    """The audit page of the config ``run_dir`` was trained from, if its audits have been run.

    A run of ``confide run NAME.toml`` lives in ``OUTPUT/NAME-YYYYMMDD-HHMMSS`` (or ``OUTPUT/NAME``) and the
    audits of that config in ``OUTPUT/NAME-audit``; a run an audit trained lives inside the audit folder.
    """
    run_dir = Path(run_dir).resolve()
    inside = run_dir.parent / AUDIT_PAGE
    if inside.is_file():
        return inside
    name = re.sub(r"-\d{8}-\d{6}$", "", run_dir.name)
    beside = run_dir.parent / f"{name}-audit" / AUDIT_PAGE
    return beside if beside.is_file() else None
