"""The live view of a run: a read-only web page over its run store that updates while the run goes on.

:mod:`.reader` reads the store (read-only, in short transactions), :mod:`.app` is the ASGI app (Starlette)
with server-sent events, :mod:`.serve` serves it with uvicorn and holds the rule for tokens; the page itself
(HTML, script, style) is package data under ``static/``, and draws with plotly.js from the plotly package.
"""

from confide.dashboard.serve import DEFAULT_LISTEN, Dashboard, resolve_token

__all__ = ["DEFAULT_LISTEN", "Dashboard", "resolve_token"]
