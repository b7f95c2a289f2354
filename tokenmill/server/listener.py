"""uvicorn set up for clients that may be careless or hostile, shared by the server and the router: a deadline
on each request's headers, a deadline on a client that stops reading, and a cap on open connections.

uvicorn itself times out only an idle keep-alive connection: a client that connects and never sends a byte,
or drips a header a byte at a time (slowloris), holds its connection (a file descriptor, a parser) for as
long as it likes, and enough of them fill `--max-connections` for everyone. Here the clock starts when the
connection opens and again at each request's first byte, and only a complete header stops it.

A client that stops reading a response fills the socket buffers; the transport then pauses the app's writes,
and the request (its KV blocks, its share of each step) would wait as long as the client does. Here a
connection whose writes stay paused for `write_timeout` seconds is closed: the app sees a disconnect, as if
the client had left, and aborts the request. What waits meanwhile is bounded by the socket buffers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from tokenmill.server.config import ExposureConfig

logger = logging.getLogger(__name__)
# Per connection, the kernel's send buffer (it doubles the figure for bookkeeping): plenty for a stream at any
# sensible round-trip time, and what a client that stops reading can leave queued before --write-timeout runs.
SEND_BUFFER_BYTES = 512 * 1024


class DeadlineProtocol(HttpToolsProtocol):
    """HttpToolsProtocol that closes a connection whose request headers are not complete in `header_timeout`
    seconds, or whose writes stay paused (the client reads nothing) for `write_timeout` seconds; both set on
    the subclass `with_deadlines` makes."""

    header_timeout = 10.0
    write_timeout = 30.0
    on_cut: Callable[[str], None] | None = None  # counts each cut: header_timeout, slow_reader
    _header_timer: asyncio.TimerHandle | None = None
    _write_timer: asyncio.TimerHandle | None = None

    @classmethod
    def with_deadlines(cls, header_timeout: float, write_timeout: float,
                       on_cut: Callable[[str], None] | None = None) -> type[DeadlineProtocol]:
        return type(cls.__name__, (cls,), {"header_timeout": header_timeout, "write_timeout": write_timeout,
                                           "on_cut": staticmethod(on_cut) if on_cut else None})

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:  # the kernel's share of what a non-reading client can leave waiting
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        self._start_header_clock()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._start_header_clock()  # the next request on a kept-alive connection

    def on_headers_complete(self) -> None:
        self._stop_header_clock()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_clock()
        self.resume_writing()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.write_timeout, self._client_not_reading)

    def resume_writing(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        super().resume_writing()

    def _client_not_reading(self) -> None:
        self._write_timer = None
        logger.warning("closing the connection of %s: it read nothing of its response for %gs",
                       f"{self.client[0]}:{self.client[1]}" if self.client else "a client", self.write_timeout)
        self._count("slow_reader")
        self.transport.abort()  # close() would wait to flush what the client is not reading

    def _start_header_clock(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _stop_header_clock(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self._count("header_timeout")
            self.transport.close()

    def _count(self, reason: str) -> None:
        if self.on_cut is not None:
            self.on_cut(reason)


def uvicorn_config(app: Any, config: ExposureConfig, on_cut: Callable[[str], None] | None = None,
                   **options: Any) -> uvicorn.Config:
    """uvicorn.Config for `app` listening where `config` says, with the deadlines and the connection cap;
    on_cut(reason) counts each connection cut."""
    return uvicorn.Config(app, host=config.host, port=config.port, log_config=None, access_log=False,
                          http=DeadlineProtocol.with_deadlines(config.header_timeout, config.write_timeout, on_cut),
                          limit_concurrency=config.max_connections, lifespan="on", timeout_keep_alive=30,
                          **options)
