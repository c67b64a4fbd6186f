"""`confide server`: the run of a config served over gRPC to enrolled sites, with restart from the run store.

The federation, the strategy, the privacy accounting and the run store are the very ones of a simulation; only
the backend differs. A deployment adds what a simulation does not need: it waits for the sites to join, it
checkpoints after every round, it retries a round that too few sites answered, and when started again on the
same run directory it resumes after the last checkpointed round, with the privacy ledger as it was (the
ledger is written before a round's result is applied, and never rewound).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import grpc

from confide.config import Config
from confide.errors import ConfideError, ConfigError, DeploymentError
from confide.privacy.policy import SiteDP
from confide.runtime.federation import RoundResult
from confide.runtime.grpc import confide_pb2 as pb
from confide.runtime.grpc import wire
from confide.runtime.grpc.aggregator import GrpcLink
from confide.runtime.grpc.identity import verify_registry
from confide.runtime.grpc.pki import CertificatePaths
from confide.runtime.grpc.security import (
    Authenticator,
    AuthError,
    Enrollment,
    Identity,
    server_credentials,
)
from confide.runtime.grpc.server import GrpcBackend, Hub, Servicer, start_server
from confide.runtime.runner import (
    NullObserver,
    Observer,
    Relay,
    Runner,
    SiteInfo,
    build_model_for,
    build_site_dp,
    stored_sites,
)
from confide.runtime.store import Store

log = logging.getLogger(__name__)


def endorsed_registry(
    enrollment: Enrollment, population: Sequence[str], directory: Path
) -> dict[str, Identity]:
    """Every site's identity key and the CA's endorsement of it, from ``sites.sqlite``: what the server
    sends each site (which checks every entry with ``verify_registry`` against its own CA certificate) and
    whose keys its SecAggServer checks signatures with.

    Checked here too, against the server's ``ca.pem``, so that a registry from another CA or a damaged one
    stops the server at start with the site named, rather than every site at its first secure round.
    """
    identities = enrollment.identities(population)
    paths = CertificatePaths(Path(directory))
    try:
        ca_pem = paths.ca_certificate.read_bytes()
    except OSError as e:
        raise DeploymentError(f"cannot read the CA certificate {paths.ca_certificate}: {e}") from e
    verify_registry(ca_pem, identities)
    if paths.ca_key.exists():
        log.warning(
            "%s is in the server's folder: whoever controls this server can endorse false site identities "
            "and so defeat authenticated secure aggregation and the CKKS key ceremony; keep ca.key elsewhere "
            "(`confide certs --ca`, "
            "`confide enroll --ca`)",
            paths.ca_key,
        )
    return identities


def site_config(config: Config, dp: SiteDP | None) -> Config:
    """The config the sites receive: the server's, with DP's noise already calibrated (a site need not
    repeat the calibration, and cannot disagree with it)."""
    if dp is not None and config.privacy.calibrate:
        privacy = replace(config.privacy, calibrate=False, noise_multiplier=dp.noise_multiplier)
        config = replace(config, privacy=privacy)
    if config.model["kind"] == "hf" and config.adapter.kind != "none" and not config.model.get("base_sha256"):
        # Only the adapters travel, so each site trains on its own copy of the base: the server hashes its
        # own, and every site checks that it holds the same before it trains (confide.models.hf.check_base).
        from confide.models.hf import base_sha256

        model = build_model_for(config, 0)
        config = replace(config, model={**config.model, "base_sha256": base_sha256(model)})
        del model
    return config


class Deployment:
    """One `confide server`: the gRPC service, its hub, and the runner that drives rounds through it."""

    def __init__(self, config: Config, directory: Path, listen: str) -> None:
        # Every round is checkpointed: a restarted server loses at most the round in flight.
        self.config = replace(config, run=replace(config.run, checkpoint_every=1))
        self.directory = Path(directory)
        self.listen = listen
        self.run_dir = Path(config.run.output) / config.run.name
        self.enrollment = Enrollment.open(self.directory)
        self.store: Store | None = None
        self.resuming = (self.run_dir / "run.sqlite").exists()
        if self.resuming:
            self.store = Store.open(self.run_dir)
            stored = (self.run_dir / "config.toml").read_text(encoding="utf-8")
            if stored != self.config.to_toml():
                self.store.close()
                raise ConfigError(
                    f"{self.run_dir} holds a run of another config; restart the server with the config it "
                    "was started with, or give this run another run.name"
                )
            self.population = [s.name for s in stored_sites(self.store)]
        else:
            self.population = self.enrollment.active_sites()
            if not self.population:
                raise DeploymentError(
                    f"no site is enrolled in {self.directory}; enroll each with `confide enroll SITE "
                    f"--dir {self.directory}`"
                )
        p = config.privacy
        signed = p.secagg_authenticated or p.encryption != "none" or p.enclave != "none"
        self.identities = self._identities() if signed else {}
        """With ``privacy.secagg_authenticated``, encryption (whose key ceremony the sites sign) or the
        attested aggregator (whose updates they sign): each site -> (identity key, the CA's endorsement)."""
        self.registry = {site: public for site, (public, _) in self.identities.items()} or None
        """The identity keys the server checks the sites' signatures with (verified against its ca.pem)."""
        self.dp = build_site_dp(self.config, len(self.population))
        self.hub = Hub(config.deploy.heartbeat_timeout, config.deploy.task_timeout)
        self.backend = GrpcBackend(self.hub, self.population)
        self._reply = pb.JoinReply(
            version=wire.VERSION,
            run=config.run.name,
            config_toml=site_config(self.config, self.dp).to_toml(),
            population=len(self.population),
            heartbeat_seconds=config.deploy.heartbeat_seconds,
            max_message_bytes=config.deploy.max_message_bytes,
            identities=[
                pb.Identity(site=site, public_key=public, endorsement=endorsement)
                for site, (public, endorsement) in sorted(self.identities.items())
            ],
        )
        self.authenticator = Authenticator(self.enrollment, config.deploy.auth)
        self.server: grpc.Server | None = None
        self.port = 0
        self.runner: Runner | None = None

    def _identities(self) -> dict[str, Identity]:
        try:
            return endorsed_registry(self.enrollment, self.population, self.directory)
        except ConfideError:
            if self.store is not None:
                self.store.close()
            self.enrollment.close()
            raise

    def _identify(self, context: grpc.ServicerContext) -> str:
        try:
            return self.authenticator.identify(context.invocation_metadata(), context.auth_context())
        except AuthError as e:
            self.hub.record("refused", f"a caller from {context.peer()} was refused: {e}")
            context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))
            raise  # abort raises; this line is for type checkers

    def _join_reply(self) -> pb.JoinReply:
        reply = pb.JoinReply()
        reply.CopyFrom(self._reply)
        return reply

    def start(self) -> int:
        """Listen; returns the port (useful with port 0)."""
        credentials = server_credentials(self.directory, self.config.deploy.auth == "mtls")
        d = self.config.deploy
        servicer = Servicer(
            self.hub,
            self._identify,
            self.population,
            self._join_reply,
            d.max_message_bytes,
            d.receive_buffer_bytes,
        )
        self.server, self.port = start_server(servicer, self.listen, credentials, len(self.population))
        return self.port

    def wait_for_sites(self, progress: Callable[[int, int], None] | None = None) -> list[str]:
        """Block until ``deploy.min_sites`` sites (0: all) have joined; returns the sites that have."""
        d = self.config.deploy
        need = min(d.min_sites or len(self.population), len(self.population))
        end = time.monotonic() + d.join_timeout
        members = set(self.population)
        while True:
            joined = sorted(members & set(self.hub.sessions()))
            if progress is not None:
                progress(len(joined), need)
            if len(joined) >= need:
                return joined
            if time.monotonic() > end:
                missing = sorted(members - set(joined))
                raise DeploymentError(
                    f"only {len(joined)} of the {need} sites needed joined within {d.join_timeout:g} s "
                    f"(missing: {', '.join(missing[:10])}{', ...' if len(missing) > 10 else ''}); start "
                    "their clients, or lower deploy.min_sites"
                )
            time.sleep(0.2)

    def prepare(self) -> Runner:
        """The runner: a new run over the sites that joined, or the stored run, resumed."""
        if self.store is not None:
            runner = Runner(
                self.config,
                self.store,
                sites=stored_sites(self.store),
                backend=self.backend,
                dp=self.dp,
                registry=self.registry,
            )
            runner.restore()
        else:
            sessions = self.hub.sessions()
            sites = []
            for name in self.population:
                s = sessions.get(name)
                sites.append(SiteInfo(name, name, s.num_train if s else 0, s.num_test if s else 0))
            self.store = Runner.create_store(self.config, sites)
            runner = Runner(
                self.config, self.store, sites=sites, backend=self.backend, dp=self.dp, registry=self.registry
            )
        for layer in runner.federation.layers:
            link = getattr(layer, "link", None)
            if isinstance(link, GrpcLink):
                # The enclave counts an update only if its site signed it: it gets the endorsed identities,
                # which it checks against its own copy of the CA certificate.
                link.identities = [
                    pb.Identity(site=site, public_key=public, endorsement=endorsement)
                    for site, (public, endorsement) in sorted(self.identities.items())
                ]
        self.runner = runner
        return runner

    def run(self, observer: Observer | None = None) -> Runner:
        runner = self.runner or self.prepare()
        runner.run(_Recording(observer or NullObserver(), self))
        self.flush_events()
        return runner

    def flush_events(self) -> None:
        """Write what the gRPC threads noted (refusals, drops) into the run store, from this thread, with when
        each connected site joined and was last heard from."""
        round = self.runner.state.round if self.runner is not None else None
        while not self.hub.events.empty():
            kind, message = self.hub.events.get()
            if self.store is not None:
                self.store.event(kind, message, round)
        if self.store is not None:
            # The hub keeps its own clock (monotonic); the store keeps wall-clock times.
            offset = time.time() - self.hub.clock()
            heard = self.hub.last_heard()
            sessions = self.hub.sessions()
            self.store.sites_seen(
                [
                    (site, s.joined + offset, heard.get(site, s.joined) + offset)
                    for site, s in sorted(sessions.items())
                ]
            )

    def close(self, reason: str, grace: float = 3.0) -> None:
        """Tell the sites the run is over, give them ``grace`` seconds to hear it, then stop listening."""
        self.hub.stop(reason)
        if self.server is not None:
            end = time.monotonic() + grace
            while time.monotonic() < end and self.hub.sessions() and not self._all_told():
                time.sleep(0.1)
            self.server.stop(grace=1.0).wait()
        self.flush_events()
        if self.store is not None:
            self.store.close()
        self.enrollment.close()

    def _all_told(self) -> bool:
        return self.hub.told_to_stop() >= set(self.hub.sessions())


class _Recording(Relay):
    """Passes progress on to the display, and writes the hub's events into the store as each round starts
    (who joined since: the sites panel of the live view) and ends."""

    def __init__(self, inner: Observer, deployment: Deployment) -> None:
        super().__init__(inner)
        self.deployment = deployment

    def round_started(self, round: int, sites: Sequence[str]) -> None:
        self.deployment.flush_events()
        super().round_started(round, sites)

    def round_finished(self, result: RoundResult) -> None:
        self.deployment.flush_events()
        super().round_finished(result)

    def round_retried(self, round: int, reason: str) -> None:
        self.deployment.flush_events()
        super().round_retried(round, reason)
