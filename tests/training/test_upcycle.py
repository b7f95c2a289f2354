"""`tokenmill upcycle` on the default model, briefly: the Mixtral directory it writes loads in transformers and
in tokenmill with identical greedy tokens in float32 and close logprobs; the report holds the quality figures."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from hf_reference import check_logprobs_close, hf_greedy

pytestmark = pytest.mark.slow


def test_upcycle_writes_a_mixtral_that_transformers_and_tokenmill_agree_on(tmp_path):
    import transformers

    from tokenmill import LLM, SamplingParams

    out = tmp_path / "moe"
    r = subprocess.run([sys.executable, "-m", "tokenmill.entrypoints.cli", "upcycle", "--out", str(out), "--experts",
                        "2", "--top-k", "1", "--steps", "2", "--batch-size", "2", "--seq-len", "32", "--num-prompts",
                        "2", "--samples-per-prompt", "1", "--gen-tokens", "16", "--eval-prompts", "2", "--eval-tokens", "256",
                        "--train-experts"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((out / "upcycle.json").read_text())
    assert len(summary["losses"]) == 2 and all(x >= 0 for x in summary["losses"])
    q = summary["quality"]
    assert q["perplexity_tokens"] == 256 - 2  # two windows of 128, each predicting from its second token
    # Two noisy copies of each MLP, one chosen per token, stay close to the dense model.
    assert abs(q["moe_perplexity"] / q["dense_perplexity"] - 1) < 0.1, q
    assert q["teacher_forced_agreement"] >= 0.8, q
    assert (out / "loss.png").stat().st_size > 0

    model = transformers.MixtralForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    llm = LLM(str(out), dtype="float32", quantization="none", kv_cache_memory="64MiB")
    assert llm.engine.runner.model.layers[0].moe.num_experts == 2
    prompts = [llm.tokenizer.encode(t) for t in ("The capital of France is", "def fibonacci(n):")]
    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=5, ignore_eos=True)
    for ids, o in zip(prompts, llm.generate(prompts, params, use_tqdm=False), strict=True):
        ref_tokens, ref_tops = hf_greedy(model, ids, 8)
        got = o.outputs[0]
        assert got.token_ids == ref_tokens
        ours = [{t: lp.logprob for t, lp in d.items()} for d in got.logprobs]
        check_logprobs_close(got.token_ids, ours, ref_tokens, ref_tops, atol=1e-3, name="upcycled")
