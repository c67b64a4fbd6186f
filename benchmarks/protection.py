"""What each protection of the updates costs, and what it hides from whom: plain, SecAgg+, CKKS and the
attested aggregator (on the simulated platform, in-process), each with and without distributed or central DP.

a. Cost of a protected sum (``--sizes``, ``--cost-sites`` sites). For each update size d (the demo model's
   216,041 parameters, 1M and 10M by default): the plain floor is a float32 sum ``acc += update`` of the
   sites' updates (best of ``--repeats``). CKKS: a site's encryption, the server's loading and adding of every
   site's ciphertexts, a site's decryption of the result, the bytes a site uploads, and the largest error of
   the decrypted mean against the float64 mean. SecAgg+: one round of ``run_round`` with no dropout (a
   site's masking step, the server's collection and unmasking, a site's upload). Enclave: a site's signing
   and sealing of its update, and the enclave's opening, checking and summing of every site's. The sites'
   updates are a pool of 2 random vectors reused across sites (the cost does not depend on the values).

b. Whole rounds of the demo model (the FedAvg paper's two-layer LSTM of the demo, 216,041 parameters) on
   Shakespeare at ``--sites`` sites per round: the median wall time of a round after the first (which for
   CKKS holds the key ceremony, shown apart), the bytes up and down per site and round as the backend counts
   them, and the server's CPU time per round: the time spent in the server's halves of the layers, the
   aggregator and the server step (with the in-process enclave's work), less the time the simulated sites
   spend answering its exchanges. Sites
   train ``--steps`` local steps, so that training (the same in every row) does not drown the protection.

Ratios are against the plain row measured in the same run.

Run from the repository root:

    .venv/bin/python benchmarks/protection.py --markdown        # about 10 minutes on a 2-core CPU
    .venv/bin/python benchmarks/protection.py --quick           # a minute: small sizes, 10 sites, 2 rounds
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common import Recorder, build_config, console, machine, output_folder, show
from confide.client.site import Site
from confide.config import DefenceConfig
from confide.core import Update
from confide.errors import ConfigError
from confide.privacy.he.ckks import SecretKey
from confide.privacy.secagg import SecAggParams, Step, keys, run_round
from confide.privacy.tee.attestation import SimulatedPlatform
from confide.privacy.tee.enclave import Enclave, EnclaveSettings, associated_data, seal, sign_update
from confide.runtime.runner import Runner

DEMO_SIZE = 216_041
SIZES = (DEMO_SIZE, 1_000_000, 10_000_000)
PROTECTIONS = {
    "plain": {},
    "SecAgg+": {"secure_aggregation": True},
    "CKKS": {"encryption": "ckks"},
    "enclave (simulated)": {"enclave": "simulated"},
}
DP = {
    "no DP": {},
    "distributed DP": {"dp": "distributed", "clip_norm": 1.5, "noise_multiplier": 1.0},
    "central DP": {"dp": "central", "clip_norm": 1.5, "noise_multiplier": 1.0},
}
HIDES = [
    ("plain", "nothing: the server reads every update and the model"),
    (
        "SecAgg+",
        "each update from the server (honest-but-curious or malicious) and from sites that collude with it, "
        "up to the threshold; the server still reads the sum and the model",
    ),
    (
        "CKKS",
        "each update, the sum and the model from the server (honest-but-curious or malicious); nothing from "
        "a site that colludes with the server (every site holds the key)",
    ),
    (
        "enclave",
        "each update from the server (honest-but-curious or malicious), if the platform holds; the server "
        "reads the aggregate and the model. The simulated platform hides nothing from whoever runs it",
    ),
    (
        "distributed DP",
        "one site's influence on the sum, from everyone who sees it (server and sites); needs SecAgg+ or "
        "CKKS so that no share of the noise is seen alone",
    ),
    (
        "central DP",
        "one site's influence on the released model, from everyone but the aggregator, which sees the "
        "clipped updates (under CKKS: from the sites; the server that adds the noise never sees the model)",
    ),
]


# -- a. the cost of one protected sum ----------------------------------------------------------------------


@dataclass
class Cost:
    size: int
    plain: float
    encrypt: float
    add: float
    decrypt: float
    ckks_up: int
    ckks_error: float
    mask: float
    unmask: float
    secagg_up: float
    seal: float
    enclave: float


def best(repeats: int, work: Callable[[], Any]) -> float:
    fastest = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        fastest = min(fastest, time.perf_counter() - started)
    return fastest


def cost(size: int, sites: int, repeats: int) -> Cost:
    rng = np.random.default_rng(size)
    pool = [rng.normal(0, 0.01, size).astype(np.float32) for _ in range(2)]
    updates = [pool[i % 2] for i in range(sites)]

    def plain_sum() -> None:
        total = updates[0].copy()
        for u in updates[1:]:
            total += u

    key = SecretKey.generate()
    server = key.public()
    started = time.perf_counter()
    blobs = [key.encrypt(u.astype(np.float64) / sites).to_bytes() for u in pool]
    encrypt = (time.perf_counter() - started) / len(pool)

    def ckks_sum() -> bytes:
        total = server.load(blobs[0], size)
        for i in range(1, sites):
            total += server.load(blobs[i % 2], size)
        return total.to_bytes()

    add = best(1, ckks_sum)
    summed = ckks_sum()
    started = time.perf_counter()
    mean = key.decrypt(summed, size)
    decrypt = time.perf_counter() - started
    expected = np.mean([u.astype(np.float64) for u in updates], axis=0)

    names = [f"site{i:03d}" for i in range(sites)]
    _, transcript = run_round(dict(zip(names, updates, strict=True)), SecAggParams(sites=sites), {}, rng)
    steps = transcript.steps
    seal_seconds, enclave_seconds = enclave_cost(names, updates)
    return Cost(
        size,
        best(repeats, plain_sum),
        encrypt,
        add,
        decrypt,
        len(blobs[0]),
        float(np.abs(mean - expected).max()),
        steps[Step.MASKED_INPUT].max_site_seconds,
        steps[Step.MASKED_INPUT].server_seconds + steps[Step.UNMASKING].server_seconds,
        float(np.mean([transcript.site_bytes(s)[0] for s in names])),
        seal_seconds,
        enclave_seconds,
    )


def enclave_cost(names: list[str], updates: list[np.ndarray]) -> tuple[float, float]:
    """A site's signing and sealing of its update (mean), and the enclave's opening, checking and summing of
    every site's (the simulated platform; the cost of the cryptography does not depend on the platform)."""
    identities = {name: keys.generate_identity() for name in names}
    registry = {name: keys.identity_public_bytes(key) for name, key in identities.items()}
    settings = EnclaveSettings("simulated", "bench", updates[0].size, "mean", DefenceConfig())
    enclave = Enclave(settings, SimulatedPlatform(), registry=registry)
    report = enclave.open(1)
    sealed = []
    started = time.perf_counter()
    for name, vector in zip(names, updates, strict=True):
        update = Update(name, 1, 1, vector, 0)
        aad = associated_data("bench", 1, name, report)
        sealed.append(seal(sign_update(update, identities[name], "bench"), enclave.public_key, aad))
    seal_seconds = (time.perf_counter() - started) / len(names)
    started = time.perf_counter()
    for name, box in zip(names, sealed, strict=True):
        enclave.submit(1, name, box)
    enclave.close(1)
    enclave.release(1)
    return seal_seconds, time.perf_counter() - started


def cost_rows(costs: list[Cost]) -> list[list[str]]:
    rows = []
    for c in costs:
        plain_bytes = 4 * c.size
        rows.append(
            [
                f"{c.size:,}",
                f"{1e3 * c.plain:.1f}",
                f"{1e3 * c.encrypt:.0f}",
                f"{1e3 * c.add:.0f} ({c.add / c.plain:.0f}x)",
                f"{1e3 * c.decrypt:.0f}",
                f"{c.ckks_up / 1e6:.1f} ({c.ckks_up / plain_bytes:.1f}x)",
                f"{c.ckks_error:.0e}",
                f"{1e3 * c.mask:.0f}",
                f"{1e3 * c.unmask:.0f} ({c.unmask / c.plain:.0f}x)",
                f"{c.secagg_up / 1e6:.1f} ({c.secagg_up / plain_bytes:.1f}x)",
                f"{1e3 * c.seal:.0f}",
                f"{1e3 * c.enclave:.0f} ({c.enclave / c.plain:.0f}x)",
            ]
        )
    return rows


COST_COLUMNS = [
    "d",
    "plain sum ms",
    "CKKS encrypt ms (site)",
    "CKKS add ms (server)",
    "CKKS decrypt ms (site)",
    "CKKS MB up (site)",
    "CKKS max err of mean",
    "SecAgg+ mask ms (site)",
    "SecAgg+ collect+unmask ms",
    "SecAgg+ MB up (site)",
    "enclave seal ms (site)",
    "enclave open+sum ms",
]


# -- b. whole rounds ---------------------------------------------------------------------------------------


class ServerClock:
    """CPU time in the server's halves of the round: the layers' server hooks, the aggregator and the server
    step, less the time simulated sites spend answering the exchanges made inside them."""

    HOOKS = ("begin", "decode", "accept", "close", "apply", "finish")

    def __init__(self) -> None:
        self.server = 0.0
        self.sites = 0.0
        self._depth = 0

    def wrap(self, owner: Any, name: str) -> None:
        inner = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            if self._depth:
                return inner(*args, **kwargs)
            self._depth += 1
            sites_before, started = self.sites, time.process_time()
            try:
                return inner(*args, **kwargs)
            finally:
                self._depth -= 1
                self.server += time.process_time() - started - (self.sites - sites_before)

        object.__setattr__(owner, name, timed)  # frozen dataclasses too (the server optimizer)

    def attach(self, runner: Runner) -> None:
        federation = runner.federation
        for layer in federation.layers:
            for hook in self.HOOKS:
                self.wrap(layer, hook)
        for method in ("add", "add_sum", "result"):
            self.wrap(federation.aggregator, method)
        self.wrap(federation.strategy.optimizer, "step")
        answer = Site.answer
        clock = self

        def timed_answer(site: Site, data: bytes) -> bytes:
            started = time.process_time()
            try:
                return answer(site, data)
            finally:
                clock.sites += time.process_time() - started

        Site.answer = timed_answer  # type: ignore[method-assign]
        self._restore = answer

    def detach(self) -> None:
        Site.answer = self._restore  # type: ignore[method-assign]


def demo_config(args: argparse.Namespace, sites: int, privacy: dict[str, Any]) -> dict[str, Any]:
    return {
        "run": {"seed": 0, "rounds": args.rounds, "checkpoint_every": 1_000_000},
        "data": {"dataset": "shakespeare", "partition": "natural", "min_lines": 16},
        "model": {"kind": "lstm", "embedding": 8, "hidden": 128, "layers": 2},
        "client": {"optimizer": "sgd", "learning_rate": 4.0, "batch_size": 10, "max_steps": args.steps},
        "server": {"sites_per_round": sites, "optimizer": "sgd", "learning_rate": 1.0},
        "privacy": privacy,
        "eval": {"every": 1_000_000, "sites": 10, "samples": 0},
        "backend": {"threads": args.threads},
    }


def rounds(args: argparse.Namespace, output: Path) -> list[list[str]]:
    rows: list[list[str]] = []
    for sites in args.sites:
        baseline: float | None = None
        for protection, layer in PROTECTIONS.items():
            for dp, options in DP.items():
                label = f"{protection}, {dp}"
                raw = demo_config(args, sites, {**layer, **options})
                try:
                    config = build_config(raw, output, f"{sites}-{protection}-{dp}".replace(" ", "_"))
                    runner = Runner.start(config)
                except ConfigError as e:
                    rows.append([str(sites), label, f"refused: {e}", "", "", ""])
                    continue
                clock = ServerClock()
                clock.attach(runner)
                recorder = Recorder()
                try:
                    runner.run(recorder)
                finally:
                    clock.detach()
                    runner.store.close()
                done = [r for r in recorder.rounds if r.abandoned is None]
                later = done[1:] or done
                seconds = statistics.median(r.seconds for r in later)
                baseline = baseline or seconds
                asked = [len(r.sites) for r in later]
                up = statistics.median(r.bytes_received / n for r, n in zip(later, asked, strict=True))
                down = statistics.median(r.bytes_sent / n for r, n in zip(later, asked, strict=True))
                first = f"{done[0].seconds:.2f}" if done else "-"
                rows.append(
                    [
                        str(sites),
                        label,
                        f"{seconds:.2f} ({seconds / baseline:.1f}x)",
                        first,
                        f"{up / 1e6:.2f} / {down / 1e6:.2f}",
                        f"{1e3 * clock.server / max(len(done), 1):.0f}",
                    ]
                )
                console.print(f"  [dim]{sites} sites, {label}: {rows[-1][2]} s/round[/dim]")
    return rows


ROUND_COLUMNS = [
    "sites",
    "protection",
    "s/round (vs plain)",
    "first round s",
    "MB up / down per site",
    "server CPU ms/round",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--cost-sites", type=int, default=10)
    parser.add_argument("--sites", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-rounds", action="store_true", help="only the cost of a protected sum")
    parser.add_argument("--skip-cost", action="store_true", help="only the whole rounds")
    parser.add_argument("--quick", action="store_true", help="small sizes, 10 sites, 2 rounds")
    parser.add_argument("--output", help="keep the run directories here")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.sites, args.rounds = [10_000, 100_000], [10], 2
    console.print(f"[bold]protection[/] on {machine()}")
    if not args.skip_cost:
        costs = [cost(size, args.cost_sites, args.repeats) for size in args.sizes]
        show(
            f"a. one protected sum of {args.cost_sites} updates ({SecretKey.generate().params.describe()})",
            COST_COLUMNS,
            cost_rows(costs),
            args.markdown,
        )
    if not args.skip_rounds:
        with output_folder(args.output, "protection") as output:
            rows = rounds(args, output)
        title = f"b. whole rounds of the demo model ({args.steps} local steps)"
        show(title, ROUND_COLUMNS, rows, args.markdown)
    show("what each layer hides, and from whom", ["layer", "hides"], HIDES, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
