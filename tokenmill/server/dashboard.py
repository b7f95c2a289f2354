"""GET /dashboard: one static page (shipped in the package, no CDN) that polls this server's /metrics once a
second and draws throughput, queue, KV use, prefix hits, latency percentiles, per priority class and per
replica, with a chat playground on the OpenAI API. The server and the router serve the same page."""

from __future__ import annotations

from functools import cache
from importlib import resources

from starlette.responses import Response

# The page runs its own inline script and reads only this origin.
_CSP = "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'"


@cache
def _page() -> bytes:
    return (resources.files("tokenmill.server") / "static" / "dashboard.html").read_bytes()


def dashboard_response() -> Response:
    return Response(_page(), media_type="text/html; charset=utf-8",
                    headers={"Content-Security-Policy": _CSP, "Cache-Control": "no-cache"})
