"""tokenmill as a Ray Serve application: a router deployment (the HTTP ingress) in front of engine replicas.

    client ─HTTP─► Serve proxy ─► Router (FastAPI ingress) ──handle──► EngineReplica × N
                                   reads the prompt,             each: a tokenmill Frontend + engine
                                   TokenmillRequestRouter        process, our FastAPI app run in-process
                                   picks the replica             (asgi_bridge), reports its load

The router turns the HTTP request into an `HttpCall` with a `RoutingHint` (the prompt's start, its length,
max_tokens) and calls the engine deployment through a DeploymentHandle. Which replica gets it is decided by
`TokenmillRequestRouter`, a Ray Serve request router that ranks the replicas with `rank_replicas` (a pure
function of the hint and each replica's load: what the replica last reported through
`record_routing_stats`, plus this router's own count of requests it has in flight there). Ray Serve then
sends the request to the first ranked replica that has room (`max_ongoing_requests`).

Engine replicas scale with Ray Serve's autoscaler (`autoscaling_config`) and reserve fractional CPUs. When
Serve stops a replica it waits for the replica's in-flight requests first (graceful shutdown), then the
replica's `__del__` stops its engine.
"""


import asyncio
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse

from tokenmill.cluster.asgi_bridge import (
    HOP_BY_HOP,
    HttpCall,
    ResponseHead,
    RoutingHint,
    call_asgi,
    routing_hint,
)
from tokenmill.cluster.ray_config import RayServeConfig
from tokenmill.config import EngineConfig
from tokenmill.server.config import ServerConfig

logger = logging.getLogger(__name__)

REPLICA_HEADER = b"x-tokenmill-replica"
CHARS_PER_TOKEN = 4  # the router has no tokenizer; a rough size is enough to weigh load


# -- which replica: a pure function -------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ReplicaLoad:
    """One engine replica as a routing policy sees it."""

    replica_id: str
    running: int = 0  # reported by the replica (may be up to routing_stats_period old)
    waiting: int = 0
    kv_cache_usage: float = 0.0
    inflight_requests: int = 0  # this router's own, always current
    inflight_tokens: int = 0  # estimated prompt + output tokens of those requests


def rank_replicas(policy: str, hint: RoutingHint | None, replicas: list[ReplicaLoad], turn: int) -> list[int]:
    """Indices of `replicas`, most preferred first. `turn` is a counter the caller advances per request.

    Stand-in until tokenmill.cluster's routing policies land; the call site in TokenmillRequestRouter
    passes the same inputs to them.
    """
    n = len(replicas)
    if policy == "round-robin":
        return [(turn + i) % n for i in range(n)]
    # least-load (and, for now, prefix-aware): outstanding tokens, then requests, then the replica's own queue.
    return sorted(range(n), key=lambda i: (replicas[i].inflight_tokens, replicas[i].inflight_requests,
                                           replicas[i].waiting, replicas[i].running, (i - turn) % n))


def estimated_tokens(hint: RoutingHint | None) -> int:
    if hint is None:
        return 1
    return hint.prompt_chars // CHARS_PER_TOKEN + (hint.max_tokens or 16)


# -- Ray Serve's request router, calling our policy ---------------------------------------------------------------
class TokenmillRequestRouter(RequestRouter):
    """Runs inside each caller of the engine deployment (the Router deployment's replicas)."""

    def initialize_state(self, policy: str = "least-load", **kwargs: Any) -> None:
        self.policy = policy
        self._turn = itertools.count()
        self._inflight: dict[str, tuple[ReplicaID, int]] = {}  # internal request id -> (replica, tokens)
        self._per_replica: dict[ReplicaID, list[int]] = {}  # replica -> [requests, tokens]

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        hint = _hint_of(pending_request)
        loads = []
        for r in candidate_replicas:
            stats = r.routing_stats or {}
            reqs, toks = self._per_replica.get(r.replica_id, (0, 0))
            loads.append(ReplicaLoad(r.replica_id.unique_id, int(stats.get("running", 0)),
                                     int(stats.get("waiting", 0)), float(stats.get("kv_cache_usage", 0.0)),
                                     reqs, toks))
        if pending_request is not None:
            # Let Serve back off between rounds when every replica is full instead of spinning.
            pending_request.routing_context.should_backoff = True
        order = rank_replicas(self.policy, hint, loads, next(self._turn))
        return [[candidate_replicas[i]] for i in order]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        tokens = estimated_tokens(_hint_of(pending_request))
        self._inflight[pending_request.metadata.internal_request_id] = (replica_id, tokens)
        counts = self._per_replica.setdefault(replica_id, [0, 0])
        counts[0] += 1
        counts[1] += tokens

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        entry = self._inflight.pop(internal_request_id, None)
        if entry is None:
            return
        counts = self._per_replica.get(entry[0])
        if counts is not None:
            counts[0] -= 1
            counts[1] -= entry[1]
            if counts[0] <= 0:
                del self._per_replica[entry[0]]


def _hint_of(pending_request: PendingRequest | None) -> RoutingHint | None:
    if pending_request is None or not pending_request.args:
        return None
    call = pending_request.args[0]
    return call.hint if isinstance(call, HttpCall) else None


# -- the engine replica -----------------------------------------------------------------------------------------
class EngineReplica:
    """One tokenmill server (frontend + engine process) inside a Ray Serve replica."""

    async def __init__(self, engine_config: EngineConfig, server_config: ServerConfig, model_name: str):
        from tokenmill.server.app import build_app
        from tokenmill.server.frontend import Frontend, State

        _log_to_stderr()
        self._state = State
        self.frontend = Frontend(engine_config, server_config, model_name)
        self.app = build_app(self.frontend, server_config, model_name)
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
async def _relay(gen) -> AsyncIterator[bytes]:
    """Body chunks from the replica to the client; if the client leaves, cancel the replica's stream."""
    done = False
    try:
        async for chunk in gen:
            yield chunk
        done = True
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


@serve.ingress(router_app)
class Router:
    def __init__(self, engine: DeploymentHandle, max_body_bytes: int):
        _log_to_stderr()
        self.engine = engine
        self.max_body = max_body_bytes
        self.registry = CollectorRegistry()
        self.requests = Counter("tokenmill:router_requests", "Requests forwarded, by engine replica.",
                                ["replica"], registry=self.registry)
        self.retries = Counter("tokenmill:router_retries", "Requests sent again after a replica failed "
                               "before answering.", registry=self.registry)
        self.failures = Counter("tokenmill:router_failures", "Requests answered 503 because no replica could "
                                "take them.", registry=self.registry)

    @router_app.get("/metrics")
    async def metrics(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    @router_app.api_route("/{path:path}", methods=_METHODS)
    async def forward(self, request: Request, path: str) -> Response:
        try:
            body = await _read_body(request, self.max_body)
        except _TooLarge:
            return _error(413, f"request body is larger than {self.max_body} bytes", "invalid_request_error")
        except ClientDisconnect:
            return Response(status_code=499)
        call = HttpCall(request.method, request.url.path, request.scope.get("query_string", b""),
                        [(k, v) for k, v in request.scope["headers"] if k not in HOP_BY_HOP], body,
                        routing_hint(request.url.path, body))
        last_error: BaseException | None = None
        for attempt in range(2):  # a replica that fails before answering: once more, elsewhere
            gen = self.engine.options(stream=True).handle.remote(call)
            try:
                head = await gen.__anext__()
            except (StopAsyncIteration, asyncio.CancelledError):
                gen.cancel()
                raise
            except Exception as e:  # noqa: BLE001 - Ray raises many kinds (actor died, unavailable, ...)
                last_error = e
                logger.warning("engine replica failed before answering (attempt %d): %s", attempt + 1, e)
                if attempt == 0:
                    self.retries.inc()
                continue
            assert isinstance(head, ResponseHead)
            replica = dict(head.headers).get(REPLICA_HEADER, b"?").decode()
            self.requests.labels(replica).inc()
            resp = StreamingResponse(_relay(gen), status_code=head.status)
            resp.raw_headers = head.headers
            return resp
        self.failures.inc()
        msg = f"no engine replica could take the request: {type(last_error).__name__}: {last_error}"
        return _error(503, msg, "service_unavailable", headers={"Retry-After": "5"})


# -- building the application ---------------------------------------------------------------------------------
def build_application(engine_config: EngineConfig, server_config: ServerConfig, ray_config: RayServeConfig,
                      model_name: str) -> serve.Application:
    """The Serve application graph: Router(engine handle) over the EngineReplica deployment."""
    engine_options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": ray_config.replica_cpus, "num_gpus": ray_config.replica_gpus},
        "max_ongoing_requests": ray_config.max_ongoing_requests,
        "graceful_shutdown_timeout_s": server_config.drain_timeout,
        "health_check_period_s": 5.0,
        "request_router_config": RequestRouterConfig(
            request_router_class=TokenmillRequestRouter,
            request_router_kwargs={"policy": ray_config.routing},
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
    return router.bind(engine.bind(engine_config, server_config, model_name), int(server_config.max_body_bytes))


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
    engine_config, server_config = pick(EngineConfig), pick(ServerConfig)
    name = server_config.served_model_name or engine_config.model
    return build_application(engine_config, server_config, pick(RayServeConfig), name)


def wait_until_running(app_name: str, timeout: float) -> None:
    """Block until the application's deployments are all running, or raise with Serve's status message."""
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        status = serve.status().applications.get(app_name)
        if status is not None and status.status == "RUNNING":
            return
        if status is not None and status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise RuntimeError(f"Ray Serve application {app_name!r} is {status.status}: {status.message}")
        time.sleep(0.5)
    raise TimeoutError(f"Ray Serve application {app_name!r} not running after {timeout:.0f}s: {status}")
