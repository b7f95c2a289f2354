"""Start-up time and peak memory of `tokenmill serve` (issue 16).

    python benchmarks/startup.py [--runs 3] [--kv-cache-memory 512MiB|default] [--out FILE.json]

Each run starts `tokenmill serve` on the default model on a free loopback port and times, from the command's
start: the listening frontend, /health ready (the engine loaded, kernels built or found in the cache, the
start-up measurements done) and the first token of a first streamed chat completion. Then it reads the peak
resident memory (VmHWM) of the frontend and the engine process and compares their sum with what the issue
allows: the weights as held + the KV cache budget + 600 MB (`--kv-cache-memory default`: the server sizes the cache
itself, a share of free memory, and the budget is read from its log). The kernel and tuning caches are as this
machine has them (warm); a fresh clone's first start adds the kernel build that `make setup` does once.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tokenmill.bench.launch import free_port
from tokenmill.config import parse_size

ROOT = Path(__file__).resolve().parents[1]


def peak_rss(pid: int) -> int:
    """VmHWM of a process and its descendants, bytes."""
    total = 0
    pids = [pid]
    while pids:
        p = pids.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        total += next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:"))
        pids += [int(c) for c in children]
    return total


def one_run(kv: str) -> dict:
    port = free_port()
    exe = Path(sys.executable).with_name("tokenmill")
    cmd = [str(exe), "serve", "--model", "default", "--port", str(port)]
    cmd += [] if kv == "default" else ["--kv-cache-memory", kv]
    t0 = time.perf_counter()
    # The server's log at INFO (it names the KV budget it chose), to a file: a pipe nobody reads could fill.
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True, cwd=ROOT,
                            env={**os.environ, "TOKENMILL_LOG_LEVEL": "INFO"})
    url = f"http://127.0.0.1:{port}"
    out: dict = {}
    try:
        while "health_s" not in out:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"the server exited: {log.read()[-2000:]}")
            try:
                r = httpx.get(f"{url}/health", timeout=1)
                out.setdefault("listening_s", time.perf_counter() - t0)
                if r.status_code == 200:
                    out["health_s"] = time.perf_counter() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.02)
        body = {"model": "default", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8,
                "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: {") and '"content"' in line:
                    out["first_token_s"] = time.perf_counter() - t0
                    break
        out["peak_rss_bytes"] = peak_rss(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    log.seek(0)
    chosen = re.search(r"KV cache: \d+ blocks of \d+ tokens \((\d+) MiB", log.read())
    if chosen is None and kv == "default":
        raise RuntimeError("the server's log names no KV cache budget")
    out["kv_bytes"] = int(chosen.group(1)) * 2**20 if chosen else parse_size(kv)
    return out


def weights_bytes() -> int:
    """The default model's linear weights as the engine holds them, plus its float embedding and norms."""
    from tokenmill import LLM

    model = LLM("default", kv_cache_memory="16MiB").engine.runner.model
    linear = sum(v for k, v in model.weight_report().items() if k.endswith("_bytes"))
    other = model.embed.numel() * model.embed.element_size() + sum(
        t.numel() * t.element_size() for layer in model.layers for t in (layer.in_norm, layer.post_norm))
    return linear + other


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--kv-cache-memory", default="512MiB", help="a size, or default: the server's own choice")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from tokenmill.kernels.cpu import cpu_name

    runs = [one_run(args.kv_cache_memory) for _ in range(args.runs)]
    held = weights_bytes()
    kv = max(r["kv_bytes"] for r in runs)
    allowed = held + kv + 600 * 2**20
    med = {k: statistics.median(r[k] for r in runs) for k in ("listening_s", "health_s", "first_token_s",
                                                               "peak_rss_bytes")}
    print(f"CPU: {cpu_name()}; `tokenmill serve --model default --kv-cache-memory {args.kv_cache_memory}`, "
          f"{args.runs} runs, medians (warm kernel and tuning caches)")
    print(f"listening {med['listening_s']:.2f} s, /health ready {med['health_s']:.2f} s, first token "
          f"{med['first_token_s']:.2f} s")
    print(f"peak RSS, frontend + engine: {med['peak_rss_bytes'] / 2**20:.0f} MiB; weights as held "
          f"{held / 2**20:.0f} MiB + KV {kv / 2**20:.0f} MiB + 600 MiB = {allowed / 2**20:.0f} MiB allowed "
          f"({'within' if med['peak_rss_bytes'] <= allowed else 'OVER'})")
    if args.out:
        args.out.write_text(json.dumps({"cpu": cpu_name(), "runs": runs, "median": med, "weights_bytes": held,
                                        "kv_bytes": kv, "allowed_bytes": allowed}, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("TOKENMILL_LOG_LEVEL", "WARNING")
    main()
