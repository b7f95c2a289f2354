"""`echo` with prompt logprobs on /v1/completions, in the request shapes lm-eval's `local-completions` model
sends for loglikelihood tasks (token-id prompts, max_tokens 1, logprobs 1, echo), and parsed the way it
parses them; the logprobs equal the offline engine's prompt logprobs for the same tokens."""

from __future__ import annotations

import gc
import json
import math

import httpx
import pytest
from server_helpers import ServerProcess, start_server

from tokenmill import LLM, SamplingParams

pytestmark = pytest.mark.slow

CONTEXTS = ["Question: What is the capital of France?\nAnswer:", "The sun rises in the"]
CONTINUATIONS = [[" Paris", " London"], [" east", " west"]]
ENGINE = ["--dtype", "float32", "--quantization", "none"]


@pytest.fixture(scope="module")
def reference():
    """Offline prompt logprobs (top 1) of every context + continuation, and the token ids."""
    llm = LLM(kv_cache_memory="256MiB", dtype="float32", quantization="none")
    tok = llm.tokenizer
    cases = []
    for ctx, conts in zip(CONTEXTS, CONTINUATIONS, strict=True):
        for cont in conts:
            ctx_ids = tok.encode(ctx)
            ids = ctx_ids + tok.encode(cont)
            out = llm.generate([ids], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1),
                               use_tqdm=False)[0]
            lps = [None] + [d[t].logprob for t, d in zip(ids[1:], out.prompt_logprobs[1:], strict=True)]
            cases.append((ids, len(ctx_ids), lps, ctx + cont))
    del llm
    gc.collect()
    return cases


@pytest.fixture(scope="module")
def server(reference) -> ServerProcess:
    s = start_server(*ENGINE)
    yield s
    assert s.stop() == 0, s.log_text()
    s.assert_clean_log()
    s.remove_log()


def _post(server, body: dict) -> dict:
    r = httpx.post(f"{server.url}/v1/completions", json={"model": "default", **body}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_lm_eval_loglikelihood_shape(server, reference):
    # lm-eval batches requests as token lists and reads choices by index: token_logprobs[ctxlen:-1] is the
    # continuation, compared with max(top_logprobs) to decide whether it is the greedy one.
    body = {"prompt": [ids for ids, _, _, _ in reference], "temperature": 0, "max_tokens": 1, "logprobs": 1,
            "seed": 1234, "echo": True}
    res = _post(server, body)
    choices = sorted(res["choices"], key=lambda c: c["index"])
    assert len(choices) == len(reference)
    for (ids, ctxlen, ref_lps, _), c in zip(reference, choices, strict=True):
        lp = c["logprobs"]
        assert len(lp["token_logprobs"]) == len(ids) + 1 == len(lp["top_logprobs"]) == len(lp["tokens"])
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        for got, want in zip(lp["token_logprobs"][1:len(ids)], ref_lps[1:], strict=True):
            assert math.isclose(got, want, abs_tol=1e-4), (got, want)
        cont = lp["token_logprobs"][ctxlen:-1]
        assert len(cont) == len(ids) - ctxlen
        for tok_lp, top in zip(cont, lp["top_logprobs"][ctxlen:-1], strict=True):
            assert len(top) == 1 and tok_lp <= max(top.values()) + 1e-6
        assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
    # the two continuations of each context are told apart
    sums = [sum(c["logprobs"]["token_logprobs"][ctxlen:-1]) for (_, ctxlen, _, _), c in zip(reference, choices, strict=True)]
    assert sums[0] != sums[1] and sums[2] != sums[3]


def test_max_tokens_zero_returns_the_prompt_alone(server, reference):
    ids, _, ref_lps, text = reference[0]
    res = _post(server, {"prompt": text, "max_tokens": 0, "echo": True, "logprobs": 0})
    c = res["choices"][0]
    assert c["text"] == text and c["finish_reason"] == "length"
    assert res["usage"]["completion_tokens"] == 0 and res["usage"]["prompt_tokens"] == len(ids)
    assert len(c["logprobs"]["token_logprobs"]) == len(ids)
    assert "".join(c["logprobs"]["tokens"]) == text


def test_streamed_echo(server, reference):
    text = reference[2][3]
    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=120,
                      json={"model": "default", "prompt": text, "max_tokens": 4, "temperature": 0, "echo": True,
                            "stream": True}) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    streamed = "".join(e["choices"][0]["text"] for e in events)
    plain = _post(server, {"prompt": text, "max_tokens": 4, "temperature": 0, "echo": True})["choices"][0]["text"]
    assert streamed == plain and streamed.startswith(text) and len(streamed) > len(text)


def test_echo_without_max_tokens_zero_still_rejects_zero(server):
    r = httpx.post(f"{server.url}/v1/completions", json={"model": "default", "prompt": "hi", "max_tokens": 0},
                   timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
