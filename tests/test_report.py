"""The HTML report: built from a real run store, self-contained, and safe against what the store holds."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from confide.report import write_report
from confide.runtime.store import Store

SITES = [f"site{i}" for i in range(12)]
MODEL_BYTES = 40_000


def _metrics(
    round: int, per_site: list[tuple[str, float, float, int]], totals: dict[str, float]
) -> dict[str, Any]:
    """A metrics record shaped like the one Runner.evaluate stores."""
    targets = np.array([n for *_, n in per_site], dtype=np.float64)
    losses = np.array([lo for _, lo, _, _ in per_site])
    accuracies = np.array([a for _, _, a, _ in per_site])
    loss = float((losses * targets).sum() / targets.sum())
    return {
        "round": round,
        "loss": loss,
        "accuracy": float((accuracies * targets).sum() / targets.sum()),
        "perplexity": math.exp(loss),
        "site_accuracy_mean": float(accuracies.mean()),
        "site_accuracy_p10": float(np.percentile(accuracies, 10)),
        "site_loss_mean": float(losses.mean()),
        "site_loss_p90": float(np.percentile(losses, 90)),
        "site_perplexity_mean": float(np.exp(losses).mean()),
        "site_perplexity_p90": float(np.percentile(np.exp(losses), 90)),
        "eval_sites": float(len(per_site)),
        "train_loss": loss - 0.1,
        "unigram_accuracy": 0.16,
        "seconds": 1.5,
        "compute_seconds": 1.2,
        "eval_seconds": 0.2,
        "bytes_sent": 4 * MODEL_BYTES,
        "bytes_received": 4 * MODEL_BYTES,
        "total_seconds": totals["seconds"],
        "total_bytes_sent": totals["sent"],
        "total_bytes_received": totals["received"],
        "eval_bytes_sent": len(per_site) * MODEL_BYTES,
        "eval_bytes_received": len(per_site) * 16,
        "rejected_updates": 0,
    }


def _store(tmp_path: Path, rounds: int, evaluate_every: int) -> tuple[Store, list[dict[str, Any]]]:
    store = Store.create(tmp_path / "run", "[run]\nname = 'x'\nrounds = 6\n")
    store.add_sites([(name, "g", 100, 20) for name in SITES])
    store.set_meta("status", "finished")
    store.event("start", f"run x started with {len(SITES)} sites")
    rng = np.random.default_rng(0)
    totals = {"seconds": 0.0, "sent": 0.0, "received": 0.0}
    recorded = []
    for r in range(1, rounds + 1):
        store.record_round(r, SITES[:4], 400, 3.0 / r, 4 * MODEL_BYTES, 4 * MODEL_BYTES, 1.5)
        totals["seconds"] += 1.5
        totals["sent"] += 4 * MODEL_BYTES
        totals["received"] += 4 * MODEL_BYTES
        if r % evaluate_every == 0:
            per_site = [
                (name, 3.0 / r + rng.uniform(0, 0.5), min(0.95, 0.15 * r + rng.uniform(0, 0.1)), 20 + i)
                for i, name in enumerate(SITES)
            ]
            metrics = _metrics(r, per_site, totals)
            store.record_evaluation(r, metrics, per_site)
            recorded.append(metrics)
    store.event("rejected", "update of site <site3> refused: non-finite & large", 2)
    return store, recorded


def test_report_of_a_run(tmp_path: Path) -> None:
    store, recorded = _store(tmp_path, rounds=6, evaluate_every=2)
    store.close()
    samples = [("ROMEO.\n", "<script>alert('x')</script> & more"), ("JULIET.\n", "O Romeo, Romeo!")]

    path = write_report(tmp_path / "run", samples)

    assert path == tmp_path / "run" / "report.html"
    page = path.read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 4  # loss, accuracy, perplexity, per-site spread
    assert f"{recorded[-1]['accuracy']:.3f}" in page
    assert "evaluated at round 6" in page
    assert "6 of 6" in page  # rounds done against run.rounds
    assert "<b>ROMEO.\n</b>&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; more" in page
    assert "<script" not in page.lower()
    assert "&lt;site3&gt;" in page and "non-finite &amp; large" in page  # events escaped too
    assert "name = &#x27;x&#x27;" in page  # the config, escaped, in a <details> block
    # Bytes: 6 rounds of 4 models each way plus 3 evaluations of 12 sites.
    assert f"{(6 * 4 * MODEL_BYTES + 3 * 12 * MODEL_BYTES) / 1e6:.1f} MB" in page
    # Self-contained: nothing is fetched from anywhere.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page)


def test_report_of_a_single_evaluated_round(tmp_path: Path) -> None:
    _store(tmp_path, rounds=1, evaluate_every=1)[0].close()

    page = write_report(tmp_path / "run").read_text(encoding="utf-8")

    assert page.count("data:image/png;base64,") == 4
    assert "Passages written" not in page  # no samples given, no empty section


def test_report_of_a_run_with_no_evaluations(tmp_path: Path) -> None:
    store, recorded = _store(tmp_path, rounds=1, evaluate_every=2)
    store.set_meta("status", "running")
    store.close()
    assert recorded == []

    page = write_report(tmp_path / "run", [("A", "<b>")]).read_text(encoding="utf-8")

    assert "data:image/png;base64," not in page
    assert "No round has been evaluated yet" in page
    assert "running" in page
    assert "<b>A</b>&lt;b&gt;" in page


def test_importing_the_report_stays_light() -> None:
    # `confide run` imports it at the end of every run and `confide report` before anything else:
    # neither torch nor matplotlib should come with it.
    code = "import sys, confide.report; print('torch' in sys.modules, 'matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_no_lower_layer_imports_the_report_or_the_cli() -> None:
    # Imports point one way (cli -> report -> runtime -> ...): the runtime and everything under it never
    # import the report or the command line, so the audit page is written by runtime/auditpage.py.
    import ast

    root = Path(__file__).parent.parent / "src" / "confide"
    upward = {"confide.report", "confide.cli"}
    offenders = []
    for path in sorted(root.rglob("*.py")):
        if path.name in ("report.py", "cli.py", "__main__.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            if upward & set(names):
                offenders.append(f"{path.relative_to(root)}: imports {', '.join(upward & set(names))}")
    assert offenders == []


def test_the_canary_page_escapes_what_it_shows(tmp_path: Path) -> None:
    from confide.runtime.auditpage import render

    canaries = [{"secret": "123456", "site": "<b>site</b>", "exposure": 3.5}]
    runs = [
        {
            "label": "<script>x</script>",
            "epsilon": None,
            "delta": None,
            "accuracy": 0.5,
            "canaries": canaries,
        },
        {"label": "with DP", "epsilon": 2.0, "delta": 1e-3, "accuracy": 0.25, "canaries": canaries},
    ]
    page = render("<i>x</i>", {"canaries": (0.0, {"repeats": 3, "candidates": 50, "runs": runs})})
    assert page.count("<img") == 1 and "<script" not in page and "<i>" not in page
    assert "&lt;script&gt;x&lt;/script&gt;" in page and "2.000 at delta 1.0e-03" in page
    assert "<td>0.500</td>" in page and "<td>3.50</td>" in page


def test_report_of_a_run_whose_config_no_longer_loads(tmp_path: Path) -> None:
    # The config is read by the config loader; a config it refuses (a run of an older confide, or a file
    # edited by hand) costs the page only what needs it: here, the planned number of rounds.
    _store(tmp_path, rounds=2, evaluate_every=1)[0].close()
    (tmp_path / "run" / "config.toml").write_text("[run]\nrounds = 'many'\n")

    page = write_report(tmp_path / "run").read_text(encoding="utf-8")

    assert "<th>Rounds done</th><td>2</td>" in page
    assert "rounds = &#x27;many&#x27;" in page  # the text itself is still shown


def test_the_report_links_the_audits_of_its_config_and_the_store_keeps_them_as_strict_json(
    tmp_path: Path,
) -> None:
    from confide.runtime.auditpage import write_audit_page

    store, _ = _store(tmp_path, rounds=2, evaluate_every=1)
    store.close()
    (tmp_path / "run").rename(tmp_path / "x-20261202-101010")
    assert "Privacy audits" not in write_report(tmp_path / "x-20261202-101010").read_text(encoding="utf-8")

    audits = Store.create(tmp_path / "x-audit", "[run]\nname = 'x'\n")
    canaries = [{"secret": "123456", "site": "s", "exposure": 3.5}]
    run = {
        "label": "without DP",
        "epsilon": None,
        "delta": None,
        "accuracy": float("nan"),
        "canaries": canaries,
    }
    audits.record_audit("canaries", {"repeats": 1, "candidates": 10, "runs": [run]})
    audits.record_audit("canaries", {"repeats": 2, "candidates": 10, "runs": [run]})
    latest = audits.audits()["canaries"][1]
    assert latest["repeats"] == 2 and latest["runs"][0]["accuracy"] is None  # NaN is not JSON: null
    audits.close()
    (tmp_path / "x-audit" / "audit.html").write_text("")

    page = write_report(tmp_path / "x-20261202-101010").read_text(encoding="utf-8")
    assert 'href="../x-audit/audit.html"' in page
    assert "Privacy audits" in write_audit_page(tmp_path / "x-audit").read_text(encoding="utf-8")
