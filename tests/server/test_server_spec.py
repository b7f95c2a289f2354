"""A server speculating with prompt lookup: the official openai client gets the same greedy text as the
offline engine without speculation, and the spec_decode counters appear in /metrics."""

from __future__ import annotations

import openai
import pytest
from server_helpers import start_server

from tokenmill import LLM, SamplingParams

pytestmark = pytest.mark.slow

PROMPT = "red green blue red green blue red green blue red"


@pytest.fixture(scope="module")
def server():
    s = start_server("--speculative", "ngram", "--num-speculative-tokens", "3", "--dtype", "float32")
    yield s
    s.stop()
    s.assert_clean_log()
    s.remove_log()


def test_greedy_text_unchanged_and_counters_exported(server):
    ref = LLM(kv_cache_memory="64MiB", dtype="float32").generate(
        PROMPT, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True), use_tqdm=False)[0].outputs[0].text
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
    out = client.completions.create(model="default", prompt=PROMPT, max_tokens=16, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].text == ref
    m = server.metrics()
    assert m["tokenmill:spec_decode_num_drafts_total"] > 0
    assert 0 < m["tokenmill:spec_decode_num_accepted_tokens_total"] <= m["tokenmill:spec_decode_num_draft_tokens_total"]
    per_pos = [m[f'tokenmill:spec_decode_num_accepted_tokens_per_pos_total{{position="{i}"}}'] for i in range(3)]
    assert sum(per_pos) == m["tokenmill:spec_decode_num_accepted_tokens_total"]
