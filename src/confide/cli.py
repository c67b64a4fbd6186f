"""The ``confide`` command: run, server, client, aggregator, certs, keys, enroll, generate, export, report,
audit, data, config.

The command line owns everything a person sees: rich progress, one summary line per evaluated round, and exit
codes. A :class:`~confide.errors.ConfideError` is printed as one line (exit 2); any other exception is a bug
and keeps its traceback.

Over ~400 lines because every command's parser, progress display and output live here, the only place that
prints; ``_parser`` is one long list of arguments and their help, read top to bottom.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import logging
import math
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from confide.errors import ConfideError
from confide.report import human_bytes

log = logging.getLogger(__name__)

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

PIPED_WIDTH = 1000
"""Columns of output that goes to a file or a pipe: Rich would wrap it at 80 (mid-number, in a CI log)."""


def _unwrap_when_piped() -> None:
    """Output not on a terminal is not wrapped (a line is as long as it is), whatever COLUMNS says (a stale
    COLUMNS=80 is often inherited by programs run from tools); on a terminal it fits the terminal."""
    for c in (console, err_console):
        if not c.is_terminal:
            c.width = PIPED_WIDTH


KNOWN_WARNINGS = (
    (
        "batching rule for aten::mkldnn_rnn_layer",
        "PyTorch computes the LSTM's per-window gradients one window at a time here (a slow path): the run's "
        "results are the same, it only takes longer",
    ),
    (
        "is_gradient_checkpointing",
        "transformers renamed a method that peft still calls; nothing in the run changes",
    ),
)
"""Library warnings a run can meet, each with what it means for the run, in plain words."""


def _library(filename: str) -> str:
    """The package a warning came from, by its file's path (``.../site-packages/torch/...`` -> torch)."""
    parts = Path(filename).parts
    for marker in ("site-packages", "dist-packages"):
        if marker in parts and parts.index(marker) + 1 < len(parts):
            return parts[parts.index(marker) + 1].removesuffix(".py")
    return Path(filename).stem


def _plain_warnings() -> None:
    """Show each library warning once, as one line on stderr that says what it means for the run where that
    is known, instead of the library's raw text and source line at every place it is raised."""
    seen: set[tuple[str, str]] = set()

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        lines = str(message).strip().splitlines()
        text = lines[0] if lines else category.__name__
        library = _library(filename)
        if (library, text) in seen:
            return
        seen.add((library, text))
        meaning = next((m for pattern, m in KNOWN_WARNINGS if pattern in text), None)
        if meaning is not None:
            err_console.print(f"note: {meaning} ({library} warned: {text})", markup=False, soft_wrap=True)
        else:
            err_console.print(
                f"note: {library} warned, once ({category.__name__}; the run goes on): {text}",
                markup=False,
                soft_wrap=True,
            )

    warnings.showwarning = show


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _unwrap_when_piped()
    _plain_warnings()
    logging.basicConfig(level=logging.WARNING if not args.verbose else logging.INFO, format="%(message)s")
    # dp-accounting's RDP logs through absl when an order fails to converge and is left out: that only
    # makes epsilon larger (safe), and says nothing a user can act on.
    logging.getLogger("absl").setLevel(logging.ERROR)
    try:
        return int(args.func(args) or 0)
    except ConfideError as e:
        err_console.print(f"[bold red]error:[/] {type(e).__name__}: {e}", markup=True, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        hints = {
            "server": "interrupted; the same `confide server` command resumes the run after its last round",
            "client": "interrupted; the server goes on without this site until it is started again",
        }
        default = "interrupted; continue a run with `confide run --resume RUN_DIR`"
        err_console.print(hints.get(str(getattr(args, "command", "")), default))
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="confide", description="Federated training of generative models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what confide does")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="train a model federatedly, as a config says")
    run.add_argument("config", nargs="?", type=Path, help="a TOML config, e.g. examples/shakespeare.toml")
    _overrides(run)
    run.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue an interrupted run")
    run.add_argument("--no-report", action="store_true", help="do not write report.html at the end")
    run.set_defaults(func=cmd_run)

    gen = sub.add_parser("generate", help="write text with a run's latest model")
    gen.add_argument("run_dir", type=Path)
    gen.add_argument("--prompt", default="ROMEO.\n")
    gen.add_argument(
        "--length", type=int, default=400, help="characters to generate (new tokens, for an 'hf' model)"
    )
    gen.add_argument("--temperature", type=float, default=0.8, help="0 is greedy; higher is more varied")
    gen.add_argument("--top-k", type=int, default=20, help="sample among the k likeliest characters (0: all)")
    gen.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        help="'hf' models: sample among the likeliest tokens that make up this probability (1: all)",
    )
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(func=cmd_generate)

    exp = sub.add_parser(
        "export", help="write a run's model in Hugging Face's formats, for transformers and peft to load"
    )
    exp.add_argument("run_dir", type=Path)
    exp.add_argument("--out", type=Path, required=True, metavar="DIR", help="the folder to write (new)")
    exp.add_argument(
        "--merged",
        action="store_true",
        help="for an adapter run: write the base with the adapter merged in (and the adapter to DIR/adapter)",
    )
    exp.add_argument("--round", type=int, help="export the stored model of this round (default: the last)")
    exp.add_argument("--force", action="store_true", help="replace a previous export in DIR")
    exp.set_defaults(func=cmd_export)

    rep = sub.add_parser("report", help="write RUN_DIR/report.html with plots of the run")
    rep.add_argument("run_dir", type=Path)
    rep.set_defaults(func=cmd_report)

    dash = sub.add_parser(
        "dashboard", help="a live, read-only web page of a run: open it while the run goes on, or after"
    )
    dash.add_argument("run_dir", type=Path, help="the run directory (it may not have started yet)")
    _dashboard_arguments(dash, "--listen", "--token")
    dash.set_defaults(func=cmd_dashboard)

    data = sub.add_parser("data", help="inspect or fetch data sets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    fetch = data_sub.add_parser("fetch", help="download a data set into the cache")
    fetch.add_argument("name", choices=["shakespeare"])
    fetch.add_argument("--cache-dir", type=Path)
    fetch.set_defaults(func=cmd_data_fetch)
    shk = data_sub.add_parser("shakespeare", help="sites and samples of the Shakespeare task")
    shk.add_argument("--cache-dir", type=Path)
    shk.add_argument("--min-lines", type=int, default=64)
    shk.set_defaults(func=cmd_data_shakespeare)
    text = data_sub.add_parser("text", help="sites and samples of your own text (folder or .jsonl)")
    text.add_argument("path", type=Path)
    text.set_defaults(func=cmd_data_text)

    audit = sub.add_parser("audit", help="measure what a trained model leaks")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    can = audit_sub.add_parser(
        "canaries",
        help="plant secrets in some sites' text, train with and without DP, and measure their exposure",
    )
    can.add_argument("config", type=Path, help="a TOML config with privacy.dp set")
    _overrides(can)
    can.add_argument("--canaries", type=int, default=4, help="secrets to plant, one site each (default 4)")
    can.add_argument("--repeats", type=int, default=20, help="copies of each secret in its site (default 20)")
    can.add_argument(
        "--candidates", type=int, default=2000, help="random secrets each canary is ranked against (2000)"
    )
    can.set_defaults(func=cmd_audit_canaries)
    inv = audit_sub.add_parser(
        "inversion",
        help="reconstruct a site's text from its update as the server sees it under each privacy layer",
    )
    inv.add_argument("config", type=Path, help="a TOML config (its model, data, plan and privacy layers)")
    _overrides(inv)
    inv.add_argument(
        "--batch-sizes", type=_int_list, default=[1, 4, 16], metavar="N,N,..", help="batch sizes (1,4,16)"
    )
    inv.add_argument(
        "--steps", type=_int_list, default=[1, 4], metavar="N,N,..", help="local steps per round (1,4)"
    )
    inv.add_argument(
        "--views",
        type=lambda text: [v.strip() for v in text.split(",") if v.strip()],
        default=None,
        metavar="VIEW,..",
        help="what the server sees, among none, dpsgd, distributed-share, secagg, secagg+dp "
        "(default: all the config allows)",
    )
    inv.add_argument(
        "--sites-summed", type=int, default=None, help="sites in the secure sum (the config's per round)"
    )
    inv.add_argument("--iterations", type=int, default=40, help="optimisation steps per restart (40)")
    inv.add_argument("--restarts", type=int, default=1, help="restarts of the optimisation (1)")
    inv.add_argument("--discrete", type=int, default=100, help="discrete refinements per restart (100)")
    inv.add_argument(
        "--sequential-batch",
        type=int,
        default=4,
        help="the largest batch the sequential search reads (4; 0: none; it costs a search per window)",
    )
    inv.add_argument(
        "--run",
        type=Path,
        default=None,
        metavar="RUN_DIR",
        help="attack at this run's last checkpoint (default: the config's initial weights)",
    )
    inv.set_defaults(func=cmd_audit_inversion)
    mem = audit_sub.add_parser(
        "membership",
        help="train with and without DP and tell the records a model trained on from held-out ones",
    )
    mem.add_argument("config", type=Path, help="a TOML config")
    _overrides(mem)
    mem.add_argument("--sites", type=int, default=20, help="sites whose records are attacked (20)")
    mem.add_argument("--records", type=int, default=50, help="records of each kind per audited site (50)")
    mem.add_argument(
        "--references", type=int, default=1, help="reference runs without the audited sites (1; 0: none)"
    )
    mem.set_defaults(func=cmd_audit_membership)

    srv = sub.add_parser("server", help="serve a run to enrolled sites over gRPC with TLS (a deployment)")
    srv.add_argument("--config", type=Path, required=True, help="the run's TOML config")
    srv.add_argument("--listen", default="0.0.0.0:7443", metavar="HOST:PORT", help="where to listen (7443)")
    srv.add_argument(
        "--dir", type=Path, default=Path("deploy"), help="certificates and enrollments (`confide certs`)"
    )
    _overrides(srv)
    srv.add_argument("--ready-file", type=Path, help="write the port here once listening (for scripts)")
    srv.add_argument("--no-report", action="store_true", help="do not write report.html at the end")
    _dashboard_arguments(srv, "--dashboard", "--dashboard-token")
    srv.set_defaults(func=cmd_server)

    cli = sub.add_parser("client", help="take part in a deployed run as one site (or several)")
    cli.add_argument("--server", required=True, metavar="HOST:PORT", help="the server to dial")
    cli.add_argument(
        "--site",
        dest="sites",
        action="append",
        required=True,
        help="this site's name, as enrolled; repeat it to host several sites in this process (they share "
        "one model and take turns, as in a simulation)",
    )
    cli.add_argument(
        "--data",
        type=Path,
        required=True,
        help="the site's text: a text file, or a folder / .jsonl holding it (and the other sites' texts)",
    )
    cli.add_argument(
        "--credentials",
        type=Path,
        required=True,
        help="the file `confide enroll` wrote; with several sites, a folder of SITE.json files",
    )
    cli.add_argument(
        "--state",
        type=Path,
        default=None,
        help="the site's own SQLite file for what it keeps between rounds and across restarts (its DP-SGD "
        "privacy spent, control variates, personal models); default: beside the credentials",
    )
    cli.add_argument("--threads", type=int, default=0, help="torch threads (0: the run's setting)")
    cli.add_argument(
        "--connection-per-site",
        action="store_true",
        help="with several sites, open a TLS connection for each (as separate machines would) instead of "
        "sharing one",
    )
    cli.add_argument(
        "--give-up-after", type=float, default=900.0, help="seconds without the server before giving up"
    )
    _enclave_arguments(cli)
    cli.set_defaults(func=cmd_client)

    agg = sub.add_parser(
        "aggregator",
        help="serve the attested aggregator (TEE) that `confide server` reaches at privacy.enclave_address",
    )
    agg.add_argument("--config", type=Path, required=True, help="the run's TOML config (the server's)")
    _overrides(agg)
    agg.add_argument(
        "--population", type=int, required=True, help="the number of enrolled sites (the server's run)"
    )
    agg.add_argument(
        "--listen", default="127.0.0.1:7444", metavar="HOST:PORT", help="a loopback address (7444)"
    )
    agg.add_argument(
        "--measurement", action="store_true", help="print the measurement the sites must expect, and exit"
    )
    agg.add_argument(
        "--platform-key-out",
        type=Path,
        help="the INSECURE simulated platform: write its public key here, for the sites' operators",
    )
    agg.add_argument(
        "--ca",
        type=Path,
        metavar="CA_PEM",
        help="the deployment CA's certificate (ca.pem): the sites' identities are checked against it, and an "
        "update counts only if its site signed it; part of the measurement",
    )
    agg.add_argument("--ready-file", type=Path, help="write the port here once listening (for scripts)")
    agg.set_defaults(func=cmd_aggregator)

    certs = sub.add_parser(
        "certs", help="at the server: create a development CA and the server's TLS certificate"
    )
    certs.add_argument("--dir", type=Path, default=Path("deploy"), help="the server's folder")
    certs.add_argument(
        "--host",
        dest="hosts",
        action="append",
        default=[],
        help="a name or IP address the server is reached at (repeatable; default localhost and 127.0.0.1)",
    )
    certs.add_argument(
        "--ca",
        type=Path,
        metavar="FOLDER",
        help="keep the CA's key (ca.key) in FOLDER instead of beside the server's files: the running server "
        "then cannot endorse false site identities (give the same --ca to `confide enroll`)",
    )
    certs.add_argument("--days", type=int, default=365)
    certs.add_argument("--overwrite", action="store_true", help="replace an existing server certificate")
    certs.set_defaults(func=cmd_certs)

    keys = sub.add_parser(
        "keys",
        help="at a site: make its private keys and the request (SITE.csr) to send to the server's operator",
    )
    keys.add_argument("site", help="the site's name, as it will be enrolled")
    keys.add_argument(
        "--dir",
        type=Path,
        default=Path("site"),
        help="the site's folder, where its keys stay (default: site)",
    )
    keys.add_argument(
        "--overwrite",
        action="store_true",
        help="make new keys even if the folder has some (the site must then be enrolled again)",
    )
    keys.set_defaults(func=cmd_keys)

    enroll = sub.add_parser(
        "enroll", help="at the server: admit a site, from its request (SITE.csr), and write its credentials"
    )
    enroll.add_argument("site", nargs="?", help="the site's name")
    enroll.add_argument("--dir", type=Path, default=Path("deploy"), help="the server's folder")
    enroll.add_argument(
        "--csr",
        type=Path,
        metavar="FILE",
        help="the request `confide keys SITE` wrote at the site: a client certificate is signed for its "
        "TLS key and its identity key is endorsed; without it the site gets a token and no identity",
    )
    enroll.add_argument(
        "--auth",
        choices=["mtls", "token"],
        help="how the site proves who it is: mtls (a client certificate; the default with --csr) or token "
        "(the default without); match the server's deploy.auth",
    )
    enroll.add_argument(
        "--ca", type=Path, metavar="FOLDER", help="the folder holding ca.key, if not the server's folder"
    )
    enroll.add_argument("--server", default="", metavar="HOST:PORT", help="recorded in the credentials file")
    enroll.add_argument("--days", type=int, default=365, help="how long a site certificate is valid")
    enroll.add_argument(
        "--out", type=Path, help="where to write the credentials (default DIR/sites/SITE.json)"
    )
    # Gone: it made the site's private key here, at the server. Kept only to say what replaces it.
    enroll.add_argument("--certificate", action="store_true", help=argparse.SUPPRESS)
    enroll.add_argument("--revoke", action="store_true", help="revoke the site: it is refused from now on")
    enroll.add_argument("--list", action="store_true", help="list enrolled and revoked sites")
    enroll.set_defaults(func=cmd_enroll)

    dp = sub.add_parser("dp", help="differential privacy: plan a run's noise before it trains")
    dp_sub = dp.add_subparsers(dest="dp_command", required=True)
    dp_plan = dp_sub.add_parser(
        "plan",
        help="the noise against the signal and the epsilon against each adversary, and whether the run "
        "can learn",
    )
    dp_plan.add_argument("config", help="a TOML config with site-level DP (privacy.dp)")
    _overrides(dp_plan)
    dp_plan.set_defaults(func=cmd_dp_plan)

    cfg = sub.add_parser("config", help="list every config option with its default")
    cfg.set_defaults(func=cmd_config)
    return parser


def _overrides(parser: argparse.ArgumentParser) -> None:
    """The ``--set SECTION.KEY=VALUE`` option every command that reads a config takes."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value (repeatable)",
    )


# -- run -------------------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from confide import config as config_module
    from confide.runtime.runner import Runner

    if args.resume is not None:
        if args.config is not None or args.overrides:
            raise ConfideError("--resume continues a run with its own saved config; give no CONFIG or --set")
        runner = Runner.resume(args.resume)
        console.print(f"Resuming [bold]{args.resume}[/] after round {runner.state.round}")
    else:
        if args.config is None:
            raise ConfideError(
                "give a config file (e.g. `confide run examples/shakespeare.toml`) or --resume RUN_DIR"
            )
        config = config_module.load(args.config, args.overrides)
        runner = Runner.start(config)
    try:
        with RichObserver(runner.config.run.rounds) as observer:
            runner.run(observer)
        _finish(runner, write=not args.no_report)
    finally:
        runner.close()  # a Ray backend stops its workers (and Ray, if it started it) even after an error
    return 0


def _worst_decile(accuracy: float) -> str:
    if math.isnan(accuracy):  # only the sum of the sites' evaluations is known (secure aggregation)
        return "per-site accuracy hidden by secure aggregation"
    return f"worst-decile site accuracy {accuracy:.3f}"


class RichObserver:
    """A live display of rounds and sites, and one line per evaluated round."""

    def __init__(self, rounds: int) -> None:
        self.rounds = rounds
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self.round_task: TaskID | None = None
        self.dp: Any = None
        self.secure = False
        self.site_task: TaskID | None = None
        self.baseline: float | None = None

    def __enter__(self) -> RichObserver:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def run_started(self, runner: Any, first_round: int) -> None:
        model = runner.config.model["kind"]
        sites = runner.sites
        self.dp = runner.dp
        self.secure = runner.secure is not None
        buffered = runner.buffered
        rounds = (
            f"{runner.strategy.count(len(sites))} sites per round, {runner.config.run.rounds} rounds"
            if buffered is None
            else f"asynchronous (FedBuff): {buffered.concurrency} sites training at once, "
            f"{runner.config.run.rounds} buffers of {buffered.buffer_size} updates"
        )
        console.print(
            f"[bold]{runner.config.run.name}[/]: {model} model with {runner.layout.size:,} parameters, "
            f"{len(sites):,} sites ({sum(s.num_train for s in sites):,} training windows"
            f"{', estimated: registered lazily' if runner.config.data.lazy else ''}), {rounds}"
        )
        workers = getattr(runner.backend, "workers", None)
        if runner.config.backend.kind == "ray" and workers is not None:
            b = runner.config.backend
            where = f"the cluster at {b.address}" if b.address else "this machine"
            console.print(
                f"backend: ray, {len(workers)} workers on {where} ({b.num_cpus:g} CPUs"
                + (f", {b.num_gpus:g} GPUs" if b.num_gpus else "")
                + " each), sites sticky to a worker"
            )
        elif not getattr(runner, "deployed", False):
            console.print(f"backend: local, {runner.backend.describe()}")
        if runner.baseline is not None:
            self.baseline = runner.baseline.accuracy
            console.print(
                f"unigram baseline (always predict {runner.baseline.character!r}): accuracy "
                f"{runner.baseline.accuracy:.3f} on the held-out text of {len(runner.eval_sites)} sites"
            )
        if runner.dp is not None:
            from confide.privacy.plan import plan

            console.print(runner.dp.describe())
            s = runner.config.server
            noise = plan(runner.dp, runner.config.run.rounds, runner.layout.size, s.optimizer, s.beta1)
            warning = noise.warning()
            if warning is not None:  # `confide dp plan` says the same, with its numbers
                console.print(f"WARNING: {warning}", style="bold red", markup=False, highlight=False)
        for layer in runner.federation.layers:
            describe = getattr(layer, "describe", None)
            if describe is not None:  # the enclave's says INSECURE for the simulated platform
                console.print(describe())
        if runner.attack.attackers:
            a = runner.config.attack
            console.print(
                f"[red]simulated attack[/]: {a.kind} by {len(runner.attack.attackers)} of {len(sites)} sites"
                + (" (colluding)" if a.collude else "")
            )
        if runner.config.privacy.record_dp:
            p = runner.config.privacy
            calibrated = (
                f" (calibrated: at most epsilon {p.record_target_epsilon:g} per window at every site over "
                f"{runner.config.run.rounds} rounds)"
                if p.record_target_epsilon
                else ""
            )
            console.print(
                f"record-level DP-SGD at every site: per-window clip {p.record_clip:g}, noise multiplier "
                f"{p.record_noise:g}{calibrated}; each site's epsilon is for its own windows at delta "
                "1/(10 x windows)"
            )
            from confide.privacy.plan import record_plan

            c = runner.config.client
            record = record_plan(
                [site.num_train for site in sites],
                runner.layout.size,
                sites_per_round=runner.strategy.count(len(sites)),
                rounds=runner.config.run.rounds,
                batch_size=c.batch_size,
                epochs=c.epochs,
                max_steps=c.max_steps or None,
                clip=p.record_clip,
                noise_multiplier=p.record_noise,
                calibrated=bool(p.record_target_epsilon),
            )
            warning = record.warning()
            if warning is not None:  # `confide dp plan` says the same, with its numbers
                console.print(f"WARNING: {warning}", style="bold red", markup=False, highlight=False)
        self.round_task = self.progress.add_task("rounds", total=self.rounds, completed=first_round - 1)
        self.site_task = self.progress.add_task("sites", total=1)

    def round_started(self, round: int, sites: Sequence[str]) -> None:
        assert self.site_task is not None
        self.progress.reset(self.site_task, total=len(sites), description=f"round {round}: sites")

    def site_done(self, round: int, site: str) -> None:
        assert self.site_task is not None
        self.progress.advance(self.site_task)

    def round_finished(self, result: Any) -> None:
        assert self.round_task is not None
        self.progress.advance(self.round_task)
        if self.dp is not None or self.secure:
            # With privacy layers on, every round's cost and spend is worth a line of its own.
            spent = ""
            if self.dp is not None:
                run = self.dp.spent()
                amplified = (
                    "no amplification claimed"
                    if self.dp.mechanism == "dp-ftrl"
                    else f"amplified {run.amplified:.3f}"
                )
                spent = (
                    f"  epsilon {run.epsilon:.3f} (worst site {run.worst_site:.3f}, median "
                    f"{run.median_site:.3f}, {amplified})"
                )
            console.print(
                f"[dim]round {result.round:>4}  {len(result.participants)} of {len(result.sites)} sites "
                f"in the sum  sent {human_bytes(result.bytes_sent)}  "
                f"received {human_bytes(result.bytes_received)}{spent}  {result.seconds:.1f}s[/]"
            )
        if result.staleness:
            stale = [s for s in result.staleness if s > 0]
            how = f"{len(stale)} stale (by {min(stale)} to {max(stale)} versions)" if stale else "none stale"
            console.print(
                f"[dim]buffer {result.round:>4}  {len(result.staleness)} updates, {how}  "
                f"clock {result.clock:,.1f}s[/]"
            )
        if result.abandoned:
            console.print(f"[yellow]round {result.round} abandoned: {result.abandoned}[/]")
        if result.rejected:
            for site, reason in result.rejected:
                console.print(f"[yellow]round {result.round}: refused the update of {site}: {reason}[/]")

    def round_retried(self, round: int, reason: str) -> None:
        console.print(f"[yellow]round {round} failed and will be retried: {reason}[/]")

    def evaluated(self, round: int, m: dict[str, Any]) -> None:
        console.print(
            f"round {round:>4}  accuracy {m['accuracy']:.3f}"
            + (f" (unigram {self.baseline:.3f})  " if self.baseline is not None else "  ")
            + f"loss {m['loss']:.3f}  perplexity {m['perplexity']:6.2f}  "
            f"{_worst_decile(m['site_accuracy_p10'])}  "
            f"{m['seconds']:5.1f}s  sent {human_bytes(m['bytes_sent'])}  "
            f"received {human_bytes(m['bytes_received'])}"
        )
        if "epsilon" in m or "record_epsilon_max" in m:
            parts = []
            if "epsilon" in m:
                parts.append(
                    f"site-level epsilon {m['epsilon']:.3f} at delta {m['delta']:.1e}: worst site "
                    f"{m['epsilon_worst_site']:.3f}, median site {m['epsilon_median_site']:.3f} against a "
                    "server that knows who took part, "
                    + (
                        f"{m['epsilon_amplified']:.3f} amplified by sampling "
                        if "epsilon_amplified" in m
                        else "and against anyone (no amplification claimed) "
                    )
                    + f"(noise multiplier {m['noise_multiplier']:.4g}, clip norm {m['clip_norm']:.3g})"
                )
            if "record_epsilon_max" in m:
                parts.append(
                    f"record-level epsilon of the {int(m['record_dp_sites'])} sites that trained: worst "
                    f"{m['record_epsilon_max']:.3f}, median {m['record_epsilon_median']:.3f}"
                )
            console.print("            privacy: " + ";  ".join(parts))
        if "update_bytes" in m:
            rouge = f"  ROUGE-L {m['rouge_l']:.3f}" if "rouge_l" in m else ""
            console.print(
                f"            language model: update {human_bytes(m['update_bytes'])} a site "
                f"({100 * m['update_fraction']:.2f}% of the model's {human_bytes(m['full_model_bytes'])})  "
                f"peak memory {human_bytes(m.get('site_peak_memory_max', 0))}{rouge}"
            )
        if "personal_accuracy" in m:
            console.print(
                f"            personalized: accuracy {m['personal_accuracy']:.3f}  "
                f"loss {m['personal_loss']:.3f}  "
                f"{_worst_decile(m['personal_site_accuracy_p10'])}  "
                f"({int(m['personalized_sites'])} of {int(m['eval_sites'])} sites hold a personal model)"
            )
        if "attack_success" in m:
            console.print(
                f"            [red]backdoor[/]: attack success {m['attack_success']:.3f} (greedy "
                "continuation after the trigger is the whole target), target characters right "
                f"{m['attack_char_accuracy']:.3f}"
            )

    def run_finished(self, runner: Any) -> None:
        pass

    def stopped(self, reason: str) -> None:
        console.print(f"[bold yellow]{reason}[/]")


def _finish(runner: Any, write: bool) -> None:
    e = runner.config.eval
    samples = []
    readable = runner.clear_weights() is not None
    if not readable and e.samples:
        console.print(
            "[yellow]No passage: this server holds the model only encrypted (CKKS), and only the sites can "
            "decrypt it.[/]"
        )
    for i in range(e.samples if readable else 0):
        text = runner.generate(e.prompt, e.sample_length, seed=i)
        samples.append((e.prompt, text[len(e.prompt) :]))
    if samples:
        how = " (decrypted with a simulated site's key)" if runner.encrypted else ""
        console.print(f"\n[bold]A passage written by the federated model{how}:[/]")
        console.print(samples[0][0] + samples[0][1], markup=False)
    if write:
        from confide.report import write_report

        path = write_report(runner.store.run_dir, samples)
        console.print(f"\nreport: {path}")
    console.print(f"run directory: {runner.store.run_dir}")


# -- the live view ---------------------------------------------------------------------------------------


def _dashboard_arguments(parser: argparse.ArgumentParser, listen: str, token: str) -> None:
    """The live view's address and token: ``--listen``/``--token`` of `confide dashboard`, or
    ``--dashboard [HOST:PORT]``/``--dashboard-token`` of `confide server` (off unless given)."""
    from_server = listen == "--dashboard"
    parser.add_argument(
        listen,
        nargs="?" if from_server else None,
        const="127.0.0.1:8765" if from_server else None,
        default=None if from_server else "127.0.0.1:8765",
        metavar="HOST:PORT",
        help=("serve the live view beside the run " if from_server else "where to listen ")
        + "(127.0.0.1:8765; any other address than this machine's needs a token)",
    )
    parser.add_argument(
        token,
        metavar="TOKEN",
        help="the token every request must carry ('generate': a new random one, printed in the address); "
        "or set CONFIDE_DASHBOARD_TOKEN",
    )


def _dashboard_banner(url: str, token: str | None) -> None:
    console.print(f"live view: {url}", markup=False, soft_wrap=True)
    if token is not None:
        console.print(
            "[yellow]The address holds the token: give it only to those who may watch this run. It is "
            "served over plain HTTP, so use it on a network you trust, or behind a TLS proxy.[/]"
        )


def cmd_dashboard(args: argparse.Namespace) -> int:
    from confide.dashboard import Dashboard

    if not args.run_dir.is_dir():
        raise ConfideError(f"{args.run_dir} is no run directory (give the folder `confide run` writes)")
    dashboard = Dashboard(args.run_dir, args.listen, args.token)
    with contextlib.suppress(KeyboardInterrupt):
        dashboard.serve(lambda url: _dashboard_banner(url, dashboard.token))
    return 0


# -- deployment ------------------------------------------------------------------------------------------


def cmd_server(args: argparse.Namespace) -> int:
    from confide import config as config_module
    from confide.runtime.grpc.deployment import Deployment

    config = config_module.load(args.config, args.overrides, stamp=False)
    dashboard = None
    if args.dashboard is not None:
        from confide.dashboard import Dashboard

        run_dir = Path(config.run.output) / config.run.name
        dashboard = Dashboard(run_dir, args.dashboard, args.dashboard_token)
    deployment = Deployment(config, args.dir, args.listen)
    reason = "the server stopped"
    try:
        if dashboard is not None:
            _dashboard_banner(dashboard.start(), dashboard.token)
        port = deployment.start()
        host = args.listen.rsplit(":", 1)[0]
        console.print(
            f"listening on {host}:{port} (TLS, {config.deploy.auth} authentication) for "
            f"{len(deployment.population)} enrolled sites; run directory {deployment.run_dir}"
        )
        if args.ready_file is not None:
            args.ready_file.write_text(str(port), encoding="utf-8")
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            console=console,
            transient=True,
        ) as progress:
            task = progress.add_task("sites joined", total=None)
            deployment.wait_for_sites(
                lambda joined, need: progress.update(task, completed=joined, total=need)
            )
        runner = deployment.prepare()
        if deployment.resuming:
            console.print(f"Resuming {deployment.run_dir} after round {runner.state.round}")
        with RichObserver(config.run.rounds) as observer:
            deployment.run(observer)
        reason = "the run is finished"
        _finish(runner, write=not args.no_report)
    except KeyboardInterrupt:
        reason = "the server was stopped; it resumes the run when started again"
        raise
    finally:
        deployment.close(reason)
        if dashboard is not None:
            dashboard.stop()
    return 0


def _enclave_arguments(cli: argparse.ArgumentParser) -> None:
    cli.add_argument(
        "--enclave-platform",
        metavar="NAME",
        help="the attested aggregator's platform this site trusts (e.g. 'simulated'); with the next two",
    )
    cli.add_argument(
        "--enclave-platform-key",
        type=Path,
        metavar="PATH",
        help="the platform's root of trust from this site's operator (never from the server)",
    )
    cli.add_argument(
        "--enclave-measurement",
        metavar="HEX",
        help="the aggregator measurement this site accepts (`confide aggregator --measurement`)",
    )
    cli.add_argument(
        "--enclave-max-age", type=float, default=600.0, help="seconds a report stays acceptable (600)"
    )
    cli.add_argument(
        "--enclave-allow-insecure-simulation",
        action="store_true",
        help="accept the INSECURE simulated platform, which protects nothing (to test a deployment only)",
    )


def _enclave_trust(args: argparse.Namespace) -> Any:
    """The site's own trust anchors for the attested aggregator, or None when none are given."""
    given = (args.enclave_platform, args.enclave_platform_key, args.enclave_measurement)
    if not any(given):
        return None
    if not all(given):
        raise ConfideError(
            "the attested aggregator needs all three of --enclave-platform, --enclave-platform-key and "
            "--enclave-measurement, from this site's operator"
        )
    from confide.privacy.tee.layer import SiteTrust

    try:
        root = args.enclave_platform_key.read_bytes()
    except OSError as e:
        raise ConfideError(f"cannot read the enclave platform key {args.enclave_platform_key}: {e}") from e
    trust = SiteTrust.from_files(
        args.enclave_platform,
        root,
        args.enclave_measurement,
        args.enclave_max_age,
        args.enclave_allow_insecure_simulation,
    )
    console.print(f"attested aggregator expected: {args.enclave_platform}, measurement {trust.measurement}")
    return trust


def cmd_aggregator(args: argparse.Namespace) -> int:
    from confide import config as config_module
    from confide.privacy.tee.attestation import INSECURE_LABEL, SimulatedPlatform
    from confide.privacy.tee.enclave import Enclave
    from confide.runtime.grpc.aggregator import aggregator_settings, make_platform, start_aggregator

    config = config_module.load(args.config, args.overrides, stamp=False)
    settings = aggregator_settings(config, args.population)
    ca_pem = None
    if args.ca is not None:
        try:
            ca_pem = args.ca.read_bytes()
        except OSError as e:
            raise ConfideError(f"cannot read the CA certificate {args.ca}: {e}") from None
        settings = dataclasses.replace(settings, identity_ca=hashlib.sha256(ca_pem).hexdigest())
    if args.measurement:
        console.print(settings.measurement())
        return 0
    config_module.check_deployment(config)
    platform = make_platform(config)
    if platform.insecure and args.platform_key_out is None:
        raise ConfideError("the simulated platform needs --platform-key-out PATH, for the sites to verify it")
    if ca_pem is None:
        raise ConfideError(
            "`confide aggregator` needs --ca PATH/ca.pem, the deployment CA's certificate: it counts an "
            "update only if its site signed it with the identity the CA endorsed"
        )
    enclave = Enclave(settings, platform)
    if isinstance(platform, SimulatedPlatform) and args.platform_key_out is not None:
        args.platform_key_out.write_bytes(platform.public_key())
    server, port = start_aggregator(enclave, args.listen, ca_pem)
    label = INSECURE_LABEL if platform.insecure else platform.platform
    console.print(
        f"attested aggregator on the {label}; measurement {enclave.measurement}; listening on "
        f"{args.listen.rsplit(':', 1)[0]}:{port} (plaintext gRPC, loopback only)"
    )
    if args.ready_file is not None:
        args.ready_file.write_text(str(port), encoding="utf-8")
    try:
        server.wait_for_termination()
    finally:
        server.stop(grace=1.0)
    return 0


def cmd_client(args: argparse.Namespace) -> int:
    from confide.runtime.grpc.client import SiteClient, load_site_data

    sites = list(dict.fromkeys(args.sites))
    if len(sites) > 1:
        return _client_group(args, sites)
    site = sites[0]
    credentials = _site_credentials(args.credentials, site)
    data = load_site_data(args.data, site)
    client = SiteClient(
        args.server,
        credentials,
        data,
        threads=args.threads,
        give_up_after=args.give_up_after,
        on_status=lambda message: console.print(message),
        state=_site_state(args, site),
        enclave_trust=_enclave_trust(args),
    )
    console.print(
        f"site {site}: {data.num_train:,} training and {data.num_test:,} test windows; dialing {args.server}"
    )
    reason = client.run()
    console.print(f"site {site}: {reason} ({client.done} pieces of work done)")
    return 0


def _site_state(args: argparse.Namespace, name: str) -> Any:
    """The site's durable state file: --state, or NAME.state.sqlite beside the credentials."""
    from confide.client.state import DurableSiteState

    if args.state is not None:
        return DurableSiteState(args.state)
    folder = args.credentials if args.credentials.is_dir() else args.credentials.parent
    return DurableSiteState(folder / f"{name}.state.sqlite")


def _site_credentials(path: Path, site: str) -> Any:
    from confide.runtime.grpc.security import Credentials

    return Credentials.load(path / f"{site}.json" if path.is_dir() else path)


def _client_group(args: argparse.Namespace, sites: list[str]) -> int:
    """Several sites in this process: one thread each, one shared model, turns at work."""
    import threading

    from confide.runtime.grpc.client import SiteClient, SiteGroup, load_site_data

    if not args.credentials.is_dir():
        raise ConfideError(
            f"{len(sites)} sites need a folder of credentials files (SITE.json each), not the file "
            f"{args.credentials}"
        )
    group = SiteGroup(share_connection=not args.connection_per_site, state=_site_state(args, "group"))
    trust = _enclave_trust(args)
    clients = [
        SiteClient(
            args.server,
            _site_credentials(args.credentials, site),
            load_site_data(args.data, site),
            threads=args.threads,
            give_up_after=args.give_up_after,
            on_status=lambda message: log.info("%s", message),
            group=group,
            enclave_trust=trust,
        )
        for site in sites
    ]
    outcomes: dict[str, str] = {}

    def serve(client: SiteClient) -> None:
        try:
            outcomes[client.site] = client.run()
        except ConfideError as e:
            outcomes[client.site] = f"error: {e}"

    console.print(f"{len(clients)} sites in this process; dialing {args.server}")
    threads = [threading.Thread(target=serve, args=(c,), name=c.site, daemon=True) for c in clients]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            thread.join()
    except KeyboardInterrupt:
        for client in clients:
            client.stop()
        raise
    finally:
        group.close()
    failed = {site: why for site, why in outcomes.items() if why.startswith("error:")}
    reasons = sorted({why for why in outcomes.values() if not why.startswith("error:")})
    done = sum(c.done for c in clients)
    console.print(
        f"{len(clients) - len(failed)} of {len(clients)} sites: {'; '.join(reasons) or 'none finished'} "
        f"({done} pieces of work done)"
    )
    for site, why in sorted(failed.items()):
        console.print(f"[red]site {site}: {why}[/]")
    return 2 if failed else 0


def cmd_certs(args: argparse.Namespace) -> int:
    from confide.runtime.grpc.security import create_certificates

    hosts = args.hosts or ["localhost", "127.0.0.1"]
    paths = create_certificates(
        args.dir, hosts, days=args.days, overwrite=args.overwrite, ca_directory=args.ca
    )
    console.print(
        f"development CA and server certificate for {', '.join(hosts)} in {args.dir}; "
        "they are for development: a real deployment should use its organisation's CA"
    )
    if args.ca is None:
        console.print(
            f"the CA's key is {paths.ca_key}, beside the server's files: a server holding it could endorse "
            "false site identities; keep it elsewhere with --ca FOLDER"
        )
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from confide.runtime.grpc.identity import make_site_keys

    keys = make_site_keys(args.dir, args.site, overwrite=args.overwrite)
    p = keys.paths
    made = f"made {', '.join(keys.made)}" if keys.made else "kept the keys already there"
    console.print(
        f"site {args.site}: {made} in {p.directory} (private: they never leave this folder)\n"
        f"send {p.request} to the server's operator (it holds no secret), who runs\n"
        f"  confide enroll {args.site} --csr {p.request.name}\n"
        f"and sends back {p.credentials.name}: put it in {p.directory}, beside the keys.\n"
        f"identity fingerprint: {keys.fingerprint} (the operator should see the same one when enrolling)"
    )
    return 0


def cmd_enroll(args: argparse.Namespace) -> int:
    from confide.runtime.grpc.security import Enrollment, issue_site_credentials

    if args.list:
        with Enrollment.open(args.dir) as enrollment:
            table = Table("site", "method", "identity", "enrolled", "revoked")
            for record in enrollment.sites():
                table.add_row(
                    record.site,
                    record.method,
                    _fingerprint(record.identity),
                    time.strftime("%Y-%m-%d %H:%M", time.localtime(record.enrolled_at)),
                    time.strftime("%Y-%m-%d %H:%M", time.localtime(record.revoked_at))
                    if record.revoked_at
                    else "",
                )
            console.print(table)
        return 0
    if not args.site:
        raise ConfideError("name the site to enroll or revoke, e.g. `confide enroll hospital-a`")
    if args.revoke:
        with Enrollment.open(args.dir) as enrollment:
            enrollment.revoke(args.site)
        console.print(f"site {args.site} is revoked: the server refuses it from its next call")
        return 0
    if args.certificate:
        raise ConfideError(
            "`confide enroll --certificate` is gone: it made the site's private key here, at the server. "
            f"The site now makes its own: it runs `confide keys {args.site}` and sends {args.site}.csr, "
            f"which you enroll with `confide enroll {args.site} --csr {args.site}.csr`"
        )
    request = _read_request(args.csr) if args.csr is not None else None
    credentials = issue_site_credentials(
        args.dir,
        args.site,
        server=args.server,
        request=request,
        auth=args.auth,
        ca_directory=args.ca,
        days=args.days,
        source=str(args.csr),
    )
    out = args.out or args.dir / "sites" / f"{args.site}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    credentials.save(out)
    if credentials.token is not None:
        how = "a token (the server keeps only its hash): the file is its password, give it privately"
    else:
        how = "a client certificate for the key it made; the file holds no secret"
    console.print(f"site {args.site} enrolled with {how}; give {out} to the site")
    if request is not None:
        with Enrollment.open(args.dir) as enrollment:
            enrolled = enrollment.record(args.site)
        console.print(
            f"identity fingerprint: {_fingerprint(enrolled.identity if enrolled else None)} (check that the "
            "site's operator sees the same one)"
        )
    return 0


def _read_request(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfideError(f"cannot read the site's request {path}: {e}") from e


def _fingerprint(identity: tuple[bytes, bytes] | None) -> str:
    from confide.runtime.grpc.identity import identity_fingerprint

    return identity_fingerprint(identity[0]) if identity is not None else ""


# -- generate, report ----------------------------------------------------------------------------------


def _load_model(run_dir: Path) -> tuple[Any, Any, Any]:
    from confide import config as config_module
    from confide.core import Layout
    from confide.data import DEFAULT_TOKENIZER
    from confide.runtime.runner import build_model_for
    from confide.runtime.store import Store

    config = config_module.load(run_dir / "config.toml")
    model = build_model_for(config, DEFAULT_TOKENIZER.vocab_size)
    layout = Layout.of_module(model)
    store = Store.open(run_dir)
    try:
        checkpoint = store.latest_checkpoint()
        if checkpoint is None:
            raise ConfideError(
                f"{run_dir} has no checkpoint yet; it is written every run.checkpoint_every rounds"
            )
        # Under CKKS, only with a simulated site's key from the run store.
        checkpoint = dataclasses.replace(checkpoint, weights=store.readable(checkpoint.weights, layout.size))
    finally:
        store.close()
    layout.check(checkpoint.weights, "checkpoint's weights")
    return model, layout, checkpoint


def cmd_generate(args: argparse.Namespace) -> int:
    from confide.runtime.runner import generate_text

    if args.length < 1:
        raise ConfideError(f"--length must be at least 1 (got {args.length})")
    if args.temperature < 0:
        raise ConfideError(f"--temperature must be >= 0 (got {args.temperature})")
    if not 0 < args.top_p <= 1:
        raise ConfideError(f"--top-p must be in (0, 1] (got {args.top_p})")
    model, layout, checkpoint = _load_model(args.run_dir)
    text = generate_text(
        model,
        layout,
        checkpoint.weights,
        args.prompt,
        args.length,
        args.temperature,
        args.top_k or None,
        args.seed,
        args.top_p if args.top_p < 1 else None,
    )
    console.print(text, markup=False)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from confide.export import export_run

    with contextlib.suppress(ImportError):  # without transformers, export_run says what to install
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # one progress bar per file written: noise here
    done = export_run(args.run_dir, args.out, merged=args.merged, round=args.round, force=args.force)
    console.print(
        f"exported the model of round {done.round} of {done.rounds} of {args.run_dir} to {done.out_dir}: "
        f"{done.description}",
        markup=False,
        soft_wrap=True,
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from confide.report import write_report
    from confide.runtime.runner import generate_text

    model, layout, checkpoint = _load_model(args.run_dir)
    prompt = "ROMEO.\n"
    samples = [
        (prompt, generate_text(model, layout, checkpoint.weights, prompt, 300, seed=i)[len(prompt) :])
        for i in range(2)
    ]
    console.print(f"report: {write_report(args.run_dir, samples)}")
    return 0


# -- audit ---------------------------------------------------------------------------------------------


def cmd_audit_canaries(args: argparse.Namespace) -> int:
    from confide import config as config_module
    from confide.runtime.audit import audit_canaries

    config = config_module.load(args.config, args.overrides)
    with contextlib.ExitStack() as live:

        def observer(label: str, runner: Any) -> RichObserver:
            live.close()  # one live display at a time: the previous training's ends here
            console.print(f"\n[bold]Training {label}[/]")
            return live.enter_context(RichObserver(runner.config.run.rounds))

        folder, runs = audit_canaries(config, args.canaries, args.repeats, args.candidates, observer)
    most = math.log2(args.candidates + 1)
    table = Table(
        title=f"Canary exposure in bits (at most {most:.1f} by rank among {args.candidates} candidates)"
    )
    table.add_column("secret")
    table.add_column("site")
    table.add_column("rounds its site trained", justify="right")
    for run in runs:
        table.add_column(f"exposure {run.label}", justify="right")
        table.add_column(f"fitted {run.label}", justify="right")
    for i, c in enumerate(runs[0].canaries):
        row = [c.secret, c.site, str(c.rounds_trained)]
        for run in runs:
            row += [f"{run.canaries[i].exposure:.2f}", f"{run.canaries[i].fitted_exposure:.2f}"]
        table.add_row(*row)
    console.print(table)
    for run in runs:
        privacy = (
            "no differential privacy"
            if run.epsilon is None
            else f"site-level epsilon {run.epsilon:.2f} at delta {run.delta:.1e}"
        )
        console.print(f"{run.label}: accuracy {run.accuracy:.3f}, {privacy}  ({run.run_dir})")
    console.print(
        "exposure = log2(candidates + 1) - log2(rank among them): about 1.4 for a secret the model never "
        "saw, "
        "the maximum for one it would complete first; 'fitted' extrapolates past the candidates (Carlini et "
        "al. 2019, sec. 4.3)"
    )
    console.print(f"results: {folder / 'canaries.json'}; page of every audit: {folder / 'audit.html'}")
    return 0


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected whole numbers separated by commas, got {text!r}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def cmd_audit_inversion(args: argparse.Namespace) -> int:
    from confide import config as config_module
    from confide.audit.inversion import Settings
    from confide.runtime.audit import audit_folder
    from confide.runtime.inversion import audit_inversion

    config = config_module.load(args.config, args.overrides, stamp=False)
    weights = None
    if args.run is not None:
        _, _, checkpoint = _load_model(args.run)
        weights = checkpoint.weights
        console.print(f"attacking at the weights of {args.run}, round {checkpoint.round}")
    settings = Settings(
        iterations=args.iterations,
        restarts=args.restarts,
        discrete=args.discrete,
        sequential_batch=args.sequential_batch,
    )
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("inverting", total=None)

        def report(done: int, total: int, label: str) -> None:
            progress.update(task, completed=done, total=total, description=f"inverting: {label}")

        audit = audit_inversion(
            config,
            batch_sizes=args.batch_sizes,
            steps=args.steps,
            scenarios=args.views,
            weights=weights,
            settings=settings,
            sites_summed=args.sites_summed,
            progress=report,
        )
    table = Table(
        title=f"Gradient inversion of site {audit.victim}'s update ({audit.model}): what the server recovers"
    )
    for column in (
        "view",
        "batch",
        "steps",
        "token accuracy",
        "ROUGE-L",
        "baseline acc.",
        "baseline ROUGE-L",
    ):
        table.add_column(column, justify="left" if column == "view" else "right")
    for c in audit.cells:
        table.add_row(
            c.scenario,
            str(c.batch_size),
            str(c.steps),
            f"{c.token_accuracy:.3f}",
            f"{c.rouge_l:.3f}",
            f"{c.baseline_token_accuracy:.3f}",
            f"{c.baseline_rouge_l:.3f}",
            f"{c.words:.2f}",
            f"{c.baseline_words:.2f}",
        )
    console.print(table)
    first = next((c for c in audit.cells if c.examples), None)
    if first is not None:
        example = first.examples[0]
        console.print(f"[bold]true text[/] ({first.scenario}, batch {first.batch_size}):", markup=True)
        console.print(repr(example.true), markup=False)
        console.print("[bold]reconstructed:[/]", markup=True)
        console.print(repr(example.reconstructed), markup=False)
    console.print(
        "baseline: the model's own guess of each window, without the update; words: the share of the true "
        f"text's words the reconstruction holds, in any order. Noise in this audit is {audit.noise}."
    )
    if args.run is None:
        console.print(
            "These are the initial weights, whose states say little of the text read; a server attacks every "
            "round, and the attack reads far more from a trained model's update: give --run RUN_DIR."
        )
    folder = audit_folder(config)
    console.print(f"results: {folder / 'inversion.json'}; page of every audit: {folder / 'audit.html'}")
    return 0


def cmd_audit_membership(args: argparse.Namespace) -> int:
    from confide import config as config_module
    from confide.runtime.membership import audit_membership

    config = config_module.load(args.config, args.overrides, stamp=False)
    with contextlib.ExitStack() as live:

        def observer(label: str, runner: Any) -> RichObserver:
            live.close()  # one live display at a time: the previous training's ends here
            console.print(f"\n[bold]Training {label}[/]")
            return live.enter_context(RichObserver(runner.config.run.rounds))

        audit = audit_membership(
            config, sites=args.sites, records=args.records, references=args.references, observer=observer
        )
    table = Table(title="Membership inference: members (trained on) against held-out records")
    for column in ("model", "privacy", "attack", "AUC", "TPR at 1% FPR", "TPR at 0.1% FPR", "members"):
        table.add_column(column, justify="left" if column in ("model", "privacy", "attack") else "right")
    for r in audit.results:
        privacy = "no DP" if r.epsilon is None else f"epsilon {r.epsilon:.2f}"

        def rate(value: float | None) -> str:
            return "-" if value is None else f"{100 * value:.1f}%"

        table.add_row(
            r.model,
            privacy,
            r.attack,
            f"{r.auc:.3f}",
            rate(r.tpr_at_1pct_fpr),
            rate(r.tpr_at_01pct_fpr),
            f"{r.members} / {r.nonmembers}",
        )
    console.print(table)
    if audit.note:
        console.print(audit.note)
    console.print(
        "AUC 0.5 and a TPR equal to the FPR are guessing; '-': too few non-members to read that FPR. "
        f"results: {Path(audit.folder) / 'membership.json'}; page of every audit: "
        f"{Path(audit.folder) / 'audit.html'}"
    )
    return 0


# -- data, config --------------------------------------------------------------------------------------


def cmd_data_fetch(args: argparse.Namespace) -> int:
    from confide.data import shakespeare

    started = time.perf_counter()
    where = shakespeare.fetch(args.cache_dir)
    console.print(f"Shakespeare texts available at {where} ({time.perf_counter() - started:.1f}s)")
    return 0


def cmd_data_shakespeare(args: argparse.Namespace) -> int:
    from confide.data import shakespeare

    _print_summary(shakespeare.load(cache_dir=args.cache_dir, min_lines=args.min_lines))
    return 0


def cmd_data_text(args: argparse.Namespace) -> int:
    from confide.data.text import load_text

    _print_summary(load_text(args.path))
    return 0


def _print_summary(dataset: Any) -> None:
    import numpy as np

    table = Table(title=f"{dataset.name}: {len(dataset.sites)} sites")
    for column in ("samples", "total", "min per site", "median", "max"):
        table.add_column(column, justify="left" if column == "samples" else "right")
    train = np.array([s.num_train for s in dataset.sites])
    test = np.array([s.num_test for s in dataset.sites])
    for name, counts in (("train", train), ("test", test), ("train + test", train + test)):
        table.add_row(
            name, f"{counts.sum():,}", f"{counts.min():,}", f"{np.median(counts):,.0f}", f"{counts.max():,}"
        )
    console.print(table)
    console.print(
        "A sample is a window of 80 characters; the model predicts the next character at each position."
    )


def cmd_dp_plan(args: argparse.Namespace) -> int:
    from confide import config as config_module
    from confide.core import Layout
    from confide.data import DEFAULT_TOKENIZER
    from confide.privacy.plan import plan, record_plan
    from confide.runtime.runner import load_dataset
    from confide.runtime.stack import build_model_for, build_site_dp, build_strategy, resolve_record_dp

    config = config_module.load(args.config, args.overrides)
    p = config.privacy
    if p.dp == "none" and not p.record_dp:
        raise ConfideError(
            f"{args.config} has no differential privacy (privacy.dp = 'none', privacy.record_dp = false): "
            "there is no noise to plan. Set privacy.dp = 'central' or 'distributed', or privacy.record_dp = "
            "true (try it with --set privacy.dp=central)"
        )
    dataset = load_dataset(config)
    windows = [s.num_train for s in dataset.sites]
    config = resolve_record_dp(config, windows)
    size = Layout.of_module(build_model_for(config, DEFAULT_TOKENIZER.vocab_size)).size
    lines: list[str] = []
    if p.dp != "none":
        dp = build_site_dp(config, len(dataset.sites))
        assert dp is not None
        s = config.server
        lines += plan(dp, config.run.rounds, size, s.optimizer, s.beta1).lines()
    if p.record_dp:
        c = config.client
        lines += record_plan(
            windows,
            size,
            sites_per_round=build_strategy(config).count(len(dataset.sites)),
            rounds=config.run.rounds,
            batch_size=c.batch_size,
            epochs=c.epochs,
            max_steps=c.max_steps or None,
            clip=config.privacy.record_clip,
            noise_multiplier=config.privacy.record_noise,
            calibrated=bool(p.record_target_epsilon),
        ).lines()
    for line in lines:
        style = "bold red" if line.startswith("WARNING") else None
        console.print(line, style=style, markup=False, highlight=False)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from confide.config import describe
    from confide.models.configs import describe_models

    rows = describe()
    if not console.is_terminal:
        # One record per option, its meaning indented below it: readable in a file and easy to grep.
        for key, default, help in rows:
            console.print(f"{key} = {default!r}", markup=False, highlight=False)
            for line in help.splitlines():
                console.print(f"    {line}", markup=False, highlight=False)
    else:
        table = Table(title="confide run options (sections of the TOML file)")
        table.add_column("option")
        table.add_column("default")
        table.add_column("meaning")
        for key, default, help in rows:
            table.add_row(key, repr(default), help)
        console.print(table)
    console.print("[model] takes, besides kind:", markup=False)
    for line in describe_models():
        console.print(f"  {line}", markup=False, highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
