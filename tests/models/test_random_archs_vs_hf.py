"""Small random-weight Llama, Mistral and Qwen2 models, saved as Hugging Face directories and loaded
through the HF path: greedy tokens identical to transformers, logprobs close."""

from __future__ import annotations

import pytest
import torch
from hf_reference import check_logprobs_close, hf_greedy, hf_tokenizer_dir

from tokenmill import LLM, SamplingParams

pytestmark = pytest.mark.slow

VOCAB = 49152  # the default model's tokenizer is reused, so the vocabulary matches it

COMMON = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
              num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
              initializer_range=0.2, rms_norm_eps=1e-6)

CASES = {
    "llama3-rope-scaled": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_theta=500000.0, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 256})),
    "llama-tied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None, tie_word_embeddings=False)),
    "qwen2-bias": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False, use_sliding_window=False)),
}


@pytest.fixture(scope="module")
def tokenizer_dir(gguf_path):
    return hf_tokenizer_dir(gguf_path)


@pytest.mark.parametrize("case", sorted(CASES))
def test_random_model_matches_transformers(case, tmp_path, tokenizer_dir):
    import shutil

    import transformers

    cfg_cls, model_cls, extra = CASES[case]
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_cls)(**COMMON, **extra)
    model = getattr(transformers, model_cls)(cfg).eval()
    if case == "qwen2-bias":  # biases start at zero: make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    model.save_pretrained(tmp_path, safe_serialization=True)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)

    llm = LLM(str(tmp_path), dtype="float32", kv_cache_memory="32MiB", max_num_batched_tokens=64)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (5, 37, 300)]
    params = SamplingParams(temperature=0.0, max_tokens=16, logprobs=5, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for n, (ids, out) in enumerate(zip(prompts, outs, strict=True)):
        ref_tokens, ref_tops = hf_greedy(model, ids, 16)
        o = out.outputs[0]
        ours = [{t: lp.logprob for t, lp in d.items()} for d in o.logprobs]
        assert o.token_ids == ref_tokens, f"{case} prompt {n}: greedy tokens differ"
        check_logprobs_close(o.token_ids, ours, ref_tokens, ref_tops, atol=1e-3, name=f"{case} prompt {n}")
