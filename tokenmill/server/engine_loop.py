"""The engine side of the split: one EngineCore driven by messages, in its own process or in a thread.

Loop: take every waiting message without blocking; if the engine has work, step it and send the updates
(with fresh stats) back; if not, block on the inbox until a message comes or a heartbeat is due. The loop
does nothing per token beyond what EngineCore.step() does: text, stop strings and metrics are the
frontend's job.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Callable

from tokenmill.config import EngineConfig
from tokenmill.engine.step_time import StepRecorder
from tokenmill.errors import InvalidRequestError, TokenmillError
from tokenmill.gc_control import freeze_startup_heap
from tokenmill.lifetime import die_with_parent
from tokenmill.server.protocol import (
    AbortRequests,
    AddRejected,
    AddRequest,
    Embedded,
    EmbedRequest,
    Failed,
    FromEngine,
    Ready,
    Shutdown,
    ToEngine,
    Updates,
)

logger = logging.getLogger(__name__)

HEARTBEAT_S = 1.0  # idle engines still report stats (and notice a vanished parent) this often


def default_num_threads(config: EngineConfig) -> int:
    return config.num_threads or len(os.sched_getaffinity(0))


def build_engine(config: EngineConfig, send: Callable[[FromEngine], None]):
    """Load the model (and the embedding model, if any) and report Ready. Returns (EngineCore, embedder)."""
    import torch  # only the engine side pays for torch

    torch.set_num_threads(default_num_threads(config))
    from tokenmill.engine.replica import build_replica

    replica = build_replica(config)
    engine = replica.engine
    embedder = None
    if config.embedding_model:
        from tokenmill.models.bert import BertEncoder
        from tokenmill.models.sentence_model import resolve_embedding_model

        embedder = BertEncoder(resolve_embedding_model(config.embedding_model))
    send(Ready(engine.max_model_len, replica.source.arch.vocab_size, engine.kv.pool.num_blocks,
               engine.kv.block_size, os.getpid(), embedder.dim if embedder is not None else 0))
    return engine, embedder


# Embedding inputs run in batches of at most this many tokens (padded): big enough to use the cores, small
# enough that a step waits little behind them.
EMBED_BATCH_TOKENS = 4096


class EngineLoop:
    def __init__(self, engine, send: Callable[[FromEngine], None], embedder=None):
        self.engine = engine
        self.send = send
        self.embedder = embedder
        self._embeds: list[EmbedRequest] = []
        self._recv: Callable[[float], list[ToEngine] | None] = lambda timeout: []
        self._deferred: list[ToEngine] = []  # messages taken while a step ran, applied after it

    def handle(self, msg: ToEngine) -> bool:
        """Apply one message; False means shut down."""
        engine = self.engine
        if isinstance(msg, AddRequest):
            try:
                engine.add_request(msg.prompt_token_ids, msg.params, request_id=msg.request_id,
                                   priority=msg.priority, arrival_time=msg.arrival_time, cache_salt=msg.cache_salt,
                                   tenant=msg.tenant, ttft_target=msg.ttft_target, expires_at=msg.expires_at)
            except InvalidRequestError as e:
                self.send(AddRejected(msg.request_id, str(e), e.param))
            except ValueError as e:  # duplicate id: a frontend bug, but not worth the engine's life
                self.send(AddRejected(msg.request_id, str(e), None))
        elif isinstance(msg, AbortRequests):
            for rid in msg.request_ids:
                engine.abort_request(rid)
        elif isinstance(msg, EmbedRequest):
            self._embeds.append(msg)
        elif isinstance(msg, Shutdown):
            return False
        return True

    def _poll(self) -> bool:
        """Called while a step runs: new requests join the scheduler at once (the engine may abandon the
        step for one), aborts and shutdown wait for the step's end. True when a request was added."""
        msgs = self._recv(0.0)
        added = False
        for m in msgs or ():
            if isinstance(m, AddRequest):
                self.handle(m)
                added = True
            else:
                self._deferred.append(m)
        return added

    def run(self, recv: Callable[[float], list[ToEngine] | None]) -> None:
        """recv(timeout) returns the waiting messages (waiting up to timeout seconds for the first), or
        None when the engine should stop (its inbox is gone)."""
        engine = self.engine
        self._recv = recv
        last_report = 0.0
        while True:
            msgs = recv(0.0 if engine.has_unfinished() or self._deferred else HEARTBEAT_S)
            if msgs is None:
                return
            if self._deferred:
                msgs, self._deferred = self._deferred + msgs, []
            for m in msgs:
                if not self.handle(m):
                    self._abort_all()
                    return
            if self._embeds:
                self._embed()
            if engine.has_unfinished():
                t0 = time.monotonic()
                updates = engine.step(self._poll)
                last_report = time.monotonic()
                self.send(Updates(last_report, updates, engine.stats(), last_report - t0))
            elif time.monotonic() - last_report >= HEARTBEAT_S:
                last_report = time.monotonic()
                self.send(Updates(last_report, [], engine.stats()))

    def _embed(self) -> None:
        """Answer every waiting embedding request, inputs batched across requests (between steps: the
        embedding model and the generative one share the cores by taking turns)."""
        reqs, self._embeds = self._embeds, []
        if self.embedder is None:
            for r in reqs:
                self.send(Embedded(r.request_id, [], "this server has no embedding model"))
            return
        try:
            vectors = self._embed_all(reqs)
        except Exception as e:  # a bad input must not take the engine (and every generation) down
            logger.exception("embedding failed")
            for r in reqs:
                self.send(Embedded(r.request_id, [], f"embedding failed: {type(e).__name__}: {e}"))
            return
        for r, v in zip(reqs, vectors, strict=True):
            self.send(Embedded(r.request_id, v))

    def _embed_all(self, reqs: list[EmbedRequest]) -> list[list[list[float]]]:
        inputs = [(n, i, ids) for n, r in enumerate(reqs) for i, ids in enumerate(r.token_ids)]
        inputs.sort(key=lambda x: len(x[2]))  # similar lengths together: less padding
        out: list[list[list[float]]] = [[[]] * len(r.token_ids) for r in reqs]
        start = 0
        while start < len(inputs):
            end = start + 1
            while end < len(inputs) and (end + 1 - start) * len(inputs[end][2]) <= EMBED_BATCH_TOKENS:
                end += 1
            chunk = inputs[start:end]
            for (n, i, _), v in zip(chunk, self.embedder.embed([ids for _, _, ids in chunk]).tolist(), strict=True):
                out[n][i] = v
            start = end
        return out

    def _abort_all(self) -> None:
        for rid in list(self.engine.scheduler.requests):
            self.engine.abort_request(rid)


def run_engine_process(config: EngineConfig, in_addr: str, out_addr: str, parent_pid: int, log_level: str) -> None:
    """Target of the engine process (multiprocessing spawn)."""
    import zmq

    from tokenmill.server.protocol import from_engine_codec, to_engine_codec

    logging.basicConfig(level=log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s [engine]: %(message)s")
    # The frontend owns shutdown: Ctrl+C or a SIGTERM sent to the whole process group must not kill the
    # engine under in-flight requests that are draining. It exits on Shutdown or when its parent is gone.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # A frontend killed outright (kill -9, OOM) sends no Shutdown: the kernel's SIGKILL ends the engine even
    # mid-step, and a blocked send to a frontend that no longer reads gives up (SNDTIMEO) instead of hanging.
    die_with_parent(signal.SIGKILL, parent_pid)

    ctx = zmq.Context()
    inbox = ctx.socket(zmq.PULL)
    inbox.connect(in_addr)
    outbox = ctx.socket(zmq.PUSH)
    outbox.setsockopt(zmq.LINGER, 2000)
    outbox.setsockopt(zmq.SNDTIMEO, 30_000)
    outbox.connect(out_addr)
    encoder, _ = from_engine_codec()
    _, decoder = to_engine_codec()

    def send(msg: FromEngine) -> None:
        outbox.send(encoder.encode(msg))

    def recv(timeout: float) -> list[ToEngine] | None:
        if timeout > 0 and not inbox.poll(int(timeout * 1000)):
            return None if os.getppid() != parent_pid else []
        msgs = []
        while True:
            try:
                raw = inbox.recv(zmq.NOBLOCK)
            except zmq.Again:
                return msgs
            try:
                msgs.append(decoder.decode(raw))
            except Exception:  # a frontend bug; never a reason to take every other request down
                logger.exception("dropping an undecodable message")

    stage = "loading the model"
    try:
        engine, embedder = build_engine(config, send)
        if config.record_steps:
            StepRecorder(config.record_steps).install(engine)
        freeze_startup_heap()  # the model and torch's objects: no collection should walk them again
        logger.info("engine ready (pid %d, %d torch threads)", os.getpid(), default_num_threads(config))
        stage = "engine loop"
        EngineLoop(engine, send, embedder).run(recv)
        logger.info("engine stopped")
    except Exception as e:
        if isinstance(e, TokenmillError):  # a reported condition (bad model file, bad config): no traceback
            logger.error("engine failed while %s: %s", stage, e)
        else:
            logger.exception("engine failed while %s", stage)
        try:
            send(Failed(f"engine failed while {stage}: {type(e).__name__}: {e}"))
        except Exception:
            pass
        raise SystemExit(1) from None
    finally:
        inbox.close(linger=0)
        outbox.close()
        ctx.term()
