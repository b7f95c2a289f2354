"""One HTTP request as plain data, run against an in-process ASGI app, answered as a stream of parts.

Ray Serve moves Python objects between actors, not sockets. The Ray ingress turns each HTTP request into an
`HttpCall` (with the routing policy's `RequestFeatures` of its prompt); the engine replica runs it through
tokenmill's own FastAPI app (`call_asgi`) and yields a `ResponseHead` followed by body chunks. So every validation, error body, SSE stream and metric of the
single-replica server holds behind Ray too. Closing the generator early (the client left) delivers
`http.disconnect` to the app, which aborts the engine request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from tokenmill.cluster.policy import RequestFeatures

logger = logging.getLogger(__name__)

ASGIApp = Callable[[dict[str, Any], Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]

# Hop-by-hop headers describe one connection; they are not forwarded across a relay.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"upgrade", b"te", b"trailer",
                        b"proxy-authenticate", b"proxy-authorization"})


@dataclass(slots=True)
class HttpCall:
    method: str
    path: str
    query_string: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    features: RequestFeatures | None = None  # what the routing policy reads (the ingress fills it)


@dataclass(frozen=True, slots=True)
class ResponseHead:
    status: int
    headers: list[tuple[bytes, bytes]]


def _scope(call: HttpCall) -> dict[str, Any]:
    return {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": call.method, "scheme": "http", "path": call.path, "raw_path": call.path.encode(),
        "query_string": call.query_string, "root_path": "", "headers": list(call.headers),
        "client": None, "server": None, "state": {},
    }


async def call_asgi(app: ASGIApp, call: HttpCall,
                    extra_headers: list[tuple[bytes, bytes]] = ()) -> AsyncIterator[ResponseHead | bytes]:
    """Run `call` through `app`; yield the head, then each non-empty body chunk as the app sends it."""
    parts: asyncio.Queue[dict | None] = asyncio.Queue()
    client_gone = asyncio.Event()
    body_sent = False

    async def receive() -> dict:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": call.body, "more_body": False}
        await client_gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if client_gone.is_set():
            raise OSError("client disconnected")  # what a server does when writing to a closed socket
        await parts.put(message)

    async def run() -> None:
        try:
            await app(_scope(call), receive, send)
        finally:
            parts.put_nowait(None)

    task = asyncio.get_running_loop().create_task(run())
    try:
        while True:
            msg = await parts.get()
            if msg is None:
                break
            if msg["type"] == "http.response.start":
                headers = [(k.lower(), v) for k, v in msg.get("headers", []) if k.lower() not in HOP_BY_HOP]
                yield ResponseHead(msg["status"], headers + list(extra_headers))
            elif msg["type"] == "http.response.body":
                if msg.get("body"):
                    yield msg["body"]
                if not msg.get("more_body", False):
                    break
        await task  # surfaces an exception the app let escape
    finally:
        if not task.done():
            # Closed early: the client left. Let the app see it and abort its engine request.
            client_gone.set()
            try:
                await asyncio.wait_for(asyncio.shield(task), 10.0)
            except Exception:  # noqa: BLE001 - the app's own errors after a disconnect are not ours to raise
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        else:
            client_gone.set()
