"""Start the real `tokenmill router` as a subprocess (spawning its replicas), wait until they are in rotation."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import httpx
from server_helpers import CliProcess, free_port, parse_metrics

REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 180.0


class RouterProcess(CliProcess):
    def __init__(self, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_dir = tempfile.mkdtemp(prefix="tokenmill-router-replicas-")
        key = args[args.index("--api-key") + 1].split(",")[0] if "--api-key" in args else None
        self.auth = {"Authorization": f"Bearer {key}"} if key else {}  # for its own pages (--protect-all-paths)
        super().__init__(["router", "--port", str(self.port), "--replica-log-dir", self.log_dir, *args],
                         "tokenmill-router-")

    def replicas(self) -> list[dict]:
        return httpx.get(f"{self.url}/router/replicas", headers=self.auth, timeout=10).json()["replicas"]

    def wait_healthy(self, n: int, timeout: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"router exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                r = httpx.get(f"{self.url}/health", timeout=2)
                if r.status_code == 200 and r.json()["healthy_replicas"] >= n and \
                        httpx.get(f"{self.url}/router/replicas", headers=self.auth,
                                  timeout=2).json()["tokenizer_loaded"]:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"router not ready with {n} healthy replicas in {timeout}s:\n{self.log_text()}")

    def metrics(self) -> dict[str, float]:
        return parse_metrics(httpx.get(f"{self.url}/metrics", headers=self.auth, timeout=10).text)

    def log_text(self, tail: int = 80) -> str:
        text = Path(self.log.name).read_text(errors="replace").splitlines()[-tail:]
        for p in sorted(Path(self.log_dir).glob("*.log")):
            text += [f"---- {p.name}", *p.read_text(errors="replace").splitlines()[-20:]]
        return "\n".join(text)

    def own_log(self) -> str:
        """The router's log alone (spawned replicas log to their own files)."""
        return Path(self.log.name).read_text(errors="replace")

    def stop(self, timeout: float = 60.0) -> int:
        return super().stop(timeout)


def start_router(*args: str, replicas: int) -> RouterProcess:
    router = RouterProcess(*args)
    try:
        router.wait_healthy(replicas)
    except Exception:
        router.stop()
        raise
    return router


def child_pids(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def maps_torch(pid: int) -> bool:
    """Whether process `pid` has torch's native library loaded."""
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
