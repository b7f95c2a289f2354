"""Speculative decoding never changes greedy output: the default model in float32, 16 prompts batched,
a KV cache small enough to force preemption; ngram proposals, a random-weight draft (nearly all
rejected) and the target as its own draft (nearly all accepted)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from tokenmill import LLM, SamplingParams
from tokenmill.models.loader import _arch_from_config, expected_shapes, open_model

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return",
    "1, 2, 3, 4, 5, 6, 7,",
    "Repeat after me: the quick brown fox jumps over the lazy dog. The quick brown",
    "Once upon a time",
    "<|im_start|>user\nName three colors.<|im_end|>\n<|im_start|>assistant\n",
    "import numpy as np\nx = np.zeros(3)\ny = np.zeros(3)\nz =",
    "Q: What is 2 + 2?\nA: 4\nQ: What is 3 + 3?\nA:",
    "The mitochondria is",
    "a b c d e f g h a b c d",
    "Dear Sir or Madam,",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
    "for i in range(10):\n    print(i)\nfor j in range(10):\n",
    "Paris, London, Berlin, Madrid, Rome, Paris, London,",
    "The best way to learn programming is",
    "red green blue red green blue red",
]
MAX_TOKENS = 16
# float32 weights: the exact reference, where even a preempted request's recomputed K/V is bit-identical.
ENGINE = dict(dtype="float32", quantization="none", kv_cache_memory="10MiB", max_model_len=512,
              max_num_batched_tokens=256)


def _params(i: int, max_tokens: int) -> SamplingParams:
    # Half the prompts ask for logprobs: speculative steps must return those of the emitted tokens.
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=2 if i % 2 else None)


def _run(max_tokens: int = MAX_TOKENS, **opts):
    if "speculative" in opts:
        opts.setdefault("speculative_max_batch", len(PROMPTS))  # speculate in every step, all 16 at once
    llm = LLM("default", **{**ENGINE, **opts})
    outs = llm.generate(PROMPTS, [_params(i, max_tokens) for i in range(len(PROMPTS))], use_tqdm=False)
    return [o.outputs[0] for o in outs], llm.engine.stats()


@pytest.fixture(scope="module")
def plain():
    outs, stats = _run(kv_cache_memory="64MiB")
    assert stats.num_preemptions == 0
    return outs


def _check_same(plain_outs, outs, stats):
    """outs equal the plain outputs, or their prefixes when they were asked for fewer tokens (greedy)."""
    n = len(outs[0].token_ids)
    assert [o.token_ids for o in outs] == [o.token_ids[:n] for o in plain_outs]
    assert stats.num_preemptions > 0, "the small KV cache should have forced preemption"
    for a, b in zip(outs, plain_outs, strict=True):
        if b.logprobs is None:
            assert a.logprobs is None
            continue
        assert len(a.logprobs) == n
        for la, lb in zip(a.logprobs, b.logprobs[:n], strict=True):
            assert la.keys() == lb.keys()
            for t in la:
                assert la[t].logprob == pytest.approx(lb[t].logprob, abs=1e-3)


def test_ngram_speculation_is_exact_on_the_block_formats():
    """The default fast path (w4a8 layers, w8a8 head): verification rows run the same kernel as decodes,
    one row's arithmetic independent of its neighbours, so speculation changes nothing, logprobs included."""
    plain_outs, _ = _run(kv_cache_memory="64MiB", quantization="auto")
    outs, stats = _run(speculative="ngram", num_speculative_tokens=4, kv_cache_memory="64MiB", quantization="auto")
    assert stats.spec_num_accepted_tokens > 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain_outs]
    for a, b in zip(outs, plain_outs, strict=True):
        assert (a.logprobs is None) == (b.logprobs is None)
        for la, lb in zip(a.logprobs or [], b.logprobs or [], strict=True):
            assert {t: v.logprob for t, v in la.items()} == {t: v.logprob for t, v in lb.items()}


def _logprob_dicts(outs) -> list:
    return [[{t: v.logprob for t, v in step.items()} for step in (o.logprobs or [])] for o in outs]


def test_a_position_computes_the_same_cold_chunked_after_a_prefix_hit_and_batched():
    """The default fast path: every prompt position on the dense copy (called with enough rows to round the
    same in any call), every output position on the block kernel, every query row's attention on the paged
    kernel to its own position. So the way a step is cut never shows in the numbers: bit-identical logprobs
    for each prompt alone, all 16 batched, prefilled in 7-token chunks, and again after prefix-cache hits."""
    opts = dict(quantization="auto", kv_cache_memory="64MiB", enable_prefix_caching=False)
    alone = []
    llm = LLM("default", **{**ENGINE, **opts})
    for i, p in enumerate(PROMPTS):
        alone += [o.outputs[0] for o in llm.generate([p], _params(i, MAX_TOKENS), use_tqdm=False)]
    del llm
    batched, _ = _run(**opts)
    chunked, _ = _run(**{**opts, "max_num_batched_tokens": 7})
    warm = LLM("default", **{**ENGINE, **opts, "enable_prefix_caching": True})
    params = [_params(i, MAX_TOKENS) for i in range(len(PROMPTS))]
    warm.generate(PROMPTS, params, use_tqdm=False)
    hits = warm.engine.stats().prefix_cache_hits
    again = [o.outputs[0] for o in warm.generate(PROMPTS, params, use_tqdm=False)]
    assert warm.engine.stats().prefix_cache_hits > hits
    want = [o.token_ids for o in alone]
    for name, outs in (("batched", batched), ("chunked", chunked), ("prefix hit", again)):
        assert [o.token_ids for o in outs] == want, name
        assert _logprob_dicts(outs) == _logprob_dicts(alone), name


def test_ngram_speculation_is_exact(plain):
    outs, stats = _run(speculative="ngram", num_speculative_tokens=4)
    _check_same(plain, outs, stats)
    assert stats.spec_num_accepted_tokens > 0


def test_random_draft_speculation_is_exact(plain, tmp_path, gguf_path):
    target = open_model(str(gguf_path)).arch
    cfg = {"model_type": "llama", "vocab_size": target.vocab_size, "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 1024, "tie_word_embeddings": True, "rms_norm_eps": 1e-5}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)
    shapes = expected_shapes(_arch_from_config(tmp_path / "config.json", cfg, {}), include_lm_head=False)
    save_file({n: torch.randn(s, generator=g) * 0.2 for n, s in shapes.items()}, str(tmp_path / "model.safetensors"))
    outs, stats = _run(max_tokens=8, speculative="draft", draft_model=str(tmp_path), num_speculative_tokens=2)
    _check_same(plain, outs, stats)
    assert stats.spec_num_draft_tokens > 0


def test_target_as_its_own_draft_is_exact_and_accepted(plain, gguf_path):
    # Fewer tokens: the draft costs as much as the target here.
    outs, stats = _run(max_tokens=8, speculative="draft", draft_model=str(gguf_path), num_speculative_tokens=2)
    _check_same(plain, outs, stats)
    # The same weights propose what the target picks: nearly every proposal is accepted.
    assert stats.spec_num_accepted_tokens >= 0.9 * stats.spec_num_draft_tokens > 0


def test_seeded_sampling_with_speculation_reproduces_in_any_batch():
    llm = LLM("default", dtype="float32", kv_cache_memory="64MiB", max_model_len=512, speculative="ngram",
              num_speculative_tokens=4, speculative_max_batch=4)  # speculate in the batch of 3 too
    seeded = SamplingParams(temperature=0.8, seed=42, max_tokens=10, ignore_eos=True)
    alone = llm.generate(PROMPTS[3], seeded, use_tqdm=False)[0].outputs[0].token_ids
    before = llm.engine.stats().spec_num_draft_tokens
    batched = llm.generate([PROMPTS[0], PROMPTS[3], PROMPTS[9]],
                           [SamplingParams(temperature=1.0, max_tokens=10), seeded,
                            SamplingParams(temperature=0.0, max_tokens=10)], use_tqdm=False)
    assert batched[1].outputs[0].token_ids == alone
    assert llm.engine.stats().spec_num_draft_tokens > before > 0
