"""The frontend's handle on the engine: in its own process over ZMQ (default) or in a thread (--inproc).

Both deliver every engine message to `on_message` on the event loop, and call `on_death(reason)` once if
the engine goes away without being asked to.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import queue
import shutil
import tempfile
import threading
from collections.abc import Callable

import zmq
import zmq.asyncio

from tokenmill.config import EngineConfig
from tokenmill.errors import TokenmillError
from tokenmill.server.protocol import (
    AbortRequests,
    AddRequest,
    Failed,
    FromEngine,
    Shutdown,
    ToEngine,
    from_engine_codec,
    to_engine_codec,
)

logger = logging.getLogger(__name__)

OnMessage = Callable[[FromEngine], None]
OnDeath = Callable[[str], None]


class EngineClient:
    def __init__(self, config: EngineConfig, on_message: OnMessage, on_death: OnDeath):
        self.config = config
        self.on_message = on_message
        self.on_death = on_death
        self.stopping = False

    def start(self) -> None:
        raise NotImplementedError

    def send(self, msg: ToEngine) -> None:
        raise NotImplementedError

    def add(self, msg: AddRequest) -> None:
        self.send(msg)

    def abort(self, request_ids: list[str]) -> None:
        if request_ids:
            self.send(AbortRequests(request_ids))

    async def shutdown(self, timeout: float = 10.0) -> None:
        raise NotImplementedError

    @property
    def pid(self) -> int | None:
        return None


class ProcessEngineClient(EngineClient):
    """Engine core in a spawned process; frontend binds a PUSH (to engine) and a PULL (from engine) socket."""

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._dir = tempfile.mkdtemp(prefix="tokenmill-")
        in_addr, out_addr = f"ipc://{self._dir}/to-engine", f"ipc://{self._dir}/from-engine"
        # Sends go through a plain (sync) socket so a failed send raises here instead of in a Future
        # nobody reads; no high-water mark, because admission control already bounds what we queue.
        self._sync_ctx = zmq.Context()
        self._push = self._sync_ctx.socket(zmq.PUSH)
        self._push.setsockopt(zmq.LINGER, 0)
        self._push.setsockopt(zmq.SNDHWM, 0)
        self._push.bind(in_addr)
        self._ctx = zmq.asyncio.Context()
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.LINGER, 0)
        self._pull.bind(out_addr)
        self._encoder, _ = to_engine_codec()
        _, self._decoder = from_engine_codec()
        mp = multiprocessing.get_context("spawn")  # fork would copy the event loop and sockets
        from tokenmill.server.engine_loop import run_engine_process

        level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        self._proc = mp.Process(target=run_engine_process, name="tokenmill-engine", daemon=True,
                                args=(self.config, in_addr, out_addr, os.getpid(), level))
        self._proc.start()
        logger.info("engine process started (pid %d)", self._proc.pid)
        self._reader = loop.create_task(self._read())
        loop.add_reader(self._proc.sentinel, self._on_exit)

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def send(self, msg: ToEngine) -> None:
        # Non-blocking: PUSH queues up to its high-water mark; the engine drains it every step.
        self._push.send(self._encoder.encode(msg), zmq.NOBLOCK)

    async def _read(self) -> None:
        pull, decode, deliver = self._pull, self._decoder.decode, self.on_message
        while True:
            frames = [await pull.recv()]
            # Take whatever else already arrived in one wake-up.
            while len(frames) < 64:
                try:
                    frames.append(pull.recv(zmq.NOBLOCK).result())
                except (zmq.Again, asyncio.InvalidStateError):
                    break
            for f in frames:
                try:
                    msg = decode(f)
                except Exception:
                    logger.exception("dropping an undecodable engine message")
                    continue
                try:
                    deliver(msg)
                except Exception:
                    logger.exception("error handling an engine message")

    def _on_exit(self) -> None:
        asyncio.get_running_loop().remove_reader(self._proc.sentinel)
        self._proc.join(0)
        if not self.stopping:
            self.on_death(f"engine process {self._proc.pid} exited with code {self._proc.exitcode}")

    async def shutdown(self, timeout: float = 10.0) -> None:
        self.stopping = True
        if self._proc.is_alive():
            with contextlib.suppress(zmq.ZMQError):
                self.send(Shutdown())
            await asyncio.to_thread(self._proc.join, timeout)
            if self._proc.is_alive():
                logger.warning("engine process did not stop in %.0fs; killing it", timeout)
                self._proc.kill()
                await asyncio.to_thread(self._proc.join, 5)
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(self._proc.sentinel)
        self._reader.cancel()
        self._push.close()
        self._pull.close()
        self._ctx.term()
        self._sync_ctx.term()
        shutil.rmtree(self._dir, ignore_errors=True)


class ThreadEngineClient(EngineClient):
    """Engine core in a thread of this process: messages travel as objects, no encoding."""

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._inbox: queue.SimpleQueue[ToEngine] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="tokenmill-engine", daemon=True)
        self._thread.start()

    def send(self, msg: ToEngine) -> None:
        self._inbox.put(msg)

    def _deliver(self, msg: FromEngine) -> None:
        self._loop.call_soon_threadsafe(self.on_message, msg)

    def _recv(self, timeout: float) -> list[ToEngine]:
        inbox = self._inbox
        msgs: list[ToEngine] = []
        if timeout > 0:
            try:
                msgs.append(inbox.get(timeout=timeout))
            except queue.Empty:
                return msgs
        while True:
            try:
                msgs.append(inbox.get_nowait())
            except queue.Empty:
                return msgs

    def _build(self):
        from tokenmill.server.engine_loop import build_engine

        return build_engine(self.config, self._deliver)

    def _run(self) -> None:
        from tokenmill.server.engine_loop import EngineLoop

        stage = "loading the model"
        try:
            engine, embedder = self._build()
            stage = "engine loop"
            EngineLoop(engine, self._deliver, embedder).run(self._recv)
        except BaseException as e:
            if isinstance(e, TokenmillError):
                logger.error("engine thread failed while %s: %s", stage, e)
            else:
                logger.exception("engine thread failed while %s", stage)
            self._deliver(Failed(f"engine failed while {stage}: {type(e).__name__}: {e}"))
            if not self.stopping:
                self._loop.call_soon_threadsafe(self.on_death, f"engine thread failed while {stage}: {e}")

    async def shutdown(self, timeout: float = 10.0) -> None:
        self.stopping = True
        self.send(Shutdown())
        await asyncio.to_thread(self._thread.join, timeout)
        if self._thread.is_alive():
            logger.warning("engine thread did not stop in %.0fs (it is a daemon; exiting anyway)", timeout)
