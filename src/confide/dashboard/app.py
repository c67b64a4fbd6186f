"""The live view as a small ASGI app (Starlette): one page, its script and style, plotly.js, and two reads.

```
GET /                 the page (package data: static/index.html)
GET /static/NAME      its script and style; plotly.min.js from the plotly package (nothing from the internet)
GET /api/state        everything the store holds that the page shows, as JSON
GET /api/stream       server-sent events: everything first, then what is new, every ``poll`` seconds
```

Every route is a GET; nothing the app does can change the run. With a token, every request must carry it: as
``?token=`` (the page's address; the page then keeps it in a same-site, HTTP-only cookie), the cookie, or an
``Authorization: Bearer`` header; a request without it is answered 401, one with another token 403. Without a
token the app serves only requests addressed to this machine's loopback names (it binds to loopback only,
:mod:`confide.dashboard.serve`), so a web page elsewhere cannot read it through a DNS name rebound to
127.0.0.1.
"""

from __future__ import annotations

import contextlib
import hmac
import importlib.util
import json
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from confide.dashboard.reader import Cursor, RunReader
from confide.errors import ConfideError

log = logging.getLogger(__name__)

COOKIE = "confide_dashboard"
"""The cookie's name, followed by the port: browsers send a host's cookies to all its ports, and two views on
one machine must not overwrite each other's token."""
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
KEEPALIVE_SECONDS = 15.0
"""A comment line this often when nothing is new, so proxies and browsers keep the stream open."""

STATIC = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}

# The page loads only what this app serves; plotly draws its styles inline.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


def plotly_path() -> Path:
    """plotly.min.js as the ``plotly`` package ships it (found without importing plotly)."""
    spec = importlib.util.find_spec("plotly")
    path = Path(spec.origin).parent / "package_data" / "plotly.min.js" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise ConfideError(
            "the live view draws with plotly.js from the plotly package, which is missing or has no "
            "package_data/plotly.min.js: install confide's dependencies again (pip install plotly)"
        )
    return path


def _static(name: str) -> bytes:
    return (resources.files("confide.dashboard") / "static" / name).read_bytes()


def create_app(run_dir: Path, token: str | None = None, poll: float = 1.0) -> Starlette:
    """The live view of the run in ``run_dir``; ``token``: the one every request must carry (None: loopback
    only, no token); ``poll``: seconds between two looks at the store for each open page."""
    reader = RunReader(run_dir)
    plotly_js = plotly_path()
    index = _static("index.html")
    closing = threading.Event()
    """Set when the server shuts down, so that open streams end (from any thread: Dashboard.stop)."""

    async def page(request: Request) -> Response:
        response = Response(index, media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)
        given = request.query_params.get("token")
        if token is not None and given is not None:
            # The address carried it once; from now on the cookie does (the page drops it from the address).
            response.set_cookie(cookie_name(request), given, httponly=True, samesite="strict", path="/")
        return response

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name == "plotly.min.js":
            return FileResponse(
                plotly_js, media_type="text/javascript", headers={"Cache-Control": "max-age=86400"}
            )
        if name not in STATIC:
            return PlainTextResponse("not found", status_code=404)
        return Response(_static(name), media_type=STATIC[name], headers=SECURITY_HEADERS)

    async def snapshot(request: Request) -> Response:
        out, _ = await run_in_threadpool(reader.look, None)
        return JSONResponse(out, headers=SECURITY_HEADERS)

    async def stream(request: Request) -> Response:
        async def events() -> AsyncIterator[str]:
            cursor: Cursor | None = None
            status = None
            quiet = 0.0
            # How soon the browser comes back when the stream breaks (milliseconds); it then gets everything.
            yield f"retry: {int(max(poll, 1.0) * 2000)}\n\n"
            while not closing.is_set():
                out, after = await run_in_threadpool(reader.look, cursor)
                if out["reset"] and after is None and status == out["status"]:
                    new = False  # still waiting for the run's store: said once
                else:
                    new = out["reset"] or status != out["status"] or any(out[k] for k in _ROWS)
                if new:
                    yield "event: update\ndata: " + json.dumps(out, allow_nan=False) + "\n\n"
                    quiet = 0.0
                elif quiet >= KEEPALIVE_SECONDS:
                    yield ": keepalive\n\n"
                    quiet = 0.0
                cursor, status = after, out["status"]
                await anyio.sleep(poll)
                quiet += poll

        headers = dict(SECURITY_HEADERS)
        headers["X-Accel-Buffering"] = "no"  # a proxy in front must pass each event on at once
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            closing.set()
            reader.close()

    app = Starlette(
        routes=[
            Route("/", page),
            Route("/static/{name}", static),
            Route("/api/state", snapshot),
            Route("/api/stream", stream),
        ],
        lifespan=lifespan,
    )
    app.add_middleware(_Guard, token=token)
    app.state.closing = closing
    return app


_ROWS = ("rounds", "evaluations", "ledger", "events", "samples", "sites")
"""The kinds of rows a look may bring."""


def cookie_name(request: Request) -> str:
    """The token's cookie for the port the request was sent to."""
    return f"{COOKIE}_{request.url.port or 80}"


def _host(header: str) -> str:
    """The name in a Host header, without its port: ``[::1]:8765`` -> ``[::1]``, ``localhost:80`` ->
    ``localhost``."""
    if header.startswith("["):
        return header.split("]", 1)[0] + "]"
    return header.rsplit(":", 1)[0]


class _Guard:
    """Lets a request through only with the token (when there is one), or addressed to loopback (when there
    is none); and only GET or HEAD."""

    def __init__(self, app: Callable[..., Awaitable[None]], token: str | None) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        refusal = self.refusal(request)
        if refusal is not None:
            status, message = refusal
            response = PlainTextResponse(message, status_code=status, headers=SECURITY_HEADERS)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def refusal(self, request: Request) -> tuple[int, str] | None:
        if request.method not in ("GET", "HEAD"):
            return 405, "the live view is read-only"
        if self.token is None:
            if _host(request.headers.get("host", "")) not in LOOPBACK_HOSTS:
                return 403, "this live view serves only this machine (127.0.0.1 or localhost)"
            return None
        given = request.query_params.get("token") or request.cookies.get(cookie_name(request))
        header = request.headers.get("authorization", "")
        if not given and header.lower().startswith("bearer "):
            given = header[7:].strip()
        if not given:
            return 401, "this live view needs its token: open the address `confide dashboard` printed"
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            return 403, "wrong token for this live view"
        return None
