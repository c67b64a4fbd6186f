"""The membership-inference audit: can an attacker tell a site's training text from its held-out text?

``confide audit membership CONFIG`` trains the config with its differential privacy and without any (only
without, when the config has none; without DP also means without secure aggregation, whose fixed-point range
the unclipped updates would overflow, and which changes nothing of the final model otherwise), and attacks
each final global model (and, with Ditto, FedRep or fine-tuning, each audited site's personal model) with
the attacks of :mod:`confide.audit.membership`:

- **members** are training windows of a few audited sites, chosen with the public seeded audit stream, that
  the run trained on: a site never selected in any round trained on nothing, and contributes neither members
  nor non-members to that run's attack;
- **non-members** are the same sites' held-out windows, which no model ever trains on. Each audited site
  gives as many of each (at most ``records``, drawn with the same stream), so that differences between sites
  (a role that speaks verse, one that speaks prose) cannot pass for membership;
- the **loss attack** scores each window by the model's negative mean loss on it;
- the **reference attack** calibrates that score by the window's score under ``references`` reference runs:
  the same config and privacy, trained on the data set *without the audited sites*, so that every audited
  window is out of their training. Held-out text is not drawn from quite the same text as training text (it
  is the end of the site's text); the reference models see that shift as well, and calibration removes it.
  A reference run keeps the sites' rate of participation: a count of sites per round is scaled to the
  sites left (a FedBuff buffer keeps its size). Personal models are calibrated by the reference runs'
  global models, which are out on the site as well.

For each (model, privacy, attack): the AUC, the true-positive rates at 1% and 0.1% false-positive rate (None
where there are too few non-members to read it: 0.1% needs 1000), the counts, the run's (epsilon, delta) and
accuracy, and the ROC curve downsampled for a plot. The runs go under :func:`audit_folder` as
``membership-dp``, ``membership-no-dp``, ``membership-ref1-dp``, ...; the numbers to ``membership.json``,
the audit folder's store and its page.

The attacks measure what the *final* model gives away: a server that saw every round's model, or an
attacker with more shadow models (online LiRA), could do better. "A member" is any training window of a
site that trained in some round; a site whose round stops after ``client.max_steps`` batches trained on only
some of its windows, which makes members harder to find than if every one had been used.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np

from confide.audit.membership import AttackResult, attack, reference_scores, window_scores
from confide.client.personalize import DITTO_KEY, FEDREP_KEY, Personal, personal_weights
from confide.client.trainer import ClientOptimizer, Trainer
from confide.config import Config, PrivacyConfig, ServerConfig
from confide.core import Vector
from confide.data import FederatedDataset
from confide.data.tokenize import PAD
from confide.errors import ConfigError
from confide.randomness import Stream, public_rng
from confide.runtime.audit import audit_folder, audit_store, clear_runs, finish_audit
from confide.runtime.runner import Observer, Runner, load_dataset
from confide.runtime.stack import personal_parts
from confide.runtime.store import StoreSiteState

__all__ = ["MembershipAudit", "MembershipResult", "audit_membership"]

PERSONALIZED = ("ditto", "fedrep", "finetune")


@dataclass(frozen=True)
class MembershipResult(AttackResult):
    """One attack on one model of one training run: the attack's result and what was attacked."""

    model: str
    """'global' (the final global model) or 'personal' (each audited site's personal model, pooled)."""
    privacy: str
    """'dp' (the config's differential privacy) or 'no-dp' (none)."""
    run_dir: str
    epsilon: float | None
    """The run's site-level epsilon as its accountant spent it; None without DP."""
    delta: float | None
    accuracy: float | None
    """The last evaluation's held-out accuracy of the model attacked (personal accuracy for 'personal');
    None if the run did not measure it (its evaluation could not complete)."""
    sites: int
    """Audited sites whose records were attacked (those the run trained on)."""


@dataclass(frozen=True)
class MembershipAudit:
    folder: str
    dp: str
    """The config's DP placement ('central', 'distributed', ...), or 'none'; '+record' added with DP-SGD."""
    note: str
    """What was not audited and why (no DP in the config, no personalization), or empty."""
    audited_sites: list[str]
    records: int
    """The most windows drawn of each audited site's training and held-out text each."""
    references: int
    rounds_trained: dict[str, dict[str, int]]
    """For each target run ('dp', 'no-dp'), how many rounds each audited site was selected in."""
    results: list[MembershipResult]


@dataclass
class _Trained:
    """What the audit keeps of a finished run: its scores of every audited record, and what it reports."""

    run_dir: str
    epsilon: float | None
    delta: float | None
    accuracy: float | None
    personal_accuracy: float | None
    rounds: Counter[str]
    scores: dict[str, tuple[np.ndarray, np.ndarray]]
    """Global model's (member, non-member) scores per audited site."""
    personal: dict[str, tuple[np.ndarray, np.ndarray]]
    """Personal models' (member, non-member) scores per audited site that has one."""


def audit_membership(
    config: Config,
    sites: int = 20,
    records: int = 50,
    references: int = 1,
    observer: Callable[[str, Runner], Observer] | None = None,
) -> MembershipAudit:
    """Train ``config`` with and without its DP (and ``references`` reference runs of each), attack the
    models, write ``membership.json`` in the audit folder and return the results.

    ``sites``: how many sites are audited; ``records``: the most windows of each audited site's training
    text (members) and of its held-out text (non-members) attacked; ``references``: reference runs per
    privacy setting (0: the loss attack only). ``observer(label, runner)`` gives each training's observer.
    """
    if sites < 1 or records < 1:
        raise ConfigError(f"the audit needs at least 1 site and 1 record a site (got {sites} and {records})")
    if references < 0:
        raise ConfigError(f"the number of reference runs must be 0 or more, got {references}")
    dataset = load_dataset(config)
    # Two windows of each part: all but a part's last are whole (see _whole).
    eligible = [i for i, s in enumerate(dataset.sites) if s.num_train >= 2 and s.num_test >= 2]
    # The reference runs train on the sites left: at least one must be.
    room = len(dataset.sites) - 1 if references else len(dataset.sites)
    if sites > min(len(eligible), room):
        raise ConfigError(
            f"{sites} audited sites are more than the data set allows: it has {len(dataset.sites)} sites, "
            f"{len(eligible)} with at least two training and two held-out windows"
            + (", and the reference runs need at least one site left out of the audit" if references else "")
            + "; audit fewer sites"
        )
    rng = public_rng(config.run.seed, 0, Stream.AUDIT)
    chosen = [dataset.sites[eligible[i]] for i in np.sort(rng.choice(len(eligible), sites, replace=False))]
    picks: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for site in chosen:
        train, test = _whole(site.train), _whole(site.test)
        k = min(records, len(train), len(test))
        members = train[np.sort(rng.choice(len(train), k, replace=False))]
        nonmembers = test[np.sort(rng.choice(len(test), k, replace=False))]
        picks[site.name] = (members, nonmembers)
    audited = frozenset(picks)
    without_audited = replace(dataset, sites=tuple(s for s in dataset.sites if s.name not in audited))

    folder = audit_folder(config)
    audit_store(config).close()
    clear_runs(folder, "membership")
    no_dp = replace(
        config.privacy,
        dp="none",
        target_epsilon=0.0,
        calibrate=False,
        adaptive_clip=False,
        record_dp=False,
        # Secure aggregation is no DP, and without DP's clipping the updates overflow its fixed-point range
        # (their coordinates would be clipped): the model without DP is trained without it, unless a
        # compression that sends a subset of coordinates needs it.
        secure_aggregation=config.privacy.secure_aggregation and config.compression.subset < 1,
    )
    settings: list[tuple[str, str, PrivacyConfig]] = [("no-dp", "without DP", no_dp)]
    note = ""
    if config.privacy.dp == "none" and not config.privacy.record_dp:
        note = "the config has no differential privacy: only the model trained without it was audited"
    else:
        settings.append(("dp", "with DP", config.privacy))
    personalized = config.client.personalization in PERSONALIZED
    if not personalized:
        note += (
            "; " if note else ""
        ) + "no personalization in the config: only the global model was attacked"

    results: list[MembershipResult] = []
    rounds_trained: dict[str, dict[str, int]] = {}
    for privacy_name, label, privacy in settings:
        target_config = replace(config, privacy=privacy, run=replace(config.run, output=str(folder)))
        target = _train(
            replace(target_config, run=replace(target_config.run, name=f"membership-{privacy_name}")),
            dataset,
            picks,
            f"{label} (the model attacked)",
            observer,
            personalized,
        )
        rounds_trained[privacy_name] = {name: target.rounds[name] for name in picks}
        reference_runs = []
        for i in range(1, references + 1):
            run = replace(
                target_config.run, name=f"membership-ref{i}-{privacy_name}", seed=config.run.seed + i
            )
            ref_config = replace(
                target_config,
                run=run,
                server=_scaled_server(config.server, len(dataset.sites), len(without_audited.sites)),
            )
            # A reference never trains on an audited site: it scores every audited record as out.
            reference_runs.append(
                _train(
                    ref_config, without_audited, picks, f"{label}, reference {i} of {references}", observer
                )
            )
        trained = [name for name in picks if target.rounds[name] > 0]
        for model, scores, accuracy in (
            ("global", target.scores, target.accuracy),
            ("personal", target.personal, target.personal_accuracy),
        ):
            names = [name for name in trained if name in scores]
            if not names:
                continue
            members = np.concatenate([scores[name][0] for name in names])
            nonmembers = np.concatenate([scores[name][1] for name in names])
            attacks = [attack("loss", members, nonmembers)]
            if reference_runs:
                # The reference runs' global models are out on every audited record: they calibrate the
                # personal models as well as the global one.
                ref_members = np.stack(
                    [np.concatenate([r.scores[n][0] for n in names]) for r in reference_runs]
                )
                ref_nonmembers = np.stack(
                    [np.concatenate([r.scores[n][1] for n in names]) for r in reference_runs]
                )
                calibrated = reference_scores(
                    np.concatenate([members, nonmembers]),
                    np.concatenate([ref_members, ref_nonmembers], axis=1),
                )
                attacks.append(attack("reference", calibrated[: members.size], calibrated[members.size :]))
            results += [_result(model, privacy_name, target, accuracy, len(names), a) for a in attacks]

    audit = MembershipAudit(
        str(folder),
        config.privacy.dp + ("+record" if config.privacy.record_dp else ""),
        note,
        sorted(picks),
        records,
        references,
        rounds_trained,
        results,
    )
    finish_audit(config, "membership", asdict(audit))
    return audit


def _whole(windows: np.ndarray) -> np.ndarray:
    """The windows of a site's text that are whole: the last one is padded (a few characters, perhaps just
    the end of a line), a record of another kind, whose mean loss over few targets would blur the attack.
    A language model's token rows are kept as they are."""
    if windows.ndim != 2:
        return windows
    return windows[~(windows == PAD).any(axis=1)]


def _scaled_server(server: ServerConfig, total: int, kept: int) -> ServerConfig:
    """The server settings of a reference run over ``kept`` of the ``total`` sites: a count of sites per round
    scaled so that each site takes part as often as in the audited run (a fraction already does; a FedBuff
    buffer keeps its size)."""
    if server.sites_per_round < 1 or server.strategy == "fedbuff" or kept >= total:
        return server
    return replace(server, sites_per_round=float(max(1, round(server.sites_per_round * kept / total))))


def _train(
    config: Config,
    dataset: FederatedDataset,
    picks: dict[str, tuple[np.ndarray, np.ndarray]],
    label: str,
    observer: Callable[[str, Runner], Observer] | None,
    personalized: bool = False,
) -> _Trained:
    """Run ``config`` on ``dataset``; score every audited record with the final global model and, with
    ``personalized``, each audited site's records with its personal model."""
    runner = Runner.start(config, dataset)
    try:
        runner.run(observer(label, runner) if observer else None)
        evaluations = runner.store.evaluations()
        last = evaluations[-1][1] if evaluations else {}
        rounds = Counter(site for row in runner.store.rounds() for site in row["sites"])
        weights = runner.clear_weights()
        if weights is None:
            raise ConfigError(
                "the membership audit reads the trained model, which this run holds encrypted "
                "(privacy.homomorphic): audit the config without homomorphic encryption"
            )
        c = config.client
        trainer = Trainer(runner.model, ClientOptimizer(c.optimizer, c.momentum, c.weight_decay))
        batch = config.eval.batch_size
        scores = {
            name: (window_scores(trainer, weights, m, batch), window_scores(trainer, weights, n, batch))
            for name, (m, n) in picks.items()
        }
        personal = {}
        if personalized:
            for name, (m, n) in picks.items():
                mine = _personal(runner, trainer, name, weights)
                if mine is not None:
                    personal[name] = (
                        window_scores(trainer, mine, m, batch),
                        window_scores(trainer, mine, n, batch),
                    )
        dp = runner.dp
        return _Trained(
            str(runner.store.run_dir),
            dp.epsilon() if dp else None,
            dp.delta if dp else None,
            _measured(last.get("accuracy")),
            _measured(last.get("personal_accuracy")),
            rounds,
            scores,
            personal,
        )
    finally:
        runner.close()


def _measured(value: object) -> float | None:
    """A metric as JSON holds it: None rather than NaN (which strict JSON has no word for)."""
    if not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _personal(runner: Runner, trainer: Trainer, site: str, weights: Vector) -> Vector | None:
    """Site ``site``'s personal model after the run, or None where it has none that trained on its text
    (Ditto and FedRep keep one only for a site that was selected; fine-tuning makes one for every site)."""
    config = runner.config
    method = config.client.personalization
    head, _ = personal_parts(config, runner.model, runner.layout)
    personal = Personal(StoreSiteState(runner.store), runner.layout.index(head), head)
    keys = {"ditto": DITTO_KEY, "fedrep": FEDREP_KEY}
    if method in keys and runner.store.get_site_state(site, keys[method]) is None:
        return None
    assert runner.dataset is not None
    r = runner.state.round
    # The plan of the run's own personal evaluation after its last round (fine-tuning's steps and seed).
    seed = int(public_rng(config.run.seed, r, Stream.EVAL).integers(2**31 - 1))
    plan = runner.strategy.plan(r, seed)
    windows = runner.dataset.by_name(site).train
    return personal_weights(trainer, site, windows, weights, plan, personal)


def _result(
    model: str, privacy: str, run: _Trained, accuracy: float | None, sites: int, result: AttackResult
) -> MembershipResult:
    return MembershipResult(
        **asdict(result),
        model=model,
        privacy=privacy,
        run_dir=run.run_dir,
        epsilon=run.epsilon,
        delta=run.delta,
        accuracy=accuracy,
        sites=sites,
    )
