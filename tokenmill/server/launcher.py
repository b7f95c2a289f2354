"""Run the server: uvicorn in the foreground, SIGTERM/SIGINT drain, non-zero exit when the engine dies."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
from types import FrameType

import uvicorn

from tokenmill.config import EngineConfig
from tokenmill.errors import ConfigError
from tokenmill.server.app import build_app
from tokenmill.server.auth import load_api_keys
from tokenmill.server.config import ServerConfig
from tokenmill.server.frontend import Frontend, State
from tokenmill.server.guard import is_loopback
from tokenmill.server.listener import uvicorn_config

logger = logging.getLogger(__name__)


class _DrainingServer(uvicorn.Server):
    """uvicorn's Server with a drain on the first SIGTERM/SIGINT instead of closing the listening socket:
    new requests get 503 while in-flight ones finish (up to --drain-timeout). A second signal stops at once
    (in-flight requests are aborted), a third forces exit."""

    def __init__(self, config: uvicorn.Config, frontend: Frontend, drain_timeout: float):
        super().__init__(config)
        self.frontend = frontend
        self.drain_timeout = drain_timeout
        self._signals = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Deliberately not recorded in _captured_signals: uvicorn would re-raise it after shutdown, and the
        # default SIGTERM action would turn our clean exit 0 into death-by-signal.
        self._signals += 1
        if self._signals == 1 and self._loop is not None and self.frontend.state is not State.DEAD:
            logger.info("received %s: draining (up to %.0fs); send it again to stop now",
                        signal.Signals(sig).name, self.drain_timeout)
            self._loop.call_soon_threadsafe(self._start_drain)
        elif self._signals <= 2:
            self.should_exit = True
        else:
            self.force_exit = True

    def _start_drain(self) -> None:
        async def drain() -> None:
            await self.frontend.drain(self.drain_timeout)
            self.should_exit = True

        self._drain_task = asyncio.get_running_loop().create_task(drain())


def served_name(engine_config: EngineConfig, server_config: ServerConfig) -> str:
    return server_config.served_model_name or engine_config.model


def with_rag_embedding(engine_config: EngineConfig, server_config: ServerConfig) -> EngineConfig:
    """--rag-index: the engine loads the index's embedding model (its questions are embedded by the model its
    passages were)."""
    if not server_config.rag_index:
        return engine_config
    from tokenmill.rag.store import index_embedding_model

    wanted = index_embedding_model(server_config.rag_index)
    if engine_config.embedding_model not in (None, wanted):
        raise ConfigError(f"--rag-index {server_config.rag_index} was built with the embedding model {wanted!r}, "
                          f"not --embedding-model {engine_config.embedding_model!r}")
    return dataclasses.replace(engine_config, embedding_model=wanted)


def run_server(engine_config: EngineConfig, server_config: ServerConfig) -> int:
    """Serve until drained or stopped; 0 after a clean stop, 1 when the engine died or failed to start."""
    engine_config = with_rag_embedding(engine_config, server_config)
    name = served_name(engine_config, server_config)
    frontend = Frontend(engine_config, server_config, name)
    app = build_app(frontend, server_config, name)
    uv_config = uvicorn_config(app, server_config, frontend.metrics.rejected, timeout_graceful_shutdown=5)
    server = _DrainingServer(uv_config, frontend, server_config.drain_timeout)

    def stop() -> None:
        server.should_exit = True

    frontend.on_fatal = stop
    if not is_loopback(server_config.host) and not load_api_keys(server_config.api_key, server_config.api_key_file):
        logger.warning("SERVING WITHOUT AN API KEY ON %s, reachable beyond this machine: anyone who can reach port %d "
                       "can use this model. Set --api-key-file or $TOKENMILL_API_KEY, or bind to 127.0.0.1.",
                       server_config.host, server_config.port)
    logger.info("serving %r on http://%s:%d (engine %s)", name, server_config.host, server_config.port,
                "MOCK (no model)" if server_config.mock
                else "in-process thread" if server_config.inproc else "in its own process")
    server.run()
    if frontend.exit_code:
        logger.error("exiting with code %d: %s", frontend.exit_code, frontend.death_reason)
    return frontend.exit_code
