"""The guard in front of every HTTP app that faces clients (the server, the router): a Host allow-list
(400), the API key on protected paths (401), JSON-only POST bodies (415), a body size limit (413) and a body
deadline (408), checked before the app reads a byte too many. Plain ASGI, so streaming responses still see
client disconnects. CORS, when asked for, sits outside it; the deadlines on headers and on a client that stops
reading are the connection's (tokenmill/server/listener.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response

from tokenmill.server.auth import Keys, load_api_keys, match_key
from tokenmill.server.config import ExposureConfig

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
PROTECTED = ("/v1/", "/tokenize", "/detokenize")
PUBLIC_ALWAYS = ("/health",)  # liveness probes carry no key
GRANT = "key_grant"  # scope["state"][GRANT]: the KeyGrant of the request's API key (request.state.key_grant)
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]", "::1")
_json = msgspec.json.Encoder()


def host_allow_list(bind_host: str, allowed_hosts: str | None) -> frozenset[str] | None:
    """Host header names to accept (None: any). Bound to loopback, only loopback names: a page in a browser
    on this machine that rebinds its own domain to 127.0.0.1 then sends its domain as Host and is refused."""
    if allowed_hosts:
        return frozenset(h.strip().lower() for h in allowed_hosts.split(",") if h.strip())
    return frozenset(LOOPBACK_NAMES) if is_loopback(bind_host) else None


def is_loopback(host: str) -> bool:
    """Is this bind address reachable from this machine only?"""
    return host in LOOPBACK_NAMES or host.startswith("127.")


def host_name(value: str) -> str:
    """'example.com:8000' -> 'example.com'; '[::1]:8000' -> '[::1]'."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[: value.find("]") + 1] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _error(status: int, message: str, code: str | int, headers: dict[str, str] | None = None) -> Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    return Response(_json.encode(body), status_code=status, media_type="application/json", headers=headers)


def install_guard(app, config: ExposureConfig, on_reject: Callable[[str], None], *,
                  hosts: frozenset[str] | None) -> None:
    """The guard (and CORS, only for --allowed-origins) around `app`."""
    app.add_middleware(Guard, api_keys=load_api_keys(config.api_key, config.api_key_file),
                       max_body=int(config.max_body_bytes), hosts=hosts, on_reject=on_reject,
                       protect_all=config.protect_all_paths, body_timeout=config.body_timeout)
    if config.allowed_origins:  # added last: outermost, so a preflight is answered before the key is asked for
        origins = [o.strip().rstrip("/") for o in config.allowed_origins.split(",") if o.strip()]
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-Id"], max_age=600)


class Guard:
    """on_reject(reason) counts each refusal: bad_host, unauthorized, unsupported_media_type, body_too_large,
    body_timeout."""

    def __init__(self, app: Callable, *, api_keys: Keys, max_body: int, hosts: frozenset[str] | None,
                 on_reject: Callable[[str], None], protect_all: bool = False, body_timeout: float = 30.0):
        self.app = app
        self.api_keys = api_keys
        self.max_body = max_body
        self.hosts = hosts
        self.on_reject = on_reject
        self.protect_all = protect_all
        self.body_timeout = body_timeout

    def _needs_key(self, path: str) -> bool:
        if self.protect_all:
            return path not in PUBLIC_ALWAYS
        return path.startswith(PROTECTED)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path: str = scope["path"]
        headers = {k: v.decode("latin-1") for k, v in scope["headers"] if k in (b"host", b"content-type")}
        if self.hosts is not None and host_name(headers.get(b"host", "")) not in self.hosts:
            self.on_reject("bad_host")
            return await _error(400, "Host header not allowed (see --allowed-hosts)", "invalid_host")(
                scope, receive, send)
        if self.api_keys and self._needs_key(path):
            auth = ""
            for k, v in scope["headers"]:
                if k == b"authorization":
                    auth = v.decode("latin-1")
            key = match_key(auth, self.api_keys)
            if key is None:
                self.on_reject("unauthorized")
                return await _error(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                                    "invalid_api_key")(scope, receive, send)
            scope.setdefault("state", {})[GRANT] = self.api_keys[key]
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        # Read the whole body up front (bounded), then replay it: our bodies are JSON and small.
        for k, v in scope["headers"]:
            if k == b"content-length" and v.isdigit() and int(v) > self.max_body:
                return await self._too_large(scope, receive, send)
        # JSON only: a page can POST text/plain or a form to any origin without asking the browser's
        # permission (a "simple" request); application/json needs a CORS preflight, which this server fails unless
        # --allowed-origins lists the page's origin.
        media = headers.get(b"content-type", "").split(";", 1)[0].strip().lower()
        if media != "application/json":
            self.on_reject("unsupported_media_type")
            return await _error(415, f"the request body must be application/json, got {media or 'no Content-Type'}",
                                "unsupported_media_type")(scope, receive, send)
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.body_timeout):  # a client dripping its body holds nothing for long
                while True:
                    msg = await receive()
                    if msg["type"] == "http.disconnect":
                        return
                    body = msg.get("body", b"")
                    size += len(body)
                    if size > self.max_body:
                        return await self._too_large(scope, receive, send)
                    chunks.append(body)
                    if not msg.get("more_body", False):
                        break
        except TimeoutError:
            self.on_reject("body_timeout")
            return await _error(408, f"the request body did not arrive within {self.body_timeout:g}s", "timeout",
                                headers={"Connection": "close"})(scope, receive, send)
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # then http.disconnect, whenever the client leaves

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.on_reject("body_too_large")
        await _error(413, f"request body is larger than {self.max_body} bytes", 413,
                     headers={"Connection": "close"})(scope, receive, send)
