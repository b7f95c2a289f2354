"""Start the real `tokenmill serve` as a subprocess on a free port, wait for /health, read /metrics."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

STARTUP_TIMEOUT_S = 180.0
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text as {'name{labels}': value}, labels sorted, model_name dropped."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, value = line.rsplit(" ", 1)
        if "{" in name:
            base, labels = name[:-1].split("{", 1)
            kept = sorted(lb for lb in re.findall(r'\w+="[^"]*"', labels) if not lb.startswith("model_name="))
            name = base + ("{" + ",".join(kept) + "}" if kept else "")
        out[name] = float(value)
    return out


class CliProcess:
    """`python -m tokenmill.entrypoints.cli ARGS` as a subprocess of this checkout, its output in a temporary log."""

    def __init__(self, args: list[str], log_prefix: str, env: dict[str, str] | None = None,
                 new_session: bool = False):
        self.log = tempfile.NamedTemporaryFile(prefix=log_prefix, suffix=".log", delete=False)  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "tokenmill.entrypoints.cli", *args], stdout=self.log,
                                     stderr=subprocess.STDOUT, cwd=REPO,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                     start_new_session=new_session)

    def log_text(self, tail: int = 60) -> str:
        return "\n".join(Path(self.log.name).read_text(errors="replace").splitlines()[-tail:])

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then SIGKILL after `timeout` seconds; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


class ServerProcess(CliProcess):
    def __init__(self, *args: str, api_key: str | None = None):
        self.port = free_port()
        self.api_key = api_key
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = ["serve", "--port", str(self.port), "--kv-cache-memory", "256MiB", *args]
        if api_key:
            cmd += ["--api-key", api_key]
        super().__init__(cmd, "tokenmill-serve-")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} during startup:\n{self.log_text()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"server not ready in {timeout}s:\n{self.log_text()}")

    def assert_clean_log(self) -> None:
        """No unexpected exception made it into the server's log."""
        text = Path(self.log.name).read_text(errors="replace")
        assert "Traceback" not in text and " ERROR " not in text, self.log_text(200)

    def remove_log(self) -> None:
        """Called once a module passed; a failing module leaves its log behind for inspection."""
        Path(self.log.name).unlink(missing_ok=True)

    def engine_pid(self) -> int:
        """The spawned engine process: the server's child that is not multiprocessing's resource tracker."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        for pid in children:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            if b"spawn_main" in cmdline:
                return int(pid)
        raise RuntimeError(f"no engine process among children {children}")

    def metrics(self) -> dict[str, float]:
        """Samples of /metrics as {'name{labels}': value} (labels without model_name)."""
        return parse_metrics(httpx.get(f"{self.url}/metrics", timeout=10).text)



def start_server(*args: str, api_key: str | None = None) -> ServerProcess:
    server = ServerProcess(*args, api_key=api_key)
    try:
        server.wait_ready()
    except Exception:
        server.stop()
        raise
    return server
