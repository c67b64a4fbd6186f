"""What the demo's privacy budget means against each adversary: the epsilon amplified by sampling, against
someone who cannot know who took part, and each site's own epsilon, against a server that knows it.

Under distributed DP with secure aggregation the server sees who sends a masked input, so it knows the
sample; amplification by subsampling does not hold against it (issue 11). This benchmark replays the demo's
site selection (Poisson sampling of an expected 50 of the 755 Shakespeare sites over 40 rounds, the run's
public draw for seed 0) without training: each round is charged at the demo's noise to the sites drawn, and
the table gives the amplified epsilon and the worst and the median site's epsilon after 10, 20, 30 and 40
rounds, for two configurations:

- before: the noise calibrated so that the amplified epsilon of 40 rounds is 8 (what the demo used to do and
  print), no per-site limit;
- now: the noise calibrated so that a site in 4 rounds spends 8 (``privacy.max_participations = 4``), the
  budget held for the worst site, sites that reach it left out of later rounds.

Every round is charged at its planned multiplier (every drawn site reports), RDP accounting at delta = 1/(10
x 755). Run from the repository root (a few seconds):

    .venv/bin/python benchmarks/privacy_trust.py [--markdown]
"""

from __future__ import annotations

import argparse

from common import console, machine, show
from confide.privacy.policy import SiteDP
from confide.server.strategy import Strategy

POPULATION, PER_ROUND, ROUNDS, TARGET = 755, 50, 40, 8.0


def replay(dp: SiteDP, per_site_budget: bool) -> list[tuple[int, float, float, float, int]]:
    """Charge the demo's 40 rounds; at 10, 20, 30, 40: (round, amplified, worst, median, sites left out)."""
    strategy = Strategy(sites_per_round=PER_ROUND, sampling="poisson", seed=0)
    sites = [f"site{i:03d}" for i in range(POPULATION)]
    rows = []
    for r in range(1, ROUNDS + 1):
        out = dp.exhausted(dp.share_sites) if per_site_budget else frozenset()
        drawn = strategy.select(r, [s for s in sites if s not in out])
        dp.charge(r, drawn)
        if r % 10 == 0:
            spent = dp.spent()
            rows.append((r, spent.amplified, spent.worst_site, spent.median_site, len(out)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    console.print(f"[dim]{machine()}[/]")
    common = {
        "placement": "distributed",
        "clip_norm": 1.5,
        "population": POPULATION,
        "sites_per_round": PER_ROUND,
        "sampling": "poisson",
        "accounting": "rdp",
    }
    amplified = SiteDP.calibrated(TARGET, ROUNDS, trust=None, **{**common, "placement": "central"})
    # The old demo's multiplier: calibrated for the amplified epsilon, charged per site as the server sees it.
    old = SiteDP(noise_multiplier=amplified.noise_multiplier, target_epsilon=0.0, **common)
    now = SiteDP.calibrated(TARGET, ROUNDS, participations=4, **common)
    rows = []
    configurations = (("before (amplified budget)", old, False), ("now (worst-site budget)", now, True))
    for label, dp, per_site in configurations:
        for r, amp, worst, median, out in replay(dp, per_site):
            rows.append(
                (label, f"{dp.noise_multiplier:.4g}", r, f"{amp:.2f}", f"{worst:.2f}", f"{median:.2f}", out)
            )
    show(
        "The demo's epsilon against each adversary (distributed DP, 755 sites, 50 per round, delta 1.3e-4)",
        ["configuration", "z", "round", "amplified", "worst site", "median site", "sites left out"],
        rows,
        args.markdown,
    )


if __name__ == "__main__":
    main()
