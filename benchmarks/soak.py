"""Soak: the real server at 2x its capacity for minutes, with hostile clients beside normal ones.

    python benchmarks/soak.py                                        # 10 min hostile + 3 min baseline
    python benchmarks/soak.py --mock --duration 30 --baseline-duration 15       # smoke run, no model
    python benchmarks/soak.py --duration 60 -- --max-queued-requests 64         # after --: to `tokenmill serve`

1. Start `tokenmill serve` (engine in its own process) and measure its capacity: completed requests per
   second of a closed loop of normal requests (short chat prompts, 32 streamed tokens) at --max-num-seqs.
2. Baseline phase (--baseline-duration): normal clients only, open-loop Poisson arrivals at --load x
   capacity. Hostile phase (--duration): the same normal load, plus hostile clients: slowloris connections,
   slow bodies, streams nobody reads, clients leaving big requests, malformed, nested, oversized, foreign-Host,
   text/plain, too costly and out-of-range requests. Baseline first, so its reference is not coloured by
   anything hostile clients leave behind; after the hostile phase the server must go idle on its own.
3. Every second: resident memory (VmRSS) of the server process and each of its children.

Reports every normal request's outcome (ok, 429, 408, other 4xx, 5xx, lost = no complete answer: no end
within --lost-after, a transport error or a stream cut off), every hostile request's outcome against what it
should get, p50/p99 TTFT of normal requests per phase and their ratio, RSS start/end/max and slope per
phase, and the server log's tracebacks and errors. Writes benchmarks/results/soak_<cpu>.json and .png (RSS
over time; TTFT p99 per 30 s window). Exits 1 if any response was a 5xx or any request was lost, so the
run can be a gate.

Cores: the engine is given all of them (--num-threads) and its thread governor (--adapt-threads, on by
default) gives one back while the frontend and this load generator keep a core busy. The generator is one
asyncio process (httpx and raw sockets, no torch), so it costs only what the traffic costs; its event-loop
lag is reported, as it bounds how exactly it times TTFT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import json
import math
import os
import random
import re
import resource
import shlex
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from tqdm import tqdm

from tokenmill.bench.launch import ServerProcess, free_port
from tokenmill.bench.overload import percentile
from tokenmill.gc_control import collector_paused
from tokenmill.kernels.cpu import cpu_name

RESULTS = Path(__file__).resolve().parent / "results"
MAX_TOKENS = 32  # normal requests: short chat prompt, 32 streamed tokens
TOPICS = ["the mill", "the river", "bread", "winter", "the harbour", "a clock", "the market", "rain", "a bridge",
          "the forest", "salt", "a lighthouse"]


# -- the server ---------------------------------------------------------------------------------------------

def server_command(args: argparse.Namespace, server_args: list[str]) -> str:
    cmd = [sys.executable, "-m", "tokenmill.entrypoints.cli", "--log-level", "WARNING", "serve", "--port", "{port}",
           "--model", args.model, "--max-num-seqs", str(args.max_num_seqs), "--kv-cache-memory", "512MiB",
           "--num-threads", str(args.engine_threads), "--no-log-requests"]
    if args.max_queue_delay > 0:
        cmd += ["--max-queue-delay", str(args.max_queue_delay)]
    if args.mock:
        # A mock step as long as a small real batch, so the generator is not the bottleneck at 2x.
        cmd += ["--mock", "--mock-base-ms", "20"]
    return shlex.join(cmd + server_args)


def server_option(server_args: list[str], flag: str, default: float) -> float:
    """A deadline the server runs with (passed after -- or its default): the hostile clients' yardstick."""
    return float(server_args[server_args.index(flag) + 1]) if flag in server_args else default


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (children are listed per thread in /proc)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split()]
    return out


def role(pid: int, root: int) -> str:
    if pid == root:
        return "frontend"
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "other"
    if b"resource_tracker" in cmd:
        return "resource_tracker"
    return "engine" if b"spawn_main" in cmd else "other"


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    except OSError:
        return math.nan


def server_pid(server: ServerProcess) -> int:
    """The Python server process: bash -c execs a plain command, but look one level down to be sure."""
    pid = server.proc.pid
    if b"tokenmill" not in Path(f"/proc/{pid}/cmdline").read_bytes():
        pid = next(p for p in process_tree(pid)[1:] if b"tokenmill" in Path(f"/proc/{p}/cmdline").read_bytes())
    return pid


def metric_values(text: str, name: str) -> dict[str, float]:
    """{label set: value} of one series family in Prometheus text (model_name dropped)."""
    out: dict[str, float] = {}
    for m in re.finditer(rf"^{re.escape(name)}(?:\{{([^}}]*)\}})? (\S+)$", text, re.M):
        labels = ",".join(lb for lb in (m.group(1) or "").split(",") if lb and not lb.startswith("model_name="))
        out[labels] = out.get(labels, 0.0) + float(m.group(2))
    return out


def log_problems(path: Path, since: int) -> tuple[list[str], dict[str, int]]:
    """What the server logged after byte offset `since`: each traceback or ERROR line with the 25 lines
    after it, and the number of WARNING lines per logger."""
    lines = path.read_bytes()[since:].decode(errors="replace").splitlines()
    problems, warnings, shown_until = [], Counter(), -1
    for i, line in enumerate(lines):
        if (line.startswith("Traceback") or " ERROR " in line or " CRITICAL " in line) and i > shown_until:
            problems.append("\n".join(lines[i: i + 25]))
            shown_until = i + 24
        elif m := re.search(r" WARNING (\S+):", line):
            warnings[m.group(1)] += 1
    return problems, dict(warnings)


# -- normal clients -------------------------------------------------------------------------------------------

@dataclass
class Normal:
    phase: str
    sent: float  # seconds after the phase started
    outcome: str = "lost"  # ok | 429 | 408 | 4xx | 5xx | lost
    http_status: int = 0
    ttft: float | None = None
    detail: str = ""


def chat_body(i: int) -> dict:
    # Distinct prompts (the prefix cache shares only the chat template), fixed output length.
    words = " ".join(f"w{(i * 7919 + k * 31) % 1009}" for k in range(8))
    return {"messages": [{"role": "user", "content": f"Request {i}: write about {TOPICS[i % len(TOPICS)]} "
                                           f"({words})."}],
            "max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0.0, "stream": True}


def classify_status(status: int) -> str:
    if status == 200:
        return "ok"
    if status in (408, 429):
        return str(status)
    return "5xx" if status >= 500 else "4xx"


async def stream_chat(client: httpx.AsyncClient, body: dict, rec: Normal, t_sent: float) -> None:
    """One streamed chat request; fills rec (outcome stays "lost" unless an answer is complete)."""
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        rec.http_status = r.status_code
        if r.status_code != 200:
            rec.detail = (await r.aread()).decode(errors="replace")[:200]
            rec.outcome = classify_status(r.status_code)
            return
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if "error" in ev:  # an error after the 200: its code says what it was
                code = int(ev["error"].get("code") or 500)
                rec.outcome, rec.detail = classify_status(code), ev["error"].get("message", "")[:200]
                return
            for choice in ev.get("choices") or []:  # none in a usage-only chunk
                if rec.ttft is None and (choice.get("delta", {}).get("content") or choice.get("finish_reason")):
                    rec.ttft = time.monotonic() - t_sent
                if choice.get("finish_reason"):
                    rec.outcome = "ok"
        if rec.outcome != "ok":
            rec.detail = "the stream ended without a finish reason"


async def normal_request(client: httpx.AsyncClient, i: int, phase: str, phase_t0: float,
                         lost_after: float) -> Normal:
    t = time.monotonic()
    rec = Normal(phase, t - phase_t0)
    try:
        await asyncio.wait_for(stream_chat(client, chat_body(i), rec, t), lost_after)
    except TimeoutError:
        rec.outcome, rec.detail = "lost", f"no complete answer within {lost_after:g}s"
    except (httpx.HTTPError, OSError, ValueError, AttributeError, TypeError) as e:  # no usable answer
        rec.outcome, rec.detail = "lost", f"{type(e).__name__}: {e}"[:200]
    return rec


def normal_client(url: str, lost_after: float) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, timeout=lost_after,
                             limits=httpx.Limits(max_connections=4096, max_keepalive_connections=128))


async def measure_capacity(url: str, concurrency: int, lost_after: float) -> dict:
    """Closed loop at `concurrency`: a warm-up round, then 3 x concurrency requests timed."""
    async with normal_client(url, lost_after) as client:
        async def run(first: int, num: int) -> tuple[float, list[Normal]]:
            todo = list(range(first, first + num))
            done: list[Normal] = []

            async def worker() -> None:
                while todo:
                    done.append(await normal_request(client, todo.pop(), "capacity", t0, lost_after))

            t0 = time.monotonic()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return time.monotonic() - t0, done

        await run(9_000_000, concurrency)
        wall, done = await run(9_100_000, 3 * concurrency)
    bad = [r for r in done if r.outcome != "ok"]
    if bad:
        raise RuntimeError(f"capacity run: {len(bad)} requests failed, e.g. {bad[0]}")
    return {"req_per_s": len(done) / wall, "wall_s": wall, "concurrency": concurrency,
            "ttft_p50_s": percentile([r.ttft for r in done], 50)}


# -- hostile clients ------------------------------------------------------------------------------------------
# Each kind is a loop of bounded concurrency; each attempt ends in one outcome word, counted per kind.
# EXPECTED says which outcomes are right; anything else is reported as unexpected.

class Tally:
    def __init__(self) -> None:
        self.counts: dict[str, Counter] = {}
        self.examples: dict[str, str] = {}  # first unexpected outcome per kind, with its detail

    def add(self, kind: str, outcome: str, detail: str = "") -> None:
        self.counts.setdefault(kind, Counter())[outcome] += 1
        if not expected(kind, outcome) and kind + outcome not in self.examples:
            self.examples[kind + outcome] = f"{kind}: {outcome} {detail}"[:400]


JSON_HEADERS = {"Content-Type": "application/json"}
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
HI = '"messages": [{"role": "user", "content": "hi"}]'
# name -> (path, extra headers, body bytes, the statuses it should get)
QUICK_CASES: dict[str, tuple[str, dict, bytes, set[str]]] = {
    "deep_json": (CHAT, {}, b"[" * 100_000 + b"]" * 100_000, {"400"}),
    "truncated_json": (CHAT, {}, b'{"messages": [{"role": "user", "content": "hi"', {"400"}),
    "deep_stop": (CHAT, {}, ("{" + HI + ', "max_tokens": 2, "stop": ' + "[" * 5000 + "]" * 5000 + "}").encode(),
                  {"400"}),
    "text_plain": (CHAT, {"Content-Type": "text/plain"}, ("{" + HI + ', "max_tokens": 2}').encode(), {"415"}),
    "foreign_host": (CHAT, {"Host": "evil.example:8000"}, ("{" + HI + ', "max_tokens": 2}').encode(), {"400"}),
    # Over --max-body-bytes (4 MiB): a 413, or the connection cut while the rest is still being sent.
    "oversized": (CHAT, {}, b'{"messages": [{"role": "user", "content": "' + b"a" * (5 << 20) + b'"}]}',
                  {"413", "reset"}),
    "too_costly": (COMPLETIONS, {}, json.dumps({"prompt": ["a"] * 16, "n": 64, "logprobs": 20,
                                                "max_tokens": 4000}).encode(), {"400"}),
    "huge_int": (CHAT, {}, ("{" + HI + ', "max_tokens": 1' + "0" * 60 + "}").encode(), {"400"}),
    "huge_n": (COMPLETIONS, {}, b'{"prompt": "hi", "max_tokens": 2, "n": 1' + b"0" * 30 + b"}", {"400"}),
    "huge_float": (CHAT, {}, ("{" + HI + ', "max_tokens": 2, "temperature": 1e400}').encode(), {"400"}),
    # Valid requests (a 429 is right for them when the queue is full: the normal load is 2x capacity).
    "tiny_temperature": (CHAT, {}, ("{" + HI + ', "max_tokens": 8, "temperature": 1e-46}').encode(),
                         {"200", "429"}),
    "lone_surrogate": (COMPLETIONS, {}, b'{"prompt": "\\ud800", "max_tokens": 2}', {"200", "400", "429"}),
}
EXPECTED = {name: case[3] for name, case in QUICK_CASES.items()} | {
    "slowloris": {"cut"},  # closed by the server within --header-timeout (+ slack)
    "silent": {"cut"},  # connects and says nothing
    "slow_body": {"408"},  # within --body-timeout
    "never_reader": {"cut", "429"},  # its stream aborted after --write-timeout: output ends with no [DONE]
    "leaver": {"left", "429"},  # left before an answer; the server should drop the work at once
}


def expected(kind: str, outcome: str) -> bool:
    return outcome == "unfinished" or outcome in EXPECTED.get(kind, set())


@contextlib.contextmanager
def attempt(tally: Tally, kind: str):
    """Counts an attempt the end of the phase cut short as "unfinished" (neither right nor wrong)."""
    try:
        yield
    except asyncio.CancelledError:
        tally.add(kind, "unfinished")
        raise


def outcome_of(status: int) -> str:
    return "5xx" if status >= 500 else str(status)


async def quick_hostile(url: str, tally: Tally, rate: float, rng: random.Random, lost_after: float) -> None:
    """The one-shot bad requests, round robin, `rate` a second, at most 8 in flight."""
    gate = asyncio.Semaphore(8)
    names = list(QUICK_CASES)
    tasks: set[asyncio.Task] = set()
    async with httpx.AsyncClient(base_url=url, timeout=lost_after) as client:

        async def one(name: str) -> None:
            path, headers, body, _ = QUICK_CASES[name]
            try:
                with attempt(tally, name):
                    r = await asyncio.wait_for(client.post(path, content=body, headers=JSON_HEADERS | headers),
                                               lost_after)
                tally.add(name, outcome_of(r.status_code), r.text[:200])
            except TimeoutError:
                tally.add(name, "lost", f"no answer within {lost_after:g}s")
            except (httpx.RemoteProtocolError, httpx.WriteError, httpx.ReadError) as e:
                tally.add(name, "reset", repr(e))
            except httpx.HTTPError as e:
                tally.add(name, "lost", repr(e))
            finally:
                gate.release()

        try:
            for k in range(10**9):
                await gate.acquire()
                t = asyncio.create_task(one(names[k % len(names)]))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
                await asyncio.sleep(rng.expovariate(rate))
        finally:
            for t in tasks:
                t.cancel()


async def connect(host: str, port: int, small: bool = False) -> socket.socket:
    """A raw non-blocking socket. small: a 4 KiB receive window and a 536-byte MSS, set before connecting;
    the MSS it announces also keeps the server's send buffer small (Linux sizes it by segments), so a
    reader that stops blocks the server's writes after ~150 KB instead of the ~4 MB loopback allows."""
    s = socket.socket()
    if small:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
    s.setblocking(False)
    await asyncio.get_running_loop().sock_connect(s, (host, port))
    return s


async def recv_some(s: socket.socket, timeout: float, size: int = 65536) -> bytes | None:
    """Bytes, b"" when the server closed (or reset) the connection, None if nothing came in `timeout`."""
    try:
        return await asyncio.wait_for(asyncio.get_running_loop().sock_recv(s, size), timeout)
    except TimeoutError:
        return None
    except (ConnectionResetError, BrokenPipeError):
        return b""


def status_of(reply: bytes) -> str:
    parts = reply.split(b"\r\n", 1)[0].split()
    return outcome_of(int(parts[1])) if len(parts) > 1 and parts[1].isdigit() else "garbled"


async def slowloris(host: str, port: int, tally: Tally, header_timeout: float, silent: bool) -> None:
    """Forever: open a connection, drip a header line a second (or say nothing), see it cut."""
    loop = asyncio.get_running_loop()
    kind = "silent" if silent else "slowloris"
    while True:
        s = await connect(host, port)
        t0 = time.monotonic()
        with contextlib.closing(s), attempt(tally, kind):
            if not silent:
                await loop.sock_sendall(s, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            outcome = "not_cut"
            while time.monotonic() - t0 < header_timeout + 10:
                got = await recv_some(s, 1.0)
                if got is not None:  # closed, or an answer to a request it never finished
                    outcome = "cut" if got == b"" else status_of(got)
                    break
                if not silent:
                    try:
                        await loop.sock_sendall(s, b"X-Drip: 1\r\n")
                    except (ConnectionResetError, BrokenPipeError):
                        outcome = "cut"
                        break
            if outcome == "cut" and time.monotonic() - t0 > header_timeout + 3:
                outcome = "cut_late"
            tally.add(kind, outcome, f"after {time.monotonic() - t0:.1f}s")


async def slow_body(host: str, port: int, tally: Tally, body_timeout: float) -> None:
    """Forever: complete headers, then a body byte a second; the server should answer 408."""
    loop = asyncio.get_running_loop()
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 4096\r\n\r\n{")
    while True:
        s = await connect(host, port)
        t0 = time.monotonic()
        with contextlib.closing(s), attempt(tally, "slow_body"):
            await loop.sock_sendall(s, head)
            outcome = "not_cut"
            while time.monotonic() - t0 < body_timeout + 10:
                got = await recv_some(s, 1.0)
                if got is not None:
                    outcome = "closed_silently" if got == b"" else status_of(got)
                    break
                try:
                    await loop.sock_sendall(s, b" ")
                except (ConnectionResetError, BrokenPipeError):
                    outcome = "closed_silently"
                    break
            tally.add("slow_body", outcome, f"after {time.monotonic() - t0:.1f}s")


async def never_reader(host: str, port: int, tally: Tally, write_timeout: float, lost_after: float) -> None:
    """Forever: a streamed request with a lot to say (n=2, 1000 tokens, top-20 logprobs: ~1.2 MB) on a small
    socket, not read for the write deadline plus as much again (at most 15 s) plus 10 s to fill the
    buffers; then read what is there: a stream the server cut ends with no [DONE]."""
    loop = asyncio.get_running_loop()
    body = json.dumps({"prompt": "Tell me everything about the mill.", "max_tokens": 1000, "n": 2, "logprobs": 20,
                       "ignore_eos": True, "stream": True}).encode()
    req = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    while True:
        s = await connect(host, port, small=True)
        with contextlib.closing(s), attempt(tally, "never_reader"):
            await loop.sock_sendall(s, req)
            # Only the status line is read: a refusal (429 under overload) is retried soon, as an attacker would.
            head = await recv_some(s, lost_after, size=128)
            if head is None or (status := status_of(head)) != "200":
                tally.add("never_reader", "lost" if head is None else status, (head or b"").decode(errors="replace"))
                await asyncio.sleep(1)
                continue
            await asyncio.sleep(write_timeout + min(write_timeout, 15) + 10)
            tail, t_read = b"", time.monotonic()  # then the end of what is there
            while (chunk := await recv_some(s, 5.0)) and time.monotonic() - t_read < 30:
                tail = (tail + chunk)[-64:]
            if b"[DONE]" in tail:
                outcome = "finished"  # all of it fit the buffers: the write deadline was never reached
            elif chunk == b"":
                outcome = "cut"
            else:
                outcome = "not_cut" if chunk else "stalled"  # still streaming / open and silent
            tally.add("never_reader", outcome, tail.decode(errors="replace"))
        await asyncio.sleep(5)


async def leaver(url: str, tally: Tally) -> None:
    """Forever: a big non-streaming request (n=8, 600 tokens), abandoned after 2 s, every 8 s (a 429: again
    after 1 s)."""
    body = {"prompt": "Tell me everything about the river.", "max_tokens": 600, "n": 8, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=url) as client:
        while True:
            pause = 6.0
            try:
                with attempt(tally, "leaver"):
                    r = await client.post(COMPLETIONS, json=body, timeout=2.0)
                tally.add("leaver", outcome_of(r.status_code), r.text[:200])
                pause = 1.0 if r.status_code == 429 else pause
            except httpx.TimeoutException:
                tally.add("leaver", "left")
            except httpx.HTTPError as e:
                tally.add("leaver", "reset", repr(e))
            await asyncio.sleep(pause)


def start_hostile(url: str, tally: Tally, args: argparse.Namespace, deadlines: dict[str, float],
                  rng: random.Random) -> list[asyncio.Task]:
    host, port = url.removeprefix("http://").split(":")
    port = int(port)
    tasks = [quick_hostile(url, tally, args.hostile_rate, rng, args.lost_after), leaver(url, tally),
             never_reader(host, port, tally, deadlines["write"], args.lost_after)]
    tasks += [slowloris(host, port, tally, deadlines["header"], silent=k % 4 == 0) for k in range(args.slowloris)]
    tasks += [slow_body(host, port, tally, deadlines["body"]) for _ in range(4)]
    return [asyncio.create_task(t) for t in tasks]


# -- sampling -------------------------------------------------------------------------------------------------

@dataclass
class Sampler:
    """Every second: the RSS of the server's processes, by role, and this event loop's lag."""
    root: int
    t0: float
    phase: str = "start-up"
    samples: list[dict] = field(default_factory=list)
    lags: dict[str, list[float]] = field(default_factory=dict)

    async def run(self) -> None:
        while True:
            t = time.monotonic()
            by_role: dict[str, float] = {}
            for pid in process_tree(self.root):
                mb = rss_mb(pid)
                if mb is not None:
                    r = role(pid, self.root)
                    by_role[r] = by_role.get(r, 0.0) + mb
            self.samples.append({"t": round(t - self.t0, 2), "phase": self.phase,
                                 **{k: round(v, 1) for k, v in by_role.items()},
                                 "total": round(sum(by_role.values()), 1)})
            await asyncio.sleep(1.0)
            # A sleep that ends late measures how long other work held the loop (and delayed timestamps).
            self.lags.setdefault(self.phase, []).append(max(0.0, time.monotonic() - t - 1.0))


# -- phases ---------------------------------------------------------------------------------------------------

async def run_phase(url: str, name: str, duration: float, rate: float, hostile: bool, args: argparse.Namespace,
                    deadlines: dict[str, float], sampler: Sampler, tally: Tally, first_index: int) -> list[Normal]:
    """Normal clients arrive (Poisson, `rate` a second) for `duration` seconds, hostile ones beside them if
    asked; then the hostile ones leave and the normal requests still in flight get up to --lost-after."""
    rng = random.Random(f"{args.seed}-{name}")  # the normal arrivals' own, whatever hostile clients draw
    sampler.phase = name
    hostile_tasks = []
    if hostile:
        hostile_tasks = start_hostile(url, tally, args, deadlines, random.Random(f"{args.seed}-hostile"))
    pending: list[asyncio.Task] = []
    async with normal_client(url, args.lost_after) as client:
        t0 = time.monotonic()
        bar = tqdm(total=round(duration), desc=f"{name:>8}", unit="s", leave=True)
        next_at, shown = 0.0, 0
        while next_at < duration:
            await asyncio.sleep(max(0.0, t0 + next_at - time.monotonic()))
            pending.append(asyncio.create_task(normal_request(client, first_index + len(pending), name, t0,
                                                              args.lost_after)))
            next_at += rng.expovariate(rate)
            if (elapsed := min(round(time.monotonic() - t0), round(duration))) > shown:
                done = [t.result() for t in pending if t.done()]
                bar.set_postfix(sent=len(pending), **Counter(r.outcome for r in done))
                bar.update(elapsed - shown)
                shown = elapsed
        bar.update(round(duration) - shown)
        bar.close()
        for t in hostile_tasks:
            t.cancel()
        await asyncio.gather(*hostile_tasks, return_exceptions=True)
        sampler.phase = f"{name}-drain"
        return list(await asyncio.gather(*pending))


async def wait_idle(url: str, within: float) -> float | None:
    """Seconds until the server has no request running or waiting (None: not within `within`)."""
    t0 = time.monotonic()
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        while time.monotonic() - t0 < within:
            text = (await client.get("/metrics")).text
            busy = sum(metric_values(text, "tokenmill:num_requests_running").values()) + \
                sum(metric_values(text, "tokenmill:num_requests_waiting").values())
            if busy == 0:
                return time.monotonic() - t0
            await asyncio.sleep(0.5)
    return None


# -- arithmetic and report ------------------------------------------------------------------------------------

def slope_mb_per_min(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MB), in MB per minute."""
    if len(points) < 3:
        return math.nan
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((t - mx) ** 2 for t, _ in points)
    return 60 * sum((t - mx) * (y - my) for t, y in points) / var if var else math.nan


def rss_summary(samples: list[dict], phase: str) -> dict:
    mine = [s for s in samples if s["phase"] == phase]
    out = {}
    for key in ("total", "frontend", "engine"):
        pts = [(s["t"], s[key]) for s in mine if key in s]
        if pts:
            out[key] = {"start_mb": pts[0][1], "end_mb": pts[-1][1], "max_mb": max(y for _, y in pts),
                        "slope_mb_per_min": round(slope_mb_per_min(pts), 3)}
    return out


def ttft_windows(recs: list[Normal], duration: float, window: float) -> list[dict]:
    """TTFT p50/p99 of completed requests by the window they were sent in."""
    out = []
    for k in range(math.ceil(duration / window)):
        w = [r.ttft for r in recs
             if r.outcome == "ok" and r.ttft is not None and k * window <= r.sent < (k + 1) * window]
        out.append({"start_s": k * window, "mid_s": (k + 0.5) * window, "n": len(w), "p50_s": percentile(w, 50),
                    "p99_s": percentile(w, 99)})
    return out


def phase_summary(name: str, recs: list[Normal], duration: float, rate: float, window: float,
                  sampler: Sampler) -> dict:
    ttft = [r.ttft for r in recs if r.outcome == "ok" and r.ttft is not None]
    lags = sampler.lags.get(name, [])
    return {"duration_s": duration, "offered_req_per_s": rate, "sent": len(recs),
            "outcomes": dict(Counter(r.outcome for r in recs)), "completed_req_per_s": len(ttft) / duration,
            "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
            "ttft_max_s": max(ttft) if ttft else math.nan, "ttft_windows": ttft_windows(recs, duration, window),
            "lost_examples": [asdict(r) for r in recs if r.outcome == "lost"][:5],
            "5xx_examples": [asdict(r) for r in recs if r.outcome == "5xx"][:5],
            "rss": rss_summary(sampler.samples, name),
            "generator_loop_lag_p99_s": percentile(lags, 99), "generator_loop_lag_max_s": max(lags, default=math.nan)}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_rss, ax_ttft) = plt.subplots(1, 2, figsize=(14, 4.5))
    samples = report["rss_samples"]
    for key, style in (("total", "-"), ("frontend", "--"), ("engine", ":")):
        pts = [(s["t"], s[key]) for s in samples if key in s]
        if pts:
            ax_rss.plot(*zip(*pts, strict=True), style, label=key)
    for k, phase in enumerate(report["phases"]):
        ts = [s["t"] for s in samples if s["phase"] == phase]
        if ts:
            ax_rss.axvspan(min(ts), max(ts), color=f"C{k + 3}", alpha=0.12, label=phase)
    ax_rss.set_xlabel("seconds since the server was launched")
    ax_rss.set_ylabel("VmRSS (MB)")
    ax_rss.set_title("resident memory")
    ax_rss.legend(fontsize=8)
    for k, (phase, res) in enumerate(report["phases"].items()):
        w = [x for x in res["ttft_windows"] if x["n"]]
        ax_ttft.plot([x["mid_s"] for x in w], [x["p99_s"] for x in w], "o-", color=f"C{k + 3}",
                     label=f"{phase} p99")
        ax_ttft.plot([x["mid_s"] for x in w], [x["p50_s"] for x in w], "x--", color=f"C{k + 3}",
                     alpha=0.6, label=f"{phase} p50")
    ax_ttft.set_xlabel("seconds since the phase started")
    ax_ttft.set_ylabel(f"TTFT of requests sent in each {report['window_s']:g} s (s)")
    ax_ttft.set_title(f"normal clients' TTFT at {report['load']}x capacity")
    ax_ttft.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def slope_text(phase: dict, key: str) -> str:
    return f"{phase['rss'][key]['slope_mb_per_min']:+.2f}" if key in phase["rss"] else "n/a"


def print_summary(report: dict) -> None:
    phases = report["phases"]
    rows = [("offered req/s", lambda p: f"{p['offered_req_per_s']:.2f}"),
            ("sent", lambda p: str(p["sent"])),
            ("completed req/s", lambda p: f"{p['completed_req_per_s']:.2f}"),
            ("outcomes", lambda p: " ".join(f"{k}={v}" for k, v in sorted(p["outcomes"].items()))),
            ("TTFT p50 / p99 (s)", lambda p: f"{p['ttft_p50_s']:.3f} / {p['ttft_p99_s']:.3f}"),
            ("RSS total start/end/max (MB)", lambda p: "{start_mb:.0f} / {end_mb:.0f} / {max_mb:.0f}".format(
                **p["rss"]["total"]) if "total" in p["rss"] else "n/a"),
            ("RSS slope total (MB/min)", lambda p: slope_text(p, "total")),
            ("RSS slope engine (MB/min)", lambda p: slope_text(p, "engine")),
            ("RSS slope frontend (MB/min)", lambda p: slope_text(p, "frontend")),
            ("generator loop lag p99 (s)", lambda p: f"{p['generator_loop_lag_p99_s']:.3f}")]
    width = max(len(r[0]) for r in rows)
    print(f"\n{'':{width}}  " + "  ".join(f"{name:>28}" for name in phases))
    for label, fmt in rows:
        print(f"{label:{width}}  " + "  ".join(f"{fmt(p):>28}" for p in phases.values()))
    v = report["verdict"]
    print(f"\nTTFT p99 hostile / baseline: {v['ttft_p99_ratio']:.2f}   (p50 {v['ttft_p50_ratio']:.2f})")
    print("hostile clients:")
    for kind, counts in report["hostile"]["counts"].items():
        bad = {k: n for k, n in counts.items() if not expected(kind, k)}
        print(f"  {kind:>17}: " + " ".join(f"{k}={n}" for k, n in sorted(counts.items()))
              + (f"   UNEXPECTED {bad}" if bad else ""))
    for ex in report["hostile"]["unexpected_examples"]:
        print(f"  e.g. {ex}")
    run = report["rss_whole_run"].get("total")
    if run:
        print(f"RSS total over the whole run: {run['start_mb']:.0f} -> {run['end_mb']:.0f} MB "
              f"(max {run['max_mb']:.0f}), slope {run['slope_mb_per_min']:+.2f} MB/min")
    print(f"server went idle {report['idle_after_hostile_s']} s after the hostile clients left "
          f"(None: not within 90 s)")
    print(f"server log: {len(report['server_log_problems'])} tracebacks/errors, warnings per logger "
          f"{report['server_log_warnings']} ({report['server_log']})")
    for p in report["server_log_problems"][:3]:
        print("  " + p.replace("\n", "\n  ")[:2000])
    print(f"\n5xx: {v['5xx']}   lost: {v['lost']}   -> {'PASS' if v['pass'] else 'FAIL'}")


def verdict(report: dict) -> dict:
    """The gate: no 5xx anywhere, no request lost; and the TTFT ratio it reports beside."""
    phases, hostile = report["phases"].values(), report["hostile"]["counts"].values()
    normal_5xx = sum(ph["outcomes"].get("5xx", 0) for ph in phases)
    hostile_5xx = sum(c.get("5xx", 0) for c in hostile)
    lost = sum(ph["outcomes"].get("lost", 0) for ph in phases) + sum(c.get("lost", 0) for c in hostile)
    base, host = report["phases"]["baseline"], report["phases"]["hostile"]
    return {"5xx": normal_5xx + hostile_5xx, "5xx_normal": normal_5xx, "5xx_hostile": hostile_5xx, "lost": lost,
            "ttft_p99_ratio": host["ttft_p99_s"] / base["ttft_p99_s"],
            "ttft_p50_ratio": host["ttft_p50_s"] / base["ttft_p50_s"], "pass": normal_5xx + hostile_5xx + lost == 0}


# -- main -----------------------------------------------------------------------------------------------------

def cpu_tag() -> str:
    return re.sub(r"[^a-z0-9]", "", cpu_name().split()[0].lower()) or "cpu"


async def soak(args: argparse.Namespace, server: ServerProcess, deadlines: dict[str, float], t_start: float) -> dict:
    url = server.base_url
    sampler = Sampler(server_pid(server), t_start)
    sampling = asyncio.create_task(sampler.run())
    sampler.phase = "capacity"
    cap = await measure_capacity(url, args.max_num_seqs, args.lost_after)
    rate = args.load * cap["req_per_s"]
    print(f"capacity {cap['req_per_s']:.2f} req/s (closed loop at {args.max_num_seqs}); offering {rate:.2f} req/s",
          flush=True)
    tally = Tally()
    phases, records = {}, {}
    with collector_paused():  # a collection here would land inside the TTFTs being timed
        records["baseline"] = await run_phase(url, "baseline", args.baseline_duration, rate, False, args, deadlines,
                                              sampler, tally, 0)
        records["hostile"] = await run_phase(url, "hostile", args.duration, rate, True, args, deadlines, sampler,
                                             tally, 10_000_000)
    sampler.phase = "after"
    idle = await wait_idle(url, 90)
    await asyncio.sleep(3)  # a few samples of the server at rest
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        metrics = (await client.get("/metrics")).text
    sampling.cancel()
    durations = {"baseline": args.baseline_duration, "hostile": args.duration}
    for name, recs in records.items():
        phases[name] = phase_summary(name, recs, durations[name], rate, args.window, sampler)
    # The whole run past start-up, phases and drains: what a leak would show as a slope.
    rss_run = rss_summary([s | {"phase": "run"} for s in sampler.samples if s["phase"] != "start-up"], "run")
    return {"capacity": cap, "offered_req_per_s": rate, "phases": phases, "rss_whole_run": rss_run,
            "rss_samples": sampler.samples,
            "hostile": {"counts": {k: dict(v) for k, v in tally.counts.items()},
                        "unexpected_examples": list(tally.examples.values())},
            "idle_after_hostile_s": None if idle is None else round(idle, 1),
            "rejected_by_reason": metric_values(metrics, "tokenmill:request_rejected_total"),
            "finished_by_reason": metric_values(metrics, "tokenmill:request_success_total")}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    server_args = argv[argv.index("--") + 1:] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=600, help="seconds of the hostile phase")
    p.add_argument("--baseline-duration", type=float, default=180, help="seconds of the phase without hostiles")
    p.add_argument("--load", type=float, default=2.0, help="normal arrivals as a multiple of measured capacity")
    p.add_argument("--model", default="default")
    p.add_argument("--mock", action="store_true", help="serve --mock (no model): a fast smoke run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="JSON report (default results/soak_<cpu>.json; "
                   "the plot beside it, .png)")
    p.add_argument("--max-num-seqs", type=int, default=16, help="server's running set; the capacity loop's width")
    p.add_argument("--max-queue-delay", type=float, default=5.0,
                   help="server's admission control: 429 for a request predicted to wait longer (0: off)")
    p.add_argument("--engine-threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="the engine's --num-threads (default: every core this process may use)")
    p.add_argument("--lost-after", type=float, default=120.0,
                   help="a request with no complete answer after this many seconds is lost")
    p.add_argument("--slowloris", type=int, default=24, help="slowloris connections held open at once")
    p.add_argument("--hostile-rate", type=float, default=4.0, help="one-shot bad requests per second")
    p.add_argument("--window", type=float, default=30.0, help="seconds per TTFT window in the plot")
    p.add_argument("--log", type=Path, default=None, help="server log (default: a temporary file)")
    args = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1`: where a stuck run is, on stderr
    deadlines = {"header": server_option(server_args, "--header-timeout", 10.0),
                 "body": server_option(server_args, "--body-timeout", 30.0),
                 "write": server_option(server_args, "--write-timeout", 30.0)}
    out = args.out or RESULTS / f"soak_{cpu_tag()}{'_mock' if args.mock else ''}.json"
    log = args.log or Path(tempfile.gettempdir()) / f"tokenmill-soak-{os.getpid()}.log"
    command = server_command(args, server_args)
    print(f"{cpu_name()}, {os.cpu_count()} cores; server: {command}; log {log}", flush=True)

    t_start = time.monotonic()
    log_start = log.stat().st_size if log.exists() else 0
    server = ServerProcess(command, free_port(), log, ready_timeout_s=300)

    def stop_and_exit(signum, _frame):
        # Stopped from outside (a stuck run, a test's deadline): the server lives in a session of its own and
        # would outlive a plain kill of this process, so it goes first.
        server.stop(grace_s=5)
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, stop_and_exit)
    with server:
        pid = server_pid(server)
        report = asyncio.run(soak(args, server, deadlines, t_start))
        server_cpu = {role(q, pid): round(cpu_seconds(q), 1) for q in process_tree(pid)}
    gen = resource.getrusage(resource.RUSAGE_SELF)
    report = {"cpu": cpu_name(), "cores": os.cpu_count(), "command": command, "argv": sys.argv, "load": args.load,
              "mock": args.mock, "seed": args.seed, "window_s": args.window, "server_deadlines_s": deadlines,
              "server_log": str(log), "server_cpu_s": server_cpu,
              "generator_cpu_s": round(gen.ru_utime + gen.ru_stime, 1),
              "wall_s": round(time.monotonic() - t_start, 1),
              **report}
    report["server_log_problems"], report["server_log_warnings"] = log_problems(log, log_start)
    report["verdict"] = verdict(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str))
    plot(report, out.with_suffix(".png"))
    print_summary(report)
    print(f"wrote {out} and {out.with_suffix('.png')}; server CPU {server_cpu} s, generator CPU "
          f"{report['generator_cpu_s']} s, wall {report['wall_s']} s")
    return 0 if report["verdict"]["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
