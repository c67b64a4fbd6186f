"""The site side of a deployment: dial the server, join, and do the work it posts until the run ends.

A site never listens. It joins with its credentials (a token or a certificate, always over TLS), builds its
trainer and privacy layers from the run config the server sends, and then loops: poll for work, do it on its
own data, submit the result. While a poll is open the server knows the site is alive (gRPC tells it at once
when the connection breaks); while the site works, a background thread sends heartbeats instead. When the
server cannot be reached (it restarted, the network went away) the site waits with exponential backoff and
joins again; the work it was doing is posted again by the server, so nothing is lost.

Over ~400 lines because the site's loop of join, poll, work and submit, its heartbeats and the group of sites
sharing one model are one state machine of the connection.
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import torch

import confide
from confide.client.site import Site, SiteKit
from confide.client.state import DurableSiteState, MemorySiteState, SiteState
from confide.config import Config, from_dict
from confide.core import Layout, Task
from confide.data import DEFAULT_TOKENIZER
from confide.data.dataset import WINDOW, SiteData, has_test_window, make_site, split_text
from confide.data.llm import retokenize
from confide.data.text import read_site_file, read_sites
from confide.errors import ConfideError, DataError, DeploymentError, WireError
from confide.models.hf import HFCausalLM, check_base
from confide.privacy.he.layer import CKKSLayer
from confide.privacy.secure import SecAggLayer
from confide.privacy.tee.layer import EnclaveLayer, SiteTrust
from confide.runtime.grpc import confide_pb2 as pb
from confide.runtime.grpc import wire
from confide.runtime.grpc.identity import verify_registry
from confide.runtime.grpc.security import Credentials
from confide.runtime.grpc.server import MODEL_WORK, FederationClient, channel_options
from confide.runtime.stack import (
    build_layers,
    build_model_for,
    build_secure,
    build_site_dp,
    build_site_kit,
    personal_parts,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

REFUSED = {
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.FAILED_PRECONDITION,
}
"""Answers that waiting will not change: the site stops and says why."""


def load_site_data(path: Path, site: str) -> SiteData:
    """The site's own windows: from a text file (the site's text, with any extension or none but .jsonl), or
    its part of a folder or .jsonl file."""
    source = Path(path).expanduser()
    if source.is_file() and source.suffix != ".jsonl":
        text = read_site_file(source)
    else:
        texts = read_sites(source)
        if site not in texts:
            shown = ", ".join(list(texts)[:5])
            raise DataError(
                f"{source} has no site {site!r} (it has: {shown}{', ...' if len(texts) > 5 else ''})"
            )
        text = texts[site]
    if not has_test_window(split_text(text)[1]):
        raise DataError(
            f"the text of site {site!r} in {source} is too short: its last ~20% must hold at least "
            f"{WINDOW + 1} characters for evaluation"
        )
    return make_site(site, site, text, DEFAULT_TOKENIZER)


@dataclass
class _Setup:
    """What a site builds from the server's join reply; rebuilt only when the run changes."""

    key: tuple[str, int]
    config: Config
    layout: Layout
    site: Site


_Kit = tuple[Config, Layout, SiteKit]
"""What a site builds from the run config: the parsed config, the model's layout, and its trainer kit."""


class SiteGroup:
    """Sites hosted by one process (a rehearsal with many sites, a load test, an organisation serving several
    data holders): they build one model and trainer between them and take turns to work on it, as the local
    backend's sites do. Their polls ask for headers only; a site announced training or evaluation waits for
    the model, then fetches the weights, and gives the model up when the work is done, before its answer is
    uploaded. So the process reads one model's weights at a time however many sites it hosts (heartbeats keep
    the waiting sites in the round), while uploads overlap the next site's download and training."""

    def __init__(self, share_connection: bool = True, state: SiteState | None = None) -> None:
        self.turn = threading.Lock()
        self.uploads = threading.BoundedSemaphore(UPLOADS_IN_FLIGHT)
        """A site leaves its turn only once it may upload: answers waiting for the server never pile up."""
        self.state: SiteState = state if state is not None else MemorySiteState()
        self.share_connection = share_connection
        """Sites with tokens send their calls over one connection (gRPC multiplexes them; each call still
        carries its own site's token). Each gRPC channel costs a thread that polls it, and hundreds of those
        starve the sites' training of the interpreter. Sites with certificates always need their own."""
        self._kits: dict[tuple[str, int], _Kit] = {}
        self._channels: dict[tuple[str, bytes], grpc.Channel] = {}
        self._lock = threading.Lock()
        _calm_grpc_waits()
        self._worker = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="confide-sites")
        """Every site's work runs on this one thread. torch's OpenMP gives each thread that computes its own
        pool of threads, which then spin when idle: hundreds of site threads computing in turn would leave
        hundreds of pools spinning and slow the training several times over."""

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the group's compute thread."""
        return self._worker.submit(fn, *args).result()

    def kit(self, key: tuple[str, int], build: Callable[[], _Kit]) -> _Kit:
        with self._lock:
            if key not in self._kits:
                self._kits[key] = build()
            return self._kits[key]

    def channel(self, server: str, credentials: Credentials) -> grpc.Channel | None:
        """The group's connection to ``server`` for a site with ``credentials``; None when the site needs a
        connection of its own (a client certificate, or sharing turned off)."""
        if not self.share_connection or credentials.cert_pem is not None:
            return None
        key = (server, credentials.ca_pem)
        with self._lock:
            if key not in self._channels:
                self._channels[key] = grpc.secure_channel(
                    server, credentials.channel_credentials(), options=channel_options(0)
                )
            return self._channels[key]

    def close(self) -> None:
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()
        self._worker.shutdown()


UPLOADS_IN_FLIGHT = 2
"""Answers a site group uploads at once while its next site downloads and trains: the group holds at most
this many answers beside the model it works on, however slowly the server takes them."""

GRPC_WAIT_SLICE = 2.0
"""Seconds a thread blocked in a gRPC call sleeps between checks, in a process hosting a group of sites."""


def _calm_grpc_waits() -> None:
    """gRPC's synchronous Python API wakes every thread blocked in a call ten times a second (so that a signal
    reaches the main thread promptly). A process hosting hundreds of sites has hundreds of polls blocked at
    once, and those wakeups take the interpreter from the one thread that trains: the demo's rounds, with 755
    sites in one process, ran a quarter slower (benchmarks/transport.py). Here no thread that waits in gRPC
    is the main thread, so the slice is raised. The setting is grpc's own module constant; a grpc release
    without it leaves this a no-op."""
    import grpc._common as grpc_common

    if isinstance(getattr(grpc_common, "MAXIMUM_WAIT_TIMEOUT", None), float):
        grpc_common.MAXIMUM_WAIT_TIMEOUT = max(grpc_common.MAXIMUM_WAIT_TIMEOUT, GRPC_WAIT_SLICE)


class _Turn:
    """A site's hold on its group's model for one piece of work (nothing to hold for a site on its own).

    In a group a site polls for headers only; when training or evaluation is announced it waits for the
    model, and only then fetches the weights, so the process reads one model at a time however many sites it
    hosts."""

    def __init__(self, group: SiteGroup | None) -> None:
        self.group = group
        self.held = False

    def take(self) -> None:
        if self.group is not None:
            self.group.turn.acquire()
            self.held = True

    def __enter__(self) -> _Turn:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.held:
            self.held = False
            assert self.group is not None
            self.group.turn.release()


class _Rejoin(Exception):
    """The server no longer knows this site's session: join again at once."""


class SiteClient:
    """One site's connection to a confide server. ``run`` returns when the server says the run is over."""

    def __init__(
        self,
        server: str,
        credentials: Credentials,
        data: SiteData,
        *,
        threads: int = 0,
        poll_seconds: float = 20.0,
        backoff: tuple[float, float] = (0.2, 10.0),
        give_up_after: float = 900.0,
        on_status: Callable[[str], None] | None = None,
        group: SiteGroup | None = None,
        state: SiteState | None = None,
        enclave_trust: SiteTrust | None = None,
    ) -> None:
        if credentials.site != data.name:
            raise DeploymentError(
                f"the credentials are for site {credentials.site!r}, but the data is site {data.name!r}"
            )
        self.server = server
        self.credentials = credentials
        self.data = data
        self.site = data.name
        self.threads = threads
        self.poll_seconds = poll_seconds
        self.backoff = backoff
        self.give_up_after = give_up_after
        self.on_status = on_status or (lambda message: log.info("%s", message))
        self.group = group
        self.state: SiteState = group.state if group is not None else state or MemorySiteState()
        """The site's own state (DP-SGD privacy spent, control variates, personal models): in its own file
        (``confide client --state``), so that it survives reconnections, server restarts and restarts of
        the site itself; in memory only when none is given."""
        self.enclave_trust = enclave_trust
        """What this site trusts of the attested aggregator (its operator's platform key and measurement)."""
        self.setup: _Setup | None = None
        self.limit = 0
        self.done = 0
        """Pieces of work done, for progress displays and tests."""
        self.heartbeat_seconds = 5.0
        self._metadata = credentials.call_metadata()
        self._stop = threading.Event()
        self._working = threading.Event()

    def stop(self) -> None:
        """Ask ``run`` to return at its next chance (another thread's way to end a site)."""
        self._stop.set()

    def run(self) -> str:
        """Take part until the server ends the run; returns the server's reason. Raises DeploymentError
        when the server refuses the site, or cannot be reached for ``give_up_after`` seconds."""
        delay = self.backoff[0]
        last_contact = time.monotonic()
        while not self._stop.is_set():
            shared = self.group.channel(self.server, self.credentials) if self.group is not None else None
            channel = shared or grpc.secure_channel(
                self.server, self.credentials.channel_credentials(), options=channel_options(0)
            )
            try:
                stub = FederationClient(channel)
                session = self._join(stub)
                last_contact = time.monotonic()
                delay = self.backoff[0]
                return self._serve(stub, session)
            except _Rejoin:
                self.on_status(
                    f"site {self.site}: the server forgot this session (it restarted); joining again"
                )
                continue
            except grpc.RpcError as e:
                code = e.code()
                details = e.details()
                if code in REFUSED:
                    raise DeploymentError(f"the server refused site {self.site!r}: {details}") from None
                if code == grpc.StatusCode.NOT_FOUND:
                    continue  # the session is gone: join again now
                silent = time.monotonic() - last_contact
                if silent > self.give_up_after:
                    raise DeploymentError(
                        f"site {self.site!r} could not reach the server at {self.server} for {silent:.0f} s "
                        f"(last error: {code.name}: {details}); is it running, and is the address right?"
                    ) from None
                self.on_status(
                    f"site {self.site}: server unreachable ({code.name}); retrying in {delay:.1f} s"
                )
                self._stop.wait(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, self.backoff[1])
            finally:
                if shared is None:
                    channel.close()
        return "stopped by the site"

    # -- one connection -------------------------------------------------------------------------------------

    def _join(self, stub: FederationClient) -> bytes:
        request = pb.JoinRequest(
            version=wire.VERSION,
            site=self.site,
            num_train=self.data.num_train,
            num_test=self.data.num_test,
            software=f"confide {confide.__version__}",
        )
        reply = stub.Join(request, metadata=self._metadata, timeout=30)
        self.limit = reply.max_message_bytes
        if isinstance(self.state, DurableSiteState):
            self.state.run = reply.run
        self._prepare(reply)
        self.on_status(f"site {self.site} joined run {reply.run}")
        self.heartbeat_seconds = reply.heartbeat_seconds
        return bytes(reply.session)

    def _prepare(self, reply: pb.JoinReply) -> None:
        key = (reply.config_toml, int(reply.population))
        if self.setup is not None and self.setup.key == key:
            return

        def build() -> _Kit:
            # Parsing checks the config by building its model: in a group, once for all the sites.
            try:
                config = from_dict(tomllib.loads(reply.config_toml))
            except (tomllib.TOMLDecodeError, ConfideError) as e:
                raise DeploymentError(f"the server sent a run config this site cannot use: {e}") from e
            # A group of sites in one process trains like a simulation, on one thread (see
            # confide.runtime.runner.SIMULATION_THREADS); one site alone takes torch's default.
            threads = self.threads or config.backend.threads or (1 if self.group is not None else 0)
            if threads:
                torch.set_num_threads(threads)
            model = build_model_for(config, DEFAULT_TOKENIZER.vocab_size)
            try:
                check_base(self.site, model, config.model.get("base_sha256", ""))
            except ConfideError as e:
                raise DeploymentError(str(e)) from None
            dp = build_site_dp(config, int(reply.population))
            secure, _ = build_secure(config, [], dp, registry={})
            registry = None
            if (secure is not None and secure.authenticated) or config.privacy.encryption != "none":
                # Every identity key is checked against this site's own CA certificate: a key the server
                # made up (to stand in for another site and unmask it, or to take the CKKS key) is refused.
                entries = {e.site: (e.public_key, e.endorsement) for e in reply.identities}
                registry = verify_registry(self.credentials.ca_pem, entries)
                if secure is not None:
                    secure = replace(secure, registry=registry)
            layout = Layout.of_module(model)
            _, shared = personal_parts(config, model, layout)
            size = layout.size if shared is None else shared.size
            layers = build_layers(
                config, dp, secure, size, population=int(reply.population), registry=registry
            )
            kit = build_site_kit(config, model, layers, self.state, deployed=True)
            return config, layout, kit

        config, layout, kit = self.group.kit(key, build) if self.group is not None else build()
        p = config.privacy
        if (p.secure_aggregation and p.secagg_authenticated) or p.encryption != "none" or p.enclave != "none":
            identity = self.credentials.identity()
            if identity is None:
                what = "its part of the CKKS key ceremony"
                if p.secure_aggregation:
                    what = "secure aggregation's keys"
                elif p.enclave != "none":
                    what = "its updates for the attested aggregator"
                raise DeploymentError(
                    f"the run signs {what}, but site {self.site!r} has no identity key: make its keys with "
                    "`confide keys` and enroll it with --csr"
                )
            for layer in kit.layers:
                # This process signs for this site alone.
                if isinstance(layer, SecAggLayer):
                    layer.identities[self.site] = identity
                if isinstance(layer, CKKSLayer):
                    layer.ceremony.identities[self.site] = identity
                if isinstance(layer, EnclaveLayer):
                    layer.identities[self.site] = identity
        for layer in kit.layers:
            if isinstance(layer, EnclaveLayer):
                layer.trust = self.enclave_trust  # the site's own anchors, never the server's config
        data = self.data
        if isinstance(kit.trainer.model, HFCausalLM) and data.train.ndim == 2:
            # The site read its text before it knew the model: now in the model's own tokenizer.
            data = retokenize(data, kit.trainer.model.tokenizer, kit.trainer.model.context)
        self.setup = _Setup(key, config, layout, Site(self.site, data, kit))

    def _serve(self, stub: FederationClient, session: bytes) -> str:
        forgotten = threading.Event()
        beating = threading.Event()
        self._working.clear()
        beat = threading.Thread(
            target=self._heartbeats, args=(stub, session, forgotten, beating), daemon=True
        )
        beat.start()
        uploading = False
        try:
            while not self._stop.is_set():
                if forgotten.is_set():
                    raise _Rejoin
                stream = stub.Poll(
                    pb.PollRequest(
                        version=wire.VERSION,
                        session=session,
                        wait_seconds=self.poll_seconds,
                        header_only=self.group is not None,
                    ),
                    metadata=self._metadata,
                    timeout=self.poll_seconds + 60,
                )
                with _Turn(self.group) as turn:
                    try:
                        message = self._receive(stub, session, stream, turn)
                    except WireError as e:
                        # A broken message from the server: say so and ask again (the work is posted again).
                        log.warning("site %s received a malformed message: %s", self.site, e)
                        continue
                    if message is None:
                        continue  # the announced work was withdrawn before the site fetched it
                    kind = message.kind
                    if kind == "idle":
                        continue
                    if kind == "stop":
                        return message.header.stop.reason
                    self._working.set()  # no poll is open now: heartbeats say the site is alive
                    if self.group is not None and kind in MODEL_WORK:
                        header, tensors = self.group.run(self._work, message, session)
                    else:
                        header, tensors = self._work(message, session)
                    if turn.held:
                        assert self.group is not None
                        self.group.uploads.acquire()
                        uploading = True
                # The turn ends with the work: the upload overlaps the next site's download and training.
                try:
                    reply = stub.Submit(wire.chunks(header, tensors), metadata=self._metadata, timeout=600)
                finally:
                    self._working.clear()
                    if uploading:
                        uploading = False
                        assert self.group is not None
                        self.group.uploads.release()
                # Let go of the weights and the answer now, not at the next work: a site waits most of the
                # time, and in a group of a hundred sites these would be two models each.
                del message, header, tensors
                if not reply.accepted:
                    log.warning("site %s: the server did not take its %s: %s", self.site, kind, reply.reason)
                self.done += 1
            return "stopped by the site"
        finally:
            # The heartbeat thread must be out of its call before the channel closes: a gRPC call still in
            # flight when the interpreter exits aborts the process.
            beating.set()
            beat.join()

    def _receive(
        self, stub: FederationClient, session: bytes, stream: Iterator[wire.Part], turn: _Turn
    ) -> wire.Message | None:
        """The polled message. After a header-only poll announced training or evaluation, the site takes its
        group's turn and fetches the work whole; None when it was withdrawn meanwhile."""
        if self.group is None:
            return wire.assemble(stream, self.limit)
        first = next(iter(stream), None)
        if first is None or not isinstance(first, pb.Chunk) or first.WhichOneof("part") != "header":
            return wire.assemble([] if first is None else itertools.chain([first], stream), self.limit)
        kind = first.header.WhichOneof("body")
        if kind not in MODEL_WORK:
            return wire.assemble(itertools.chain([first], stream), self.limit)
        self._working.set()  # no poll is open while it waits for the model: heartbeats say it is alive
        turn.take()
        request = pb.FetchRequest(version=wire.VERSION, session=session, ticket=first.header.ticket)
        try:
            return wire.assemble(stub.Fetch(request, metadata=self._metadata, timeout=600), self.limit)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND and "ticket" in (e.details() or ""):
                self._working.clear()
                return None
            raise

    def _heartbeats(
        self, stub: FederationClient, session: bytes, forgotten: threading.Event, done: threading.Event
    ) -> None:
        while not done.wait(self.heartbeat_seconds):
            if not self._working.is_set():
                continue  # the open poll tells the server this site is alive
            try:
                reply = stub.Heartbeat(
                    pb.Beat(version=wire.VERSION, session=session), metadata=self._metadata, timeout=10
                )
            except grpc.RpcError:
                continue  # the main loop notices a dead server on its own
            if not reply.known:
                forgotten.set()
                return

    def _work(self, message: wire.Message, session: bytes) -> tuple[pb.Header, list[tuple[str, np.ndarray]]]:
        """Do one piece of work; a failure the site can name is reported, not raised."""
        ticket = message.header.ticket
        try:
            return self._do(message, ticket, session)
        except (ConfideError, ValueError) as e:
            log.warning("site %s cannot do its %s work: %s", self.site, message.kind, e)
            return wire.failure_message(ticket, session, f"{type(e).__name__}: {e}"), []

    def _do(
        self, message: wire.Message, ticket: int, session: bytes
    ) -> tuple[pb.Header, list[tuple[str, np.ndarray]]]:
        setup = self.setup
        assert setup is not None
        site = setup.site
        kind = message.kind
        if kind == "train":
            body = message.header.train
            # A task that releases a held update (asynchronous rounds) carries no model.
            weights = np.empty(0, np.float32) if body.plan.release else _weights(message, setup)
            extras = {name: t for name, t in message.tensors.items() if name != "weights"}
            task = Task(self.site, wire.plan_from_proto(body.plan), body.model_version, extras)
            return wire.update_message(ticket, session, site.train(weights, task))
        if kind == "evaluate":
            body = message.header.evaluate
            weights = _weights(message, setup)
            plan = wire.plan_from_proto(body.plan) if body.personal else None
            return wire.evaluation_message(ticket, session, site.evaluate(weights, plan))
        if kind == "exchange":
            answer = site.answer(message.tensor("message", np.uint8).tobytes())
            return wire.answer_message(ticket, session, answer)
        raise WireError(f"the server sent work of an unknown kind {kind!r}")


def _weights(message: wire.Message, setup: _Setup) -> np.ndarray:
    """The global model of a task: float32 of the model's size, or under encryption the ciphertexts (bytes,
    which the CKKS layer checks as it decrypts them), or under downlink compression an empty vector (the
    model travels in the task's extras, which the downlink layer checks as it rebuilds the model)."""
    held = message.tensors.get("weights")
    if setup.config.privacy.encryption != "none" and held is not None and held.dtype == np.uint8:
        return message.tensor("weights", np.uint8)
    if setup.config.compression.downlink != "none" and held is not None and held.size == 0:
        return message.tensor("weights", np.float32, 0)
    return message.tensor("weights", np.float32, setup.layout.size)
