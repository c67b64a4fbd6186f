"""confide against a plain PyTorch loop and Flower: the same federated training, timed by each (issue 17).

Four contenders train the same model on the same Shakespeare sites for the same rounds:

    plain         a plain PyTorch loop in one process, sites one after another: the floor, no framework
    confide       confide's Runner on the local backend (every site in the one process, one reused model)
    confide-ray   confide's Runner with backend.kind = "ray", 2 workers of num_cpus = 1 (skipped, with a line
                  that says so, where this checkout has no Ray backend registered)
    flower        Flower's run_simulation: a ServerApp with FedAvg and a ClientApp, 2 Ray actors of
                  num_cpus = 1 each

They share everything that decides the result: the FedAvg paper's character LSTM as confide builds it
(the same seeded initial weights), the sites of confide's data loader (confide.runtime.runner.load_dataset),
the sites drawn each round and each site's seed (the draws confide's Strategy makes from the run's seed),
the local loop (plain SGD, the same batch order from the site's seed, the same number of steps), and FedAvg
weighted by each site's training windows with a server step of 1. The plain loop and the Flower ClientApp
share one local training function; the Flower server sends each drawn site's index and seed in the
message's config and aggregates with Flower's own FedAvg. Torch runs one thread in every process of every
contender (OMP_NUM_THREADS=1 and torch.set_num_threads(1)), so no contender gains or loses by threads.

Two workloads: compute-bound (10 sites a round, 20 local steps each) and overhead-bound (200 sites a round,
one step each); both do 200 optimizer steps a round. Each contender runs in a fresh process of its own.
Columns: s/round (mean over the rounds after the first, of every repeat with ``--repeats``, which runs the
contenders in turn, every other time backwards, with ``--settle`` seconds of rest before each) and its ratio
to the plain loop's; start-up, what a contender spends once: the seconds from its first call (after imports)
to the end of its first round, less one round like the others (data, model, store, Ray and its actors, and
whatever is started lazily in the first round, such as a Flower actor loading its data; Flower's ServerApp
sends the first round's messages before its actors are up, so the moment a round "begins" means nothing
there); the first round's seconds as measured; and the final training loss (the sites' loss in the last
round, weighted by their windows) and evaluation loss (of the final weights on the held-out windows of a
seeded sample of sites, computed by this script in the same way for every contender). They must agree: to
1e-4 for confide against the plain loop (the same float32 operations in the same order), to FLOWER_TOLERANCE
for Flower, which averages whole weights (not changes) with float32 products w_i * (n_i / n) summed in the
order replies arrive, which two actors make vary from run to run.

Goals: confide local within 1.10x the plain loop on both workloads; confide on Ray at least 1.5x faster than
Flower on the overhead-bound workload.

Run from the repository root, in an environment with the bench extra (pip install -e '.[bench]'):

    .venv/bin/python benchmarks/vs_flower.py              # the full run, 5-10 minutes on 2 cores
    .venv/bin/python benchmarks/vs_flower.py --quick      # 2 rounds of smaller workloads, a few minutes
    .venv/bin/python benchmarks/vs_flower.py --only plain,confide --workloads overhead --markdown

The machine should be otherwise idle; ratios are measured in the same run, so load moves them less than it
moves the seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import Recorder, build_config, console, machine, merge, show
from confide.client.trainer import Trainer
from confide.config import Config, from_dict
from confide.core import Layout, round_size
from confide.data import DEFAULT_TOKENIZER, FederatedDataset
from confide.models import PAD
from confide.randomness import Stream, public_rng
from confide.registry import BACKENDS
from confide.runtime.runner import Runner, build_model_for, load_dataset

CONTENDERS = ("plain", "confide", "confide-ray", "flower")
LOCAL_GOAL = 1.10
"""confide local's s/round at most this times the plain loop's, on both workloads."""
RAY_VS_FLOWER_GOAL = 1.5
"""confide on Ray at least this many times faster than Flower on the overhead-bound workload."""
TOLERANCE = 1e-4
"""Largest difference of the final losses between confide and the plain loop."""
FLOWER_TOLERANCE = 1e-3
"""Largest difference of the final losses between Flower and the plain loop (see the module docstring)."""
EVAL_SITES = 50


@dataclass(frozen=True)
class Workload:
    key: str
    label: str
    sites: int
    steps: int
    rounds: int


def workloads(args: argparse.Namespace) -> list[Workload]:
    if args.quick:
        every = [
            Workload("compute", "compute-bound", 4, 5, 2),
            Workload("overhead", "overhead-bound", 40, 1, 2),
        ]
    else:
        every = [
            Workload("compute", "compute-bound", 10, 20, args.rounds),
            Workload("overhead", "overhead-bound", 200, 1, args.rounds),
        ]
    return [w for w in every if w.key in args.workloads]


def raw_config(workload: Workload, args: argparse.Namespace) -> dict[str, Any]:
    """The run every contender does, as a confide config (the others read their settings from it)."""
    return {
        "run": {"seed": args.seed, "rounds": workload.rounds, "checkpoint_every": 1_000_000},
        "data": {"dataset": "shakespeare", "min_lines": 16},
        "model": {"kind": "lstm", "embedding": 8, "hidden": args.hidden, "layers": 2},
        # epochs = max_steps: every site does exactly `steps` steps, however few windows it has.
        "client": {
            "optimizer": "sgd",
            "learning_rate": args.lr,
            "batch_size": args.batch_size,
            "epochs": workload.steps,
            "max_steps": workload.steps,
        },
        "server": {"sites_per_round": workload.sites, "optimizer": "sgd", "learning_rate": 1.0},
        # Evaluation runs once, after the last round and outside the rounds' times; this script evaluates.
        "eval": {"every": 1_000_000, "sites": 1, "samples": 0},
        # confide local in one process, as measured here; benchmarks/parallel.py sets its worker processes.
        "backend": {"threads": 1, "workers": 1},
    }


# --- what the plain loop and the Flower ClientApp share -----------------------------------------------------


def draw(config: Config, round: int, population: int) -> tuple[np.ndarray, np.ndarray]:
    """The sites (indices, ascending) of round ``round`` and each one's seed: the draws confide's Strategy
    makes from the run's seed (Strategy.select and Strategy.plans)."""
    count = round_size(config.server.sites_per_round, population)
    chosen = np.sort(
        public_rng(config.run.seed, round, Stream.SELECT).choice(population, count, replace=False)
    )
    seeds = public_rng(config.run.seed, round, Stream.SITE_PLAN).integers(0, 2**31 - 1, size=count)
    return chosen, seeds


def local_steps(config: Config, windows: int) -> int:
    c = config.client
    return min(c.epochs * math.ceil(windows / c.batch_size), c.max_steps)


def local_fit(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    windows: np.ndarray,
    steps: int,
    batch: int,
    seed: int,
) -> float:
    """``steps`` steps of SGD on ``windows`` in an order drawn from ``seed`` (a new permutation per pass);
    the mean training loss."""
    model.train()
    generator = torch.Generator().manual_seed(seed)
    # Dropout, if the model had any, draws from the CPU's global generator (torch.manual_seed would also
    # queue a seed for every accelerator, with a stack trace each: half a millisecond a site).
    torch.random.default_generator.manual_seed(seed)
    done, total = 0, 0.0
    while done < steps:
        order = torch.randperm(len(windows), generator=generator).numpy()
        for start in range(0, len(windows), batch):
            if done >= steps:
                break
            rows = torch.from_numpy(windows[order[start : start + batch]].astype(np.int64))
            inputs, targets = rows[:, :-1].masked_fill(rows[:, :-1] == PAD, 0), rows[:, 1:]
            _, loss = model(inputs, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.item())
            done += 1
    return total / max(done, 1)


def read_flat(params: Sequence[torch.Tensor]) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1) for p in params]).numpy()


def write_flat(params: Sequence[torch.Tensor], flat: np.ndarray) -> None:
    with torch.no_grad():
        for p, part in zip(params, torch.from_numpy(flat).split([p.numel() for p in params]), strict=True):
            p.copy_(part.view_as(p))


# --- the contenders, each in a process of its own -----------------------------------------------------------


def run_plain(raw: dict[str, Any], output: Path) -> dict[str, Any]:
    started = time.perf_counter()
    config = from_dict(raw)
    dataset = load_dataset(config)
    model = build_model_for(config, DEFAULT_TOKENIZER.vocab_size)
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=config.client.learning_rate)
    weights = read_flat(params).copy()
    seconds, loss, first_end = [], math.nan, 0.0
    for round in range(1, config.run.rounds + 1):
        began = time.perf_counter()
        total = np.zeros_like(weights)
        examples, loss_sum = 0, 0.0
        for site, seed in zip(*draw(config, round, len(dataset.sites)), strict=True):
            windows = dataset.sites[site].train
            write_flat(params, weights)
            site_loss = local_fit(
                model,
                optimizer,
                windows,
                local_steps(config, len(windows)),
                config.client.batch_size,
                int(seed),
            )
            delta = read_flat(params) - weights
            torch.from_numpy(total).add_(torch.from_numpy(delta), alpha=float(len(windows)))
            examples += len(windows)
            loss_sum += site_loss * len(windows)
        weights += total / np.float32(examples)
        loss = loss_sum / examples
        seconds.append(time.perf_counter() - began)
        first_end = first_end or time.perf_counter() - started
    return {"first_end": first_end, "rounds": seconds, "train_loss": loss, "weights": weights}


class FirstRound(Recorder):
    """A Recorder that also keeps the moment the first round ended."""

    first_end: float = 0.0

    def round_finished(self, result: Any) -> None:
        super().round_finished(result)
        self.first_end = self.first_end or time.perf_counter()


def run_confide(raw: dict[str, Any], output: Path) -> dict[str, Any]:
    started = time.perf_counter()
    config = build_config(raw, output, "run")
    recorder = FirstRound()
    runner = Runner.start(config)
    try:
        runner.run(recorder)
    finally:
        runner.close()  # the store, and the local backend's worker processes
    return {
        "first_end": recorder.first_end - started,
        "rounds": recorder.runner_seconds,
        "train_loss": recorder.rounds[-1].train_loss,
        "weights": runner.state.weights,
    }


def run_confide_ray(raw: dict[str, Any], output: Path) -> dict[str, Any]:
    raw = merge(raw, {"backend": {"kind": "ray", "workers": 2, "num_cpus": 1.0}})
    return run_confide(raw, output)


_CLIENT: dict[str, Any] = {}
"""A Flower actor's data set, model and optimizer, made at its first message and kept (as a user would)."""


def flower_train(raw: dict[str, Any], msg: Any) -> Any:
    """The ClientApp's training: one drawn site's local steps from the message's weights."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    if not _CLIENT:
        torch.set_num_threads(1)
        config = from_dict(raw)
        model = build_model_for(config, DEFAULT_TOKENIZER.vocab_size)
        optimizer = torch.optim.SGD(model.parameters(), lr=config.client.learning_rate)
        _CLIENT.update(config=config, dataset=load_dataset(config), model=model, optimizer=optimizer)
    config, model = _CLIENT["config"], _CLIENT["model"]
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    asked = msg.content["config"]
    windows = _CLIENT["dataset"].sites[int(asked["site"])].train
    steps = local_steps(config, len(windows))
    loss = local_fit(
        model, _CLIENT["optimizer"], windows, steps, config.client.batch_size, int(asked["seed"])
    )
    reply = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord({"train_loss": loss, "num-examples": len(windows)}),
        }
    )
    return Message(content=reply, reply_to=msg)


def run_flower(raw: dict[str, Any], output: Path) -> dict[str, Any]:
    import logging

    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    import vs_flower  # this file by its module name, so that Ray ships the ClientApp's work by reference

    logging.getLogger("flwr").setLevel(logging.WARNING)
    config = from_dict(raw)
    population = len(load_dataset(config).sites)
    rounds: list[list[float]] = []

    class DrawnSites(FedAvg):
        """Flower's FedAvg, asking the sites confide's draw picks, each with its index and seed."""

        def configure_train(
            self, server_round: int, arrays: ArrayRecord, config_record: ConfigRecord, grid: Grid
        ) -> list[Message]:
            rounds.append([time.perf_counter(), 0.0])
            nodes = sorted(grid.get_node_ids())
            messages = []
            for node, site, seed in zip(nodes, *draw(config, server_round, population), strict=False):
                asked = ConfigRecord({"site": int(site), "seed": int(seed), "server-round": server_round})
                content = RecordDict({"arrays": arrays, "config": asked})
                messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node))
            return messages

        def aggregate_train(self, server_round: int, replies: Any) -> Any:
            aggregated = super().aggregate_train(server_round, replies)
            rounds[-1][1] = time.perf_counter()
            return aggregated

    final: dict[str, Any] = {}
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        model = build_model_for(config, DEFAULT_TOKENIZER.vocab_size)
        strategy = DrawnSites(fraction_evaluate=0.0, min_available_nodes=population)
        result = strategy.start(
            grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=len_rounds
        )
        model.load_state_dict(result.arrays.to_torch_state_dict())
        final["weights"] = Layout.of_module(model).read(model)
        final["train_loss"] = result.train_metrics_clientapp[len_rounds]["train_loss"]

    client = ClientApp()

    @client.train()
    def train(msg: Any, context: Context) -> Any:
        return vs_flower.flower_train(raw, msg)

    len_rounds = config.run.rounds
    resources = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}}
    started = time.perf_counter()
    run_simulation(server, client, num_supernodes=population, backend_config=resources)  # type: ignore[arg-type]
    if "weights" not in final:
        raise RuntimeError("Flower's simulation ended without a result (its log above says why)")
    return {
        "first_end": rounds[0][1] - started,
        "rounds": [end - begin for begin, end in rounds],
        "train_loss": final["train_loss"],
        "weights": final["weights"],
    }


RUNS: dict[str, Callable[[dict[str, Any], Path], dict[str, Any]]] = {
    "plain": run_plain,
    "confide": run_confide,
    "confide-ray": run_confide_ray,
    "flower": run_flower,
}


def skipped(contender: str) -> str | None:
    """Why ``contender`` cannot run in this environment, or None."""
    import importlib.util

    if contender == "confide-ray" and "ray" not in BACKENDS:
        return "backend.kind = 'ray' is not registered in this checkout (the Ray backend is not merged yet)"
    if contender == "confide-ray" and importlib.util.find_spec("ray") is None:
        return "Ray is not installed: pip install -e '.[ray]'"
    if contender == "flower" and importlib.util.find_spec("flwr") is None:
        return "Flower is not installed: pip install -e '.[bench]'"
    return None


def worker(contender: str, config_path: Path, output: Path) -> None:
    """Run one contender (in this process, which the parent started for it) and write what it measured."""
    torch.set_num_threads(1)
    raw = json.loads(config_path.read_text())
    measured = RUNS[contender](raw, output)
    np.save(output / "weights.npy", measured.pop("weights"))
    (output / "measured.json").write_text(json.dumps(measured))


# --- the parent: runs each contender, evaluates, compares ---------------------------------------------------


@dataclass
class Outcome:
    contender: str
    first_ends: list[float] = field(default_factory=list)
    """Each repeat's seconds from the contender's first call (after imports) to the end of its first round."""
    rounds: list[tuple[float, ...]] = field(default_factory=list)
    """Each repeat's rounds, in seconds."""
    train_loss: float = math.nan
    eval_loss: float = math.nan
    weights: np.ndarray | None = None
    """The first repeat's final weights (the losses are the first repeat's too)."""
    note: str = ""

    @property
    def per_round(self) -> float:
        """The mean round after the first, over every repeat."""
        later = [s for run in self.rounds for s in (run[1:] or run)]
        return float(np.mean(later)) if later else math.nan

    @property
    def first_round(self) -> float:
        return float(np.median([run[0] for run in self.rounds])) if self.rounds else math.nan

    @property
    def startup(self) -> float:
        """What the contender spends once: to the end of the first round, less a round like the others
        (the median over repeats)."""
        return float(np.median(self.first_ends)) - self.per_round

    def add(self, other: Outcome) -> None:
        """Count another repeat of the same contender."""
        if other.note or self.note:
            self.note = self.note or other.note
            return
        self.first_ends += other.first_ends
        self.rounds += other.rounds


def launch(contender: str, raw: dict[str, Any], folder: Path, log: Path) -> Outcome:
    folder.mkdir(parents=True)
    config_path = folder / "config.json"
    config_path.write_text(json.dumps(raw))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [
        sys.executable,
        __file__,
        "--worker",
        contender,
        "--config",
        str(config_path),
        "--output",
        str(folder),
    ]
    with log.open("a") as out:
        out.write(f"\n=== {contender}: {' '.join(command)}\n")
        out.flush()
        done = subprocess.run(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=3600, check=False
        )
    if done.returncode != 0:
        return Outcome(contender, note=f"failed (exit {done.returncode}; see {log})")
    measured = json.loads((folder / "measured.json").read_text())
    return Outcome(
        contender,
        first_ends=[measured["first_end"]],
        rounds=[tuple(measured["rounds"])],
        train_loss=measured["train_loss"],
        weights=np.load(folder / "weights.npy"),
    )


def evaluation_windows(config: Config, dataset: FederatedDataset) -> np.ndarray:
    names = [s for s in dataset.sites if len(s.test)]
    chosen = np.sort(
        public_rng(config.run.seed, 0, Stream.EVAL).choice(len(names), EVAL_SITES, replace=False)
    )
    return np.concatenate([names[i].test for i in chosen])


def agreement(outcome: Outcome, plain: Outcome) -> tuple[str, bool | None]:
    if outcome.weights is None or plain.weights is None:
        return "—", None
    tolerance = FLOWER_TOLERANCE if outcome.contender == "flower" else TOLERANCE
    gap = max(abs(outcome.train_loss - plain.train_loss), abs(outcome.eval_loss - plain.eval_loss))
    return f"{gap:.1e} (≤ {tolerance:g})", bool(gap <= tolerance)


def compare(workload: Workload, args: argparse.Namespace, scratch: Path, log: Path) -> dict[str, Outcome]:
    raw = raw_config(workload, args)
    config = from_dict(raw)
    console.print(
        f"[bold]{workload.label}[/bold]: {workload.sites} sites a round, {workload.steps} local steps each "
        f"(batch {args.batch_size}, lr {args.lr:g}), {workload.rounds} rounds"
    )
    outcomes: dict[str, Outcome] = {}
    for contender in args.only:
        reason = skipped(contender)
        if reason:
            console.print(f"   {contender}: skipped: {reason}")
            outcomes[contender] = Outcome(contender, note=f"skipped: {reason}")
    # Repeats go round the contenders in turn, every other one backwards, so that a change in the machine's
    # load, and what a contender leaves running as it ends (Ray's processes shutting down), fall on all alike.
    for repeat in range(args.repeats):
        for contender in args.only[:: -1 if repeat % 2 else 1]:
            if contender in outcomes and outcomes[contender].note:
                continue
            time.sleep(args.settle)
            began = time.perf_counter()
            outcome = launch(contender, raw, scratch / workload.key / f"{contender}-{repeat}", log)
            if contender in outcomes:
                outcomes[contender].add(outcome)
            else:
                outcomes[contender] = outcome
            console.print(f"   {contender}: {time.perf_counter() - began:.0f} s {outcome.note}")

    dataset = load_dataset(config)
    windows = evaluation_windows(config, dataset)
    model = build_model_for(config, DEFAULT_TOKENIZER.vocab_size)
    trainer = Trainer(model)
    for outcome in outcomes.values():
        if outcome.weights is not None:
            scores = trainer.evaluate(outcome.weights, windows).sum(0)
            outcome.eval_loss = float(scores[0] / scores[2])

    plain = outcomes.get("plain", Outcome("plain"))
    rows = []
    for outcome in outcomes.values():
        if outcome.note.startswith("skipped"):
            continue  # said above
        if outcome.weights is None:
            rows.append([outcome.contender, *["—"] * 8, outcome.note])
            continue
        ratio = outcome.per_round / plain.per_round if plain.weights is not None else math.nan
        gap, agrees = agreement(outcome, plain)
        drift = f"{np.abs(outcome.weights - plain.weights).max():.1e}" if plain.weights is not None else "—"
        rows.append(
            [
                outcome.contender,
                f"{outcome.startup:.1f}",
                f"{outcome.first_round:.2f}",
                f"{outcome.per_round:.2f}",
                f"{ratio:.2f}x",
                f"{outcome.train_loss:.5f}",
                f"{outcome.eval_loss:.5f}",
                drift,
                gap,
                {True: "yes", False: "NO", None: "—"}[agrees],
            ]
        )
    columns = [
        "contender",
        "start-up s",
        "round 1 s",
        "s/round",
        "vs plain",
        "train loss",
        "eval loss",
        "max |w - plain|",
        "loss gap",
        "agrees",
    ]
    show(f"{workload.label}: {workload.sites} sites x {workload.steps} steps", columns, rows, args.markdown)
    return outcomes


def goals(results: dict[str, dict[str, Outcome]], as_markdown: bool) -> bool:
    rows, verdicts = [], []
    for key, outcomes in results.items():
        plain, local = outcomes.get("plain"), outcomes.get("confide")
        if plain and local and plain.weights is not None and local.weights is not None:
            ratio = local.per_round / plain.per_round
            met = ratio <= LOCAL_GOAL
            verdicts.append(met)
            rows.append(
                [f"confide local / plain ({key})", f"≤ {LOCAL_GOAL:.2f}x", f"{ratio:.2f}x", _met(met)]
            )
    overhead = results.get("overhead", {})
    ray, flower = overhead.get("confide-ray"), overhead.get("flower")
    if ray and flower and ray.weights is not None and flower.weights is not None:
        speedup = flower.per_round / ray.per_round
        met = speedup >= RAY_VS_FLOWER_GOAL
        verdicts.append(met)
        rows.append(
            [
                "Flower / confide on Ray (overhead)",
                f"≥ {RAY_VS_FLOWER_GOAL:.1f}x",
                f"{speedup:.2f}x",
                _met(met),
            ]
        )
    elif "overhead" in results:
        why = "skipped (see above)" if ray and ray.note.startswith("skipped") else "not run"
        rows.append(
            [
                "Flower / confide on Ray (overhead)",
                f"≥ {RAY_VS_FLOWER_GOAL:.1f}x",
                "—",
                f"not measured: {why}",
            ]
        )
    for key, outcomes in results.items():
        plain = outcomes.get("plain")
        for outcome in outcomes.values():
            if outcome.contender != "plain" and plain is not None:
                _, agrees = agreement(outcome, plain)
                if agrees is not None:
                    verdicts.append(agrees)
                    if not agrees:
                        rows.append([f"{outcome.contender} agrees with plain ({key})", "", "no", "NOT MET"])
    show("Goals", ["goal", "target", "measured", "verdict"], rows, as_markdown)
    return all(verdicts)


def _met(met: bool) -> str:
    return "met" if met else "NOT MET"


def workload_arguments(parser: argparse.ArgumentParser, rounds: int, settle: float) -> None:
    """The options of the workloads and their runs, shared with benchmarks/parallel.py."""
    parser.add_argument("--quick", action="store_true", help="2 rounds of smaller workloads (a few minutes)")
    parser.add_argument(
        "--rounds", type=int, default=rounds, help=f"rounds of each workload (default {rounds})"
    )
    parser.add_argument("--workloads", default="compute,overhead", help="'compute', 'overhead' or both")
    parser.add_argument(
        "--hidden", type=int, default=128, help="LSTM units a layer (default 128, the demo's)"
    )
    parser.add_argument("--lr", type=float, default=1.0, help="the sites' SGD learning rate (default 1.0)")
    parser.add_argument("--batch-size", type=int, default=10, help="windows a batch (default 10)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each contender, in turn (default 1)")
    parser.add_argument(
        "--settle", type=float, default=settle, help=f"seconds of rest before each contender ({settle:g})"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="keep the runs and their log here (default: a temporary folder)")
    parser.add_argument("--markdown", action="store_true", help="also print the tables as markdown")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    workload_arguments(parser, rounds=5, settle=5.0)
    parser.add_argument(
        "--only", default=",".join(CONTENDERS), help=f"contenders (default {','.join(CONTENDERS)})"
    )
    parser.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.config, Path(args.output))
        return 0
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    args.only = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = sorted(set(args.only) - set(CONTENDERS)) + sorted(set(args.workloads) - {"compute", "overhead"})
    if unknown:
        parser.error(f"unknown contender or workload: {', '.join(unknown)}")
    if "plain" not in args.only:
        args.only.insert(0, "plain")  # every comparison is against it
    torch.set_num_threads(1)
    console.print(f"[dim]{time.strftime('%Y-%m-%d %H:%M')}  {machine()}[/dim]")
    console.print("[dim]torch: one thread in every process of every contender[/dim]\n")
    with tempfile.TemporaryDirectory(prefix="confide-bench-vs-flower-") as tmp:
        scratch = Path(args.output) if args.output else Path(tmp)
        scratch.mkdir(parents=True, exist_ok=True)
        log = scratch / "contenders.log"
        results = {w.key: compare(w, args, scratch / time.strftime("%H%M%S"), log) for w in workloads(args)}
        met = goals(results, args.markdown)
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
