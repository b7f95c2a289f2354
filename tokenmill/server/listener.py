"""uvicorn set up for clients that may be careless or hostile: a deadline on each request's headers and a cap
on open connections, shared by the server and the router.

uvicorn itself times out only an idle keep-alive connection: a client that connects and never sends a byte,
or drips a header a byte at a time (slowloris), holds its connection (a file descriptor, a parser) for as
long as it likes, and enough of them fill `--max-connections` for everyone. Here the clock starts when the
connection opens and again at each request's first byte, and only a complete header stops it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from tokenmill.server.config import ExposureConfig


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """HttpToolsProtocol that closes a connection whose request headers are not complete in `header_timeout`
    seconds (set on the subclass `with_header_timeout` makes)."""

    header_timeout = 10.0
    _header_timer: asyncio.TimerHandle | None = None

    @classmethod
    def with_header_timeout(cls, seconds: float) -> type[HeaderDeadlineProtocol]:
        return type(cls.__name__, (cls,), {"header_timeout": seconds})

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_header_clock()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._start_header_clock()  # the next request on a kept-alive connection

    def on_headers_complete(self) -> None:
        self._stop_header_clock()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_clock()
        super().connection_lost(exc)

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
            self.transport.close()


def uvicorn_config(app: Any, config: ExposureConfig, **options: Any) -> uvicorn.Config:
    """uvicorn.Config for `app` listening where `config` says, with the header deadline and connection cap."""
    return uvicorn.Config(app, host=config.host, port=config.port, log_config=None, access_log=False,
                          http=HeaderDeadlineProtocol.with_header_timeout(config.header_timeout),
                          limit_concurrency=config.max_connections, lifespan="on", timeout_keep_alive=30,
                          **options)
