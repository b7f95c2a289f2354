"""One HTTP request as plain data, run against an in-process ASGI app, answered as a stream of parts.

Ray Serve moves Python objects between actors, not sockets. The Ray ingress turns each HTTP request into an
`HttpCall`; the engine replica runs it through tokenmill's own FastAPI app (`call_asgi`) and yields a
`ResponseHead` followed by body chunks. So every validation, error body, SSE stream and metric of the
single-replica server holds behind Ray too. Closing the generator early (the client left) delivers
`http.disconnect` to the app, which aborts the engine request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

ASGIApp = Callable[[dict[str, Any], Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]

# Hop-by-hop headers describe one connection; they are not forwarded across a relay.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"upgrade", b"te", b"trailer",
                        b"proxy-authenticate", b"proxy-authorization"})

# How much of a prompt the routing hint keeps: enough to tell shared prefixes apart, small to pickle.
HINT_PREFIX_CHARS = 8192


@dataclass(frozen=True, slots=True)
class RoutingHint:
    """What a routing policy may look at before a replica is chosen (no tokenizer in the router)."""

    prompt_prefix: str = ""  # the start of the prompt text (chat: the messages' contents joined)
    prompt_chars: int = 0  # the whole prompt's length in characters
    max_tokens: int = 0  # requested output tokens (0 = not given)


@dataclass(slots=True)
class HttpCall:
    method: str
    path: str
    query_string: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    hint: RoutingHint | None = None


@dataclass(frozen=True, slots=True)
class ResponseHead:
    status: int
    headers: list[tuple[bytes, bytes]]


def routing_hint(path: str, body: bytes) -> RoutingHint | None:
    """Read the prompt from an OpenAI request body, leniently: a body we cannot read gets no hint (the replica
    will answer it with the proper 400)."""
    if not path.endswith(("/completions", "/chat/completions")) or not body:
        return None
    try:
        req = json.loads(body)
    except ValueError:
        return None
    if not isinstance(req, dict):
        return None
    text = ""
    if path.endswith("/chat/completions"):
        msgs = req.get("messages")
        if isinstance(msgs, list):
            parts = []
            for m in msgs:
                content = m.get("content") if isinstance(m, dict) else None
                if isinstance(content, str):
                    parts.append(content)
                elif isinstance(content, list):  # content parts: keep the text ones
                    parts += [p.get("text", "") for p in content if isinstance(p, dict)]
            text = "\n".join(parts)
    else:
        prompt = req.get("prompt")
        if isinstance(prompt, str):
            text = prompt
        elif isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            text = prompt[0]
        elif isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            text = " ".join(map(str, prompt))  # token ids: still a stable prefix to match on
    max_tokens = req.get("max_tokens") or req.get("max_completion_tokens") or 0
    return RoutingHint(text[:HINT_PREFIX_CHARS], len(text), max_tokens if isinstance(max_tokens, int) else 0)


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
