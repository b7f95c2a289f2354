"""The FastAPI application: routes, one place mapping errors to OpenAI error bodies, and a guard middleware
(API key, body size) written as plain ASGI so streaming responses still see client disconnects."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response

from tokenmill.errors import InvalidRequestError, QueueFullError, TokenmillError
from tokenmill.server.api_models import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from tokenmill.server.auth import authorized, load_api_keys
from tokenmill.server.config import ServerConfig
from tokenmill.server.frontend import Frontend, ServerUnavailableError
from tokenmill.server.openai_api import OpenAIServing, json_response

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
_PROTECTED = ("/v1/", "/tokenize", "/detokenize")


def error_response(status: int, message: str, type_: str, param: str | None = None, code: Any = None,
                   headers: dict[str, str] | None = None) -> Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code if code is not None else status}}
    return json_response(body, status, headers)


def _validation_message(e: ValidationError | RequestValidationError) -> tuple[str, str | None]:
    err = e.errors()[0]
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    kind = err.get("type", "")
    if kind == "json_invalid":
        return f"the request body is not valid JSON (UTF-8): {err.get('msg', '')}", None
    if kind in ("model_type", "dict_type") and not loc:
        return "the request body must be a JSON object", None
    name = ".".join(loc)
    param = loc[0] if loc else None
    if kind == "extra_forbidden":
        return f"unknown parameter '{name}': this server does not support it", param
    if kind == "missing":
        return f"missing required parameter '{name}'", param
    return f"invalid value for '{name}': {err.get('msg', 'invalid')}", param


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]", "::1")


def host_allow_list(config: ServerConfig) -> frozenset[str] | None:
    """Host header names to accept (None: any). Bound to loopback, only loopback names: a page in a browser
    on this machine that rebinds its own domain to 127.0.0.1 then sends its domain as Host and is refused."""
    if config.allowed_hosts:
        return frozenset(h.strip().lower() for h in config.allowed_hosts.split(",") if h.strip())
    return frozenset(LOOPBACK_NAMES) if is_loopback(config.host) else None


def is_loopback(host: str) -> bool:
    """Is this bind address reachable from this machine only?"""
    return host in LOOPBACK_NAMES or host.startswith("127.")


def _host_name(value: str) -> str:
    """'example.com:8000' -> 'example.com'; '[::1]:8000' -> '[::1]'."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[: value.find("]") + 1] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class GuardMiddleware:
    """Host allow-list (400), API key on protected paths (401), JSON-only POST bodies (415) and a body size
    limit (413) before the app reads a byte too many."""

    def __init__(self, app: Callable, config: ServerConfig, frontend: Frontend, check_host: bool = True):
        self.app = app
        self.api_keys = load_api_keys(config.api_key, config.api_key_file)
        self.max_body = int(config.max_body_bytes)
        self.hosts = host_allow_list(config) if check_host else None
        self.frontend = frontend

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path: str = scope["path"]
        headers = {k: v.decode("latin-1") for k, v in scope["headers"] if k in (b"host", b"content-type")}
        if self.hosts is not None and _host_name(headers.get(b"host", "")) not in self.hosts:
            self.frontend.metrics.rejected("bad_host")
            resp = error_response(400, "Host header not allowed (see --allowed-hosts)", "invalid_request_error",
                                  code="invalid_host")
            return await resp(scope, receive, send)
        if self.api_keys and path.startswith(_PROTECTED):
            auth = ""
            for k, v in scope["headers"]:
                if k == b"authorization":
                    auth = v.decode("latin-1")
            if not authorized(auth, self.api_keys):
                self.frontend.metrics.rejected("unauthorized")
                resp = error_response(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                                      "invalid_request_error", code="invalid_api_key")
                return await resp(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        # Read the whole body up front (bounded), then replay it: our bodies are JSON and small.
        for k, v in scope["headers"]:
            if k == b"content-length" and v.isdigit() and int(v) > self.max_body:
                return await self._too_large(scope, receive, send)
        # JSON only: a page can POST text/plain or a form to any origin without asking the browser's
        # permission (a "simple" request); application/json needs a CORS preflight, which this server fails.
        media = headers.get(b"content-type", "").split(";", 1)[0].strip().lower()
        if media != "application/json":
            self.frontend.metrics.rejected("unsupported_media_type")
            resp = error_response(415, f"the request body must be application/json, got "
                                       f"{media or 'no Content-Type'}", "invalid_request_error",
                                  code="unsupported_media_type")
            return await resp(scope, receive, send)
        chunks, size = [], 0
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
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # then http.disconnect, whenever the client leaves

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.frontend.metrics.rejected("body_too_large")
        resp = error_response(413, f"request body is larger than {self.max_body} bytes", "invalid_request_error",
                              headers={"Connection": "close"})
        await resp(scope, receive, send)


def build_app(frontend: Frontend, config: ServerConfig, served_model_name: str, listening: bool = True) -> FastAPI:
    """listening: the app owns the socket clients reach (False inside a Ray replica, where the ingress does;
    the Host a client sent is then the ingress's name, not this app's)."""
    accepted = {served_model_name, frontend.engine_config.model}
    serving = OpenAIServing(frontend, served_model_name, accepted)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        frontend.start()
        yield
        await frontend.shutdown()

    app = FastAPI(title="tokenmill", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible API of a tokenmill engine replica.")
    app.add_middleware(GuardMiddleware, config=config, frontend=frontend, check_host=listening)
    metrics = frontend.metrics

    # -- errors: one mapping to OpenAI's shape ------------------------------------------------------------
    async def on_tokenmill_error(request: Request, e: TokenmillError) -> Response:
        headers = None
        if isinstance(e, QueueFullError):
            metrics.rejected(e.reason)
            headers = {"Retry-After": str(int(e.retry_after_s))}
        elif isinstance(e, ServerUnavailableError):
            metrics.rejected(e.reason)
            headers = {"Retry-After": "5"}
        elif isinstance(e, InvalidRequestError):
            metrics.rejected("invalid_request")
        elif e.http_status == 503:
            metrics.rejected("engine_dead")
        return error_response(e.http_status, str(e), e.error_type, getattr(e, "param", None), headers=headers)

    async def on_validation_error(request: Request, e: ValidationError | RequestValidationError) -> Response:
        metrics.rejected("invalid_request")
        message, param = _validation_message(e)
        return error_response(400, message, "invalid_request_error", param)

    async def on_http_error(request: Request, e: StarletteHTTPException) -> Response:
        status = e.status_code
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"method {request.method} not allowed on {request.url.path}"}.get(status, str(e.detail))
        return error_response(status, message, "invalid_request_error" if status < 500 else "internal_error",
                              headers=getattr(e, "headers", None))

    async def on_unexpected(request: Request, e: Exception) -> Response:
        logger.exception("unhandled error serving %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(e).__name__}", "internal_error")

    app.add_exception_handler(TokenmillError, on_tokenmill_error)
    app.add_exception_handler(ValidationError, on_validation_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)

    async def parse(request: Request, model: type[BaseModel]) -> Any:
        return model.model_validate_json(await request.body())

    # -- routes -----------------------------------------------------------------------------------------------
    @app.post("/v1/completions", openapi_extra=_body_schema(CompletionRequest))
    async def completions(request: Request) -> Response:
        arrival = time.monotonic()
        return await serving.completions(await parse(request, CompletionRequest), request, arrival)

    @app.post("/v1/chat/completions", openapi_extra=_body_schema(ChatCompletionRequest))
    async def chat_completions(request: Request) -> Response:
        arrival = time.monotonic()
        return await serving.chat(await parse(request, ChatCompletionRequest), request, arrival)

    @app.get("/v1/models")
    async def models() -> Response:
        card: dict[str, Any] = {"id": served_model_name, "object": "model", "created": int(time.time()),
                                "owned_by": "tokenmill", "root": frontend.engine_config.model}
        if frontend.info is not None:
            card["max_model_len"] = frontend.info.max_model_len
        return json_response({"object": "list", "data": [card]})

    @app.get("/health")
    async def health() -> Response:
        ok = frontend.state.value == "ready" and not frontend.unresponsive
        body: dict[str, Any] = {"status": "ok" if ok else "engine_unresponsive" if frontend.unresponsive
                                else frontend.state.value}
        if frontend.death_reason and not ok:
            body["reason"] = frontend.death_reason
        return json_response(body, 200 if ok else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize", openapi_extra=_body_schema(TokenizeRequest))
    async def tokenize(request: Request) -> Response:
        req = await parse(request, TokenizeRequest)
        _need_tokenizer(frontend)
        serving._check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise InvalidRequestError("give exactly one of 'prompt' or 'messages'", param="prompt")
        if req.messages is not None:
            if req.add_special_tokens is not None:
                raise InvalidRequestError("add_special_tokens applies to 'prompt' only", param="add_special_tokens")
            gen = True if req.add_generation_prompt is None else req.add_generation_prompt
            _, ids = await serving.render_chat(req.messages, gen)
        else:
            if req.add_generation_prompt is not None:
                raise InvalidRequestError("add_generation_prompt applies to 'messages' only",
                                          param="add_generation_prompt")
            ids = await serving._encode(req.prompt, True if req.add_special_tokens is None else req.add_special_tokens)
        body: dict[str, Any] = {"count": len(ids), "tokens": ids}
        if frontend.info is not None:
            body["max_model_len"] = frontend.info.max_model_len
        return json_response(body)

    @app.post("/detokenize", openapi_extra=_body_schema(DetokenizeRequest))
    async def detokenize(request: Request) -> Response:
        req = await parse(request, DetokenizeRequest)
        tok = _need_tokenizer(frontend)
        serving._check_model(req.model)
        vocab = frontend.info.vocab_size if frontend.info is not None else tok.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})", param="tokens")
        return json_response({"prompt": tok.decode(req.tokens)})

    return app


def _need_tokenizer(frontend: Frontend):
    if frontend.tokenizer is None:
        frontend.check_available()
        raise ServerUnavailableError("service unavailable: the tokenizer is loading", "starting")
    return frontend.tokenizer


def _body_schema(model: type[BaseModel]) -> dict[str, Any]:
    # Bodies are parsed by hand (for exact error messages); still publish their schema in /openapi.json.
    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": model.model_json_schema()}}}}
