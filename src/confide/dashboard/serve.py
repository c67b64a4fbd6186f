"""Serving the live view with uvicorn: in the foreground (`confide dashboard`) or in a thread beside a run
(`confide server --dashboard`).

The rule for where it listens: loopback (127.0.0.1, ::1, localhost) needs no token, since only this machine
reaches it; any other address needs one, or the view refuses to start. ``--token generate`` draws one from the
OS's cryptographic generator; the address printed carries it. A thread beside a run shares nothing with it but
the run store, which it reads read-only (:mod:`confide.dashboard.reader`), and every read runs in uvicorn's
worker threads, off the run's thread: a slow or stuck page can delay only itself.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from confide.errors import ConfideError, ConfigError

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:8765"
TOKEN_VARIABLE = "CONFIDE_DASHBOARD_TOKEN"
"""An environment variable that may hold the token (a command line is visible to every local user)."""
MIN_TOKEN_LENGTH = 16


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8765`` for IPv6) as (host, port); ConfigError when it is neither."""
    host, sep, port = listen.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"--listen must be HOST:PORT, such as {DEFAULT_LISTEN} (got {listen!r})")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reached only from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def resolve_token(host: str, token: str | None) -> str | None:
    """The token the view will ask for when it listens on ``host``: ``token`` (``generate``: a new random
    one), else the environment's :data:`TOKEN_VARIABLE`, else none, which only loopback allows."""
    token = token or os.environ.get(TOKEN_VARIABLE) or None
    if token == "generate":
        token = secrets.token_urlsafe(24)
    if token is None:
        if not is_loopback(host):
            raise ConfigError(
                f"the live view would listen on {host}, which other machines reach, without a token: give "
                f"--token generate (a new random token, printed in the address to open), --token TOKEN or "
                f"{TOKEN_VARIABLE}=TOKEN, or listen on 127.0.0.1 and reach it through an SSH tunnel"
            )
        return None
    if len(token) < MIN_TOKEN_LENGTH or any(ch.isspace() for ch in token):
        raise ConfigError(
            f"the live view's token must be at least {MIN_TOKEN_LENGTH} characters without spaces (got "
            f"{len(token)} characters); --token generate draws a good one"
        )
    return token


class Dashboard:
    """The live view of one run directory, served by uvicorn."""

    def __init__(
        self, run_dir: Path, listen: str = DEFAULT_LISTEN, token: str | None = None, poll: float = 1.0
    ) -> None:
        import uvicorn

        from confide.dashboard.app import create_app

        self.host, self.port = parse_listen(listen)
        self.token = resolve_token(self.host, token)
        self.app = create_app(Path(run_dir), self.token, poll)
        config = uvicorn.Config(
            self.app,
            host=self.host,
            port=self.port,
            log_config=None,  # uvicorn's own would reconfigure the logging of the process it runs in
            log_level="warning",
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=2,
        )
        self.server = uvicorn.Server(config)
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The address to open, with the token when there is one."""
        host = self.host
        if host in ("0.0.0.0", "::"):
            host = socket.gethostname()  # listening everywhere: this machine's name is one way to reach it
        elif ":" in host:
            host = f"[{host}]"
        base = f"http://{host}:{self.port}/"
        return base + (f"?token={self.token}" if self.token else "")

    def _bind(self) -> socket.socket:
        """The listening socket, bound here so that a taken port is a clear error (and port 0 a free one)."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        try:
            sock = socket.create_server((self.host, self.port), family=family)
        except OSError as e:
            raise ConfideError(
                f"the live view cannot listen on {self.host}:{self.port} ({e.strerror or e}); choose another "
                "address with --listen HOST:PORT"
            ) from e
        self.port = int(sock.getsockname()[1])
        return sock

    def start(self) -> str:
        """Serve in a daemon thread; returns the address once it listens (ConfideError if its thread ends
        first). There is no time limit: on a busy machine the start may be slow, and the socket is bound
        already, so a page opened meanwhile waits rather than fails."""
        sock = self._bind()
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, name="confide-dashboard", daemon=True
        )
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                self.stop()
                raise ConfideError(f"the live view did not start on {self.host}:{self.port}")
            time.sleep(0.02)
        return self.url

    def serve(self, listening: Callable[[str], None] | None = None) -> None:
        """Serve in this thread until interrupted (Ctrl-C); ``listening`` is given the address once bound."""
        sock = self._bind()
        if listening is not None:
            listening(self.url)
        self.server.run(sockets=[sock])

    def stop(self) -> None:
        """Stop serving (open pages lose their stream) and wait a little for the thread."""
        self.app.state.closing.set()
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=10)
