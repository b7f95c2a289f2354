"""The lifetime ledger checked on a model trained here: `tokenmill distill` trains a tiny draft from the default
model and counts the compute it spent (training_compute.json); `tokenmill serve --model STUDENT` serves it under a
steady open-loop load; the ledger samples the server's /v1/usage twice early on and predicts when cumulative
inference compute passes the training compute; the load runs on until /v1/usage shows it passed. Prints the
predicted and the observed crossover and the error (goal: within 5 %).

    python benchmarks/ledger_crossover.py                          # distill (~35 s), then ~80 s of load
    python benchmarks/ledger_crossover.py --student DIR            # an existing distill output directory

The training compute is the run's honest count (the student's training plus the teacher's data, as
`tokenmill distill` writes it); the run is sized (steps x batch x sequence length) so that the load passes it
in about 1-2 minutes on 2 cores, not the other way round. Prediction and observation both come from the
server's own counters (FLOPs counted per finished request): the error is the ledger's extrapolation error.
Writes benchmarks/results/ledger_crossover_<cpu>.json (or --json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from tokenmill.bench.launch import ServerProcess, free_port
from tokenmill.kernels.cpu import cpu_name
from tokenmill.planning.ledger import crossover, rate

RESULTS = Path(__file__).resolve().parent / "results"


def distill(out: Path, args: argparse.Namespace) -> None:
    subprocess.run([sys.executable, "-m", "tokenmill.entrypoints.cli", "--log-level", "WARNING", "distill",
                    "--teacher", "default", "--out", str(out), "--layers", "1", "--hidden", "64",
                    "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
                    "--lr", "5e-3", "--warmup", "5", "--num-prompts", "2", "--samples-per-prompt", "2",
                    "--gen-tokens", "16", "--teacher-kv-cache-memory", "64MiB"], check=True)


class SteadyLoad:
    """Requests of a fixed shape at a fixed rate (open loop: each at its time, whatever earlier ones do), on a
    thread of its own, each prompt different (no prefix-cache hits, so every request costs the same)."""

    def __init__(self, url: str, rate_rps: float, prompt_tokens: int, max_tokens: int):
        self.url, self.interval = url, 1.0 / rate_rps
        self.prompt_tokens, self.max_tokens = prompt_tokens, max_tokens
        self.stop = threading.Event()
        self.sent = self.ok = self.failed = 0
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
        async with httpx.AsyncClient(base_url=self.url, timeout=120, limits=limits) as client:
            tasks: set[asyncio.Task] = set()
            t0 = time.monotonic()
            while not self.stop.is_set():
                i = self.sent
                prompt = [1000 + (i * 131 + j * 7) % 40000 for j in range(self.prompt_tokens)]
                task = asyncio.create_task(self._one(client, prompt))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                self.sent += 1
                await asyncio.sleep(max(0.0, t0 + self.sent * self.interval - time.monotonic()))
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _one(self, client: httpx.AsyncClient, prompt: list[int]) -> None:
        r = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": self.max_tokens,
                                                        "ignore_eos": True, "temperature": 0.0, "user": "steady"})
        if r.status_code == 200:
            self.ok += 1
        else:
            self.failed += 1


def usage(url: str) -> dict:
    r = httpx.get(f"{url}/v1/usage", timeout=30)
    r.raise_for_status()
    return r.json()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--student", help="an existing `tokenmill distill` output directory (default: distill now)")
    ap.add_argument("--steps", type=int, default=100, help="distill training steps")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    # Long prompts, few output tokens: most FLOPs per CPU-second of the server (prefill runs as one batch), so a
    # shared machine's stalls move the rate least; 2 requests/s keep each completion's lump of FLOPs small.
    ap.add_argument("--rate", type=float, default=2.0, help="requests/s of the steady load")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--settle", type=float, default=10.0, help="seconds of load before the ledger's first sample")
    ap.add_argument("--sample-seconds", type=float, default=20.0, help="the ledger's rate window")
    ap.add_argument("--json", dest="json_out", help="where to write the result (default: benchmarks/results/)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="ledger-crossover-") as tmp:
        student = Path(args.student) if args.student else Path(tmp) / "student"
        t0 = time.monotonic()
        if not args.student:
            distill(student, args)
        distill_s = time.monotonic() - t0
        compute = json.loads((student / "training_compute.json").read_text())
        training = compute["total_flops"]
        print(f"training compute: {training:.4g} FLOPs (student training {compute['student_training_flops']:.4g}, "
              f"teacher data {compute['teacher_generation_flops']:.4g}); distill took {distill_s:.0f} s", flush=True)
        port = free_port()
        log = Path(tmp) / "server.log"
        cmd = (f"{sys.executable} -m tokenmill.entrypoints.cli --log-level WARNING serve --port {{port}} "
               f"--model {student} --no-log-requests")
        with ServerProcess(cmd, port, log, ready_timeout_s=300) as server:
            url = server.base_url
            for i in range(4):  # warm-up: first requests pay one-off costs
                httpx.post(f"{url}/v1/completions", timeout=60, json={
                    "prompt": [500 + i] * args.prompt_tokens, "max_tokens": args.max_tokens, "ignore_eos": True})
            start = usage(url)
            if start["total"]["flops"] >= training:
                raise SystemExit("the warm-up alone passed the training compute: train longer or load less")
            load = SteadyLoad(url, args.rate, args.prompt_tokens, args.max_tokens)
            load.thread.start()
            try:
                time.sleep(args.settle)
                a = usage(url)
                time.sleep(args.sample_seconds)
                b = usage(url)
                predicted = crossover(b, rate(a, b), training)
                if predicted["passed"]:
                    raise SystemExit("the load passed the training compute before the ledger's second sample: "
                                     "train longer or load less")
                at = b["now"] + predicted["seconds_from_now"]
                print(f"ledger at {b['now'] - start['now']:.1f} s of load: {predicted['flops_per_s']:.4g} FLOPs/s, "
                      f"predicts the crossover in {predicted['seconds_from_now']:.1f} s", flush=True)
                deadline = at + max(60.0, 0.5 * (at - a["now"]))
                series = [(x["now"] - start["now"], x["total"]["flops"]) for x in (a, b)]
                while (u := usage(url))["total"]["flops"] < training:
                    if time.time() > deadline:
                        raise SystemExit("the load never passed the training compute")
                    if u["now"] - start["now"] >= series[-1][0] + 5:
                        series.append((u["now"] - start["now"], u["total"]["flops"]))
                    time.sleep(0.2)
            finally:
                load.stop.set()
                load.thread.join(130)
    predicted_s = at - a["now"]  # from the ledger's first sample, the start of its measurement
    observed_s = u["now"] - a["now"]
    error = predicted_s / observed_s - 1
    result = {
        "cpu": cpu_name(), "training_compute": compute, "distill_seconds": distill_s,
        "load": {"rate_rps": args.rate, "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
                 "sent": load.sent, "ok": load.ok, "failed": load.failed},
        "ledger": predicted, "sample_seconds": args.sample_seconds, "settle_seconds": args.settle,
        "predicted_s_from_first_sample": predicted_s, "observed_s_from_first_sample": observed_s,
        "predicted_s_from_load_start": at - start["now"], "observed_s_from_load_start": u["now"] - start["now"],
        "error": error, "observed_flops_at_crossing": u["total"]["flops"],
        "usage_series": series,  # (seconds of load, inference FLOPs counted), every ~5 s
        "command": "python benchmarks/ledger_crossover.py " + " ".join(sys.argv[1:]),
    }
    print(f"crossover from the ledger's first sample: predicted {predicted_s:.1f} s, observed {observed_s:.1f} s "
          f"(error {error:+.1%}); {u['now'] - start['now']:.1f} s of load; {load.ok} requests ok, {load.failed} "
          "failed")
    tag = "amd" if "AMD" in cpu_name() else "intel" if "Intel" in cpu_name() else "cpu"
    path = Path(args.json_out) if args.json_out else RESULTS / f"ledger_crossover_{tag}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"written {path}")
    return 0 if abs(error) <= 0.05 and not load.failed else 1


if __name__ == "__main__":
    sys.exit(main())
