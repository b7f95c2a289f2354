"""Forwarding one request to a replica: retry before the first token, pass-through after it.

A request goes to the replica the policy picked. If it fails before anything reached the client
(connection refused or reset, timeout, 502/503/504 or 429, or a stream whose error event before its first
token says so), it is retried once on another replica. An error the replica answered for the request
itself (a 4xx: bad input, the request's own timeout; or a 500: the request hit a bug), in a status or in a
stream's error event, is passed through as it came and counts as the replica answering: only the
replica's own failures count against its health. A non-streaming response is read whole before it is sent, so it is retried whenever it fails.
Once a stream's first token event has gone out the response is committed: further bytes are relayed as
they arrive (whole SSE events, never buffered beyond one), and a failure ends the stream with an
OpenAI-style error event and `[DONE]`. A client that leaves closes the upstream connection, which the
replica turns into an abort.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import msgspec
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from tokenmill.cluster.replicas import Cut, Load, Replica, ReplicaSet

logger = logging.getLogger(__name__)

_json = msgspec.json.Encoder()
_FORWARDED_HEADERS = ("authorization", "content-type", "accept", "x-request-id")
_PASSED_BACK_HEADERS = ("content-type", "retry-after")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def error_response(status: int, message: str, type_: str, headers: dict[str, str] | None = None) -> Response:
    body = {"error": {"message": message, "type": type_, "param": None, "code": status}}
    return Response(_json.encode(body), status_code=status, media_type="application/json", headers=headers)


def sse_error(message: str, type_: str = "upstream_error", code: int = 502) -> bytes:
    return b"data: " + _json.encode({"error": {"message": message, "type": type_, "param": None,
                                               "code": code}}) + b"\n\n"


def parse_json_body(body: bytes) -> Any:
    """The request body as JSON, for routing features; None when it is not JSON or nests too deeply for the
    parser (a RecursionError, not a ValueError): the replica then answers with the exact 400."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


def forward_headers(request: Request) -> dict[str, str]:
    return {k: v for k in _FORWARDED_HEADERS if (v := request.headers.get(k)) is not None}


class ClientGone(Exception):
    """The client disconnected while the router waited on the replica."""


@dataclass
class Retry:
    """This attempt failed before the client saw anything; `response` is what to send if no retry is left."""

    reason: str  # connect | timeout | reset | status_5xx | status_429 | down
    response: Response


async def _disconnected(http: Request) -> None:
    # The body is read already, so the next ASGI message is http.disconnect, whenever the client leaves.
    while True:
        if (await http.receive())["type"] == "http.disconnect":
            return


class _Watch:
    """Races awaits against the client leaving, during the part of a request before anything is sent."""

    def __init__(self, http: Request):
        self.gone = asyncio.ensure_future(_disconnected(http))

    async def run(self, aw: Awaitable[Any]) -> Any:
        task = asyncio.ensure_future(aw)
        try:
            await asyncio.wait((task, self.gone), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            raise ClientGone()
        return task.result()

    def close(self) -> None:
        self.gone.cancel()


def _classify(e: httpx.HTTPError) -> tuple[str, bool]:
    """(failure kind, whether the replica is surely gone)."""
    if isinstance(e, httpx.ConnectError):
        return "connect", True  # refused / unreachable: nothing listens there
    if isinstance(e, httpx.TimeoutException):
        return "timeout", False
    return "reset", False


def _first_event_state(buf: bytes) -> tuple[str, int | None]:
    """('wait', None) until a complete SSE event carries a token (or finishes); ('commit', None) then;
    ('error', its code) if the replica sent an error event before any token (None: no usable code)."""
    for raw in buf.split(b"\n\n")[:-1]:
        data = b"".join(line[5:].strip() for line in raw.split(b"\n") if line.startswith(b"data:"))
        if not data:
            continue
        if data == b"[DONE]":
            return "commit", None
        try:
            obj = json.loads(data)
        except ValueError:
            return "commit", None  # not ours to judge: pass it through
        if not isinstance(obj, dict):
            return "commit", None
        if err := obj.get("error"):
            code = err.get("code") if isinstance(err, dict) else None
            return "error", code if isinstance(code, int) and not isinstance(code, bool) else None
        if obj.get("usage"):
            return "commit", None
        for c in obj.get("choices") or ():
            delta = c.get("delta") or {}
            if c.get("text") or delta.get("content") or c.get("finish_reason") or c.get("logprobs"):
                return "commit", None
    return "wait", None


def is_client_error(code: int | None) -> bool:
    """An error the replica answered for the request itself: a 4xx (bad input, its own timeout), or a 500 (this
    request hit a bug there: the replica answered, so it is alive, and the same request would fail the same
    way elsewhere). The client's to see, and no fault of the replica's health: otherwise three requests that
    trip a bug would take a healthy replica out of rotation for everyone. 429 (that replica is full) is not
    one: another replica may take it; nor are 502/503/504 (the replica or its engine is down or draining)."""
    return code is not None and (400 <= code < 500 and code != 429 or code == 500)


class Forwarder:
    def __init__(self, replicas: ReplicaSet, on_failure: Callable[[Replica, str], None],
                 on_first_token: Callable[[float], None], on_stream_error: Callable[[Replica], None]):
        self.replicas = replicas
        self.on_failure = on_failure  # (replica, failure kind): metrics
        self.on_first_token = on_first_token  # (seconds since arrival)
        self.on_stream_error = on_stream_error  # (replica)

    def _failed(self, r: Replica, kind: str, detail: str, fatal: bool = False) -> None:
        self.replicas.record_failure(r, kind, detail, fatal)
        self.on_failure(r, kind)

    async def attempt(self, r: Replica, load: Load, http: Request, method: str, path: str, body: bytes | None,
                      stream: bool, arrival: float) -> Response | Retry:
        """One try on replica r. Releases `load` whenever it returns anything but a committed stream.

        The health checker may cut the exchange short (the replica stopped answering, or its process is
        gone): before the first token that is a failure like any other, and the request is retried."""
        cut = Cut()
        r.exchanges.add(cut)
        out: Response | Retry | None = None
        try:
            with anyio.CancelScope() as cut.scope:
                out = await self._attempt(r, load, http, method, path, body, stream, arrival, cut)
        finally:
            cut.scope = None
            if not isinstance(out, StreamingResponse):
                r.exchanges.discard(cut)  # a committed stream's relay keeps it until the stream ends
        if out is None:  # cut short
            self.on_failure(r, "down")
            return Retry("down", error_response(502, f"replica {r.name} stopped answering before the first token",
                                                "upstream_error"))
        return out

    async def _attempt(self, r: Replica, load: Load, http: Request, method: str, path: str, body: bytes | None,
                       stream: bool, arrival: float, cut: Cut) -> Response | Retry:
        watch = _Watch(http)
        resp: httpx.Response | None = None
        committed = False
        try:
            req = r.client.build_request(method, path, content=body, headers=forward_headers(http))
            try:
                resp = await watch.run(r.client.send(req, stream=True))
            except httpx.HTTPError as e:
                kind, fatal = _classify(e)
                self._failed(r, kind, f"{type(e).__name__}: {e}", fatal)
                return Retry(kind, error_response(502, f"replica {r.name} failed: {kind} ({type(e).__name__})",
                                                  "upstream_error"))
            status = resp.status_code
            if status != 200 or not stream:
                try:
                    content = await watch.run(resp.aread())
                except httpx.HTTPError as e:
                    kind, _ = _classify(e)
                    self._failed(r, kind, f"reading the response: {type(e).__name__}: {e}")
                    return Retry(kind, error_response(502, f"replica {r.name} failed mid-response: {kind}",
                                                      "upstream_error"))
                out = Response(content, status_code=status,
                               headers={k: v for k in _PASSED_BACK_HEADERS if (v := resp.headers.get(k))})
                out.headers["x-tokenmill-replica"] = r.name
                if status >= 500 and not is_client_error(status):
                    self._failed(r, "status_5xx", f"answered {status}")
                    return Retry("status_5xx", out)
                if status == 429:
                    return Retry("status_429", out)  # that replica is full; another may not be
                self.replicas.record_success(r)
                return out
            # A stream: hold it until its first token event, so a failure before that can still be retried.
            chunks = resp.aiter_raw()
            buf = b""
            state, code = "wait", None
            try:
                while state == "wait":
                    try:
                        buf += await watch.run(chunks.__anext__())
                    except StopAsyncIteration:
                        state = "ended"
                        break
                    state, code = _first_event_state(buf)
            except httpx.HTTPError as e:
                kind, _ = _classify(e)
                self._failed(r, kind, f"stream before its first token: {type(e).__name__}: {e}")
                return Retry(kind, error_response(502, f"replica {r.name} failed before the first token: {kind}",
                                                  "upstream_error"))
            if state == "error" and code == 429:
                return Retry("status_429", error_response(429, f"replica {r.name} is full", "rate_limit_exceeded"))
            client_error = state == "error" and is_client_error(code)
            if client_error:
                state = "commit"  # the request's own error (e.g. its timeout): passed through, the replica is fine
            if state == "error" or (state == "ended" and not buf.rstrip().endswith(b"[DONE]")):
                self._failed(r, "status_5xx", "stream failed before its first token")
                return Retry("status_5xx", error_response(
                    502, f"replica {r.name} failed before the first token", "upstream_error"))
            if watch.gone.done():
                raise ClientGone()
            if not client_error:
                load.first_token()
                self.on_first_token(time.monotonic() - arrival)
            committed = True
            headers = {**SSE_HEADERS, "x-tokenmill-replica": r.name}

            async def cleanup(resp: httpx.Response = resp) -> None:
                r.exchanges.discard(cut)
                load.release()
                await _close(resp)

            return _RelayResponse(self._relay(r, load, resp, chunks, buf, state == "ended", cut), cleanup,
                                  media_type="text/event-stream", headers=headers)
        except ClientGone:
            logger.info("client left while waiting on replica %s; request cancelled there", r.name)
            return Response(status_code=499)
        finally:
            watch.close()
            if not committed:
                load.release()
                if resp is not None:
                    await _close(resp)

    async def _relay(self, r: Replica, load: Load, resp: httpx.Response, chunks: AsyncIterator[bytes],
                     first: bytes, ended: bool, cut: Cut) -> AsyncIterator[bytes]:
        ok = False
        pending = first
        try:
            # Whole events only, so an error event never lands in the middle of a half-sent one.
            end = pending.rfind(b"\n\n") + 2
            if end >= 2:
                yield pending[:end]
                pending = pending[end:]
            while not ended:
                # Each read in a cancel scope of its own (never across a yield) that the health checker can cut.
                chunk = None
                with anyio.CancelScope() as cut.scope:
                    if not cut.cut:
                        try:
                            chunk = await chunks.__anext__()
                        except StopAsyncIteration:
                            ended = True
                cut.scope = None
                if cut.cut:
                    raise _CutShort()
                if chunk:
                    pending += chunk
                    end = pending.rfind(b"\n\n") + 2
                    if end >= 2:
                        out, pending = pending[:end], pending[end:]
                        load.tokens(out.count(b"data:"))
                        yield out
            if pending:
                yield pending
            ok = True
        except (httpx.HTTPError, _CutShort) as e:
            if isinstance(e, _CutShort):
                kind = "down"
                self.on_failure(r, kind)
            else:
                kind, _ = _classify(e)
                self._failed(r, kind, f"mid-stream: {type(e).__name__}: {e}")
            self.on_stream_error(r)
            logger.warning("stream from replica %s broke after its first token (%s); ending it with an error "
                           "event", r.name, kind)
            yield sse_error(f"the replica serving this stream ({r.name}) failed after the response started "
                            f"({kind}: {type(e).__name__}); the output is incomplete")
            yield b"data: [DONE]\n\n"
        finally:
            r.exchanges.discard(cut)
            load.release()
            if ok:
                self.replicas.record_success(r)
            await _close(resp)


class _RelayResponse(StreamingResponse):
    """A StreamingResponse that releases the upstream side however it ends: Starlette never starts the body
    iterator (so never runs its `finally`) when the client is gone before the first byte."""

    def __init__(self, content: AsyncIterator[bytes], cleanup: Callable[[], Awaitable[None]], **kw: Any):
        super().__init__(content, **kw)
        self._cleanup = cleanup

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._cleanup()


class _CutShort(Exception):
    """The health checker cut this exchange: the replica stopped answering."""


async def _close(resp: httpx.Response) -> None:
    # Shielded: this runs while the client's cancellation is being delivered, and the close is what tells the
    # replica to abort the request.
    with anyio.CancelScope(shield=True):
        with contextlib.suppress(Exception):
            await resp.aclose()
