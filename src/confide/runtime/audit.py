"""The canary audit: does the trained model give away a secret that one site's text held?

``confide audit canaries CONFIG`` plants random canaries ("my secret number is 381907", Carlini et al. 2019)
in the training text of a few seeded sites, trains the config twice on the same planted data (once with the
config's differential privacy, once without any), and measures each canary's exposure in both models: how
far up it ranks among every secret of its format. Without DP a canary seen often enough ranks near the top
(exposure close to log2 of the secret space); with site-level DP its exposure should look like that of a
secret the model never saw.

Each planted copy is a window of its own that starts with the canary, as a line of text would; the model is
scored on the secret's characters given the prefix, exactly as it saw them in training.

Every audit of a config (canaries here, :mod:`confide.runtime.inversion`, :mod:`confide.runtime.membership`)
writes into one folder, ``OUTPUT/NAME-audit/``: the runs it trains, ``KIND.json``, its numbers in the
folder's run store (table ``audits``) and the page of all of them, ``audit.html``
(:mod:`confide.runtime.auditpage`). Running an audit again replaces that audit's runs and numbers.
"""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from confide.audit.canaries import Canary, fitted_exposure, make_canaries, rank_exposure, score_with_model
from confide.config import Config
from confide.data import DEFAULT_TOKENIZER, FederatedDataset
from confide.data.dataset import windows
from confide.errors import ConfigError
from confide.randomness import Stream, public_rng
from confide.runtime.runner import Observer, Runner, load_dataset
from confide.runtime.store import Store, finite_json


def audit_folder(config: Config) -> Path:
    """Where every audit of ``config`` writes: ``OUTPUT/NAME-audit/`` (its training runs, numbers, page)."""
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

    Writes the two run directories (``canaries-no-dp``, ``canaries-dp``) and the numbers into the audit folder
    (:func:`audit_folder`); returns that folder and the two runs' results (without DP first).
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

    folder = audit_folder(config)
    store = audit_store(config)
    store.close()
    clear_runs(folder, "canaries")
    runs = []
    for label, privacy in (
        (
            "without DP",
            replace(config.privacy, dp="none", target_epsilon=0.0, calibrate=False, adaptive_clip=False),
        ),
        ("with DP", config.privacy),
    ):
        name = "canaries-no-dp" if privacy.dp == "none" else "canaries-dp"
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
    finish_audit(config, "canaries", summary)
    return folder, runs


# -- the audit folder --------------------------------------------------------------------------------------


def audit_store(config: Config) -> Store:
    """The audit folder's run store (created with ``config`` the first time): it holds the audits' numbers."""
    folder = audit_folder(config)
    if (folder / "run.sqlite").is_file():
        return Store.open(folder)
    return Store.create(folder, config.to_toml())


def clear_runs(folder: Path, kind: str) -> None:
    """Remove the training runs an earlier ``kind`` audit left in ``folder`` (``KIND-*`` run directories)."""
    for run in folder.glob(f"{kind}-*"):
        if run.is_dir() and (run / "run.sqlite").is_file():
            shutil.rmtree(run)


def finish_audit(config: Config, kind: str, summary: Mapping[str, Any]) -> Path:
    """Record ``summary`` as the latest ``kind`` audit (``KIND.json``, the store, the page); returns the page.

    NaN and infinities are written as null: strict JSON readers refuse them.
    """
    from confide.runtime.auditpage import write_audit_page

    folder = audit_folder(config)
    clean = finite_json(summary)
    text = json.dumps(clean, indent=2, allow_nan=False) + "\n"
    (folder / f"{kind}.json").write_text(text, encoding="utf-8")
    store = audit_store(config)
    try:
        store.record_audit(kind, clean)
    finally:
        store.close()
    return write_audit_page(folder)
