"""Anomaly detection across rounds: a reputation per site that decays, and the quarantine of repeat
offenders. Pure functions of the score history the run store keeps (:meth:`Store.score_history`).

Reputation. A site starts at r = 1. Each round its update is screened, with outcome o = 1 when accepted and
o = 0 when refused, its reputation moves to

    r ← γ·r + (1 − γ)·o          (γ = ``defence.reputation_decay``)

and rounds it does not take part in leave r as it is. An offence k rounds ago (k of the site's own rounds)
weighs (1 − γ)·γ^k: old offences fade geometrically as the site sends accepted updates, and a site refused
every time tends to 0.

Quarantine. A site refused at least ``after`` times within the last ``window`` rounds (counting the current
one) is quarantined: it is no longer selected for the rest of the run (the runner leaves it out as it leaves
out sites that spent their privacy budget), and the report lists it with the reason of its last refusal.
A single refusal never quarantines a site unless ``after`` is 1: an honest site can be refused once by bad
luck (a diverged local run).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence

Outcome = tuple[int, str, bool]
"""(round, site, refused) of one screened update."""


def reputations(history: Iterable[Outcome], decay: float) -> dict[str, float]:
    """Each site's reputation after ``history`` (in round order), by the formula in the module's text."""
    reputation: dict[str, float] = {}
    for _, site, refused in sorted(history, key=lambda item: item[0]):
        previous = reputation.get(site, 1.0)
        reputation[site] = decay * previous + (1.0 - decay) * (0.0 if refused else 1.0)
    return reputation


def offenders(
    history: Iterable[Outcome], round: int, after: int, window: int, known: Collection[str] = ()
) -> list[tuple[str, int]]:
    """The sites, not yet in ``known``, refused at least ``after`` times in rounds (round − window, round],
    with their count; none when ``after`` is 0 (quarantine off)."""
    if after <= 0:
        return []
    counts: dict[str, int] = {}
    for r, site, refused in history:
        if refused and round - window < r <= round:
            counts[site] = counts.get(site, 0) + 1
    return sorted((site, n) for site, n in counts.items() if n >= after and site not in known)


def outcomes(rows: Sequence[tuple[int, str, object, bool, str]]) -> list[Outcome]:
    """The (round, site, refused) of the store's score history rows."""
    return [(r, site, refused) for r, site, _, refused, _ in rows]
