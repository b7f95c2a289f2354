"""`tokenmill ray-serve` for real: a private Ray instance (2 CPUs, small object store, no dashboard), two engine
replicas of half a CPU each behind the router deployment, served through the official `openai` client.

Ray runs in the CLI's own process group, so teardown can always end every process it started (raylet,
GCS, workers, engine processes), even when a test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest
from server_helpers import REPO, CliProcess, free_port

from tokenmill import LLM, SamplingParams

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Name three colors."}]
STARTUP_TIMEOUT_S = 300.0


class RayServeProcess(CliProcess):
    def __init__(self, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {"RAY_DEDUP_LOGS": "0",
               "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
        # Its own session: raylet, GCS, the Serve actors and the engine processes all share its process group.
        super().__init__(["ray-serve", "--port", str(self.port), "--num-cpus", "2", "--object-store-memory",
                          "100MiB", *args], "tokenmill-ray-", env=env, new_session=True)

    def log_text(self, tail: int = 80) -> str:
        return super().log_text(tail)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray-serve exited with {self.proc.returncode}:\n{self.log_text()}")
            if "INFO tokenmill.entrypoints.ray_cli: serving on" in Path(self.log.name).read_text(errors="replace"):
                return
            time.sleep(0.5)
        raise RuntimeError(f"ray-serve not ready in {STARTUP_TIMEOUT_S}s:\n{self.log_text()}")

    def group_alive(self) -> bool:
        try:
            os.killpg(self.proc.pid, 0)
            return True
        except ProcessLookupError:
            return False

    def stop(self) -> int | None:
        """SIGTERM (the CLI removes the app and stops Ray), then make sure the whole group is gone."""
        code = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(90)
            except subprocess.TimeoutExpired:
                pass
        else:
            code = self.proc.returncode
        deadline = time.monotonic() + 15
        while self.group_alive() and time.monotonic() < deadline:
            time.sleep(0.5)
        if self.group_alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.log.close()
        return code


@pytest.fixture(scope="module")
def offline() -> dict[str, str]:
    llm = LLM(kv_cache_memory="64MiB", dtype="float32", num_threads=1)
    greedy = SamplingParams(max_tokens=12, temperature=0.0)
    ref = {"completion": llm.generate(PROMPT, greedy, use_tqdm=False)[0].outputs[0].text,
           "chat": llm.chat(CHAT, greedy, use_tqdm=False)[0].outputs[0].text}
    del llm
    return ref


@pytest.fixture(scope="module")
def ray_app(offline) -> RayServeProcess:
    app = RayServeProcess("--replicas", "2", "--replica-cpus", "0.5", "--router-cpus", "0.25",
                          "--routing", "round-robin", "--num-threads", "1", "--kv-cache-memory", "64MiB",
                          "--dtype", "float32", "--max-model-len", "1024")
    try:
        app.wait_ready()
        yield app
    finally:
        code = app.stop()
        alive = app.group_alive()
        log = app.log_text(200)
    assert not alive, "Ray processes outlived the test"
    assert code == 0, log
    Path(app.log.name).unlink(missing_ok=True)


@pytest.fixture
def client(ray_app) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{ray_app.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_greedy_text_equals_offline_streaming_or_not_on_both_replicas(client, offline):
    replicas = set()
    for _ in range(2):  # round-robin: consecutive requests land on different replicas
        raw = client.completions.with_raw_response.create(model="default", prompt=PROMPT, max_tokens=12,
                                                          temperature=0)
        replicas.add(raw.headers["x-tokenmill-replica"])
        assert raw.parse().choices[0].text == offline["completion"]
    assert len(replicas) == 2

    stream = client.completions.create(model="default", prompt=PROMPT, max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == offline["completion"]

    chat = client.chat.completions.create(model="default", messages=CHAT, max_tokens=12, temperature=0)
    assert chat.choices[0].message.content == offline["chat"]
    stream = client.chat.completions.create(model="default", messages=CHAT, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == offline["chat"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_concurrent_requests_complete_and_spread_over_the_replicas(ray_app):
    async def main() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{ray_app.url}/v1", api_key="unused", max_retries=0,
                                      timeout=180) as aclient:
            async def one(i: int) -> str:
                stream = await aclient.completions.create(model="default", prompt=f"{i} + {i} =", max_tokens=6,
                                                          temperature=0, stream=True)
                return "".join([c.choices[0].text async for c in stream])

            return await asyncio.gather(*(one(i) for i in range(8)))

    before = _router_counts(ray_app.url)
    texts = asyncio.run(main())
    assert len(texts) == 8 and all(texts)
    after = _router_counts(ray_app.url)
    added = {r: after[r] - before.get(r, 0) for r in after}
    assert sum(added.values()) == 8 and len([n for n in added.values() if n > 0]) == 2, added


def test_errors_keep_the_openai_shape(client, ray_app):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="default", prompt=PROMPT, max_tokens=-1)
    assert e.value.body["param"] == "max_tokens"
    r = httpx.post(f"{ray_app.url}/v1/completions", content=b"{not json", timeout=30,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(f"{ray_app.url}/v1/completions", content=b"x" * (5 << 20), timeout=30)
    assert r.status_code == 413 and "larger than" in r.json()["error"]["message"]
    assert httpx.get(f"{ray_app.url}/health", timeout=30).json() == {"status": "ok"}


@pytest.mark.parametrize("case", ["deep_json", "huge_int", "text_plain", "foreign_host", "tiny_temperature"])
def test_hostile_requests_through_the_ray_ingress_end_4xx(ray_app, case):
    url, headers = f"{ray_app.url}/v1/completions", {"Content-Type": "application/json"}
    body = b'{"prompt": "%s", "max_tokens": 3}' % PROMPT.encode()
    expect = 400
    if case == "deep_json":
        body = b"[" * 50_000 + b"]" * 50_000
    elif case == "huge_int":
        body = b'{"prompt": "hi", "max_tokens": 1' + b"0" * 40 + b"}"
    elif case == "text_plain":
        headers, expect = {"Content-Type": "text/plain"}, 415
    elif case == "foreign_host":
        headers["Host"] = "evil.example"  # DNS rebinding: a page whose domain now points at 127.0.0.1
    else:  # 1e-46 is 0 in float32: greedy, not a division by zero that samples nothing
        body, expect = b'{"prompt": "%s", "max_tokens": 3, "temperature": 1e-46}' % PROMPT.encode(), 200
    r = httpx.post(url, content=body, headers=headers, timeout=60)
    assert r.status_code == expect, r.text
    if expect == 200:
        greedy = httpx.post(url, json={"prompt": PROMPT, "max_tokens": 3, "temperature": 0}, timeout=60)
        assert r.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"] != ""
    else:
        assert set(r.json()["error"]) >= {"message", "type", "code"}
    assert httpx.get(f"{ray_app.url}/health", timeout=30).status_code == 200


def test_a_client_that_leaves_mid_stream_has_its_request_aborted_on_the_replica(ray_app):
    with httpx.Client(timeout=60) as http, http.stream(
            "POST", f"{ray_app.url}/v1/completions",
            json={"prompt": "Once upon a time", "max_tokens": 900, "ignore_eos": True, "stream": True}) as r:
        assert r.status_code == 200
        lines = 0
        for line in r.iter_lines():
            lines += bool(line)
            if lines == 3:
                break  # leave: closing the connection is the disconnect
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if "disconnected mid-stream; request aborted" in Path(ray_app.log.name).read_text(errors="replace"):
            return
        time.sleep(0.5)
    pytest.fail("the replica did not abort the abandoned stream:\n" + ray_app.log_text())


def _router_counts(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith("tokenmill:router_requests_total{"):
            name, value = line.rsplit(" ", 1)
            out[name.split('replica="')[1].split('"')[0]] = float(value)
    return out
