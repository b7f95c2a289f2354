"""The FastAPI application: routes, one place mapping errors to OpenAI error bodies, behind the guard
middleware (tokenmill/server/guard.py)."""

from __future__ import annotations

import json
import logging
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response

from tokenmill.errors import InvalidRequestError, QueueFullError, TokenmillError
from tokenmill.server.api_models import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    RagChatCompletionRequest,
    TokenizeRequest,
)
from tokenmill.server.config import ServerConfig
from tokenmill.server.dashboard import dashboard_response
from tokenmill.server.embeddings import encode_vector
from tokenmill.server.frontend import Frontend, ServerUnavailableError
from tokenmill.server.guard import host_allow_list, install_guard
from tokenmill.server.openai_api import OpenAIServing, json_response

logger = logging.getLogger(__name__)



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


def _drop_unknown(body: bytes, model: type[BaseModel]) -> bytes:
    """--lenient-fields: the body with top-level fields `model` does not know removed (and logged once each)."""
    import json

    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return body  # model_validate reports it as the error it is
    if not isinstance(data, dict):
        return body
    known = {f.alias or name for name, f in model.model_fields.items()} | set(model.model_fields)
    unknown = sorted(k for k in data if k not in known)
    for k in unknown:
        if k not in _warned_fields:
            _warned_fields.add(k)
            logger.warning("ignoring the unknown request field %r (--lenient-fields)", k)
    return json.dumps({k: v for k, v in data.items() if k in known}).encode() if unknown else body


_warned_fields: set[str] = set()


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
    install_guard(app, config, frontend.metrics.rejected,
                  hosts=host_allow_list(config.host, config.allowed_hosts) if listening else None)
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
        body = await request.body()
        if config.lenient_fields:
            body = _drop_unknown(body, model)
        return model.model_validate_json(body)

    # -- routes -----------------------------------------------------------------------------------------------
    @app.post("/v1/completions", openapi_extra=_body_schema(CompletionRequest))
    async def completions(request: Request) -> Response:
        arrival = time.monotonic()
        return await serving.completions(await parse(request, CompletionRequest), request, arrival)

    @app.post("/v1/chat/completions", openapi_extra=_body_schema(ChatCompletionRequest))
    async def chat_completions(request: Request) -> Response:
        arrival = time.monotonic()
        return await serving.chat(await parse(request, ChatCompletionRequest), request, arrival)

    @app.post("/v1/rag/chat/completions", openapi_extra=_body_schema(RagChatCompletionRequest))
    async def rag_chat_completions(request: Request) -> Response:
        arrival = time.monotonic()
        req = await parse(request, RagChatCompletionRequest)
        frontend.check_available()
        rag = frontend.rag
        if rag is None:
            raise InvalidRequestError("this server has no retrieval index (start it with --rag-index)", param="rag")
        serving._check_model(req.model)
        assert frontend.embeddings is not None and frontend.client is not None
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        options = req.rag.model_dump() if req.rag is not None else {}
        context, seconds = await rag.retrieve(frontend.embeddings, frontend.client.send, messages, options)
        metrics.rag_retrieval.observe(seconds)
        metrics.rag_context_tokens.observe(context.tokens)
        chat = ChatCompletionRequest.model_validate_json(json.dumps(
            {**req.model_dump(mode="json", exclude_none=True, exclude={"rag", "messages"}),
             "messages": rag.augment(messages, context)}))
        extra = {"citations": rag.citations(context),
                 "rag": {"context_tokens": context.tokens, "retrieval_seconds": round(seconds, 6),
                         "mode": "dense" if options.get("hybrid") is False else "hybrid",
                         "order": options.get("order") or "index"}}
        return await serving.chat(chat, request, arrival, extra)

    @app.post("/v1/embeddings", openapi_extra=_body_schema(EmbeddingRequest))
    async def embeddings(request: Request) -> Response:
        req = await parse(request, EmbeddingRequest)
        frontend.check_available()
        service = frontend.embeddings
        if service is None:
            raise InvalidRequestError("this server has no embedding model (start it with --embedding-model)",
                                      param="model")
        if req.model is not None and req.model not in (service.model_name, frontend.engine_config.embedding_model):
            raise InvalidRequestError(f"model '{req.model}' does not exist; this server embeds with "
                                      f"'{service.model_name}'", param="model")
        if req.dimensions is not None and req.dimensions != service.config.hidden_size:
            raise InvalidRequestError(f"dimensions must be {service.config.hidden_size} (the model's own size)",
                                      param="dimensions")
        ids = service.encode(req.input)
        assert frontend.client is not None
        vectors = await service.embed(frontend.client.send, ids)
        fmt = req.encoding_format or "float"
        n = sum(len(x) for x in ids)
        return json_response({"object": "list", "model": service.model_name,
                              "data": [{"object": "embedding", "index": i, "embedding": encode_vector(v, fmt)}
                                       for i, v in enumerate(vectors)],
                              "usage": {"prompt_tokens": n, "total_tokens": n}})

    @app.get("/v1/models")
    async def models() -> Response:
        card: dict[str, Any] = {"id": served_model_name, "object": "model", "created": int(time.time()),
                                "owned_by": "tokenmill", "root": frontend.engine_config.model}
        if frontend.info is not None:
            card["max_model_len"] = frontend.info.max_model_len
        data = [card]
        if frontend.embeddings is not None:
            e = frontend.embeddings
            data.append({"id": e.model_name, "object": "model", "created": card["created"], "owned_by": "tokenmill",
                         "root": frontend.engine_config.embedding_model, "max_model_len": e.config.max_seq_length})
        return json_response({"object": "list", "data": data})

    @app.get("/v1/usage")
    async def usage() -> Response:
        return json_response(frontend.usage.snapshot())

    @app.get("/health")
    async def health() -> Response:
        ok = frontend.state.value == "ready" and not frontend.unresponsive
        body: dict[str, Any] = {"status": "ok" if ok else "engine_unresponsive" if frontend.unresponsive
                                else frontend.state.value}
        if frontend.death_reason and not ok:
            body["reason"] = frontend.death_reason
        return json_response(body, 200 if ok else 503)

    @app.get("/dashboard")
    async def dashboard() -> Response:
        return dashboard_response()

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(config.metrics_prefix), media_type=CONTENT_TYPE_LATEST)

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
