"""The default model quantized end to end through `LLM`: it generates, its perplexity on held-out text stays
close to the float model's, the int8 KV cache holds ~4x the tokens of float32 in the same budget (float16
twice), and the int4 load repacks the shipped Q4_1 weights instead of requantizing them."""

from __future__ import annotations

import gc

import pytest

from tokenmill import LLM, SamplingParams
from tokenmill.errors import ConfigError
from tokenmill.eval.quality import agreement, greedy, perplexity, read_text, teacher_forced_top1
from tokenmill.kernels.cpu import native

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Photosynthesis is the process by which",
           "Three facts about the planet Mars:"]
OPTS = dict(kv_cache_memory="64MiB", max_model_len=512, dtype="float32", max_num_batched_tokens=256,
            quantization="none")


def measure(**kw) -> dict:
    llm = LLM(**(OPTS | kw))
    # The whole held-out text (~1,700 tokens, a few seconds): on 190 tokens the perplexity moved 0.6 % between
    # two builds of the same kernels (AVX2 against AVX-512, float sums in another order), too near the bounds.
    ppl = perplexity(llm, read_text(None), window=128).perplexity
    prompt_ids, out = greedy(llm, PROMPTS, 12)
    res = {"ppl": ppl, "prompt_ids": prompt_ids, "out": out, "llm": llm, "kv_storage": llm.engine.runner.kv_storage,
           "blocks": llm.engine.runner.num_blocks, "report": llm.engine.runner.model.weight_report()}
    return res


@pytest.fixture(scope="module")
def float_ref():
    r = measure()
    del r["llm"]
    gc.collect()
    return r


def test_int4_repacks_shipped_weights_and_stays_close(float_ref):
    r = measure(quantization="int4")
    # All 210 Q4_1 projection matrices (30 layers x q,k,v,o,gate,up,down) were repacked, none requantized.
    assert r["report"]["gguf_pieces_repacked_as_shipped"] == 210
    assert set(k for k in r["report"] if k.endswith("_bytes")) == {"int4_bytes", "int8_bytes"}  # int8 head
    # Same weights up to the bf16 activations of the kernels and the int8 LM head: perplexity within 3 %.
    assert abs(r["ppl"] / float_ref["ppl"] - 1) < 0.03, (r["ppl"], float_ref["ppl"])
    forced = teacher_forced_top1(r["llm"], float_ref["prompt_ids"], float_ref["out"])
    ag = agreement(float_ref["out"], r["out"], forced)
    assert ag["teacher_forced_agreement"] >= 0.8, ag
    assert all(o for o in r["out"])


def test_auto_runs_the_shipped_blocks_fast_and_stays_close(float_ref):
    """The default format: the shipped Q4_1 layers as w4a8 and the Q8_0 head as w8a8, none requantized; int8
    activations cost at most 3 % perplexity (issue 16's bound for 4-bit paths) and keep greedy agreement."""
    r = measure(quantization="auto")
    assert r["report"]["gguf_pieces_repacked_as_shipped"] == 211, r["report"]  # 210 projections + the head
    # --kv-cache-dtype auto: float16 beside these block kernels where the native attention reads it, the model
    # dtype beside float weights (the float32 reference stays exact)
    assert r["llm"].engine.runner.kv_storage == ("float16" if native() is not None else "model")
    assert float_ref["kv_storage"] == "model"
    assert {"w4a8_bytes", "w8a8_bytes"} <= set(r["report"]), r["report"]
    assert r["llm"].engine.runner.model.ops.name == "fused"  # the block formats take the fused element-wise ops
    assert abs(r["ppl"] / float_ref["ppl"] - 1) < 0.03, (r["ppl"], float_ref["ppl"])
    forced = teacher_forced_top1(r["llm"], float_ref["prompt_ids"], float_ref["out"])
    ag = agreement(float_ref["out"], r["out"], forced)
    assert ag["teacher_forced_agreement"] >= 0.9, ag


def test_w8a8_stays_within_one_percent(float_ref):
    """w8a8 widens the Q4_1 values to int8 exactly: only the activations round, so 1 % (issue 16's bound
    for 8-bit paths)."""
    r = measure(quantization="w8a8")
    assert r["report"]["gguf_pieces_repacked_as_shipped"] == 211, r["report"]
    assert abs(r["ppl"] / float_ref["ppl"] - 1) < 0.01, (r["ppl"], float_ref["ppl"])
    forced = teacher_forced_top1(r["llm"], float_ref["prompt_ids"], float_ref["out"])
    assert agreement(float_ref["out"], r["out"], forced)["teacher_forced_agreement"] >= 0.9


def test_int8_weights_with_int8_kv_cache(float_ref):
    r = measure(quantization="int8", kv_cache_dtype="int8")
    assert abs(r["ppl"] / float_ref["ppl"] - 1) < 0.05, (r["ppl"], float_ref["ppl"])
    # Same 64 MiB budget: 68 bytes per token-head instead of 256.
    assert r["blocks"] / float_ref["blocks"] > 3.7
    text = r["llm"].generate(PROMPTS[0], SamplingParams(max_tokens=8), use_tqdm=False)[0].outputs[0].text
    assert text.strip()


def test_int8_kv_cache_alone_barely_moves_perplexity(float_ref):
    r = measure(kv_cache_dtype="int8")
    assert abs(r["ppl"] / float_ref["ppl"] - 1) < 0.02, (r["ppl"], float_ref["ppl"])


def test_float16_kv_cache_beside_float_weights_is_all_but_exact(float_ref):
    """A float16 cache holds twice the tokens of a float32 one, and K/V keep 11 significant bits: beside float32
    weights the perplexity moves by less than 0.1 % and greedy decoding agrees on at least 99 % of tokens
    (measured on the AMD EPYC Zen 4: 0.002 % and all 1,024 of `tokenmill eval agreement`'s tokens)."""
    r = measure(kv_cache_dtype="float16")
    assert r["kv_storage"] == "float16"
    assert 1.95 < r["blocks"] / float_ref["blocks"] <= 2
    assert abs(r["ppl"] / float_ref["ppl"] - 1) < 0.001, (r["ppl"], float_ref["ppl"])
    forced = teacher_forced_top1(r["llm"], float_ref["prompt_ids"], float_ref["out"])
    assert agreement(float_ref["out"], r["out"], forced)["teacher_forced_agreement"] >= 0.99


def test_bfloat16_int4_generates_batched():
    llm = LLM(**(OPTS | {"dtype": "bfloat16", "quantization": "int4", "quant_group_size": 64,
                         "kv_cache_dtype": "int8"}))
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 8 for o in outs)


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="quantization"):
        LLM(quantization="int3")
    with pytest.raises(ConfigError, match="kv_cache_dtype"):
        LLM(kv_cache_dtype="fp8")
    with pytest.raises(ConfigError, match="float16 is for a float32 model"):
        LLM(dtype="bfloat16", kv_cache_dtype="float16", kv_cache_memory="16MiB")


def test_eval_cli_perplexity_and_agreement(tmp_path, capsys):
    import json

    from tokenmill.entrypoints.cli import main

    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    common = ["--kv-cache-memory", "32MiB", "--max-model-len", "256", "--dtype", "float32"]
    assert main(["eval", "perplexity", "--text", str(text), "--window", "64", "--json", "--quantization", "int4",
                 *common]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["quantization"] == "int4" and res["tokens"] > 64 and 1 < res["perplexity"] < 1e4
    assert main(["eval", "agreement", "--num-prompts", "2", "--max-tokens", "4", "--json",
                 "--kv-cache-dtype", "int8", *common]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["tokens"] == 8 and 0 <= res["teacher_forced_agreement"] <= 1
    assert main(["eval", "perplexity", "--text", str(tmp_path / "missing.txt"), *common]) == 2
    assert "cannot read text file" in capsys.readouterr().err
