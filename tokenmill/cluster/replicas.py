"""The router's replica set: membership, health, live stats and the router's own load accounting.

This is the seam an autoscaler drives: `add(url)` puts a replica in (it joins the rotation once its
/health passes), `drain(name)` takes it out of rotation while its in-flight requests finish,
`wait_idle(name)` waits for that, `remove(name)` forgets it. Health comes from two sides:
- active: every `health_interval`, GET /health and /metrics on each replica (stats: running, waiting, KV
  usage, prefix-cache counters);
- passive: the proxy reports failures (connection refused or reset, 5xx, timeouts; never 4xx).
`max_failures` consecutive failures, or a refused connection, take a replica out of rotation; one
passing health check brings it back (with an empty prefix index: a restarted replica has a cold cache).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tokenmill.cluster.policy import PrefixIndex, ReplicaView

logger = logging.getLogger(__name__)

_RETENTION_EWMA = 0.3


class ReplicaState(enum.Enum):
    STARTING = "starting"  # added, never passed a health check yet
    HEALTHY = "healthy"  # in rotation
    UNHEALTHY = "unhealthy"  # out of rotation until a health check passes
    DRAINING = "draining"  # out of rotation for good: finishing its in-flight requests before removal


@dataclass
class ReplicaStats:
    """What the replica's own /metrics said at the last poll."""

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    prefix_cache_queries: float = 0.0
    prefix_cache_hits: float = 0.0
    polled_at: float = 0.0


class Cut:
    """An exchange in flight with a replica, which the health checker can cut short when the replica stops
    answering (its current read runs in `scope`, set by the proxy only while it awaits the replica)."""

    __slots__ = ("scope", "cut")

    def __init__(self):
        self.scope = None
        self.cut = False

    def cancel(self) -> None:
        self.cut = True
        if self.scope is not None:
            self.scope.cancel()


class Replica:
    def __init__(self, name: str, url: str, index_blocks: int, client: httpx.AsyncClient):
        self.name = name
        self.url = url
        self.client = client
        self.state = ReplicaState.STARTING
        self.failures = 0  # consecutive
        self.index = PrefixIndex(index_blocks)
        self.stats = ReplicaStats()
        self.in_flight = 0
        self.outstanding_tokens = 0
        self.retention = 1.0
        self.expected_hits = 0  # prefix-hit tokens the router predicted here since the last poll
        self.pid: int | None = None  # set by the supervisor for spawned replicas
        self.last_error: str | None = None
        self.exchanges: set[Cut] = set()  # requests in flight there, for cut_in_flight()
        self._idle = asyncio.Event()
        self._idle.set()

    def cut_in_flight(self) -> int:
        """End every request in flight here: not-yet-started ones are retried elsewhere, started streams end
        with an error event. For a replica that is gone or hung, so that nothing waits on it forever."""
        cuts = list(self.exchanges)
        for c in cuts:
            c.cancel()
        return len(cuts)

    @property
    def routable(self) -> bool:
        return self.state is ReplicaState.HEALTHY

    def view(self, matched_tokens: int = 0) -> ReplicaView:
        s = self.stats
        return ReplicaView(self.name, self.outstanding_tokens, self.in_flight, s.running, s.waiting, s.kv_usage,
                           matched_tokens, self.retention)

    def describe(self) -> dict:
        return {"name": self.name, "url": self.url, "state": self.state.value, "pid": self.pid,
                "in_flight": self.in_flight, "outstanding_tokens": self.outstanding_tokens,
                "running": self.stats.running, "waiting": self.stats.waiting, "kv_usage": self.stats.kv_usage,
                "cache_retention": round(self.retention, 3), "indexed_blocks": len(self.index),
                "consecutive_failures": self.failures, "last_error": self.last_error}


class Load:
    """One request's share of a replica's outstanding tokens, released as its tokens stream back."""

    __slots__ = ("replica", "prefill", "decode", "done")

    def __init__(self, replica: Replica, prefill_tokens: int, decode_tokens: int):
        self.replica = replica
        self.prefill = prefill_tokens
        self.decode = decode_tokens
        self.done = False
        replica.in_flight += 1
        replica.outstanding_tokens += prefill_tokens + decode_tokens
        replica._idle.clear()

    def first_token(self) -> None:
        self.replica.outstanding_tokens -= self.prefill
        self.prefill = 0

    def tokens(self, n: int) -> None:
        n = min(n, self.decode)
        self.decode -= n
        self.replica.outstanding_tokens -= n

    def release(self) -> None:
        if self.done:
            return
        self.done = True
        r = self.replica
        r.outstanding_tokens -= self.prefill + self.decode
        r.in_flight -= 1
        if r.in_flight == 0:
            r._idle.set()


class ReplicaSet:
    def __init__(self, *, index_blocks: int, max_failures: int, health_interval: float, health_timeout: float,
                 connect_timeout: float, upstream_timeout: float):
        self.index_blocks = index_blocks
        self.max_failures = max_failures
        self.health_interval = health_interval
        self.health_timeout = health_timeout
        self.timeout = httpx.Timeout(upstream_timeout, connect=connect_timeout)
        self.replicas: dict[str, Replica] = {}
        self.on_state_change: Callable[[Replica, ReplicaState], None] = lambda r, old: None
        self._task: asyncio.Task | None = None
        self._counter = 0

    # -- membership (the autoscaler's seam) -----------------------------------------------------------------
    def add(self, url: str, name: str | None = None) -> Replica:
        if name is None:
            name = f"replica-{self._counter}"
        self._counter += 1
        if name in self.replicas:
            raise ValueError(f"replica {name!r} exists already")
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=256, keepalive_expiry=30)
        client = httpx.AsyncClient(base_url=url, timeout=self.timeout, limits=limits)
        r = self.replicas[name] = Replica(name, url, self.index_blocks, client)
        logger.info("replica %s added: %s (joins the rotation when /health passes)", name, url)
        return r

    def drain(self, name: str) -> Replica:
        """Out of rotation for good; in-flight requests carry on. Follow with wait_idle() then remove()."""
        r = self.replicas[name]
        self._set_state(r, ReplicaState.DRAINING, f"draining ({r.in_flight} requests in flight)")
        return r

    async def wait_idle(self, name: str, timeout: float | None = None) -> bool:
        """True once the replica has no request of the router's in flight (False on timeout)."""
        r = self.replicas[name]
        try:
            await asyncio.wait_for(r._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def remove(self, name: str) -> None:
        r = self.replicas.pop(name)
        await r.client.aclose()
        logger.info("replica %s removed (%s)", name, r.url)

    def get(self, name: str) -> Replica:
        return self.replicas[name]

    def all(self) -> list[Replica]:
        return list(self.replicas.values())

    def routable(self) -> list[Replica]:
        return [r for r in self.replicas.values() if r.state is ReplicaState.HEALTHY]

    # -- health ----------------------------------------------------------------------------------------------
    def _set_state(self, r: Replica, state: ReplicaState, why: str) -> None:
        old = r.state
        if old is state or (old is ReplicaState.DRAINING and state is not ReplicaState.DRAINING):
            return  # a draining replica never rejoins
        r.state = state
        if state is ReplicaState.UNHEALTHY:
            r.index.clear()  # whatever comes back will have a cold cache
            r.retention = 1.0
            logger.warning("replica %s (%s) out of rotation: %s", r.name, r.url, why)
        elif state is ReplicaState.HEALTHY:
            r.failures = 0
            r.last_error = None
            logger.info("replica %s (%s) in rotation: %s", r.name, r.url, why)
        else:
            logger.info("replica %s (%s): %s", r.name, r.url, why)
        self.on_state_change(r, old)

    def mark_down(self, name: str, why: str) -> None:
        """Take a replica out of rotation now and end what is in flight there (its supervised process exited)."""
        r = self.replicas.get(name)
        if r is not None:
            r.last_error = why
            self._set_state(r, ReplicaState.UNHEALTHY, why)
            if n := r.cut_in_flight():
                logger.warning("replica %s: ending %d requests in flight there", name, n)

    def record_failure(self, r: Replica, kind: str, detail: str, fatal: bool = False) -> None:
        """A request to r failed (connect, 5xx, timeout, reset). `fatal`: the replica is surely gone."""
        r.failures += 1
        r.last_error = f"{kind}: {detail}"
        if fatal or r.failures >= self.max_failures:
            self._set_state(r, ReplicaState.UNHEALTHY, f"{r.failures} consecutive failures, last {kind}: {detail}")

    def record_success(self, r: Replica) -> None:
        r.failures = 0

    async def start(self) -> None:
        await self.check_all()
        self._task = asyncio.get_running_loop().create_task(self._poll())

    async def stop_polling(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def stop(self) -> None:
        await self.stop_polling()
        for r in self.replicas.values():
            await r.client.aclose()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval)
            try:
                await self.check_all()
            except Exception:
                logger.exception("replica health check round failed")

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(r) for r in list(self.replicas.values())))

    async def check(self, r: Replica) -> None:
        """One active check: /health decides rotation, /metrics refreshes the stats the policies read."""
        answered = False
        try:
            resp = await r.client.get("/health", timeout=self.health_timeout)
            answered = True
            ok, why = resp.status_code == 200, f"/health answered {resp.status_code}"
        except httpx.HTTPError as e:
            ok, why = False, f"/health failed: {type(e).__name__}: {e!s}".rstrip(": ")
        if not ok:
            r.last_error = why
            if r.state is ReplicaState.HEALTHY:
                if answered:
                    # It says it is not ready (starting, draining, engine dead): out of rotation now. It is
                    # alive, so what it has in flight ends by its own hand (a draining replica finishes it).
                    self._set_state(r, ReplicaState.UNHEALTHY, why)
                    return
                self.record_failure(r, "health", why)
                if r.state is ReplicaState.UNHEALTHY and (n := r.cut_in_flight()):
                    # It does not answer at all: nothing in flight there can be trusted to finish.
                    logger.warning("replica %s: ending %d requests in flight there", r.name, n)
            elif r.state is ReplicaState.STARTING and r.failures == 0:
                r.failures = 1  # log the first miss only; starting replicas take a while
                logger.info("replica %s not ready yet (%s)", r.name, why)
            return
        try:
            resp = await r.client.get("/metrics", timeout=self.health_timeout)
            if resp.status_code == 200:
                self._update_stats(r, resp.text)
        except httpx.HTTPError as e:
            logger.debug("replica %s /metrics failed: %s", r.name, e)
        if r.state in (ReplicaState.STARTING, ReplicaState.UNHEALTHY):
            self._set_state(r, ReplicaState.HEALTHY, "/health passed")

    def _update_stats(self, r: Replica, text: str) -> None:
        vals = parse_replica_metrics(text)
        old = r.stats
        new = ReplicaStats(int(vals.get("num_requests_running", 0)), int(vals.get("num_requests_waiting", 0)),
                           vals.get("kv_cache_usage_perc", 0.0), vals.get("prefix_cache_queries", 0.0),
                           vals.get("prefix_cache_hits", 0.0), time.monotonic())
        hits = new.prefix_cache_hits - old.prefix_cache_hits
        if old.polled_at and hits >= 0 and r.expected_hits > 0:
            # The replica found `hits` cached tokens where the router expected `expected_hits`: how much of
            # what the index says is still in the replica's cache.
            observed = max(0.0, min(1.0, hits / r.expected_hits))
            r.retention = (1 - _RETENTION_EWMA) * r.retention + _RETENTION_EWMA * observed
        r.expected_hits = 0
        r.stats = new


_WANTED = {"num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prefix_cache_queries",
           "prefix_cache_hits"}


def parse_replica_metrics(text: str) -> dict[str, float]:
    """The engine gauges and counters the policies read, summed over label sets: `tokenmill:` series, or
    `vllm:` ones from a replica serving --metrics-prefix vllm (never both added up)."""
    by_prefix: dict[str, dict[str, float]] = {"tokenmill:": {}, "vllm:": {}}
    for fam in text_string_to_metric_families(text):
        prefix = next((p for p in by_prefix if fam.name.startswith(p)), None)
        if prefix is None or (name := fam.name.removeprefix(prefix)) not in _WANTED:
            continue
        out = by_prefix[prefix]
        for s in fam.samples:
            if s.name.endswith("_created"):
                continue
            out[name] = out.get(name, 0.0) + s.value
    return by_prefix["tokenmill:"] or by_prefix["vllm:"]
