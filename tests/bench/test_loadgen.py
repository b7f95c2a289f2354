"""The load generator against a real HTTP server with scripted delays (tests/bench/fake_openai_server.py):
TTFT, TPOT, ITL, throughput and goodput come out as the script dictates; short peers are flagged.

Delays are lower bounds (the fake sleeps at least that long); upper tolerances are generous because
other processes share the CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tokenmill.bench import loadgen, serve
from tokenmill.bench.datasets import BenchRequest
from tokenmill.bench.launch import free_port
from tokenmill.bench.metrics import compute

FAKE = Path(__file__).with_name("fake_openai_server.py")
REPO = Path(__file__).resolve().parents[2]
SLACK = 0.25  # seconds a busy machine may add to a scripted delay
# The fake sleeps at least each delay, but the client times arrivals: a first token that reaches it late makes
# the span after it look that much shorter (seen at 0.3995 s against a scripted 0.4 on a loaded machine).
JITTER = 0.05


@pytest.fixture(scope="module")
def fake_url():
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(FAKE), str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(loadgen.wait_ready(url, 60, alive=lambda: proc.poll() is None))
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def req(ttft_ms: int, gap_ms: int, out: int) -> BenchRequest:
    ids = [ttft_ms, gap_ms, 7, 7, 7, 7]
    return BenchRequest(ids, "unused", out)


def go(url, reqs, **kw):
    kw.setdefault("backend", loadgen.BACKENDS["openai"])
    return asyncio.run(loadgen.run(url, reqs, **kw))


def test_ttft_tpot_itl_follow_the_script(fake_url):
    ttft, gap, out = 0.3, 0.08, 6
    recs = go(fake_url, [req(300, 80, out) for _ in range(4)])
    m = compute(recs)
    assert m["completed"] == 4 and m["short"] == m["errors"] == 0
    for r in recs:
        assert r.tokens_source == "usage" and r.output_tokens == out and len(r.chunks) == out
        assert r.served_by == "fake-0"
        assert ttft <= r.ttft <= ttft + SLACK
        assert (out - 1) * gap - JITTER <= r.e2e - r.ttft <= (out - 1) * gap + SLACK
        assert r.tpot == pytest.approx((r.e2e - r.ttft) / (out - 1))
    assert ttft <= m["ttft_s"]["median"] <= ttft + SLACK
    assert gap * 0.9 <= m["itl_s"]["mean"] <= gap + SLACK / (out - 1)
    assert gap * 0.9 <= m["tpot_s"]["mean"] <= gap + SLACK / (out - 1)
    assert ttft + (out - 1) * gap <= m["e2e_s"]["p99"] <= ttft + (out - 1) * gap + SLACK


def test_throughput_and_goodput(fake_url):
    # 4 fast (TTFT 100 ms) and 2 slow (TTFT 700 ms) requests of 4 tokens, 50 ms apart, all at once.
    reqs = [req(100, 50, 4)] * 4 + [req(700, 50, 4)] * 2
    recs = go(fake_url, reqs)
    m = compute(recs, {"ttft": 0.45, "tpot": 0.5})
    wall = m["duration_s"]
    assert 0.7 + 3 * 0.05 <= wall <= 0.7 + 3 * 0.05 + SLACK
    assert m["request_throughput"] == pytest.approx(6 / wall)
    assert m["output_throughput"] == pytest.approx(24 / wall)
    assert m["input_throughput"] == pytest.approx(36 / wall)
    assert m["good_requests"] == 4 and m["goodput"] == pytest.approx(4 / wall)
    assert compute(recs, {"tpot": 0.01})["good_requests"] == 0


def test_short_peer_is_flagged_not_counted(fake_url):
    recs = go(fake_url + "/short", [req(10, 10, 6)] * 3)
    m = compute(recs)
    assert [r.status for r in recs] == ["short"] * 3 and [r.output_tokens for r in recs] == [4] * 3
    assert m["completed"] == 0 and m["short"] == 3 and m["ttft_s"]["n"] == 0 and m["output_throughput"] == 0


def test_without_usage_chunks_are_counted(fake_url):
    recs = go(fake_url + "/nousage", [req(10, 10, 5)] * 2)
    assert all(r.tokens_source == "chunks" and r.output_tokens == 5 and r.status == "ok" for r in recs)


def test_several_tokens_per_chunk(fake_url):
    recs = go(fake_url + "/pairs", [req(10, 60, 6)])
    (r,) = recs
    assert r.status == "ok" and r.output_tokens == 6 and len(r.chunks) == 3 and len(r.itls) == 2
    assert r.tpot == pytest.approx((r.e2e - r.ttft) / 5)  # per token, not per chunk


def test_max_concurrency_and_arrivals(fake_url):
    recs = go(fake_url, [req(50, 10, 2)] * 4, max_concurrency=1)
    for a, b in zip(recs, recs[1:], strict=False):
        assert b.sent >= a.end - 1e-3  # one at a time
    assert recs[-1].sent - recs[-1].scheduled >= 3 * 0.05  # it queued behind three others
    recs = go(fake_url, [req(10, 10, 2)] * 4, request_rate=20.0, seed=5)
    expected = loadgen.arrival_times(4, 20.0, seed=5)
    assert [r.scheduled for r in recs] == expected
    assert all(r.sent >= r.scheduled for r in recs)


def test_errors_are_recorded(fake_url):
    body_rejected = BenchRequest([5], "x", 3)  # the fake wants two script ids: HTTP 400
    (r,) = go(fake_url, [body_rejected])
    assert r.status == "error" and r.error.startswith("HTTP 400")
    (r,) = go("http://127.0.0.1:9", [req(1, 1, 2)])  # nothing listens there
    assert r.status == "error"


def test_cli_serve_sweep_plot_without_torch(fake_url, tmp_path):
    """The whole CLI path in a fresh process: dataset from the real tokenizer, run, JSON, sweep with a
    freshly launched server per point, plots; torch never imported by the serve/sweep part."""
    out, sweep = tmp_path / "serve.json", tmp_path / "sweep.json"
    common = ["--dataset", "random", "--input-len", "8", "8", "--output-len", "3", "3", "--warmup", "1"]
    script = f"""
import sys
from tokenmill.entrypoints.cli import main
assert main(["bench", "serve", "--base-url", {fake_url!r}, "--num-prompts", "3", "--slo", "ttft=5",
             "--label", "fake", "--out", {str(out)!r}, *{common!r}]) == 0
assert main(["bench", "sweep", "--rates", "5,inf", "--num-prompts", "3", "--label", "fake",
             "--launch", {f"{sys.executable} {FAKE} {{port}}"!r}, "--log-dir", {str(tmp_path)!r},
             "--out", {str(sweep)!r}, *{common!r}]) == 0
assert "torch" not in sys.modules, "the load generator imported torch"
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO, env=env, timeout=120)
    res = json.loads(out.read_text())
    assert res["metrics"]["completed"] == 3 and res["metrics"]["good_requests"] == 3
    assert len(res["requests"]) == 3 and all(len(r["chunks"]) == 3 for r in res["requests"])
    assert all(r["prompt_tokens"] == r["prompt_len"] == 8 for r in res["requests"])
    sw = json.loads(sweep.read_text())
    assert [c["x"] for c in sw["curve"]] == [5.0, float("inf")]
    assert sw["max_rate_meeting_slo"] is not None

    from tokenmill.bench.plot import plot

    pngs = plot([out, sweep], tmp_path / "plots")
    assert {p.name for p in pngs} == {"latency_cdf.png", "goodput_vs_rate.png"}
    assert all(p.stat().st_size > 10_000 for p in pngs)


def test_cli_reports_bad_input(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "tokenmill.entrypoints.cli", "bench", "serve", "--slo", "fast=1",
                        "--num-prompts", "1"], capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
    assert r.returncode == 2 and "bad SLO" in r.stderr and "Traceback" not in r.stderr


def test_closed_loop_helper(fake_url):
    # Synthetic prompts: ids 1000.. -> the fake's TTFT is id % 1000 ms (< 1 s), gaps id % 100 ms.
    r = asyncio.run(loadgen.run_load(fake_url, concurrency=2, requests=3, max_tokens=3, prompt_words=4))
    assert r["completed"] == 3 and r["concurrency"] == 2 and r["output_tok_per_s"] > 0
    assert r["ttft_p50_ms"] <= r["ttft_p99_ms"]


def test_rate_and_concurrency_lists_reject_bad_input_clearly():
    assert serve.rate_list("0.5,2,inf") == [0.5, 2.0, float("inf")]
    assert serve.concurrency_list("1,4,16") == [1, 4, 16]
    for bad, parse, says in (("1,x", serve.rate_list, "is not a request rate"),
                             ("0", serve.rate_list, "must be positive"),
                             ("1,a", serve.concurrency_list, "whole numbers"),
                             ("4,0", serve.concurrency_list, "at least 1")):
        with pytest.raises(argparse.ArgumentTypeError, match=says):
            parse(bad)
