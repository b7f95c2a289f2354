"""The default model, end to end, against transformers loading the same GGUF (float32)."""

from __future__ import annotations

import pytest
from hf_reference import check_logprobs_close

from tokenmill import LLM, SamplingParams

pytestmark = pytest.mark.slow

LONG = " ".join(
    f"Paragraph {i}: the mill turned grain into flour for the village, and every season the miller "
    f"wrote down how many sacks came in and how many went out, with the weather beside each entry."
    for i in range(20)
)
RAW = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a land far away,",
    "1, 2, 3, 5, 8, 13,",
    LONG + "\nSummary of the ledger:",
]
CHATS = [
    [{"role": "user", "content": "What is the boiling point of water at sea level?"}],
    [{"role": "system", "content": "You answer in one short sentence."},
     {"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "Read this and tell me what the miller recorded.\n\n" + LONG}],
]


@pytest.fixture(scope="module")
def llm(gguf_path):
    return LLM(str(gguf_path), dtype="float32", quantization="none", kv_cache_memory="256MiB", max_num_batched_tokens=512)


@pytest.fixture(scope="module")
def prompt_ids(llm):
    ids = [llm.tokenizer.encode(p) for p in RAW]
    ids += [llm.tokenizer.encode(llm.tokenizer.apply_chat_template(c), add_special_tokens=False) for c in CHATS]
    assert len(ids) >= 8 and max(len(i) for i in ids) > 500
    return ids


def test_greedy_tokens_and_logprobs_match_transformers(llm, default_reference, prompt_ids):
    params = SamplingParams(temperature=0.0, max_tokens=32, logprobs=5, ignore_eos=True)
    outs = llm.generate(prompt_ids, params, use_tqdm=False)  # all prompts batched together
    for n, (ids, out) in enumerate(zip(prompt_ids, outs, strict=True)):
        ref_tokens, ref_tops = default_reference.greedy(ids, 32)
        o = out.outputs[0]
        ours_tops = [{t: lp.logprob for t, lp in d.items()} for d in o.logprobs]
        assert o.token_ids == ref_tokens, f"prompt {n}: greedy tokens differ from transformers"
        check_logprobs_close(o.token_ids, ours_tops, ref_tokens, ref_tops, atol=1e-3, name=f"prompt {n}")


def test_batched_equals_one_by_one(llm, prompt_ids):
    # 16 tokens: every short prompt's output crosses a block boundary; each float32 decode step costs ~55 ms
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    many = (prompt_ids * 2)[:12]
    mixed = [p[: 3 + 37 * i % max(4, len(p))] for i, p in enumerate(many)]  # 12 mixed lengths, every prompt
    batched = [o.outputs[0].token_ids for o in llm.generate(mixed, params, use_tqdm=False)]
    single = [llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in mixed]
    assert batched == single


def test_prefix_hit_equals_cold(llm, gguf_path, prompt_ids):
    """The module's engine (prefix caching on, 512-token steps) against a cold one with 1024-token steps: the
    hits and the chunking both differ, and the tokens do not."""
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    cold = LLM(str(gguf_path), dtype="float32", quantization="none", kv_cache_memory="128MiB", enable_prefix_caching=False)
    ref = [o.outputs[0].token_ids for o in cold.generate(prompt_ids, params, use_tqdm=False)]
    warm = llm
    warm.generate(prompt_ids, params, use_tqdm=False)
    hits_before = warm.engine.stats().prefix_cache_hits
    again = [o.outputs[0].token_ids for o in warm.generate(prompt_ids, params, use_tqdm=False)]
    assert warm.engine.stats().prefix_cache_hits > hits_before
    assert again == ref


def test_preemption_keeps_greedy_output(llm, gguf_path, prompt_ids):
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    short = [p[:60] for p in prompt_ids]
    ref = [o.outputs[0].token_ids for o in llm.generate(short, params, use_tqdm=False)]
    # 7 blocks of 16 tokens, each request needs up to 6: the engine preempts over and over.
    per_block = 2 * 30 * 16 * 3 * 64 * 4
    tight = LLM(str(gguf_path), dtype="float32", quantization="none", kv_cache_memory=7 * per_block, enable_prefix_caching=False)
    got = [o.outputs[0].token_ids for o in tight.generate(short, params, use_tqdm=False)]
    assert got == ref
    assert tight.engine.stats().num_preemptions >= 3


def test_abandoned_steps_keep_greedy_output(llm, prompt_ids):
    """Steps abandoned part-way through the real model (its first layers had written this step's K/V) and
    redone: the same greedy tokens as without. Each arrival has a better priority level than the running
    requests, so fcfs abandons the step for it."""
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    prompts = [p[:80] for p in prompt_ids[:6]]
    ref = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    eng = llm.engine
    interrupted = eng.num_interrupted_steps
    for i in range(3):
        eng.add_request(prompts[i], params, request_id=f"run{i}", priority=1)
    arrivals = list(range(3, 6))

    def poll() -> bool:  # one arrival per step, while the step runs
        if not arrivals:
            return False
        i = arrivals.pop(0)
        eng.add_request(prompts[i], params, request_id=f"run{i}", priority=0)
        return True

    got: dict[str, list[int]] = {}
    while eng.has_unfinished():
        for u in eng.step(poll):
            got.setdefault(u.request_id, []).extend(u.new_token_ids)
    assert eng.num_interrupted_steps - interrupted >= 2  # the redo after each is not offered to stop
    assert [got[f"run{i}"] for i in range(6)] == ref


def test_n_and_seed_reproduce(llm):
    p = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=20, n=3, seed=1234)
    a = llm.generate("Write a haiku about flour.", p, use_tqdm=False)[0]
    b = llm.generate(["Write a haiku about flour.", "unrelated prompt in the batch"], p, use_tqdm=False)[0]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) > 1, "the n completions should differ"
