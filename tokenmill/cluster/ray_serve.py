"""tokenmill as a Ray Serve application: a router deployment (the HTTP ingress) in front of engine replicas.

    client ─HTTP─► Serve proxy ─► Router (FastAPI ingress) ──handle──► EngineReplica × N
                                   tokenizes the prompt,          each: a tokenmill Frontend + engine
                                   TokenmillRequestRouter         process, our FastAPI app run in-process
                                   picks the replica              (asgi_bridge), reports its load

The router turns the HTTP request into an `HttpCall` carrying the prompt's `RequestFeatures` (token count,
output tokens asked for, the prefix cache's block hashes) and calls the engine deployment through a
DeploymentHandle. Which replica gets it is decided by `TokenmillRequestRouter`, a Ray Serve request router
that calls the same pure policy as `tokenmill router` (`tokenmill.cluster.policy.route`) over one
`ReplicaView` per replica: what the replica last reported through `record_routing_stats` (running, waiting,
KV use) plus this router's own in-flight requests, outstanding tokens and per-replica prefix index. The
policy's pick is ranked first, the others after it by load: Ray Serve sends the request to the first one
with room (`max_ongoing_requests`).

Engine replicas scale with Ray Serve's autoscaler (`autoscaling_config`) and reserve fractional CPUs. When
Serve stops a replica it waits for the replica's in-flight requests first (graceful shutdown), then the
replica's `__del__` stops its engine.
"""

import asyncio
import dataclasses
import json
import logging
import random
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse

from tokenmill.cluster.asgi_bridge import HOP_BY_HOP, HttpCall, ResponseHead, call_asgi
from tokenmill.cluster.features import Featurizer, load_tokenizer
from tokenmill.cluster.metrics import RouterMetrics
from tokenmill.cluster.policy import PolicyParams, PrefixIndex, ReplicaView, RequestFeatures, load, route
from tokenmill.cluster.proxy import parse_json_body, sse_error
from tokenmill.cluster.ray_config import RayServeConfig
from tokenmill.config import EngineConfig
from tokenmill.server.config import ServerConfig
from tokenmill.server.guard import host_allow_list, host_name

logger = logging.getLogger(__name__)

REPLICA_HEADER = b"x-tokenmill-replica"
PREFIX_INDEX_BLOCKS = 16384  # block hashes remembered per replica (as `tokenmill router`'s default)

# The Router deployment's metrics; its request router (in the same process) counts decisions here too.
_metrics: RouterMetrics | None = None


# -- Ray Serve's request router, calling our policy -----------------------------------------------------------
@dataclasses.dataclass
class _Work:
    """This router's requests on one replica, and the prompts it sent there."""

    index: PrefixIndex
    in_flight: int = 0
    outstanding_tokens: int = 0


class TokenmillRequestRouter(RequestRouter):
    """Runs inside each caller of the engine deployment (the Router deployment's replicas)."""

    def initialize_state(self, policy: str = "least-load", block_size: int = 16,
                         params: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.policy = policy
        self.block_size = block_size
        self.params = PolicyParams(**(params or {}))
        self._seq = 0
        self._rng = random.Random()
        self._work: dict[ReplicaID, _Work] = {}
        self._requests: dict[str, tuple[ReplicaID, int]] = {}  # internal request id -> (replica, tokens)

    def _of(self, replica_id: ReplicaID) -> _Work:
        w = self._work.get(replica_id)
        if w is None:
            w = self._work[replica_id] = _Work(PrefixIndex(PREFIX_INDEX_BLOCKS))
        return w

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        live = {r.replica_id for r in replicas}
        for gone in [rid for rid in self._work if rid not in live]:
            del self._work[gone]  # a replacement replica starts with a cold cache

    def matched_tokens(self, f: RequestFeatures, replica_id: ReplicaID) -> int:
        if not f.block_hashes:
            return 0
        max_blocks = max(0, (f.prompt_tokens - 1) // self.block_size)  # the engine looks up prompt - 1 tokens
        return min(self._of(replica_id).index.match(f.block_hashes), max_blocks) * self.block_size

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is not None:
            # Let Serve back off between rounds when every replica is full instead of spinning.
            pending_request.routing_context.should_backoff = True
        self._seq += 1
        f = dataclasses.replace(_features_of(pending_request) or RequestFeatures(0, 0), seq=self._seq,
                                rand=self._rng.getrandbits(32))
        views = []
        for r in candidate_replicas:
            stats, w = r.routing_stats or {}, self._of(r.replica_id)
            views.append(ReplicaView(r.replica_id.unique_id, w.outstanding_tokens, w.in_flight,
                                     int(stats.get("running", 0)), int(stats.get("waiting", 0)),
                                     float(stats.get("kv_cache_usage", 0.0)), self.matched_tokens(f, r.replica_id)))
        decision = route(self.policy, f, views, self.params)
        if _metrics is not None:
            _metrics.decided(decision.reason)
        order = sorted(range(len(views)), key=lambda i: (views[i].name != decision.replica, load(views[i])))
        return [[candidate_replicas[i]] for i in order]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        f = _features_of(pending_request) or RequestFeatures(0, 0)
        w = self._of(replica_id)
        tokens = max(0, f.prompt_tokens - self.matched_tokens(f, replica_id)) + f.max_tokens
        if f.block_hashes:
            w.index.insert(f.block_hashes)
        w.in_flight += 1
        w.outstanding_tokens += tokens
        self._requests[pending_request.metadata.internal_request_id] = (replica_id, tokens)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        entry = self._requests.pop(internal_request_id, None)
        if entry is None or entry[0] not in self._work:
            return
        w = self._work[entry[0]]
        w.in_flight -= 1
        w.outstanding_tokens -= entry[1]


def _features_of(pending_request: PendingRequest | None) -> RequestFeatures | None:
    if pending_request is None or not pending_request.args:
        return None
    call = pending_request.args[0]
    return call.features if isinstance(call, HttpCall) else None


# -- the engine replica -----------------------------------------------------------------------------------------
class EngineReplica:
    """One tokenmill server (frontend + engine process) inside a Ray Serve replica."""

    async def __init__(self, engine_config: EngineConfig, server_config: ServerConfig, model_name: str):
        from tokenmill.server.app import build_app
        from tokenmill.server.frontend import Frontend, State

        _log_to_stderr()
        self._state = State
        self.frontend = Frontend(engine_config, server_config, model_name)
        self.app = build_app(self.frontend, server_config, model_name, listening=False)
        self.frontend.on_fatal = lambda: None  # check_health reports it; Serve replaces the replica
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.frontend.start()
        while self.frontend.state is State.STARTING:
            await asyncio.sleep(0.05)
        if self.frontend.state is not State.READY:
            raise RuntimeError(f"engine replica failed to start: {self.frontend.death_reason}")
        logger.info("engine replica %s ready", self.replica_id)

    async def handle(self, call: HttpCall) -> AsyncIterator[ResponseHead | bytes]:
        async for part in call_asgi(self.app, call, [(REPLICA_HEADER, self.replica_id.encode())]):
            yield part

    def record_routing_stats(self) -> dict[str, Any]:
        s = self.frontend.stats
        out: dict[str, Any] = {"queued_requests": self.frontend.queued_seqs,
                               "queued_tokens": self.frontend.queued_tokens}
        if s is not None:
            out.update(running=s.num_running, waiting=s.num_waiting, kv_cache_usage=s.kv_cache_usage)
        return out

    def check_health(self) -> None:
        if self.frontend.state is self._state.DEAD:
            raise RuntimeError(f"engine is dead: {self.frontend.death_reason}")

    async def __del__(self) -> None:
        # Serve calls this after the replica's in-flight requests finished (or graceful_shutdown_timeout_s).
        await self.frontend.shutdown()


def _log_to_stderr() -> None:
    # A Ray worker configures only Ray's loggers; Ray forwards the worker's stderr to the driver's log.
    log = logging.getLogger("tokenmill")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


# -- the router (HTTP ingress) -----------------------------------------------------------------------------------
_END = object()


async def _next(gen, timeout: float):
    """The replica's next chunk, _END when it is done; asyncio.TimeoutError when it stalls past timeout."""
    return await asyncio.wait_for(anext(gen, _END), timeout)


async def _relay(gen, first: bytes | None, stream: bool, timeout: float, on_first=None) -> AsyncIterator[bytes]:
    """Body chunks from the replica to the client. If the client leaves, cancel the replica's stream; if the
    replica fails or stalls past `timeout` mid-stream, cancel it and end an SSE stream with an OpenAI-style
    error event (the status is sent)."""
    done = False
    try:
        if first is not None:
            if on_first is not None:
                on_first()
            yield first
        while (chunk := await _next(gen, timeout)) is not _END:
            yield chunk
        done = True
    except Exception as e:  # noqa: BLE001 - the replica (or its actor) failed or stalled after the response started
        reason = f"sent nothing for {timeout:g}s" if isinstance(e, asyncio.TimeoutError) else type(e).__name__
        logger.warning("engine replica failed mid-response: %s: %s", reason, e)
        if stream:
            yield sse_error(f"the engine replica failed mid-stream ({reason})")
            yield b"data: [DONE]\n\n"
    finally:
        if not done:
            gen.cancel()


class _TooLarge(Exception):
    pass


async def _read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise _TooLarge
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _error(status: int, message: str, type_: str, headers: dict[str, str] | None = None) -> Response:
    body = {"error": {"message": message, "type": type_, "param": None, "code": status}}
    return Response(json.dumps(body), status, headers=headers, media_type="application/json")


router_app = FastAPI(title="tokenmill router", description="OpenAI-compatible API in front of engine replicas.")
_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]
_GENERATE = ("/v1/completions", "/v1/chat/completions")


@serve.ingress(router_app)
class Router:
    async def __init__(self, engine: DeploymentHandle, engine_config: EngineConfig, routing: str,
                       max_body_bytes: int, upstream_timeout: float = 600.0, hosts: frozenset[str] | None = None):
        global _metrics
        _log_to_stderr()
        self.engine = engine
        self.max_body = max_body_bytes
        self.upstream_timeout = upstream_timeout
        self.hosts = hosts  # the Host allow-list (DNS rebinding), as the guard of `tokenmill serve` applies it
        self.metrics = _metrics = RouterMetrics(routing)
        # Block hashes only for the policies that read them (as `tokenmill router`).
        self.featurizer = Featurizer(engine_config.block_size, hash_prompts=routing in ("prefix-aware", "kv-aware"))
        try:
            self.featurizer.tokenizer = await asyncio.to_thread(load_tokenizer, engine_config)
        except Exception as e:  # routing still works, on load alone
            logger.error("cannot load the tokenizer of %r (%s): routing without prompt features",
                         engine_config.model, e)

    @router_app.get("/metrics")
    async def metrics(self) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @router_app.api_route("/{path:path}", methods=_METHODS)
    async def forward(self, request: Request, path: str) -> Response:
        arrival = time.monotonic()
        if self.hosts is not None and host_name(request.headers.get("host", "")) not in self.hosts:
            self.metrics.unrouted.labels("bad_host").inc()
            return _error(400, "Host header not allowed (see --allowed-hosts)", "invalid_request_error")
        try:
            body = await _read_body(request, self.max_body)
        except _TooLarge:
            self.metrics.unrouted.labels("body_too_large").inc()
            return _error(413, f"request body is larger than {self.max_body} bytes", "invalid_request_error")
        except ClientDisconnect:
            return Response(status_code=499)
        features = stream = None
        if request.method == "POST" and request.url.path in _GENERATE:
            parsed = parse_json_body(body)
            features = await self.featurizer.features(parsed)  # its seq/rand are replaced when routing
            stream = isinstance(parsed, dict) and parsed.get("stream") is True
        call = HttpCall(request.method, request.url.path, request.scope.get("query_string", b""),
                        [(k, v) for k, v in request.scope["headers"] if k not in HOP_BY_HOP], body, features)
        last_error: BaseException | None = None
        for attempt in range(2):  # a replica that fails before the client got a byte: once more, elsewhere
            gen = self.engine.options(stream=True).handle.remote(call)
            try:
                head = await _next(gen, self.upstream_timeout)
                if head is _END:
                    raise RuntimeError("the engine replica ended the call without a response")
                # Wait for the first body chunk too (a stream's first event): until then nothing was sent.
                first = await _next(gen, self.upstream_timeout)
                first = None if first is _END else first
            except asyncio.CancelledError:
                gen.cancel()
                raise
            except Exception as e:  # noqa: BLE001 - Ray raises many kinds (actor died, unavailable, ...)
                gen.cancel()
                last_error = e
                timed_out = isinstance(e, asyncio.TimeoutError)
                logger.warning("engine replica failed before answering (attempt %d): %s", attempt + 1,
                               f"sent nothing for {self.upstream_timeout:g}s" if timed_out else e)
                if attempt == 0:
                    self.metrics.retries.labels("timeout" if timed_out else "reset").inc()
                continue
            assert isinstance(head, ResponseHead)
            replica = dict(head.headers).get(REPLICA_HEADER, b"?").decode()
            self.metrics.requests.labels(replica).inc()
            on_first = (lambda: self.metrics.ttft.observe(time.monotonic() - arrival)) if stream else None
            resp = StreamingResponse(_relay(gen, first, bool(stream), self.upstream_timeout, on_first),
                                     status_code=head.status)
            resp.raw_headers = head.headers
            return resp
        self.metrics.unrouted.labels("no_replica").inc()
        if isinstance(last_error, asyncio.TimeoutError):
            return _error(504, f"no engine replica answered within {self.upstream_timeout:g}s", "timeout")
        msg = f"no engine replica could take the request: {type(last_error).__name__}: {last_error}"
        return _error(503, msg, "service_unavailable", headers={"Retry-After": "5"})


# -- building the application ---------------------------------------------------------------------------------
def build_application(engine_config: EngineConfig, server_config: ServerConfig, ray_config: RayServeConfig,
                      model_name: str, bind_host: str | None = None) -> serve.Application:
    """The Serve application graph: Router(engine handle) over the EngineReplica deployment. bind_host: where
    Serve's HTTP proxy listens, when known (a loopback bind then answers loopback Host names only); a Serve
    config file sets that elsewhere, so there only --allowed-hosts applies."""
    hosts = host_allow_list(bind_host or "0.0.0.0", server_config.allowed_hosts)
    engine_options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": ray_config.replica_cpus, "num_gpus": ray_config.replica_gpus},
        "max_ongoing_requests": ray_config.max_ongoing_requests,
        "graceful_shutdown_timeout_s": server_config.drain_timeout,
        "health_check_period_s": 5.0,
        "request_router_config": RequestRouterConfig(
            request_router_class=TokenmillRequestRouter,
            request_router_kwargs={"policy": ray_config.routing, "block_size": engine_config.block_size},
            request_routing_stats_period_s=ray_config.routing_stats_period,
            request_routing_stats_timeout_s=max(5.0, 3 * ray_config.routing_stats_period)),
    }
    if ray_config.autoscaling is not None:
        engine_options["autoscaling_config"] = ray_config.autoscaling
    else:
        engine_options["num_replicas"] = ray_config.replicas
    engine = serve.deployment(EngineReplica, name="EngineReplica").options(**engine_options)
    router = serve.deployment(Router, name="Router").options(
        num_replicas=ray_config.router_replicas,
        ray_actor_options={"num_cpus": ray_config.router_cpus},
        max_ongoing_requests=ray_config.max_ongoing_requests * 4,
        max_queued_requests=ray_config.max_waiting_requests)
    return router.bind(engine.bind(engine_config, server_config, model_name), engine_config, ray_config.routing,
                       int(server_config.max_body_bytes), ray_config.upstream_timeout, hosts)


# Options `tokenmill ray-serve` uses to start or reach Ray and Serve, not to build the application.
_NOT_APP_OPTIONS = frozenset({"host", "port", "address", "num_cpus", "object_store_memory", "detach", "app_name"})


def app_builder(args: dict[str, Any]) -> serve.Application:
    """For `serve run` / a Serve config file (`import_path: tokenmill.cluster.ray_serve:app_builder`): `args`
    maps option names of EngineConfig, ServerConfig and RayServeConfig (underscored) to values."""
    import dataclasses

    def pick(cls):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in args.items() if k in names})

    known = set().union(*({f.name for f in dataclasses.fields(c)} for c in (EngineConfig, ServerConfig,
                                                                            RayServeConfig)))
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown tokenmill option(s) in the Serve config: {', '.join(unknown)}")
    elsewhere = sorted(set(args) & _NOT_APP_OPTIONS)
    if elsewhere:
        raise ValueError(f"option(s) {', '.join(elsewhere)} do not belong in the application's args: the Serve "
                         "config's http_options set host and port, and the cluster is the one `serve deploy` "
                         "talks to")
    engine_config, server_config = pick(EngineConfig), pick(ServerConfig)
    name = server_config.served_model_name or engine_config.model
    return build_application(engine_config, server_config, pick(RayServeConfig), name)
