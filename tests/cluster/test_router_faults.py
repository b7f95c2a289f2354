"""`kill -9` of a replica under load, behind `tokenmill router --spawn 2 --mock`.

Each mock replica runs at most 4 sequences at once, so of the requests routed to the victim, some are
streaming tokens and the rest wait in its queue without a first token when it dies. Expected: the waiting
ones are retried on the other replica and complete; the started streams end with a clear error event (the
openai client raises APIError); the router stays up; the supervisor restarts the replica and it rejoins.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import openai
import pytest
from router_helpers import start_router

pytestmark = pytest.mark.slow

MAX_TOKENS = 120
REQUESTS = 16


@pytest.fixture(scope="module")
def router():
    r = start_router("--spawn", "2", "--mock", "--routing", "round-robin", "--health-interval", "0.5",
                     "--health-timeout", "1.5",
                     "--max-num-seqs", "4", "--replica-args=--mock-base-ms 25 --mock-decode-ms-per-seq 1",
                     replicas=2)
    yield r
    assert r.stop() == 0, r.log_text()
    log = r.own_log()
    print(log)  # shown by pytest -s, or when a test fails
    assert "Traceback" not in log, log


def test_kill_9_under_load(router):
    victim = next(r for r in router.replicas() if r["name"] == "replica-0")
    results: dict[int, tuple[str, int, str]] = {}  # i -> (outcome, tokens before the end, detail)
    first_tokens = 0

    async def one(aclient: openai.AsyncOpenAI, i: int) -> None:
        nonlocal first_tokens
        prompt = f"Request {i}: tell me everything about rivers and stones."
        if i % 4 == 2:  # non-streaming requests too (round-robin puts them on the victim): retried whenever they fail
            try:
                r = await aclient.completions.create(model="default", prompt=prompt, max_tokens=MAX_TOKENS)
                results[i] = ("complete", r.usage.completion_tokens, "")
            except openai.APIError as e:
                results[i] = ("error", 0, str(e))
            return
        n = 0
        try:
            stream = await aclient.completions.create(model="default", prompt=prompt, max_tokens=MAX_TOKENS,
                                                      stream=True, logprobs=0)
            async for c in stream:
                k = len(c.choices[0].logprobs.tokens) if c.choices and c.choices[0].logprobs else 0
                if k and n == 0:
                    first_tokens += 1
                n += k
            results[i] = ("complete", n, "")
        except openai.APIError as e:
            results[i] = ("error", n, str(e))

    async def run() -> None:
        aclient = openai.AsyncOpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0, timeout=120)
        try:
            tasks = [asyncio.create_task(one(aclient, i)) for i in range(REQUESTS)]
            # Kill once both replicas are streaming their first four requests (the rest are queued).
            deadline = time.monotonic() + 60
            while first_tokens < 6 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert first_tokens >= 6, "streams never started"
            os.kill(victim["pid"], signal.SIGKILL)
            await asyncio.wait_for(asyncio.gather(*tasks), 120)  # nothing hangs
        finally:
            await aclient.close()

    asyncio.run(run())
    assert len(results) == REQUESTS
    errors = {i: r for i, r in results.items() if r[0] == "error"}
    complete = {i: r for i, r in results.items() if r[0] == "complete"}
    # Every stream that failed had started, and says why; nothing failed before its first token.
    assert errors, "the kill cut no stream: the test did not exercise a mid-stream failure"
    for i, (_, n, detail) in errors.items():
        assert n > 0, (i, detail)
        assert "failed after the response started" in detail, detail
    for i, (_, n, _) in complete.items():
        assert n == MAX_TOKENS, (i, n)
    # Non-streaming requests have sent the client nothing until they are done: every one completes.
    assert all(i in complete for i in range(REQUESTS) if i % 4 == 2), results
    m = router.metrics()
    assert sum(v for k, v in m.items() if k.startswith("tokenmill:router_retries_total")) >= 1
    assert m['tokenmill:router_stream_errors_total{replica="replica-0"}'] == len(errors)
    # Queued requests on the victim were retried: more complete than the other replica alone was given.
    assert len(complete) > REQUESTS // 2

    # The router stayed up; the supervisor restarted the victim and it rejoined the rotation.
    router.wait_healthy(2, timeout=120)
    reborn = next(r for r in router.replicas() if r["name"] == "replica-0")
    assert reborn["pid"] != victim["pid"] and reborn["state"] == "healthy"
    assert router.metrics()['tokenmill:router_replica_restarts_total{replica="replica-0"}'] == 1
    client = openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0, timeout=60)
    served = {client.completions.with_raw_response.create(model="default", prompt="again", max_tokens=2)
              .headers["x-tokenmill-replica"] for _ in range(4)}
    assert served == {"replica-0", "replica-1"}


def test_a_hung_replica_leaves_the_rotation_and_nothing_waits_on_it(router):
    """SIGSTOP: the replica is alive but silent. Its stream ends with an error once health checks give up on
    it, the other replica's stream completes; with both hung the router answers 503 instead of hanging."""
    reps = {r["name"]: r for r in router.replicas()}
    client = openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0, timeout=120)
    streams = [client.completions.create(model="default", prompt=f"Stream {i}", max_tokens=200, stream=True)
               for i in range(2)]
    firsts = [next(iter(s)) for s in streams]  # round-robin: one stream on each replica, both started
    assert all(f.choices[0].text is not None for f in firsts)
    victim = reps["replica-0"]["pid"]
    os.kill(victim, signal.SIGSTOP)
    outcomes = []
    try:
        for s in streams:
            try:
                n = sum(1 for _ in s)
                outcomes.append(("complete", n))
            except openai.APIError as e:
                outcomes.append(("error", str(e)))
        assert sorted(o[0] for o in outcomes) == ["complete", "error"], outcomes
        assert any("failed after the response started" in str(o[1]) for o in outcomes), outcomes
        assert next(r for r in router.replicas() if r["name"] == "replica-0")["state"] == "unhealthy"

        other = reps["replica-1"]["pid"]
        os.kill(other, signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 60
            while any(r["state"] == "healthy" for r in router.replicas()) and time.monotonic() < deadline:
                time.sleep(0.2)
            with pytest.raises(openai.APIStatusError) as e:
                client.completions.create(model="default", prompt="anyone?", max_tokens=2)
            assert e.value.status_code == 503 and "no healthy replica" in str(e.value)
        finally:
            os.kill(other, signal.SIGCONT)
    finally:
        os.kill(victim, signal.SIGCONT)
    router.wait_healthy(2, timeout=60)


def test_sigterm_drains_a_replica_and_it_stays_stopped(router):
    """An operator's `kill PID`: the replica drains (its stream completes), leaves the set, and is not
    restarted; the router carries on with the other one."""
    client = openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0, timeout=120)
    streams = [client.completions.create(model="default", prompt=f"Drain {i}", max_tokens=60, stream=True)
               for i in range(2)]
    for s in streams:
        next(iter(s))
    pid = next(r["pid"] for r in router.replicas() if r["name"] == "replica-1")
    os.kill(pid, signal.SIGTERM)
    for s in streams:
        assert sum(1 for _ in s) > 0  # both finish: the draining one too
    deadline = time.monotonic() + 60
    while any(r["name"] == "replica-1" for r in router.replicas()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [r["name"] for r in router.replicas()] == ["replica-0"]
    served = {client.completions.with_raw_response.create(model="default", prompt="still there?", max_tokens=2)
              .headers["x-tokenmill-replica"] for _ in range(3)}
    assert served == {"replica-0"}
    assert router.metrics().get('tokenmill:router_replica_restarts_total{replica="replica-1"}', 0) == 0
