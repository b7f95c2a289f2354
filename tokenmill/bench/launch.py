"""Start a server under test from a shell command, wait until it serves, stop it with its whole process
group. One server at a time: the benchmark never runs two systems together on the same cores."""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import signal
import socket
import subprocess
import time
from pathlib import Path

from tokenmill.bench.loadgen import wait_ready
from tokenmill.errors import TokenmillError

logger = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) == 0


class ServerProcess:
    """`command` is a shell command; `{port}` in it is replaced by the port. `cpus` ("0-1") pins the server
    and its children to those cores with taskset. Output goes to `log_path`."""

    def __init__(self, command: str, port: int, log_path: str | Path, cpus: str | None = None,
                 ready_timeout_s: float = 900.0, env: dict[str, str] | None = None):
        self.command = command.replace("{port}", str(port))
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.log_path = Path(log_path)
        self.cpus = cpus
        self.ready_timeout_s = ready_timeout_s
        self.env = env
        self.proc: subprocess.Popen | None = None

    def start(self) -> ServerProcess:
        if port_in_use(self.port):
            raise TokenmillError(f"port {self.port} is already in use: is another server still running?")
        argv = ["bash", "-c", self.command]
        if self.cpus:
            argv = ["taskset", "-c", self.cpus, *argv]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed in stop()
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(argv)}\n".encode())
        log.flush()
        logger.info("starting: %s (log %s)", self.command, self.log_path)
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, env={**os.environ, **(self.env or {})})
        self._log = log
        try:
            asyncio.run(wait_ready(self.base_url, self.ready_timeout_s, alive=lambda: self.proc.poll() is None))
        except BaseException:
            self.stop()
            raise TokenmillError(f"server did not come up: {self.command}; see {self.log_path}") from None
        return self

    def stop(self, grace_s: float = 30.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            # SIGTERM to the server itself first (the peer scripts exec it), so it shuts down its own
            # children in order; then whatever is left of the process group goes.
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                logger.warning("server did not stop in %.0f s after SIGTERM; killing its process group", grace_s)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        self._log.close()
        self.proc = None
        # The port must be free again before the next system starts.
        deadline = time.monotonic() + 30
        while port_in_use(self.port) and time.monotonic() < deadline:
            time.sleep(0.2)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
