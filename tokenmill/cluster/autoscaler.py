"""The autoscaler of `tokenmill router --spawn N --autoscale min=..,max=..,target=..`: grows and shrinks the
local replica set with demand.

Every `interval` it turns the router's view of the replicas into an `Observation` (requests waiting in the
replicas' queues and in the router, KV use, p90 TTFT of the streams that started since the last look) and
asks the pure `decide()` (tokenmill.cluster.autoscale_policy) for a replica count. Up: the supervisor spawns
replicas, which join the rotation when their /health passes. Down: the chosen replica is drained at once (the
router sends it nothing new), and the supervisor stops its process only after its in-flight requests
finished (or `drain_timeout`); the process itself drains on SIGTERM too, so no stream is cut.

With min=0 the set may shrink to nothing after `idle` seconds without requests. A request that then arrives
waits in the router (`AutoscalingRouter.forward`) while one replica cold-starts; its TTFT is measured from
its arrival at the router, so the cold start is in the TTFT the metrics and the next decisions see.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from prometheus_client import Counter, Gauge
from starlette.requests import Request
from starlette.responses import Response

from tokenmill.cluster.autoscale_policy import AutoscaleConfig, Decision, Observation, decide, pressure
from tokenmill.cluster.config import RouterConfig
from tokenmill.cluster.metrics import RouterMetrics
from tokenmill.cluster.policy import RequestFeatures
from tokenmill.cluster.proxy import error_response
from tokenmill.cluster.replicas import Replica, ReplicaSet, ReplicaState
from tokenmill.cluster.router import Router
from tokenmill.config import EngineConfig

logger = logging.getLogger(__name__)

_HISTORY = 1000  # scale events kept for /router/autoscaler
PREDICT_WINDOW_S = 30.0  # the predicted signal plans for the demand of the last this many seconds
PREDICT_EVERY_S = 5.0
# (arrivals as (seconds into the window, prompt tokens, max tokens), window seconds) -> replicas needed.
# Built by the entrypoint from the planner (tokenmill.planning.predictor): the cluster tier only calls it.
Predictor = Callable[[list[tuple[float, int, int]], float], int]


class Autoscaler:
    def __init__(self, replicas: ReplicaSet, supervisor: Any, cfg: AutoscaleConfig, metrics: RouterMetrics,
                 interval: float = 1.0, drain_timeout: float = 60.0, predictor: Predictor | None = None):
        self.replicas = replicas
        self.supervisor = supervisor  # tokenmill.cluster.supervisor.Supervisor: add_replica / remove_replica
        self.cfg = cfg
        self.interval = interval
        self.drain_timeout = drain_timeout
        self.window: deque[Observation] = deque()
        self.started = time.monotonic()
        self.last_change = self.started
        self.pending = 0  # requests waiting in the router for a replica to exist
        self.events: deque[dict] = deque(maxlen=_HISTORY)
        self.last: Decision | None = None
        self._ttfts: list[float] = []
        # The predicted signal: recent arrivals (monotonic t, prompt tokens, max tokens), and the replicas the
        # predictor last said they need; refreshed on a worker thread every PREDICT_EVERY_S.
        self.predictor = predictor
        self.arrivals: deque[tuple[float, int, int]] = deque()
        self.needed: int | None = None
        self._predicting: asyncio.Task | None = None
        self._predicted_at = 0.0
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._removals: set[asyncio.Task] = set()
        r = metrics.registry
        self.m_target = Gauge("tokenmill:router_autoscaler_target_replicas",
                              "Replicas the autoscaler aims for (ready + starting, draining ones excluded).",
                              registry=r)
        self.m_pressure = Gauge("tokenmill:router_autoscaler_pressure",
                                "Load over target at the last decision (largest of queue, KV use, p90 TTFT; "
                                "1 = at target).", registry=r)
        self.m_events = Counter("tokenmill:router_scale_events", "Scale decisions carried out, by direction.",
                                ["direction"], registry=r)
        for d in ("up", "down"):
            self.m_events.labels(d)

    # -- inputs ----------------------------------------------------------------------------------------------
    def record_ttft(self, seconds: float) -> None:
        self._ttfts.append(seconds)

    def record_arrival(self, now: float, prompt_tokens: int, max_tokens: int) -> None:
        if self.predictor is not None:
            self.arrivals.append((now, prompt_tokens, max_tokens))

    def _refresh_prediction(self, now: float) -> None:
        """Start a prediction over the last PREDICT_WINDOW_S of arrivals unless one is running or recent."""
        while self.arrivals and self.arrivals[0][0] < now - PREDICT_WINDOW_S:
            self.arrivals.popleft()
        if self.predictor is None or now - self._predicted_at < PREDICT_EVERY_S or \
                (self._predicting is not None and not self._predicting.done()):
            return
        self._predicted_at = now
        demand = [(t - (now - PREDICT_WINDOW_S), p, o) for t, p, o in self.arrivals]
        predictor = self.predictor

        async def predict() -> None:
            try:
                self.needed = await asyncio.to_thread(predictor, demand, PREDICT_WINDOW_S)
            except Exception:
                logger.exception("the planner's prediction failed; scaling on observed load alone")
                self.needed = None

        self._predicting = asyncio.get_running_loop().create_task(predict())

    def poke(self) -> None:
        """Decide now instead of at the next tick (a request is waiting and no replica exists)."""
        self._wake.set()

    def counted(self) -> list[Replica]:
        """Replicas the decision counts: every one not draining (starting and unhealthy ones too: an unhealthy
        spawned replica is being restarted by the supervisor)."""
        return [r for r in self.replicas.all() if r.state is not ReplicaState.DRAINING]

    def observe(self, now: float) -> Observation:
        counted = self.counted()
        ready = [r for r in counted if r.state is ReplicaState.HEALTHY]
        ttfts, self._ttfts = sorted(self._ttfts), []
        p90 = ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))] if ttfts else None
        in_router = self.pending
        return Observation(
            t=now, replicas=len(counted), starting=len(counted) - len(ready),
            waiting=sum(r.stats.waiting for r in ready) + in_router,
            inflight=sum(r.in_flight for r in self.replicas.all()) + in_router,
            kv_usage=sum(r.stats.kv_usage for r in ready) / len(ready) if ready else 0.0,
            ttft_p90=p90, needed=self.needed)

    # -- the loop --------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())
        logger.info("autoscaler on: %s", self.cfg)

    async def stop(self) -> None:
        for t in [self._task, self._predicting, *self._removals]:
            if t is not None:
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
            self._wake.clear()
            try:
                await self.step()
            except Exception:
                logger.exception("autoscaler step failed")

    async def step(self) -> Decision:
        now = time.monotonic()
        self._refresh_prediction(now)
        obs = self.observe(now)
        self.window.append(obs)
        keep = max(self.cfg.up_delay, self.cfg.down_delay, self.cfg.idle) + 2 * self.interval
        while self.window and self.window[0].t < now - keep:
            self.window.popleft()
        d = decide(self.window, obs.replicas, self.last_change, self.cfg)
        self.last = d
        self.m_pressure.set(min(pressure(obs, self.cfg), 1e9))
        self.m_target.set(d.replicas)
        if d.replicas != obs.replicas:
            await self.scale(obs.replicas, d, now)
        return d

    async def scale(self, current: int, d: Decision, now: float) -> None:
        direction = "up" if d.replicas > current else "down"
        self.last_change = now
        self.m_events.labels(direction).inc()
        self.events.append({"t": round(now - self.started, 3), "from": current, "to": d.replicas,
                            "reason": d.reason})
        logger.info("autoscaler: %d -> %d replicas (%s)", current, d.replicas, d.reason)
        if direction == "up":
            for _ in range(d.replicas - current):
                await self.supervisor.add_replica()
            return
        for r in self.victims(current - d.replicas):
            self.replicas.drain(r.name)  # out of rotation now; the process stops once its requests are done
            task = asyncio.get_running_loop().create_task(self._remove(r.name))
            self._removals.add(task)
            task.add_done_callback(self._removals.discard)

    def victims(self, n: int) -> list[Replica]:
        """The cheapest replicas to lose: not-yet-ready ones, then the least busy (newest first on ties)."""
        order = {name: i for i, name in enumerate(self.replicas.replicas)}
        return sorted(self.counted(), key=lambda r: (r.state is ReplicaState.HEALTHY, r.in_flight,
                                                      r.outstanding_tokens, -order[r.name]))[:n]

    async def _remove(self, name: str) -> None:
        try:
            await self.supervisor.remove_replica(name, self.drain_timeout)
        except Exception:
            logger.exception("removing replica %s failed", name)

    async def wait_for_replica(self, timeout: float) -> bool:
        """Hold a request while no replica is in rotation (scale from zero, or all starting)."""
        if self.replicas.routable():
            return True
        self.pending += 1
        self.poke()
        deadline = time.monotonic() + timeout
        try:
            while not self.replicas.routable():
                if time.monotonic() >= deadline:
                    return False
                await asyncio.sleep(0.05)
            return True
        finally:
            self.pending -= 1

    def status(self) -> dict:
        return {"config": vars(self.cfg), "replicas": len(self.counted()),
                "ready": len(self.replicas.routable()), "pending_in_router": self.pending,
                "last_decision": None if self.last is None else {"replicas": self.last.replicas,
                                                                 "reason": self.last.reason},
                "events": list(self.events)}


class AutoscalingRouter(Router):
    """The router with an autoscaler driving its supervisor (`--spawn N --autoscale ...`)."""

    def __init__(self, config: RouterConfig, engine_config: EngineConfig, predictor: Predictor | None = None):
        super().__init__(config, engine_config)
        assert config.autoscale is not None and config.spawn
        self.predictor = predictor
        self.autoscale = AutoscaleConfig.parse(config.autoscale)
        self.autoscaler: Autoscaler | None = None
        first_token = self.forwarder.on_first_token

        def on_first_token(seconds: float) -> None:  # measured from router arrival: includes any cold start
            first_token(seconds)
            if self.autoscaler is not None:
                self.autoscaler.record_ttft(seconds)

        self.forwarder.on_first_token = on_first_token

    async def start(self) -> None:
        await super().start()
        self.autoscaler = Autoscaler(self.replicas, self.supervisor, self.autoscale, self.metrics,
                                     self.config.autoscale_interval, self.config.drain_timeout, self.predictor)
        self.autoscaler.start()

    async def stop(self) -> None:
        if self.autoscaler is not None:
            await self.autoscaler.stop()
        await super().stop()

    async def features(self, parsed: Any) -> RequestFeatures:
        f = await super().features(parsed)
        if self.autoscaler is not None and parsed is not None:
            self.autoscaler.record_arrival(time.monotonic(), f.prompt_tokens, f.max_tokens)
        return f

    async def forward(self, http: Request, method: str, path: str, body: bytes | None, parsed: Any,
                      stream: bool, arrival: float | None = None) -> Response:
        arrival = time.monotonic() if arrival is None else arrival
        if self.autoscaler is not None and not self.replicas.routable():
            waiting = asyncio.ensure_future(self.autoscaler.wait_for_replica(self.config.cold_start_timeout))
            gone = asyncio.ensure_future(_client_left(http))
            try:
                await asyncio.wait((waiting, gone), return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in (waiting, gone):
                    t.cancel()
            if not waiting.done() or waiting.cancelled():
                return Response(status_code=499)  # the client left while its request waited for a replica
            if not waiting.result():
                self.metrics.unrouted.labels("no_replica").inc()
                return error_response(503, f"no replica became ready within {self.config.cold_start_timeout:g}s",
                                      "service_unavailable", headers={"Retry-After": "5"})
        return await super().forward(http, method, path, body, parsed, stream, arrival=arrival)

    def install_routes(self, app: Any) -> None:
        async def autoscaler_status() -> Response:
            import json

            body = self.autoscaler.status() if self.autoscaler is not None else {"status": "starting"}
            return Response(json.dumps(body), media_type="application/json")

        app.add_api_route("/router/autoscaler", autoscaler_status, methods=["GET"])


async def _client_left(http: Request) -> None:
    # The body is read already, so the next ASGI message is http.disconnect, whenever the client leaves.
    while (await http.receive())["type"] != "http.disconnect":
        pass
