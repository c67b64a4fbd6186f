"""`confide aggregator`: the attested aggregator as its own process, and the link `confide server` uses.

The process holds one :class:`~confide.privacy.tee.enclave.Enclave` (its key pair made at start, on the
platform the config names) and serves the ``Aggregator`` service of confide.proto to the coordinating server,
which only relays: reports to the sites, sealed updates to the enclave, and the released aggregate to its
model. The settings (aggregator, central DP, validation) come from the run's config file, as the server's do,
and they are what the measurement covers: ``confide aggregator CONFIG --population N --measurement`` prints
the value each site's operator passes to ``confide client --enclave-measurement``.

Transport: plaintext gRPC, and only on a loopback address (the server and the aggregator on one machine).
What crosses it is sealed end to end (the updates) or shown to the server anyway (reports, sums, the
aggregate), so TLS would add integrity of the released aggregate against a network attacker, which a
loopback link does not have to fear; an aggregator on another machine needs TLS, which is not built yet.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Any, TypeVar

import grpc
import numpy as np

from confide.config import Config
from confide.errors import ConfigError, DeploymentError, UpdateError
from confide.pipeline import Layer, RoundAbandoned
from confide.privacy.tee.attestation import INSECURE_LABEL, NITRO, SIMULATED
from confide.privacy.tee.enclave import PLATFORMS, Enclave, EnclaveSettings, Platform, Summary
from confide.privacy.tee.layer import EnclaveLayer, enclave_settings
from confide.runtime.grpc import confide_pb2 as pb
from confide.runtime.grpc.identity import verify_registry

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["Aggregator"].full_name
VERSION = 1
TIMEOUT = 600.0
"""Seconds the server waits for one call (an aggregate of a large model is computed inside Release)."""

T = TypeVar("T")


def message_limit(update_size: int) -> int:
    """The largest message either side accepts: one vector of the model and room for the rest."""
    return 4 * update_size + (1 << 20)


def _options(update_size: int) -> list[tuple[str, Any]]:
    limit = message_limit(update_size)
    return [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]


# -- the server's side ---------------------------------------------------------------------------------------


class GrpcLink:
    """The coordinating server's link to `confide aggregator` (dialled on first use)."""

    def __init__(self, address: str, update_size: int) -> None:
        self.address = address
        self.update_size = update_size
        self.identities: list[pb.Identity] = []
        """The enrolled sites' identities and endorsements, sent with each Open (the deployment sets them)."""
        self._channel: grpc.Channel | None = None
        self._calls: dict[str, Callable[..., Any]] = {}

    def _call(self, name: str, request: Any, reply: Any) -> Any:
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.address, options=_options(self.update_size))
        call = self._calls.get(name)
        if call is None:
            call = self._calls[name] = self._channel.unary_unary(
                f"/{SERVICE}/{name}", type(request).SerializeToString, reply.FromString
            )
        try:
            return call(request, timeout=TIMEOUT)
        except grpc.RpcError as e:
            code, details = e.code(), e.details() or ""
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise UpdateError(details) from None
            if code == grpc.StatusCode.FAILED_PRECONDITION:
                raise RoundAbandoned(details) from None
            raise RoundAbandoned(
                f"the aggregator at {self.address} did not answer {name} ({code.name}: {details}); is "
                "`confide aggregator` running there?"
            ) from None

    def open(self, round: int) -> bytes:
        return bytes(
            self._call(
                "Open",
                pb.AggregatorRound(version=VERSION, round=round, identities=self.identities),
                pb.Attestation,
            ).report
        )

    def submit(self, round: int, site: str, sealed: bytes) -> None:
        request = pb.SealedUpdate(version=VERSION, round=round, site=site, sealed=sealed)
        self._call("Submit", request, pb.Submitted)

    def close(self, round: int) -> Summary:
        reply = self._call("Close", pb.AggregatorRound(version=VERSION, round=round), pb.RoundSums)
        return Summary(
            int(reply.round),
            tuple(reply.accepted),
            tuple((r.site, r.reason) for r in reply.refused),
            {str(k): float(v) for k, v in reply.sums.items()},
        )

    def release(self, round: int) -> np.ndarray:
        reply = self._call("Release", pb.AggregatorRound(version=VERSION, round=round), pb.ReleasedAggregate)
        if reply.round != round:
            raise RoundAbandoned(f"the aggregator released round {reply.round}, not {round}")
        return np.frombuffer(reply.vector, dtype="<f4").astype(np.float32)

    def close_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None


def connect_enclave(layers: Sequence[Layer], address: str, update_size: int) -> None:
    """Give the enclave layer of a stack its gRPC link to `confide aggregator` at ``address``."""
    for layer in layers:
        if isinstance(layer, EnclaveLayer) and layer.link is None:
            layer.link = GrpcLink(address, update_size)


# -- the aggregator's side -----------------------------------------------------------------------------------


class AggregatorService:
    """The ``Aggregator`` service around one enclave: each call is one step of :class:`Enclave`."""

    def __init__(self, enclave: Enclave, ca_pem: bytes | None = None) -> None:
        self.ca_pem = ca_pem
        self.enclave = enclave

    def _register(self, identities: Sequence[pb.Identity]) -> None:
        """Give the enclave the sites' identity keys, each checked against this aggregator's own copy of the
        CA certificate (never the server's word: a key the server made up would let it sign updates)."""
        if self.ca_pem is None:
            raise RoundAbandoned(
                "this aggregator has no CA certificate to check the sites' identities against: start it with "
                "--ca PATH/ca.pem"
            )
        entries = {i.site: (bytes(i.public_key), bytes(i.endorsement)) for i in identities}
        try:
            self.enclave.register(verify_registry(self.ca_pem, entries))
        except DeploymentError as e:
            raise RoundAbandoned(str(e)) from None

    def _step(self, context: grpc.ServicerContext, step: Callable[[], T]) -> T:
        try:
            return step()
        except UpdateError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except RoundAbandoned as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        raise AssertionError("unreachable: abort raises")

    @staticmethod
    def _version(version: int, context: grpc.ServicerContext) -> None:
        if version != VERSION:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, f"aggregator protocol {version}, not {VERSION}"
            )

    def Open(self, request: pb.AggregatorRound, context: grpc.ServicerContext) -> pb.Attestation:
        self._version(request.version, context)
        if request.identities:
            self._step(context, lambda: self._register(request.identities))
        return pb.Attestation(report=self._step(context, lambda: self.enclave.open(int(request.round))))

    def Submit(self, request: pb.SealedUpdate, context: grpc.ServicerContext) -> pb.Submitted:
        self._version(request.version, context)
        self._step(context, lambda: self.enclave.submit(int(request.round), request.site, request.sealed))
        return pb.Submitted()

    def Close(self, request: pb.AggregatorRound, context: grpc.ServicerContext) -> pb.RoundSums:
        self._version(request.version, context)
        summary = self._step(context, lambda: self.enclave.close(int(request.round)))
        return pb.RoundSums(
            round=summary.round,
            accepted=list(summary.accepted),
            refused=[pb.Refusal(site=site, reason=why) for site, why in summary.refused],
            sums=summary.sums,
        )

    def Release(self, request: pb.AggregatorRound, context: grpc.ServicerContext) -> pb.ReleasedAggregate:
        self._version(request.version, context)
        vector = self._step(context, lambda: self.enclave.release(int(request.round)))
        return pb.ReleasedAggregate(round=request.round, vector=vector.astype("<f4").tobytes())


def _handlers(service: AggregatorService) -> grpc.GenericRpcHandler:
    def unary(method: Callable[..., Any], request: Any, reply: Any) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(method, request.FromString, reply.SerializeToString)

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Open": unary(service.Open, pb.AggregatorRound, pb.Attestation),
            "Submit": unary(service.Submit, pb.SealedUpdate, pb.Submitted),
            "Close": unary(service.Close, pb.AggregatorRound, pb.RoundSums),
            "Release": unary(service.Release, pb.AggregatorRound, pb.ReleasedAggregate),
        },
    )


def check_loopback(listen: str) -> None:
    """Refuse to serve the plaintext aggregator anywhere but a loopback address."""
    host = listen.rsplit(":", 1)[0].strip("[]")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise DeploymentError(
            "`confide aggregator` serves plaintext gRPC and listens only on a loopback address (got "
            f"{listen}): run it on the server's machine with --listen 127.0.0.1:PORT (TLS between "
            "machines is not built)"
        )


def start_aggregator(enclave: Enclave, listen: str, ca_pem: bytes | None = None) -> tuple[grpc.Server, int]:
    """Serve ``enclave`` on ``listen`` (a loopback HOST:PORT; port 0 picks one); returns the server, port.
    ``ca_pem``: the CA certificate the sites' identities are checked against."""
    check_loopback(listen)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="confide-aggregator"),
        options=[*_options(enclave.settings.update_size), ("grpc.so_reuseport", 0)],
    )
    server.add_generic_rpc_handlers((_handlers(AggregatorService(enclave, ca_pem)),))
    try:
        port = server.add_insecure_port(listen)
    except RuntimeError as e:
        raise DeploymentError(f"cannot listen on {listen}: {e}") from e
    if port == 0:
        raise DeploymentError(f"cannot listen on {listen}: the address is in use or not this machine's")
    server.start()
    return server, port


def aggregator_settings(config: Config, population: int) -> EnclaveSettings:
    """The enclave's settings for ``config`` over ``population`` sites, resolved as the server resolves them
    (the model's size, DP's calibrated noise and expected sites per round)."""
    from confide.core import Layout
    from confide.data import DEFAULT_TOKENIZER
    from confide.runtime.stack import build_model_for, build_site_dp, personal_parts

    if config.privacy.enclave == "none":
        raise ConfigError("privacy.enclave is 'none' in this config: there is no attested aggregator to run")
    if population < 2:
        raise ConfigError(f"--population must be the number of enrolled sites, at least 2 (got {population})")
    model = build_model_for(config, DEFAULT_TOKENIZER.vocab_size)
    layout = Layout.of_module(model)
    _, shared = personal_parts(config, model, layout)
    dp = build_site_dp(config, population)
    return enclave_settings(config, dp, layout.size if shared is None else shared.size)


def make_platform(config: Config) -> Platform:
    """The platform the config names, refusing the simulated one unless the insecure option allows it."""
    p = config.privacy
    if p.enclave == SIMULATED and not p.enclave_allow_insecure_simulation:
        raise ConfigError(
            f"privacy.enclave = 'simulated' is an {INSECURE_LABEL}; `confide aggregator` refuses it unless "
            "privacy.enclave_allow_insecure_simulation = true (to test a deployment only)"
        )
    factory = PLATFORMS.get(p.enclave)
    if p.enclave == NITRO and factory is None:
        raise ConfigError(
            "`confide aggregator` cannot attest on AWS Nitro Enclaves in this release: that needs the Nitro "
            "Secure Module (/dev/nsm) inside an enclave image, which confide does not build yet. Sites do "
            "verify Nitro attestation documents (confide client --enclave-platform aws-nitro)"
        )
    if factory is None:
        raise ConfigError(
            f"this aggregator cannot run on the platform {p.enclave!r} (known: {', '.join(PLATFORMS)})"
        )
    return factory()
