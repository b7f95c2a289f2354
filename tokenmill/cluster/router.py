"""The router: an OpenAI-compatible HTTP endpoint in front of engine replicas.

Per request: read the body, tokenize the prompt (the model's own tokenizer and chat template, no torch) and
hash its full blocks as the engine's prefix cache does, ask the routing policy for a replica, and forward
the request bytes unchanged through `Forwarder` (retry before the first token, pass-through after).
Replicas are reached over the same HTTP API a user would use; with `--spawn N` the router also starts and
supervises them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response

from tokenmill.cluster.config import RouterConfig
from tokenmill.cluster.features import Featurizer, load_tokenizer
from tokenmill.cluster.metrics import RouterMetrics
from tokenmill.cluster.policy import Decision, PolicyParams, RequestFeatures, route
from tokenmill.cluster.proxy import Forwarder, Retry, error_response, parse_json_body
from tokenmill.cluster.replicas import Load, Replica, ReplicaSet
from tokenmill.config import EngineConfig
from tokenmill.gc_control import freeze_startup_heap
from tokenmill.server.dashboard import dashboard_response
from tokenmill.server.guard import host_allow_list, install_guard
from tokenmill.server.listener import uvicorn_config

logger = logging.getLogger(__name__)


class Router:
    """Routing state for one router process: the replica set, the policy, the tokenizer, metrics.

    Seams for what builds on it: `replicas` (a ReplicaSet: add / drain / wait_idle / remove, per-replica
    stats) and `supervisor` (spawned replicas: add_replica / remove_replica, draining first) for an
    autoscaler, with `metrics.ttft` for its latency signal; `Featurizer` (tokenmill.cluster.features) and
    the pure `route()` (tokenmill.cluster.policy) for a Ray deployment that routes the same way.
    """

    def __init__(self, config: RouterConfig, engine_config: EngineConfig):
        self.config = config
        self.engine_config = engine_config
        self.block_size = engine_config.block_size
        self.policy = config.routing
        self.params = PolicyParams(config.imbalance_tokens, config.imbalance_ratio, config.kv_pressure_tokens)
        self.uses_prefix = self.policy in ("prefix-aware", "kv-aware")
        self.metrics = RouterMetrics(self.policy)
        self.replicas = ReplicaSet(index_blocks=config.prefix_index_blocks, max_failures=config.max_failures,
                                   health_interval=config.health_interval, health_timeout=config.health_timeout,
                                   connect_timeout=config.connect_timeout, upstream_timeout=config.upstream_timeout)
        self.metrics.watch(self.replicas.all)
        self.forwarder = Forwarder(self.replicas, self._on_failure, self.metrics.ttft.observe,
                                   lambda r: self.metrics.stream_errors.labels(r.name).inc())
        self.featurizer = Featurizer(self.block_size, hash_prompts=self.uses_prefix)
        self.supervisor = None  # tokenmill.cluster.supervisor.Supervisor with --spawn
        self.min_ready = 1  # healthy replicas /health needs to say ok (the cascade needs both of its own)
        self._tokenizer_task: asyncio.Task | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._tokenizer_task = asyncio.get_running_loop().create_task(self._load_tokenizer())
        if self.config.spawn:
            from tokenmill.cluster.supervisor import Supervisor

            self.supervisor = Supervisor(self.replicas, self.engine_config, self.config, self.metrics)
            await self.supervisor.start(self.config.spawn)
        for url in self.config.replica_urls:
            self.replicas.add(url)
        await self.replicas.start()

    async def stop(self) -> None:
        await self.replicas.stop_polling()  # replicas stopping now are not failures
        if self.supervisor is not None:
            await self.supervisor.stop()
        await self.replicas.stop()

    async def _load_tokenizer(self) -> None:
        try:
            self.featurizer.tokenizer = await asyncio.to_thread(load_tokenizer, self.engine_config)
            logger.info("tokenizer of %r loaded: prompts are hashed in blocks of %d tokens for routing",
                        self.engine_config.model, self.block_size)
        except Exception as e:
            logger.error("cannot load the tokenizer of %r (%s): routing without prompt features",
                         self.engine_config.model, e)

    # -- features and decisions ----------------------------------------------------------------------------
    async def features(self, body: Any) -> RequestFeatures:
        return await self.featurizer.features(body)

    def install_routes(self, app: FastAPI) -> None:
        """Routes beyond the common ones (the autoscaling router adds its status page)."""

    def pick(self, f: RequestFeatures, exclude: set[str]) -> tuple[Replica, Decision, int] | None:
        """The policy's replica among the routable ones not in `exclude`, and the prompt tokens it should
        have cached. Records the prompt's blocks in that replica's prefix index."""
        cands = [r for r in self.replicas.routable() if r.name not in exclude]
        if not cands:
            return None
        # The engine looks up at most (prompt - 1) tokens, in whole blocks.
        max_blocks = max(0, (f.prompt_tokens - 1) // self.block_size)
        matched = {r.name: min(r.index.match(f.block_hashes), max_blocks) * self.block_size for r in cands} \
            if f.block_hashes else {}
        d = route(self.policy, f, [r.view(matched.get(r.name, 0)) for r in cands], self.params)
        r = self.replicas.get(d.replica)
        if f.block_hashes:
            r.index.insert(f.block_hashes)
            r.expected_hits += matched[r.name]
        self.metrics.decided(d.reason)
        return r, d, matched.get(r.name, 0)

    def _on_failure(self, r: Replica, kind: str) -> None:
        self.metrics.failures.labels(r.name, kind).inc()

    # -- forwarding ----------------------------------------------------------------------------------------
    async def forward(self, http: Request, method: str, path: str, body: bytes | None, parsed: Any,
                      stream: bool, arrival: float | None = None) -> Response:
        arrival = time.monotonic() if arrival is None else arrival  # (given: the request waited for a replica)
        f = await self.features(parsed)
        tried: set[str] = set()
        failed: Response | None = None
        for attempt in range(2):  # the first try and one retry elsewhere
            picked = self.pick(f, tried)
            if picked is None:
                break
            r, _, matched = picked
            tried.add(r.name)
            self.metrics.requests.labels(r.name).inc()
            load = Load(r, max(0, f.prompt_tokens - matched), f.max_tokens)
            out = await self.forwarder.attempt(r, load, http, method, path, body, stream, arrival)
            if not isinstance(out, Retry):
                return out
            failed = out.response
            if attempt == 0:
                self.metrics.retries.labels(out.reason).inc()
                logger.info("request failed on replica %s before any output (%s); retrying elsewhere",
                            r.name, out.reason)
        if failed is not None:
            return failed
        self.metrics.unrouted.labels("no_replica").inc()
        states = ", ".join(f"{r.name}: {r.state.value}" for r in self.replicas.all()) or "none configured"
        return error_response(503, f"no healthy replica to serve this request ({states})", "service_unavailable",
                              headers={"Retry-After": "2"})


def build_router_app(router: Router) -> FastAPI:
    config = router.config

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await router.start()
        freeze_startup_heap()  # the app and the tokenizer: never walked by a collection again
        try:
            yield
        finally:
            await router.stop()

    app = FastAPI(title="tokenmill router", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible API in front of tokenmill engine replicas.")
    metrics = router.metrics

    async def on_http_error(request: Request, e: StarletteHTTPException) -> Response:
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"method {request.method} not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return error_response(e.status_code, message, "invalid_request_error")

    async def on_unexpected(request: Request, e: Exception) -> Response:
        logger.exception("unhandled error routing %s %s", request.method, request.url.path)
        return error_response(500, f"internal router error: {type(e).__name__}", "internal_error")

    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)

    # The same guard as the server's: Host allow-list on a loopback bind, API key, JSON-only POST, body size.
    install_guard(app, config, lambda reason: metrics.unrouted.labels(reason).inc(),
                  hosts=host_allow_list(config.host, config.allowed_hosts))

    async def post(request: Request, generate: bool) -> Response:
        body = await request.body()  # read and bounded by the guard already
        parsed = parse_json_body(body)
        stream = generate and isinstance(parsed, dict) and parsed.get("stream") is True
        return await router.forward(request, "POST", request.url.path, body, parsed if generate else None, stream)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await post(request, True)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await post(request, True)

    @app.post("/v1/rag/chat/completions")  # replicas started with --rag-index; the router sees the question only
    async def rag_chat_completions(request: Request) -> Response:
        return await post(request, True)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        return await post(request, False)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        return await post(request, False)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        return await router.forward(request, "GET", "/v1/models", None, None, False)

    @app.get("/health")
    async def health() -> Response:
        n = len(router.replicas.routable())
        ok = n >= router.min_ready
        body = {"status": "ok" if ok else "no_healthy_replica", "healthy_replicas": n,
                "replicas": len(router.replicas.all())}
        return Response(json.dumps(body), status_code=200 if ok else 503, media_type="application/json")

    @app.get("/dashboard")
    async def dashboard() -> Response:
        return dashboard_response()

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/router/replicas")
    async def replicas() -> Response:
        body = {"routing": router.policy, "tokenizer_loaded": router.featurizer.tokenizer is not None,
                "replicas": [r.describe() for r in router.replicas.all()]}
        return Response(json.dumps(body), media_type="application/json")

    return app


def run_router(router: Router) -> int:
    """Serve `router` (a Router, or the autoscaling one the entrypoint chose) until SIGTERM/SIGINT (a second
    one forces exit); spawned replicas are stopped on the way out."""
    import uvicorn

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            # Not recorded in _captured_signals: uvicorn would re-raise it after shutdown and turn a clean
            # stop into death-by-signal.
            if self.should_exit:
                self.force_exit = True
            self.should_exit = True

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per proxied request otherwise
    config = router.config
    app = build_router_app(router)
    router.install_routes(app)
    uv = uvicorn_config(app, config, lambda reason: router.metrics.unrouted.labels(reason).inc(),
                        timeout_graceful_shutdown=30)
    logger.info("router on http://%s:%d: %s routing over %s", config.host, config.port, config.routing,
                f"{config.spawn} spawned replicas" if config.spawn else ", ".join(config.replica_urls))
    _Server(uv).run()
    return 0
