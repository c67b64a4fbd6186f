"""What the wire costs: federated rounds over gRPC against the local backend, and gRPC's transfer rate on
loopback against a raw socket copy of the same bytes. Three measurements in one run.

a. The demo. The demo config (examples/shakespeare.toml: the character LSTM, 755 Shakespeare sites, 50 per
   round, secure aggregation and distributed DP) for ``--demo-rounds`` rounds, once with the local backend and
   once deployed: a real `confide server` core in this process (TLS, token authentication, the run store) and
   one `confide client` process hosting every site (they share one model and take turns, as the local
   backend's sites do). Time per round is ``RoundResult.seconds`` (broadcast, local training, upload, secure
   aggregation's steps, aggregation); the first round is left out as warm-up. Goal: within 1.5x of local.

b. Model size and site count. GPT models of about 1M, 10M and 100M parameters, 10 and 100 sites all training
   every round (one local step of batch 1: the least compute a round can have, so the wire's share is the
   largest it can be), no privacy layers; the same comparison of time per round.

c. Loopback transfer rate. ``--megabytes`` of float32 sent through the real gRPC service (TLS; a site's
   update up through Submit, the model down through Poll; chunked, size-checked and decoded as in a
   deployment) against the same bytes sent over a plain TCP socket (``sendall`` into ``recv_into``), and, for
   information, over a TLS socket (Python's ``ssl``) with the same certificates. Goal: within 2x of the raw
   socket. The receiver runs in its own process in every case. Best of ``--repeats``.

Run from the repository root:

    .venv/bin/python benchmarks/transport.py             # everything; about 15 minutes, 5 GB of RAM
    .venv/bin/python benchmarks/transport.py --quick     # a minute: 1M and 10M, 10 sites, 64 MB, 2 rounds
    .venv/bin/python benchmarks/transport.py --only wire # just the transfer rates
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common import Recorder, build_config, console, machine, merge, run, show
from confide.config import Config
from confide.core import Plan, Update
from confide.data import shakespeare
from confide.runtime.federation import Task
from confide.runtime.grpc import confide_pb2 as pb
from confide.runtime.grpc import wire
from confide.runtime.grpc.deployment import Deployment
from confide.runtime.grpc.security import create_certificates, issue_site_credentials

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "shakespeare.toml"
ROUND_GOAL = 1.5
WIRE_GOAL = 2.0

SIZES = {  # GPT layers and width for about 1M, 10M and 100M parameters (a 256-character vocabulary)
    "1M": (2, 192),
    "10M": (4, 448),
    "100M": (8, 1024),
}

TEXT = (
    "Whether 'tis nobler in the mind to suffer the slings and arrows of outrageous fortune, or to take arms "
    "against a sea of troubles, and by opposing end them. To die, to sleep; no more; and by a sleep to say "
    "we end the heart-ache and the thousand natural shocks that flesh is heir to.\n"
)


# --- a and b: rounds over gRPC against the local backend ----------------------------------------------------


def write_sites(folder: Path, texts: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for site, text in texts.items():
        (folder / f"{site}.txt").write_text(text, encoding="utf-8")


def local_rounds(config: Config) -> Recorder:
    recorder = Recorder()
    run(config, recorder)
    return recorder


def deployed_rounds(config: Config, data: Path, sites: Sequence[str], work: Path) -> Recorder:
    """The same run deployed: the server core here, every site in one `confide client` process."""
    deploy = work / "deploy"
    create_certificates(deploy, ["localhost", "127.0.0.1"])
    (deploy / "credentials").mkdir()
    for site in sites:
        issue_site_credentials(deploy, site).save(deploy / "credentials" / f"{site}.json")
    deployment = Deployment(config, deploy, "127.0.0.1:0")
    port = deployment.start()
    args = [sys.executable, "-m", "confide", "client", "--server", f"localhost:{port}", "--data", str(data)]
    args += ["--credentials", str(deploy / "credentials"), "--give-up-after", "60"]
    args += ["--threads", os.environ.get("BENCH_CLIENT_THREADS", "0")]
    for site in sites:
        args += ["--site", site]
    log = open(work / "client.log", "wb")  # noqa: SIM115 (the process owns it)
    client = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    recorder = Recorder()
    try:
        deployment.wait_for_sites()
        deployment.prepare()
        deployment.run(recorder)
    finally:
        deployment.close("the benchmark is done")
        try:
            client.wait(120)
        finally:
            if client.poll() is None:
                client.kill()
            log.close()
    if client.returncode != 0:
        raise RuntimeError(f"the client process failed:\n{(work / 'client.log').read_text()[-3000:]}")
    return recorder


def compare(name: str, raw: dict[str, Any], texts: dict[str, str], warmup: int, tmp: Path) -> dict[str, Any]:
    data = tmp / name / "data"
    write_sites(data, texts)
    raw = merge(raw, {"data": {"dataset": "text", "path": str(data)}})
    local = local_rounds(build_config(raw, tmp / name, "local"))
    deployed = deployed_rounds(build_config(raw, tmp / name, "deployed"), data, list(texts), tmp / name)
    times = {}
    for label, recorder in (("local", local), ("grpc", deployed)):
        kept = recorder.rounds[warmup:]
        times[label] = sum(r.seconds for r in kept) / len(kept)
    r0 = deployed.rounds[-1]
    return {
        "name": name,
        "local": times["local"],
        "grpc": times["grpc"],
        "ratio": times["grpc"] / times["local"],
        "sent": r0.bytes_sent,
        "received": r0.bytes_received,
        "rounds": len(deployed.rounds) - warmup,
    }


def demo(rounds: int, tmp: Path) -> dict[str, Any]:
    raw = tomllib.loads(DEMO.read_text(encoding="utf-8"))
    # Enrolled site names are file-name safe: the roles are renamed role0000, ... in the order the demo uses.
    roles = shakespeare.site_texts(min_lines=raw["data"].get("min_lines", 16))
    texts = {f"role{i:04d}": text for i, (_, _, text) in enumerate(roles)}
    raw = merge(raw, {"run": {"rounds": rounds, "checkpoint_every": 1000}, "eval": {"every": 1000}})
    raw["data"] = {}
    row = compare("demo", raw, texts, warmup=1, tmp=tmp)
    row["name"] = f"demo: LSTM, {len(texts)} sites, 50 per round, secagg + DP"
    return row


def sized(size: str, sites: int, rounds: int, tmp: Path) -> dict[str, Any]:
    layers, width = SIZES[size]
    raw = {
        "run": {"rounds": rounds, "seed": 0, "checkpoint_every": 1000},
        "model": {"kind": "gpt", "layers": layers, "heads": 4, "width": width, "dropout": 0.0},
        "client": {"max_steps": 1, "batch_size": 1, "optimizer": "sgd", "learning_rate": 0.01},
        "server": {"sites_per_round": sites, "optimizer": "sgd", "learning_rate": 1.0},
        "eval": {"every": 1000, "sites": 1, "samples": 0},
        "deploy": {"task_timeout": 7200, "heartbeat_timeout": 600},
    }
    texts = {f"site{i:03d}": TEXT * 3 for i in range(sites)}
    row = compare(f"{size}-{sites}", raw, texts, warmup=1 if rounds > 1 else 0, tmp=tmp)
    row["name"] = f"GPT {size} ({layers} layers, width {width}), {sites} sites"
    return row


# --- c: loopback transfer rate ------------------------------------------------------------------------------


def _child(kind: str, nbytes: int, certs: str) -> None:
    """The receiving (and, for Poll, sending) side, in its own process; prints its port, then serves."""
    if kind in ("tcp", "tls"):
        listener = socket.create_server(("127.0.0.1", 0))
        if kind == "tls":
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(f"{certs}/server.pem", f"{certs}/server.key")
        print(listener.getsockname()[1], flush=True)
        buffer = bytearray(nbytes)
        view = memoryview(buffer)
        while True:
            conn, _ = listener.accept()
            if kind == "tls":
                conn = context.wrap_socket(conn, server_side=True)
            with conn:
                got = 0
                while got < nbytes:
                    n = conn.recv_into(view[got:], min(nbytes - got, 1 << 20))
                    if n == 0:
                        return
                    got += n
                conn.sendall(b"k")
    else:  # the real Servicer, as a deployment runs it
        from concurrent import futures

        import grpc

        from confide.runtime.grpc.security import server_credentials
        from confide.runtime.grpc.server import Hub, Servicer, channel_options, rpc_handlers, start_server

        hub = Hub()
        session = hub.join("bench", 1, 1)
        weights = np.ones(nbytes // 4, dtype=np.float32)
        plan = Plan(round=1, epochs=1, max_steps=1, batch_size=1, learning_rate=0.1, seed=0)

        def keep_posting() -> None:
            # The model is posted again as soon as the parent has answered it, so every Poll finds it.
            while True:
                work = hub.post("bench", wire.train_message(0, Task("bench", plan, 0), weights))
                for _ in hub.collect([work]):
                    pass

        threading.Thread(target=keep_posting, daemon=True).start()
        servicer = Servicer(hub, lambda context: "bench", ["bench"], pb.JoinReply, nbytes + (1 << 20))
        if kind == "grpc":
            server, port = start_server(servicer, "127.0.0.1:0", server_credentials(Path(certs), False), 1)
        else:  # plaintext, for information only: a deployment never listens without TLS
            server = grpc.server(futures.ThreadPoolExecutor(4), options=channel_options(0))
            server.add_generic_rpc_handlers((rpc_handlers(servicer),))
            port = server.add_insecure_port("127.0.0.1:0")
            server.start()
        print(port, session.id.hex(), flush=True)
        sys.stdin.read()  # serve until the parent closes our stdin
        server.stop(0)


def _spawn(kind: str, nbytes: int, certs: Path) -> tuple[subprocess.Popen[str], list[str]]:
    child = subprocess.Popen(
        [sys.executable, __file__, "--child", kind, str(nbytes), str(certs)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    return child, child.stdout.readline().split()


def socket_seconds(kind: str, data: np.ndarray, certs: Path, repeats: int) -> float:
    child, (port,) = _spawn(kind, data.nbytes, certs)
    context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    best = float("inf")
    try:
        for _ in range(repeats):
            started = time.perf_counter()
            conn = socket.create_connection(("127.0.0.1", int(port)))
            if kind == "tls":
                conn = context.wrap_socket(conn, server_hostname="localhost")
            with conn:
                conn.sendall(memoryview(data).cast("B"))
                assert conn.recv(1) == b"k"
            best = min(best, time.perf_counter() - started)
    finally:
        child.kill()
        child.wait()
    return best


def grpc_seconds(data: np.ndarray, certs: Path, repeats: int, tls: bool = True) -> tuple[float, float]:
    """Best seconds to submit ``data`` as an update, and to poll a model of the same size."""
    import grpc

    from confide.runtime.grpc.server import FederationClient, channel_options

    child, (port, session_hex) = _spawn("grpc" if tls else "grpc-plain", data.nbytes, certs)
    session = bytes.fromhex(session_hex)
    address, options = f"localhost:{port}", channel_options(0)
    if tls:
        credentials = grpc.ssl_channel_credentials((certs / "ca.pem").read_bytes())
        channel = grpc.secure_channel(address, credentials, options=options)
    else:
        channel = grpc.insecure_channel(address, options=options)
    up = down = float("inf")
    try:
        with channel:
            stub = FederationClient(channel)
            update = Update(site="bench", round=1, num_examples=1, vector=data, model_version=0)
            for _ in range(repeats):
                started = time.perf_counter()
                stream = stub.Poll(pb.PollRequest(version=wire.VERSION, session=session), timeout=600)
                message = wire.assemble(stream, data.nbytes + (1 << 20))
                assert message.tensors["weights"].nbytes == data.nbytes
                down = min(down, time.perf_counter() - started)
                started = time.perf_counter()
                # The answer to the work just polled: the server admits, reads and decodes all of it (an
                # upload to a ticket that is not open is refused from its header, before any data).
                header, tensors = wire.update_message(message.header.ticket, session, update)
                reply = stub.Submit(wire.chunks(header, tensors), timeout=600)
                assert reply.accepted, reply.reason
                up = min(up, time.perf_counter() - started)
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(30)
    return up, down


def wire_rates(megabytes: int, repeats: int, tmp: Path) -> list[dict[str, Any]]:
    certs = tmp / "certs"
    create_certificates(certs, ["localhost", "127.0.0.1"])
    data = np.random.default_rng(0).standard_normal(megabytes * (1 << 20) // 4).astype(np.float32)
    rows = []
    tcp = socket_seconds("tcp", data, certs, repeats)
    tls = socket_seconds("tls", data, certs, repeats)
    up, down = grpc_seconds(data, certs, repeats)
    plain_up, plain_down = grpc_seconds(data, certs, repeats, tls=False)
    mb = data.nbytes / 1e6
    for name, seconds in (
        ("raw TCP socket (baseline)", tcp),
        ("TLS socket (information)", tls),
        ("gRPC + TLS, site to server (Submit)", up),
        ("gRPC + TLS, server to site (Poll)", down),
        ("gRPC without TLS, Submit (information)", plain_up),
        ("gRPC without TLS, Poll (information)", plain_down),
    ):
        rows.append(
            {
                "name": name,
                "seconds": seconds,
                "rate": mb / seconds,
                "ratio": seconds / tcp,
                "vs_tls": seconds / tls,
            }
        )
    return rows


# --- report -------------------------------------------------------------------------------------------------


def round_rows(rows: list[dict[str, Any]]) -> list[list[Any]]:
    return [
        [
            r["name"],
            r["rounds"],
            f"{r['local']:.3f}",
            f"{r['grpc']:.3f}",
            f"{r['ratio']:.2f}x",
            f"{r['sent'] / 1e6:,.1f}",
            f"{r['received'] / 1e6:,.1f}",
        ]
        for r in rows
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short form that runs in about a minute")
    parser.add_argument(
        "--only", choices=["demo", "sizes", "wire"], nargs="+", default=["demo", "sizes", "wire"]
    )
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--sites", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--rounds", type=int, default=2, help="rounds per model size (the first is warm-up)")
    parser.add_argument(
        "--demo-rounds", type=int, default=4, help="rounds of the demo (the first is warm-up)"
    )
    parser.add_argument("--megabytes", type=int, default=256, help="bytes per transfer, in MiB")
    parser.add_argument("--repeats", type=int, default=5, help="transfers per path (best counts)")
    parser.add_argument("--markdown", action="store_true", help="also print the tables as markdown")
    parser.add_argument("--json", type=Path, help="write the measurements to this file")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child[0], int(args.child[1]), args.child[2])
        return 0
    if args.quick:
        args.sizes, args.sites, args.megabytes, args.demo_rounds = ["1M", "10M"], [10], 64, 2
        args.only = [o for o in args.only if o != "demo"]
    console.print(f"[dim]{time.strftime('%Y-%m-%d %H:%M')}  {machine()}[/dim]\n")
    results: dict[str, Any] = {}
    ok = True
    with tempfile.TemporaryDirectory(prefix="confide-bench-transport-") as folder:
        tmp = Path(folder)
        if "wire" in args.only:
            rows = wire_rates(args.megabytes, args.repeats, tmp)
            results["wire"] = rows
            show(
                f"Loopback transfer of {args.megabytes} MiB, best of {args.repeats}",
                ["path", "seconds", "MB/s", "vs raw socket", "vs TLS socket"],
                [
                    [
                        r["name"],
                        f"{r['seconds']:.3f}",
                        f"{r['rate']:,.0f}",
                        f"{r['ratio']:.2f}x",
                        f"{r['vs_tls']:.2f}x",
                    ]
                    for r in rows
                ],
                args.markdown,
            )
            deployed = [r for r in rows if r["name"].startswith("gRPC + TLS")]
            worst = max(r["ratio"] for r in deployed)
            worst_tls = max(r["vs_tls"] for r in deployed)
            ok &= worst <= WIRE_GOAL
            console.print(
                f"[bold]Verdict: gRPC + TLS within {worst:.2f}x of the raw socket; goal <= {WIRE_GOAL}x: "
                f"{'PASS' if worst <= WIRE_GOAL else 'FAIL'}[/bold] (within {worst_tls:.2f}x of a TLS "
                "socket, which pays for the same encryption)\n"
            )
        columns = [
            "run",
            "rounds timed",
            "local s/round",
            "gRPC s/round",
            "gRPC/local",
            "MB sent",
            "MB received",
        ]
        if "demo" in args.only:
            row = demo(args.demo_rounds, tmp)
            results["demo"] = row
            show("The demo, local against deployed", columns, round_rows([row]), args.markdown)
            ok &= row["ratio"] <= ROUND_GOAL
            console.print(
                f"[bold]Verdict: deployed demo round {row['ratio']:.2f}x local; goal <= {ROUND_GOAL}x: "
                f"{'PASS' if row['ratio'] <= ROUND_GOAL else 'FAIL'}[/bold]\n"
            )
        if "sizes" in args.only:
            rows = []
            for size in args.sizes:
                for sites in args.sites:
                    console.print(f"[dim]GPT {size}, {sites} sites ...[/dim]")
                    rows.append(sized(size, sites, args.rounds, tmp))
                    show("Time per round, local against deployed", columns, round_rows(rows[-1:]), False)
            results["sizes"] = rows
            show("Time per round, local against deployed", columns, round_rows(rows), args.markdown)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
