"""The frontend's request book-keeping: admission, per-token processing and metrics, engine lifecycle.

Every engine request (one per prompt x n) is a `Seq` with its own CompletionState (the same incremental
detokenizer and stop-string logic the offline LLM uses, so server text equals offline text). The seqs of
one HTTP request share a `RequestHandle`: streaming handlers read Deltas from its queue, the others wait
for it to finish. Token processing happens here, once per engine batch, on the event loop.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import time
from dataclasses import dataclass, replace

from tokenmill.config import EngineConfig
from tokenmill.engine.core import EngineStats, RequestUpdate
from tokenmill.engine.output_processor import CompletionState, Delta
from tokenmill.engine.policy import DEFAULT_TENANT, class_ttft, parse_slo_classes
from tokenmill.engine.replica import load_tokenizer
from tokenmill.errors import (
    EngineDeadError,
    InvalidRequestError,
    QueueFullError,
    RequestTimeoutError,
    TokenmillError,
)
from tokenmill.gc_control import freeze_startup_heap
from tokenmill.models.flops import FlopModel
from tokenmill.models.loader import sampling_defaults
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.admission import (
    PRIORITY_ORDERED,
    ArrivalMeter,
    DrainMeter,
    QueuedWork,
    decide,
    predict_wait,
    work_ahead,
)
from tokenmill.server.config import ServerConfig
from tokenmill.server.embeddings import EmbeddingService
from tokenmill.server.engine_client import EngineClient, ProcessEngineClient, ThreadEngineClient
from tokenmill.server.metrics import ServerMetrics
from tokenmill.server.protocol import AddRejected, AddRequest, Embedded, Failed, FromEngine, Ready, Updates
from tokenmill.server.rag import RagService
from tokenmill.server.usage import UsageLedger
from tokenmill.tokenizer.tokenizer import Tokenizer

logger = logging.getLogger(__name__)
request_logger = logging.getLogger("tokenmill.requests")


class ServerUnavailableError(TokenmillError):
    """The server cannot take requests now: the engine is starting, draining or dead."""

    http_status = 503
    error_type = "service_unavailable"

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


WATCH_INTERVAL_S = 0.25
DEADLINE_GRACE_S = 1.0  # past a request's deadline, how long the engine has to answer it itself


class State(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    DEAD = "dead"
    STOPPED = "stopped"


@dataclass(eq=False, slots=True)
class Seq:
    request_id: str
    handle: RequestHandle
    index: int  # choice index in the response
    state: CompletionState
    prompt_len: int
    queued: bool = True  # admitted, no token yet: counts against the queue limits
    last_token_time: float = 0.0
    labels: tuple[str, str] = ("0", DEFAULT_TENANT)  # (priority class, tenant) metric labels


class RequestHandle:
    """One HTTP request's engine requests. `queue` carries (seq, delta) when streaming."""

    def __init__(self, request_id: str, arrival: float, stream: bool):
        self.request_id = request_id
        self.arrival = arrival
        self.seqs: list[Seq] = []
        self.unfinished = 0
        self.error: BaseException | None = None
        self.queue: asyncio.Queue[tuple[Seq, Delta] | None] | None = asyncio.Queue() if stream else None
        self.finished = asyncio.get_running_loop().create_future()
        self.timeout_s: float | None = None
        self.timed_out = False
        self.cut_by_drain = False  # aborted because the server stopped waiting for it: an error, not a success

    @property
    def done(self) -> bool:
        return self.finished.done()

    def _finish(self, error: BaseException | None = None) -> None:
        if self.finished.done():
            return
        self.error = error
        self.finished.set_result(None)
        if self.queue is not None:
            self.queue.put_nowait(None)  # wakes the stream reader, which then looks at .error

    async def wait(self) -> None:
        await asyncio.shield(self.finished)
        if self.error is not None:
            raise self.error


class Frontend:
    def __init__(self, engine_config: EngineConfig, server_config: ServerConfig, model_name: str):
        self.engine_config = engine_config
        self.config = server_config
        self.model_name = model_name
        self.metrics = ServerMetrics(model_name)
        self.usage = UsageLedger(None)  # its FLOP model once the model's shape is read
        self.state = State.STARTING
        self.tokenizer: Tokenizer | None = None
        self.embeddings: EmbeddingService | None = None  # with --embedding-model
        self.rag: RagService | None = None  # with --rag-index
        self.sampling_defaults: dict[str, float | int] = {}  # the model's generation_config.json, if used
        self.info: Ready | None = None
        self.stats: EngineStats | None = None
        self.exit_code = 0
        self.death_reason: str | None = None
        self.on_fatal = lambda: None  # set by the launcher: stop the HTTP server
        self.client: EngineClient | None = None
        self._seqs: dict[str, Seq] = {}
        self._handles: set[RequestHandle] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self.queued_seqs = 0
        self.queued_tokens = 0
        # Admission control (tokenmill/server/admission.py): what is queued, and how fast the queue drains.
        self.policy_name = engine_config.scheduling_policy
        self.slo_classes = parse_slo_classes(engine_config.slo_classes)
        self.drain_meter = DrainMeter()
        self.arrival_meter = ArrivalMeter()
        self._queued_work: dict[str, QueuedWork] = {}
        self._queue_time_ewma = 0.0
        self._token_text: dict[int, str] = {}
        self._ready: asyncio.Future[Ready] | None = None
        self._start_task: asyncio.Task | None = None
        self._watch_task: asyncio.Task | None = None
        self.last_heard = time.monotonic()  # the engine's last message of any kind
        self.unresponsive = False  # silent past --engine-watchdog: taken as wedged until it speaks again

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> None:
        """Begin loading the tokenizer and engine in the background; the server answers 503 meanwhile."""
        self._start_task = asyncio.get_running_loop().create_task(self._start())

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self.client = self._make_client()
        t0 = time.monotonic()
        try:
            self.client.start()
            # The tokenizer loads here while the engine loads the model over there.
            _, self.tokenizer = await asyncio.to_thread(load_tokenizer, self.engine_config)
            self.usage.flops = await asyncio.to_thread(_flop_model, self.engine_config.model)
            self.sampling_defaults = await asyncio.to_thread(
                sampling_defaults, self.engine_config.model, self.engine_config.generation_config)
            if self.sampling_defaults:
                logger.info("sampling defaults from generation_config.json: %s", self.sampling_defaults)
            if self.engine_config.embedding_model:
                self.embeddings = await asyncio.to_thread(EmbeddingService, self.engine_config.embedding_model)
            if self.config.rag_index:
                self.rag = await asyncio.to_thread(RagService, self.config.rag_index, self.tokenizer)
            self.info = await self._ready
        except Exception as e:
            if self.state is not State.DEAD:
                self._on_death(f"startup failed: {type(e).__name__}: {e}")
            return
        if self.state is State.STARTING:
            freeze_startup_heap()  # the app, the tokenizer (and an in-process engine): never walked again
            self.state = State.READY
            self.last_heard = time.monotonic()
            self._watch_task = loop.create_task(self._watch())
            logger.info("ready in %.1fs: model %r, context %d tokens, KV cache %d tokens (%d blocks), engine %s",
                        time.monotonic() - t0, self.model_name, self.info.max_model_len,
                        self.kv_capacity_tokens, self.info.num_blocks,
                        "mock" if self.config.mock else "in-process thread" if self.config.inproc
                        else f"process {self.info.pid}")

    def _make_client(self) -> EngineClient:
        if self.config.mock:
            from tokenmill.server.mock_engine import MockEngineClient, StepModel, StepSeconds

            c = self.config
            model: StepSeconds = StepModel(c.mock_base_ms / 1e3, c.mock_prefill_ms_per_token / 1e3,
                                           c.mock_decode_ms_per_seq / 1e3)
            if c.mock_profile:  # a machine's measured step time (tokenmill profile) stands in for the model
                from tokenmill.engine.step_time import StepTimeModel

                model = StepTimeModel.load(c.mock_profile)
            return MockEngineClient(self.engine_config, self._on_message, self._on_death, model)
        cls = ThreadEngineClient if self.config.inproc else ProcessEngineClient
        return cls(self.engine_config, self._on_message, self._on_death)

    @property
    def kv_capacity_tokens(self) -> int:
        assert self.info is not None
        return self.info.num_blocks * self.info.block_size

    @property
    def max_total_tokens(self) -> int:
        """Longest prompt + output one sequence may have: the context, or the KV cache if smaller."""
        assert self.info is not None
        return min(self.info.max_model_len, self.kv_capacity_tokens)

    def check_available(self) -> None:
        if self.state is State.READY and self.unresponsive:
            raise ServerUnavailableError(f"service unavailable: the engine has not answered for "
                                         f"{time.monotonic() - self.last_heard:.0f}s", "engine_unresponsive")
        if self.state is State.READY:
            return
        reason = {State.STARTING: "starting", State.DRAINING: "draining"}.get(self.state, "engine_dead")
        why = {"starting": "the engine is starting", "draining": "the server is shutting down",
               "engine_dead": f"the engine is not running ({self.death_reason or 'stopped'})"}[reason]
        raise ServerUnavailableError(f"service unavailable: {why}", reason)

    def _on_death(self, reason: str) -> None:
        if self.state in (State.DEAD, State.STOPPED):
            return
        self.state = State.DEAD
        self.death_reason = reason
        self.exit_code = 1
        logger.error("engine is dead: %s; failing %d in-flight requests and exiting (a supervisor should "
                     "restart the server)", reason, len(self._handles))
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(EngineDeadError(reason))
        self._fail_all(EngineDeadError(f"the engine died: {reason}"))
        # Give the failed responses a moment to go out, then stop the HTTP server.
        asyncio.get_running_loop().call_later(1.0, self.on_fatal)

    def _fail_all(self, error: BaseException) -> None:
        if self.embeddings is not None:
            self.embeddings.fail_all(error)
        for seq in list(self._seqs.values()):
            self._drop(seq)
        for h in list(self._handles):
            h._finish(error)
        self._handles.clear()
        self._idle.set()

    async def drain(self, timeout: float) -> None:
        """Refuse new requests; let in-flight ones finish for up to `timeout` seconds, then abort them."""
        if self.state is State.READY or self.state is State.STARTING:
            self.state = State.DRAINING
        logger.info("draining: %d requests in flight, waiting up to %.0fs", len(self._handles), timeout)
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            left = list(self._handles)
            logger.warning("drain timeout: aborting %d requests still in flight", len(left))
            for h in left:
                h.cut_by_drain = True
                self.abort(h)
            try:
                await asyncio.wait_for(self._idle.wait(), 5.0)
            except TimeoutError:
                self._fail_all(ServerUnavailableError("the server is shutting down", "draining"))

    async def shutdown(self) -> None:
        if self._start_task is not None and not self._start_task.done():
            self._start_task.cancel()
        if self._watch_task is not None:
            self._watch_task.cancel()
        if self._handles:
            self._fail_all(ServerUnavailableError("the server is shutting down", "draining"))
        if self.state is not State.DEAD:
            self.state = State.STOPPED
        if self.client is not None:
            await self.client.shutdown()
        logger.info("frontend stopped")

    # -- requests ----------------------------------------------------------------------------------------
    def submit(self, request_id: str, prompts: list[list[int]], params: SamplingParams, *, priority: int = 0,
               arrival: float, stream: bool, tenant: str = DEFAULT_TENANT, ttft_target: float | None = None,
               timeout: float | None = None) -> RequestHandle:
        """Admit one HTTP request (every prompt x params.n) or raise 503/429. Prompts are validated already.
        ttft_target: the request's own TTFT target (else its priority class's); timeout: seconds until it is
        aborted (else --request-timeout)."""
        self.check_available()
        n_seqs = len(prompts) * params.n
        n_tokens = sum(len(p) for p in prompts) * params.n
        labels = self.metrics.labels_for(priority, tenant)

        def reject(message: str, retry_after: float, reason: str) -> QueueFullError:
            self.metrics.by("rejected", labels, reason=reason)
            return QueueFullError(message, retry_after, reason)

        # An empty queue always admits, so one request bigger than the limits is still served, alone.
        if self.queued_seqs:
            if self.queued_seqs + n_seqs > self.config.max_queued_requests:
                raise reject(f"server busy: {self.queued_seqs} requests waiting "
                             f"(limit {self.config.max_queued_requests}); retry later",
                             self.retry_after(), "queue_requests")
            if self.queued_tokens + n_tokens > self.config.max_queued_tokens:
                raise reject(f"server busy: {self.queued_tokens} prompt tokens waiting "
                             f"(limit {self.config.max_queued_tokens}); retry later",
                             self.retry_after(), "queue_tokens")
        target = ttft_target if ttft_target is not None else class_ttft(self.slo_classes, priority)
        work = QueuedWork(priority, math.inf if target is None else arrival + target, tenant, n_tokens)
        now = time.monotonic()
        if target is not None or self.config.max_queue_delay is not None:
            ahead = work_ahead(self.policy_name, self._queued_work.values(), work)
            overtaking = self.arrival_meter.rate_above(now, priority) if self.policy_name in PRIORITY_ORDERED else 0.0
            rej = decide(predict_wait(ahead, self.drain_meter.rate, overtaking), target,
                         self.config.max_queue_delay, nothing_ahead=ahead <= n_tokens)
            if rej is not None:
                what = "its TTFT target" if rej.reason == "ttft_target" else "the server's --max-queue-delay"
                better = f", {overtaking:.0f} of them taken by more important arrivals" if overtaking else ""
                raise reject(f"server busy: the predicted wait for a first token is {rej.predicted_s:.1f}s "
                             f"({ahead} prompt tokens ahead at {self.drain_meter.rate:.0f} tokens/s{better}), "
                             f"beyond {what} of {rej.limit_s:g}s; retry after {rej.retry_after_s}s",
                             rej.retry_after_s, rej.reason)
        self.arrival_meter.observe(now, priority, n_tokens)
        if timeout is None:
            timeout = self.config.request_timeout
        expires_at = None if timeout is None else arrival + timeout
        assert self.tokenizer is not None and self.client is not None
        handle = RequestHandle(request_id, arrival, stream)
        handle.timeout_s = timeout
        msgs = []
        for i, ids in enumerate(prompts):
            for j in range(params.n):
                child = params if params.n == 1 else _child_params(params, j)
                rid = f"{request_id}-{i}-{j}"
                seq = Seq(rid, handle, i * params.n + j, CompletionState(self.tokenizer, ids, child, j), len(ids),
                          labels=labels)
                handle.seqs.append(seq)
                msgs.append(AddRequest(rid, ids, child, priority, arrival,
                                       f"{request_id}-{i}" if params.n > 1 else None, tenant, ttft_target,
                                       expires_at))
                self._queued_work[rid] = QueuedWork(priority, work.deadline, tenant, len(ids))
        for seq in handle.seqs:
            self._seqs[seq.request_id] = seq
        handle.unfinished = len(handle.seqs)
        self.queued_seqs += n_seqs
        self.queued_tokens += n_tokens
        self._handles.add(handle)
        self._idle.clear()
        try:
            for m in msgs:
                self.client.add(m)
        except Exception as e:  # the engine's inbox is gone: it is dying
            self._abandon(handle, EngineDeadError(f"cannot reach the engine: {e}"))
            raise handle.error from None
        return handle

    def abort(self, handle: RequestHandle) -> None:
        """The client went away (or drain timed out): stop its engine requests; blocks go back to the pool."""
        if handle.done:
            return
        live = [s.request_id for s in handle.seqs if s.request_id in self._seqs]
        if self.client is not None and self.state is not State.DEAD:
            try:
                self.client.abort(live)
            except Exception:
                logger.exception("could not send abort for %s", handle.request_id)
        # The engine answers each abort with a final update (finish_reason "abort"), which finishes the seq
        # and logs it. Until then the seqs stay registered.

    def _abandon(self, handle: RequestHandle, error: BaseException) -> None:
        for s in handle.seqs:
            if s.request_id in self._seqs:
                self._drop(s)
        self._close(handle, error)

    def _drop(self, seq: Seq) -> None:
        del self._seqs[seq.request_id]
        self._dequeue(seq)

    def _dequeue(self, seq: Seq) -> None:
        if seq.queued:
            seq.queued = False
            self.queued_seqs -= 1
            self.queued_tokens -= seq.prompt_len
            self._queued_work.pop(seq.request_id, None)

    def _close(self, handle: RequestHandle, error: BaseException | None = None) -> None:
        handle._finish(error)
        self._handles.discard(handle)
        if not self._handles:
            self._idle.set()

    def retry_after(self) -> int:
        return max(1, min(60, math.ceil(self._queue_time_ewma)))

    # -- the watchdog: deadlines and a silent engine, seen from this side ------------------------------------
    async def _watch(self) -> None:
        """The engine enforces deadlines and reports, but a wedged engine (stopped, stuck in a kernel, swapped
        out) does neither: past a request's deadline (plus a grace for the engine's own answer) it is answered
        408 here, and past --engine-watchdog of silence every request is failed 503 and /health says 503."""
        while self.state in (State.READY, State.DRAINING):
            await asyncio.sleep(WATCH_INTERVAL_S)
            now = time.monotonic()
            for h in list(self._handles):
                if h.timeout_s is not None and not h.done and now > h.arrival + h.timeout_s + DEADLINE_GRACE_S:
                    logger.warning("request %s is past its deadline with no answer from the engine: 408",
                                   h.request_id)
                    h.timed_out = True
                    for s in h.seqs:
                        if s.request_id in self._seqs:
                            self.metrics.by("timeouts", s.labels)
                    self.abort(h)
                    self._abandon(h, self._timeout_error(h))
            watchdog = self.config.engine_watchdog
            if watchdog and not self.unresponsive and now - self.last_heard > watchdog:
                self.unresponsive = True
                logger.error("the engine has sent nothing for %.0fs (--engine-watchdog %gs): taken as wedged; "
                             "failing %d in-flight requests, /health 503 until it answers", now - self.last_heard,
                             watchdog, len(self._handles))
                for h in list(self._handles):
                    self.abort(h)  # so a thawed engine drops them
                self._fail_all(ServerUnavailableError("the engine stopped answering; retry later",
                                                      "engine_unresponsive"))

    # -- engine messages ---------------------------------------------------------------------------------
    def _on_message(self, msg: FromEngine) -> None:
        self.last_heard = time.monotonic()
        if self.unresponsive:
            self.unresponsive = False
            logger.warning("the engine answers again: taking requests")
        if isinstance(msg, Updates):
            self.stats = msg.stats
            self.metrics.engine.stats = msg.stats
            if msg.step_s:
                self.metrics.step_time.observe(msg.step_s)
                self.metrics.step(msg.stats)
            backlogged = self.queued_seqs > 0
            drained = self._on_updates(msg.updates) if msg.updates else 0
            self.drain_meter.observe(time.monotonic(), drained, backlogged)
        elif isinstance(msg, AddRejected):
            seq = self._seqs.get(msg.request_id)
            if seq is not None:
                h = seq.handle
                self.abort(h)
                self._abandon(h, InvalidRequestError(msg.message, msg.param))
        elif isinstance(msg, Embedded):
            if self.embeddings is not None:
                self.embeddings.on_result(msg)
        elif isinstance(msg, Ready):
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(msg)
        elif isinstance(msg, Failed):
            logger.error("engine reports failure: %s", msg.message)
            self.death_reason = msg.message
            if self._ready is not None and not self._ready.done():
                self._ready.set_exception(EngineDeadError(msg.message))

    def _on_updates(self, updates: list[RequestUpdate]) -> int:
        """Apply one step's updates; returns the queued prompt tokens that got their first token."""
        now = time.monotonic()
        metrics = self.metrics
        stop_aborts: list[str] = []
        drained = 0
        for u in updates:
            seq = self._seqs.get(u.request_id)
            if seq is None:
                continue  # the engine's echo of an abort we sent after a stop string, or of a dropped request
            if u.new_token_ids:
                if seq.queued:
                    self._dequeue(seq)
                    drained += seq.prompt_len
                    metrics.ttft.observe(now - seq.handle.arrival)
                    metrics.by("ttft", seq.labels, now - seq.handle.arrival)
                    if u.first_scheduled_time is not None:
                        qt = u.first_scheduled_time - u.arrival_time
                        self._queue_time_ewma += 0.2 * (qt - self._queue_time_ewma)
                else:
                    metrics.itl.observe(now - seq.last_token_time)
                seq.last_token_time = now
            delta = seq.state.process(u)
            if delta.needs_abort:
                stop_aborts.append(u.request_id)
            h = seq.handle
            timed_out = u.finish_reason == "timeout"  # answered with an error, not a finish chunk
            if h.queue is not None and (delta.text or delta.token_ids or delta.finished) and not timed_out:
                h.queue.put_nowait((seq, delta))
            if delta.finished:
                self._finish_seq(seq, u, now)
        if stop_aborts and self.client is not None:
            self.client.abort(stop_aborts)
        return drained

    def _finish_seq(self, seq: Seq, u: RequestUpdate, now: float) -> None:
        self._drop(seq)
        out = seq.state.output
        m = self.metrics
        reason = out.finish_reason or "abort"
        m.success(reason)
        m.e2e.observe(now - seq.handle.arrival)
        m.prompt_tokens.observe(seq.prompt_len)
        m.generation_tokens.observe(len(out.token_ids))
        m.flops.labels(m.model_name).inc(
            self.usage.record(seq.labels[1], seq.prompt_len, u.num_cached_tokens, len(out.token_ids)))
        sched, first = u.first_scheduled_time, u.first_token_time
        finished = u.finished_time if u.finished_time is not None else now
        m.by("generation", seq.labels, len(out.token_ids))
        m.by("preemptions", seq.labels, u.num_preemptions)
        if sched is not None:
            m.queue_time.observe(max(0.0, sched - u.arrival_time))
            m.by("queue", seq.labels, max(0.0, sched - u.arrival_time))
            if first is not None:
                m.prefill_time.observe(max(0.0, first - sched))
                m.decode_time.observe(max(0.0, finished - first))
                if len(out.token_ids) > 1:
                    m.time_per_output_token.observe(max(0.0, finished - first) / (len(out.token_ids) - 1))
        if self.config.log_requests:
            ttft = f"{first - u.arrival_time:.3f}" if first is not None else "-"
            queued = f"{sched - u.arrival_time:.3f}" if sched is not None else "-"
            request_logger.info(
                "request finished id=%s prompt_tokens=%d output_tokens=%d cached_tokens=%d queue_s=%s ttft_s=%s "
                "e2e_s=%.3f finish_reason=%s preemptions=%d priority_class=%s tenant=%s", seq.request_id, seq.prompt_len,
                len(out.token_ids), u.num_cached_tokens, queued, ttft, now - seq.handle.arrival, reason,
                u.num_preemptions, *seq.labels)
        h = seq.handle
        if reason == "timeout":
            h.timed_out = True
            m.by("timeouts", seq.labels)
        h.unfinished -= 1
        if h.unfinished == 0:
            error = None
            if h.timed_out:
                error = self._timeout_error(h)
            elif h.cut_by_drain and any((q.state.output.finish_reason or "abort") == "abort" for q in h.seqs):
                n = sum(len(s.state.output.token_ids) for s in h.seqs)
                error = ServerUnavailableError(f"the server is shutting down: the request was cut off by the end of "
                                               f"its drain after {n} generated tokens; retry it", "draining")
            self._close(h, error)

    def _timeout_error(self, h: RequestHandle) -> RequestTimeoutError:
        n = sum(len(s.state.output.token_ids) for s in h.seqs)
        return RequestTimeoutError(
            f"the request timed out: it was not finished {h.timeout_s:g}s after it arrived (its 'timeout', or "
            f"the server's --request-timeout) and was aborted after {n} generated tokens")

    # -- text helpers ------------------------------------------------------------------------------------
    def token_text(self, token_id: int) -> str:
        """A token's own text, for logprobs (decoded alone; cached, the vocabulary is finite)."""
        t = self._token_text.get(token_id)
        if t is None:
            assert self.tokenizer is not None
            t = self._token_text[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return t


def _child_params(p: SamplingParams, j: int) -> SamplingParams:
    # Must match tokenmill.entrypoints.llm: each of the n completions samples from seed + j, so a seeded
    # n>1 request gives the same texts here as offline.
    return replace(p, n=1, seed=None if p.seed is None else p.seed + j)


def _flop_model(model: str) -> FlopModel | None:
    """The served model's compute per token, from its metadata (no weights read); None if it cannot be read
    (usage then counts tokens only)."""
    from tokenmill.models.loader import open_model

    try:
        return FlopModel.of(open_model(model).arch)
    except Exception as e:  # noqa: BLE001 - the engine reports a model it cannot load; this is bookkeeping
        logger.warning("usage ledger counts no FLOPs: cannot read the model's shape (%s)", e)
        return None
