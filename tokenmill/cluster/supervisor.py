"""Local replicas for `tokenmill router --spawn N`: `tokenmill serve` child processes on loopback ports.

Each child is logged with its pid, URL and log file when it starts, so an operator can see and stop it.
A child that crashes (non-zero exit, killed by a signal) is taken out of rotation at once and restarted
on the same port after a backoff (0.5 s, doubling per quick crash up to --restart-backoff-max; reset once a
child has run for a minute). A child that exits cleanly was told to stop (`kill PID`: SIGTERM drains it
first) and is not restarted; nor is one that exits with code 2 (a bad flag or configuration). Children get PR_SET_PDEATHSIG, so they do not outlive a router that is killed.

`add_replica()` / `remove_replica(name)` (drain first) are the autoscaler's handles on the local set.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shlex
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

from tokenmill.cluster.config import RouterConfig
from tokenmill.cluster.metrics import RouterMetrics
from tokenmill.cluster.replicas import ReplicaSet
from tokenmill.config import EngineConfig
from tokenmill.lifetime import die_with_parent
from tokenmill.server.auth import ENV_VAR, load_api_keys

logger = logging.getLogger(__name__)

_STABLE_AFTER_S = 60.0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def engine_flags(config: EngineConfig) -> list[str]:
    """The `tokenmill serve` flags that reproduce `config` (only the ones that differ from the defaults)."""
    default = EngineConfig()
    out: list[str] = []
    for f in dataclasses.fields(EngineConfig):
        value = getattr(config, f.name)
        if value == getattr(default, f.name):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + flag[2:])
        else:
            out += [flag, str(value)]
    return out


def _key_flags(config: RouterConfig) -> list[str]:
    """The router's key file (it may bind tenants and priorities, which the replicas apply). Their /metrics
    stay open to the router's scrapes, on loopback."""
    return ["--api-key-file", config.api_key_file] if config.api_key_file else []


@dataclasses.dataclass
class ReplicaProcess:
    name: str
    port: int
    cmd: list[str]
    log_path: Path
    proc: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    restarts: int = 0
    stopping: bool = False
    watcher: asyncio.Task | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class Supervisor:
    def __init__(self, replicas: ReplicaSet, engine_config: EngineConfig, config: RouterConfig,
                 metrics: RouterMetrics):
        self.replicas = replicas
        self.metrics = metrics
        self.backoff_max = config.restart_backoff_max
        self.serve_args = engine_flags(engine_config) + (["--mock"] if config.mock else []) + \
            _key_flags(config) + shlex.split(config.replica_args)
        # The router's keys reach its replicas through the environment (never their command line, which `ps`
        # shows): a spawned replica on its loopback port is then no back door around the router's key.
        self.env = {ENV_VAR: ",".join(k for k in load_api_keys(config.api_key, None))} if config.api_key else {}
        self.log_dir = Path(config.replica_log_dir or tempfile.mkdtemp(prefix="tokenmill-replicas-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.children: dict[str, ReplicaProcess] = {}
        self._next = 0

    async def start(self, n: int) -> None:
        logger.info("spawning %d replicas (`tokenmill serve %s`), logs in %s", n, " ".join(self.serve_args),
                    self.log_dir)
        for _ in range(n):
            await self.add_replica()

    async def add_replica(self, name: str | None = None, extra_args: tuple[str, ...] = ()) -> str:
        """Start one more local replica (`extra_args` after the common flags: the cascade's own --model); it joins
        the rotation when its /health passes. Returns its name."""
        if name is None:
            name = f"replica-{self._next}"
            self._next += 1
        port = free_port()
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        cmd = [sys.executable, "-m", "tokenmill.entrypoints.cli", "--log-level", str(level), "serve",
               "--host", "127.0.0.1", "--port", str(port), *self.serve_args, *extra_args]
        rp = ReplicaProcess(name, port, cmd, self.log_dir / f"{name}.log")
        self.children[name] = rp
        await self._launch(rp)
        self.replicas.add(rp.url, name=name).pid = rp.proc.pid if rp.proc else None
        rp.watcher = asyncio.get_running_loop().create_task(self._watch(rp))
        return name

    async def remove_replica(self, name: str, drain_timeout: float = 60.0) -> None:
        """Drain (no new requests; in-flight ones finish, up to drain_timeout), then stop the process."""
        rp = self.children[name]
        rp.stopping = True
        self.replicas.drain(name)
        if not await self.replicas.wait_idle(name, drain_timeout):
            logger.warning("replica %s still busy after %.0fs of draining; stopping it anyway", name, drain_timeout)
        await self._stop(rp)
        del self.children[name]
        await self.replicas.remove(name)

    async def stop(self) -> None:
        for rp in self.children.values():
            rp.stopping = True
        await asyncio.gather(*(self._stop(rp) for rp in self.children.values()))

    async def _launch(self, rp: ReplicaProcess) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        with open(rp.log_path, "ab") as log:
            rp.proc = await asyncio.create_subprocess_exec(*rp.cmd, stdin=asyncio.subprocess.DEVNULL, stdout=log,
                                                           stderr=asyncio.subprocess.STDOUT, env=env,
                                                           preexec_fn=die_with_parent)
        rp.started_at = time.monotonic()
        r = self.replicas.replicas.get(rp.name)
        if r is not None:
            r.pid = rp.proc.pid
        logger.info("replica %s: pid %d serving on %s (log: %s; `kill %d` drains and stops it for good, a "
                    "crash is restarted, the router's exit stops it)", rp.name, rp.proc.pid, rp.url, rp.log_path,
                    rp.proc.pid)

    async def _watch(self, rp: ReplicaProcess) -> None:
        backoff = 0.5
        while True:
            assert rp.proc is not None
            code = await rp.proc.wait()
            if rp.stopping:
                return
            if code in (0, 2):
                # 0: told to stop (SIGTERM: it drained first), by an operator or an orchestrator. 2: its command
                # line or configuration is wrong, which no restart fixes. Only crashes are restarted.
                if code == 0:
                    logger.warning("replica %s (pid %d) stopped cleanly; not restarting it", rp.name, rp.proc.pid)
                else:
                    logger.error("replica %s (pid %d) rejected its configuration (exit code 2); not restarting "
                                 "it, see %s", rp.name, rp.proc.pid, rp.log_path)
                self.children.pop(rp.name, None)
                self.replicas.mark_down(rp.name, "stopped" if code == 0 else "bad configuration")
                await self.replicas.remove(rp.name)
                return
            ran = time.monotonic() - rp.started_at
            if ran >= _STABLE_AFTER_S:
                backoff = 0.5
            self.replicas.mark_down(rp.name, f"process {rp.proc.pid} exited with code {code}")
            logger.error("replica %s (pid %d) exited with code %s after %.1fs; restarting in %.1fs (log: %s)",
                         rp.name, rp.proc.pid, code, ran, backoff, rp.log_path)
            await asyncio.sleep(backoff)
            if rp.stopping:
                return
            backoff = min(self.backoff_max, backoff * 2)
            rp.restarts += 1
            self.metrics.restarts.labels(rp.name).inc()
            await self._launch(rp)

    async def _stop(self, rp: ReplicaProcess, timeout: float = 30.0) -> None:
        proc = rp.proc
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)  # the replica drains its own in-flight requests
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                logger.warning("replica %s (pid %d) did not stop in %.0fs; killing it", rp.name, proc.pid, timeout)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if rp.watcher is not None:
            rp.watcher.cancel()
        logger.info("replica %s (pid %d) stopped with code %s", rp.name, proc.pid, proc.returncode)

    def describe(self) -> list[dict]:
        return [{"name": rp.name, "pid": rp.proc.pid if rp.proc else None, "url": rp.url, "restarts": rp.restarts,
                 "log": str(rp.log_path)} for rp in self.children.values()]
