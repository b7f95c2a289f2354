"""`tokenmill serve --cascade default,gemma3` through the official openai client: real processes (the router and
two spawned replicas). The logprob signal with a fixed threshold between a prompt the small model answers with
confidence (the larger of 7 and 5: score 0.25, minus the mean logprob of its first 4 tokens) and one it guesses
at (the capital of Mongolia: 0.94): the first is answered by the small model, the second escalated to the large one; a stream
is served either way; a bad request is a 400 with an OpenAI-style body; /metrics counts escalations and compute."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from server_helpers import CliProcess, free_port, parse_metrics

from tokenmill.eval.cascade_tasks import FEW_SHOT

pytestmark = pytest.mark.slow

THRESHOLD = 0.6
EASY = FEW_SHOT + "Q: Which number is larger, 7 or 5? Answer with only the answer, no explanation.\nA:"
HARD = FEW_SHOT + "Q: What is the capital of Mongolia? Answer with only the answer, no explanation.\nA:"


@pytest.fixture(scope="module")
def cascade():
    port = free_port()
    p = CliProcess(["serve", "--cascade", "default,gemma3", "--escalate-threshold", str(THRESHOLD),
                    "--port", str(port), "--kv-cache-memory", "128MiB"], "tokenmill-cascade-")
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    try:
        while True:
            assert p.proc.poll() is None, p.log_text()
            assert time.monotonic() < deadline, p.log_text()
            try:
                if httpx.get(f"{url}/health", timeout=2).json().get("healthy_replicas") == 2:
                    break
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
        yield url
    finally:
        assert p.stop() == 0, p.log_text()


def test_escalates_the_hard_prompt_only(cascade):
    client = openai.OpenAI(base_url=f"{cascade}/v1", api_key="none")
    easy = client.completions.with_raw_response.create(model="cascade", prompt=EASY, max_tokens=4, temperature=0,
                                                       stop=["\n"])
    body = easy.parse()
    info = body.model_extra["cascade"]
    assert info["answered_by"] == "small" and not info["escalated"] and info["score"] < THRESHOLD
    assert body.model == "default" and easy.headers["x-tokenmill-cascade"] == "small"
    assert body.choices[0].text.strip() == "7" and body.choices[0].logprobs is None  # not asked for: stripped

    hard = client.completions.create(model="cascade", prompt=HARD, max_tokens=4, temperature=0, stop=["\n"])
    info = hard.model_extra["cascade"]
    assert info["answered_by"] == "large" and info["escalated"] and info["score"] > THRESHOLD
    assert hard.model == "gemma3"

    # Streams: the small answer as one chunk, the large one relayed.
    for prompt, who in ((EASY, "small"), (HARD, "large")):
        chunks = list(client.completions.create(model="cascade", prompt=prompt, max_tokens=4, temperature=0,
                                                stop=["\n"], stream=True))
        assert "".join(c.choices[0].text for c in chunks if c.choices)
        assert chunks[0].model == ("default" if who == "small" else "gemma3")

    chat = client.chat.completions.create(model="cascade", messages=[{"role": "user", "content": "Say hi."}],
                                          max_tokens=4, temperature=0)
    assert chat.model_extra["cascade"]["answered_by"] in ("small", "large")

    m = parse_metrics(httpx.get(f"{cascade}/metrics").text)
    assert m["tokenmill:cascade_escalations_total"] >= 2
    assert m["tokenmill:cascade_requests_total{answered_by=\"small\"}"] >= 2
    assert m["tokenmill:cascade_flops_total{model=\"small\"}"] > 0
    assert m["tokenmill:cascade_large_only_flops_total"] > 0


def test_bad_request_is_an_openai_error(cascade):
    client = openai.OpenAI(base_url=f"{cascade}/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="cascade", prompt=EASY, max_tokens=-3)
    assert e.value.status_code == 400 and e.value.body["message"]
