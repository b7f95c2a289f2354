"""Gemma 3 against transformers in float32: a small random-weight model (a 16-token window, so short prompts
outgrow it) and the real Gemma 3 270M GGUF from its wheels (8 prompts, four longer than its 512-token window).
Greedy tokens identical, top-5 logprobs within 1e-3, a prefix-cache hit equal to cold; batched equal to alone and
preempted equal to unpreempted (the small model); and the sliding layers' KV groups hold only their window's
blocks."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from hf_reference import GgufReference, check_logprobs_close, hf_greedy, hf_tokenizer_dir

from tokenmill import LLM, SamplingParams

pytestmark = pytest.mark.slow

VOCAB = 49152  # the small model reuses the default model's tokenizer
S, F = "sliding_attention", "full_attention"
SMALL = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=192, num_hidden_layers=6, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=48, sliding_window=16,
             layer_types=[S, S, F, S, S, F], max_position_embeddings=1024, rms_norm_eps=1e-6,
             tie_word_embeddings=True, initializer_range=0.1,
             rope_parameters={F: {"rope_type": "default", "rope_theta": 1e6},
                              S: {"rope_type": "default", "rope_theta": 1e4}})


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory, gguf_path):
    """A random Gemma 3 saved as a Hugging Face directory, norms varied (they start at zero: 1 + w = 1)."""
    import transformers

    out = tmp_path_factory.mktemp("gemma3-small")
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**SMALL)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(-0.5, 0.5)
    model.save_pretrained(out, safe_serialization=True)
    for f in hf_tokenizer_dir(gguf_path).iterdir():
        shutil.copy(f, out / f.name)
    return out, model


def _tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


def _check_against(greedy, llm, prompts, max_tokens, name, alone=True):
    """greedy(ids, max_tokens): the reference's tokens and top-5 logprobs."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=5, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)  # batched, long prompts chunked
    for n, (ids, out) in enumerate(zip(prompts, outs, strict=True)):
        ref_tokens, ref_tops = greedy(ids, max_tokens)
        o = out.outputs[0]
        ours = [{t: lp.logprob for t, lp in d.items()} for d in o.logprobs]
        assert o.token_ids == ref_tokens, f"{name} prompt {n} ({len(ids)} tokens): greedy tokens differ"
        check_logprobs_close(o.token_ids, ours, ref_tokens, ref_tops, atol=1e-3, name=f"{name} prompt {n}")
        if alone:
            single = llm.generate([ids], params, use_tqdm=False)[0].outputs[0]
            assert single.token_ids == o.token_ids, f"{name} prompt {n}: batched differs from alone"
    return outs


def test_small_gemma3_matches_transformers(small_dir):
    path, model = small_dir
    llm = LLM(str(path), dtype="float32", kv_cache_memory="16MiB", max_num_batched_tokens=64)
    runner = llm.engine.runner
    assert runner.kv_group_windows == (16, 16, None)  # two groups of two sliding layers, one of the two global
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (5, 15, 16, 17, 40, 300)]
    _check_against(lambda ids, n: hf_greedy(model, ids, n), llm, prompts, 24, "small gemma3")


def test_small_gemma3_prefix_hit_and_preemption(small_dir):
    path, _ = small_dir
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist()
               for n in (40, 70, 33, 90, 55, 64, 20, 12, 48, 30, 17, 66)]
    params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
    cold = LLM(str(path), dtype="float32", kv_cache_memory="16MiB", enable_prefix_caching=False)
    ref = _tokens(cold.generate(prompts, params, use_tqdm=False))
    warm = LLM(str(path), dtype="float32", kv_cache_memory="16MiB")
    warm.generate(prompts, params, use_tqdm=False)
    hits = warm.engine.stats().prefix_cache_hits
    assert _tokens(warm.generate(prompts, params, use_tqdm=False)) == ref
    assert warm.engine.stats().prefix_cache_hits > hits
    # 36 blocks of 16 tokens: a request holds up to 10 full-group blocks for its 150 tokens plus 2-3 per sliding
    # group, so a few run at once and outgrow the cache as they decode.
    per_block = cold.engine.runner.model.cfg.kv_block_bytes(16, "auto", 4)
    tight = LLM(str(path), dtype="float32", kv_cache_memory=37 * per_block, enable_prefix_caching=False)
    assert _tokens(tight.generate(prompts, params, use_tqdm=False)) == ref
    assert tight.engine.stats().num_preemptions >= 3


def _decode_blocks(llm, prompt, max_tokens):
    """The most KV blocks one request holds while it decodes, stepping the engine by hand: from its second output
    token on (the step that computes the prompt's last chunk still holds the blocks that chunk's window needed)."""
    eng = llm.engine
    pool = eng.kv.pool
    eng.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    peak, outputs = 0, 0
    while eng.has_unfinished():
        if outputs >= 2:
            peak = max(peak, pool.num_usable_blocks - pool.num_free_blocks)
        outputs += sum(len(u.new_token_ids) for u in eng.step())
    return peak


# ---------------------------------------------------------------------------------------------- Gemma 3 270M


@pytest.fixture(scope="module")
def gemma3_path():
    from tokenmill.models.bundled import gemma3_gguf

    return gemma3_gguf()


@pytest.fixture(scope="module")
def gemma3_llm(gemma3_path):
    return LLM(str(gemma3_path), dtype="float32", quantization="none", kv_cache_memory="160MiB",
               max_num_batched_tokens=512)


@pytest.fixture(scope="module")
def gemma3_prompts(gemma3_llm):
    """8 prompts of held-out text from different offsets (no shared prefix), 4 past the 512-token window."""
    tok = gemma3_llm.tokenizer
    text = (Path(__file__).parents[2] / "tokenmill" / "eval" / "data" / "heldout.txt").read_text()
    ids = tok.encode(text, add_special_tokens=False)
    lengths = (6, 40, 150, 400, 520, 600, 750, 1100)
    bos = [tok.bos_token_id]
    return [bos + ids[7 * i:7 * i + n] for i, n in enumerate(lengths)]


def test_gemma3_270m_matches_transformers(gemma3_path, gemma3_prompts, gemma3_llm):
    assert any(len(p) > 512 for p in gemma3_prompts)
    # batched = alone is the small model's check (the same code); here the reference is what costs
    first = _check_against(GgufReference(gemma3_path).greedy, gemma3_llm, gemma3_prompts, 8, "gemma3 270m",
                           alone=False)
    # the same prompts again: their prefixes are cached now, and the tokens come out the same (the logprobs within
    # float32 GEMM rounding: a step of other rows sums in another order)
    hits = gemma3_llm.engine.stats().prefix_cache_hits
    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=5, ignore_eos=True)
    again = gemma3_llm.generate(gemma3_prompts, params, use_tqdm=False)
    assert gemma3_llm.engine.stats().prefix_cache_hits > hits
    for a, b in zip(first, again, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for da, db in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
            assert da.keys() == db.keys()
            assert all(abs(da[t].logprob - db[t].logprob) < 1e-4 for t in da)


def test_gemma3_270m_auto_format_and_sliding_blocks_freed(gemma3_path, gemma3_prompts):
    """Under --quantization auto the GGUF's Q5_0 / Q4_K / Q6_K matrices run as w8a8 blocks and its Q8_0 embedding as
    the w8a8 head: no float matrix is left (float32 would hold 1 GB). A 1,100-token prompt decoding 30 tokens: the
    3 global layers keep every block (71), the 15 sliding ones, in 5 groups, only their window's (33 or 34 each):
    about half the 6 x 71 blocks of full attention everywhere."""
    from tokenmill.kernels.cpu import block_linear

    if block_linear() is None:
        pytest.skip("no compiler here: the block kernel is not built")
    llm = LLM(str(gemma3_path), kv_cache_memory="160MiB", max_num_batched_tokens=512)
    report = llm.engine.runner.model.weight_report()
    assert report.get("none_bytes", 0) == 0 and report["w8a8_bytes"] > 0, report
    windows = llm.engine.runner.kv_group_windows
    assert windows.count(None) == 1 and windows.count(512) == 5
    prompt = gemma3_prompts[-1]
    total = -(-(len(prompt) + 30) // 16)
    held = _decode_blocks(llm, prompt, 30)
    assert total + 5 * 32 <= held <= total + 5 * (512 // 16 + 2)


@pytest.mark.parametrize("kv", ["auto", "int8"])
def test_small_gemma3_native_decoder_equals_the_loop(small_dir, kv, monkeypatch):
    """On the block formats the whole Gemma step runs in decoder.cpp; it computes what Gemma3Model's Python loop
    computes over the same kernels, bit for bit: the same tokens and the same logprobs, prompts past the window
    among them, with a plain or an int8 KV cache."""
    from tokenmill.kernels.cpu import decoder

    if decoder() is None:
        pytest.skip("no compiler here: the native decoder is not built")
    path, _ = small_dir
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (3, 17, 70, 150)]
    params = SamplingParams(temperature=0.0, max_tokens=12, logprobs=5, ignore_eos=True)
    runs = {}
    for native in ("1", "0"):
        monkeypatch.setenv("TOKENMILL_NATIVE_DECODER", native)
        llm = LLM(str(path), dtype="float32", quantization="w8a8", kv_cache_dtype=kv, kv_cache_memory="16MiB",
                  max_num_batched_tokens=64)
        assert (llm.engine.runner.model.native is not None) == (native == "1")
        outs = llm.generate(prompts, params, use_tqdm=False)
        runs[native] = [(o.outputs[0].token_ids, [{t: lp.logprob for t, lp in d.items()} for d in o.outputs[0].logprobs])
                        for o in outs]
    assert runs["1"] == runs["0"]
