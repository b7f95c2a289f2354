"""Small random-weight mixture-of-experts models (Mixtral, Qwen2-MoE with a shared expert and a dense layer,
Qwen3-MoE with per-head q/k norms, OLMoE with whole-projection q/k norms and clipping), saved as Hugging Face
directories: greedy tokens identical to transformers in float32 and top-5 logprobs within 1e-3, batched equal
to one by one, and only the experts some token chose run."""

from __future__ import annotations

import shutil

import pytest
import torch
from hf_reference import check_logprobs_close, hf_greedy, hf_tokenizer_dir

from tokenmill import LLM, SamplingParams
from tokenmill.kernels.cpu import native

pytestmark = pytest.mark.slow

VOCAB = 49152  # the default model's tokenizer is reused, so the vocabulary matches it
COMMON = dict(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
              max_position_embeddings=1024, initializer_range=0.2, rms_norm_eps=1e-6, tie_word_embeddings=False,
              num_experts_per_tok=2)

CASES = {
    "mixtral": ("MixtralConfig", dict(intermediate_size=96, num_local_experts=8, sliding_window=None)),
    "qwen2-moe-shared": ("Qwen2MoeConfig", dict(
        intermediate_size=160, moe_intermediate_size=64, shared_expert_intermediate_size=96, num_experts=8,
        mlp_only_layers=[1], norm_topk_prob=False, use_sliding_window=False)),
    "qwen3-moe": ("Qwen3MoeConfig", dict(intermediate_size=160, moe_intermediate_size=64, num_experts=8, head_dim=32,
                                         norm_topk_prob=True, use_sliding_window=False)),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=64, num_experts=8, clip_qkv=3.0, norm_topk_prob=False)),
}


@pytest.fixture(scope="module")
def tokenizer_dir(gguf_path):
    return hf_tokenizer_dir(gguf_path)


def build(case: str, out, tokenizer_dir):
    import transformers

    cfg_cls, extra = CASES[case]
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_cls)(**COMMON, **extra)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1 and p.abs().sum() == 0:  # biases start at zero: make them matter
                p.normal_(0, 0.5)
            elif p.dim() == 1:  # norms start at one: vary them (q/k norms among them)
                p.uniform_(0.5, 1.5)
    model.save_pretrained(out, safe_serialization=True)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_moe_model_matches_transformers(case, tmp_path, tokenizer_dir):
    model = build(case, tmp_path, tokenizer_dir)
    llm = LLM(str(tmp_path), dtype="float32", kv_cache_memory="32MiB", max_num_batched_tokens=64)
    layers = llm.engine.runner.model.layers
    assert [layer.moe is not None for layer in layers] == ([True, False, True] if case == "qwen2-moe-shared"
                                                           else [True] * 3)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (5, 37, 300)]
    params = SamplingParams(temperature=0.0, max_tokens=16, logprobs=5, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)  # batched, the long prompt chunked
    for n, (ids, out) in enumerate(zip(prompts, outs, strict=True)):
        ref_tokens, ref_tops = hf_greedy(model, ids, 16)
        o = out.outputs[0]
        ours = [{t: lp.logprob for t, lp in d.items()} for d in o.logprobs]
        assert o.token_ids == ref_tokens, f"{case} prompt {n}: greedy tokens differ"
        check_logprobs_close(o.token_ids, ours, ref_tokens, ref_tops, atol=1e-3, name=f"{case} prompt {n}")
        alone = llm.generate([ids], params, use_tqdm=False)[0].outputs[0]
        assert alone.token_ids == o.token_ids, f"{case} prompt {n}: batched differs from alone"
    moe = layers[0].moe
    routed = sum(moe.expert_tokens)
    assert routed > 0 and routed % moe.top_k == 0  # every token routed to exactly top_k experts


def test_only_chosen_experts_run(tmp_path, tokenizer_dir):
    """An expert no token of the step chose runs no matmul; each chosen one runs once per step."""
    build("mixtral", tmp_path, tokenizer_dir)
    llm = LLM(str(tmp_path), dtype="float32", kv_cache_memory="32MiB")
    moe = llm.engine.runner.model.layers[0].moe
    calls = [0] * moe.num_experts

    def counting(e, lin):
        def call(x, rows=None):
            calls[e] += 1
            return lin(x, rows)
        return call

    moe.gate_up = [counting(e, lin) for e, lin in enumerate(moe.gate_up)]
    h = torch.randn(3, 128)
    _, experts = moe.route(h)
    moe(h, lambda gu: torch.nn.functional.silu(gu[:, :96]) * gu[:, 96:])
    chosen = set(experts.flatten().tolist())
    assert calls == [1 if e in chosen else 0 for e in range(moe.num_experts)]
    assert len(chosen) < moe.num_experts  # 3 tokens x 2 of 8: some expert idles


def test_moe_experts_run_in_the_block_formats(tmp_path, tokenizer_dir):
    """Experts are ordinary linears: as w8a8 blocks (int8 activations) an MoE layer's output stays within a few
    percent of the float layer's on the same input (the router stays float, so the routing is the same)."""
    build("qwen2-moe-shared", tmp_path, tokenizer_dir)
    ref = LLM(str(tmp_path), dtype="float32", kv_cache_memory="32MiB").engine.runner.model
    model = LLM(str(tmp_path), dtype="float32", kv_cache_memory="32MiB", quantization="w8a8").engine.runner.model
    assert {lin.kind for lin in model.layers[0].moe.linears()} == {"w8a8"}
    h = torch.randn(6, 128, generator=torch.Generator().manual_seed(2))
    assert torch.equal(ref.layers[0].moe.route(h)[1], model.layers[0].moe.route(h)[1])
    want, got = ref.layers[0].mlp(h, ref.ops, None), model.layers[0].mlp(h, model.ops, None)
    assert ((got - want).norm() / want.norm()).item() < 0.03


@pytest.mark.parametrize("case, dtype", [(c, "float32") for c in sorted(CASES)] + [("qwen2-moe-shared", "bfloat16")])
def test_native_decoder_runs_moe_layers_bit_for_bit(case, dtype, tmp_path, tokenizer_dir):
    """In the block formats an MoE model's decode steps run on the native decoder (routing, the one-token path,
    the grouped path, the shared expert, the q/k norms and clamp) and give what the Python loop gives, bit for
    bit; both count the expert load. bfloat16 (one tiny model: the dtype is what this case is about) takes the
    decoder's tensor-op combine instead of float32's native one."""
    build(case, tmp_path, tokenizer_dir)
    llm = LLM(str(tmp_path), dtype=dtype, kv_cache_memory="32MiB", quantization="w8a8",
              enable_prefix_caching=False)
    model = llm.engine.runner.model
    assert model.native is not None
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (7, 19, 30)]
    params = SamplingParams(temperature=0.0, max_tokens=12, logprobs=5, ignore_eos=True)

    def run(batch):
        outs = llm.generate(batch, params, use_tqdm=False)
        return [(o.outputs[0].token_ids, [{t: lp.logprob for t, lp in d.items()} for d in o.outputs[0].logprobs])
                for o in outs]

    native = run(prompts) + run(prompts[:1])  # decode steps of 3 rows (grouped) and of 1 (one token)
    counted = sum(model.expert_tokens()[0])
    assert sum(model.native.expert_tokens()[0]) > 0  # the decode steps ran natively
    saved, model.native = model.native, None
    try:
        assert run(prompts) + run(prompts[:1]) == native
    finally:
        model.native = saved
    assert sum(model.expert_tokens()[0]) == 2 * counted


@pytest.mark.parametrize("case", ["qwen3-moe", "olmoe"])
def test_qk_norms_on_the_fused_ops_match_the_eager_ones(case, tmp_path, tokenizer_dir):
    """The block formats take the fused element-wise ops: the q/k norms (per head, whole projection) and the
    clipping computed with them match the eager formulas."""
    from tokenmill.layers.ops import EagerOps

    build(case, tmp_path, tokenizer_dir)
    model = LLM(str(tmp_path), dtype="float32", kv_cache_memory="32MiB", quantization="w8a8").engine.runner.model
    assert model.ops.name == "fused"
    layer = model.layers[0]
    qkv = torch.randn(5, layer.q_size + 2 * layer.kv_size, generator=torch.Generator().manual_seed(4)) * 3
    fused = model._norm_clip_qkv(layer, qkv.clone())
    model.ops = EagerOps(model.rope)
    torch.testing.assert_close(fused, model._norm_clip_qkv(layer, qkv.clone()), rtol=1e-5, atol=1e-5)


def test_moe_prefix_hit_and_preemption_keep_greedy_output(tmp_path, tokenizer_dir):
    """An MoE model computes the same tokens after a prefix-cache hit as cold, and when preempted over and over
    (recomputed) as when never preempted."""
    build("mixtral", tmp_path, tokenizer_dir)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (12, 20, 9, 25, 15, 18)]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    cold = LLM(str(tmp_path), dtype="float32", kv_cache_memory="32MiB", enable_prefix_caching=False)
    ref = [o.outputs[0].token_ids for o in cold.generate(prompts, params, use_tqdm=False)]
    warm = LLM(str(tmp_path), dtype="float32", kv_cache_memory="32MiB")
    warm.generate(prompts, params, use_tqdm=False)
    hits = warm.engine.stats().prefix_cache_hits
    assert [o.outputs[0].token_ids for o in warm.generate(prompts, params, use_tqdm=False)] == ref
    assert warm.engine.stats().prefix_cache_hits > hits
    # 7 blocks of 16 tokens: three prompts fit, then their outputs outgrow the cache and preempt each other.
    per_block = cold.engine.runner.model.cfg.kv_block_bytes(16, "auto", 4)
    tight = LLM(str(tmp_path), dtype="float32", kv_cache_memory=7 * per_block, enable_prefix_caching=False)
    assert [o.outputs[0].token_ids for o in tight.generate(prompts, params, use_tqdm=False)] == ref
    assert tight.engine.stats().num_preemptions >= 3


# How llama.cpp's converter names each architecture's tensors (written out here, independently of the loader).
GGUF_ARCH = {"mixtral": "llama", "qwen2-moe-shared": "qwen2moe", "qwen3-moe": "qwen3moe", "olmoe": "olmoe"}
GGUF_NAMES = {"self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
              "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
              "self_attn.v_proj.bias": "attn_v.bias", "self_attn.q_norm.weight": "attn_q_norm.weight",
              "self_attn.k_norm.weight": "attn_k_norm.weight", "input_layernorm.weight": "attn_norm.weight",
              "post_attention_layernorm.weight": "ffn_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
              "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
              "block_sparse_moe.gate.weight": "ffn_gate_inp.weight", "mlp.gate.weight": "ffn_gate_inp.weight",
              "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
              "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
              "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
              "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight"}


@pytest.mark.parametrize("case, expert_type", [("mixtral", "F32"), ("mixtral", "Q8_0"), ("qwen2-moe-shared", "Q8_0"),
                                               ("qwen3-moe", "F32"), ("olmoe", "F32")])
def test_moe_gguf_reads_as_the_hf_directory(case, expert_type, tmp_path, tokenizer_dir):
    """An MoE GGUF as llama.cpp writes it reads back as the same tensors as its HF directory, and the same
    arch: Mixtral as llama with expert_count and q/k rows permuted; Qwen2-MoE with its shared expert (the gate
    a 1-D tensor) and a dense layer; Qwen3-MoE's and OLMoE's q/k norms, OLMoE's clamp. Experts are stacked in one
    [experts, rows, cols] tensor per projection; expert e's slice comes back bit for bit (Q8_0: as it decodes)."""
    import gguf
    import numpy as np
    from safetensors.torch import load_file

    from tokenmill.models.loader import open_model

    cfg = build(case, tmp_path / "hf", tokenizer_dir).config
    sd = {k: v.float().numpy() for k, v in load_file(tmp_path / "hf" / "model.safetensors").items()}  # HF names
    heads, kv_heads, arch = cfg.num_attention_heads, cfg.num_key_value_heads, GGUF_ARCH[case]
    e = getattr(cfg, "num_local_experts", None) or cfg.num_experts
    mixtral = case == "mixtral"

    def permute(w, n):  # llama.cpp's q/k row order for its llama arch: each head's halves interleaved
        return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape) if mixtral else w

    path = tmp_path / "moe.gguf"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(1024)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    w.add_value_length(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    w.add_expert_count(e)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    if not mixtral and case != "olmoe":
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    if case == "qwen2-moe-shared":
        w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    if case == "olmoe":
        w.add_clamp_kqv(cfg.clip_qkv)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(1e6)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(VOCAB)])
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    q_type = getattr(gguf.GGMLQuantizationType, expert_type)
    expect: dict[str, np.ndarray] = {}
    experts = ("block_sparse_moe.experts", ("w1", "w3", "w2")) if mixtral else \
        ("mlp.experts", ("gate_proj", "up_proj", "down_proj"))
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_q.weight", permute(sd[p + "self_attn.q_proj.weight"], heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", permute(sd[p + "self_attn.k_proj.weight"], kv_heads))
        for hf, ours in GGUF_NAMES.items():
            if p + hf in sd:
                t = sd[p + hf]
                w.add_tensor(f"blk.{i}.{ours}", t.reshape(-1) if hf == "mlp.shared_expert_gate.weight" else t)
        if f"{p}{experts[0]}.0.{experts[1][0]}.weight" not in sd:
            continue  # a dense layer
        for ours, theirs in zip(("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"), experts[1], strict=True):
            stack = np.stack([sd[f"{p}{experts[0]}.{x}.{theirs}.weight"] for x in range(e)])
            if expert_type == "F32":
                w.add_tensor(f"blk.{i}.{ours}.weight", stack)
            else:
                packed = gguf.quants.quantize(stack, q_type)
                w.add_tensor(f"blk.{i}.{ours}.weight", packed, raw_shape=packed.shape, raw_dtype=q_type)
                stack = gguf.quants.dequantize(packed, q_type)
            for x in range(e):
                expect[f"{p}{experts[0]}.{x}.{theirs}.weight"] = stack[x]
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    g, hf = open_model(path), open_model(tmp_path / "hf")
    for key in ("architecture", "moe", "qk_norm", "clip_qkv", "head_dim", "attention_bias"):
        assert getattr(g.arch, key) == getattr(hf.arch, key), key
    ref = dict(hf.iter_tensors())
    got = dict(g.iter_tensors())
    assert set(got) == set(ref)
    for name, t in got.items():
        want = torch.from_numpy(expect[name]) if name in expect else ref[name].float()
        assert torch.equal(t, want), name


@pytest.mark.skipif(native() is None, reason="no compiler here: the native kernels are not built")
@pytest.mark.parametrize("renormalize", [True, False])
def test_the_native_router_is_torch_softmax_and_topk(renormalize):
    """The router both the native decoder and models/moe.py use on the CPU: torch's softmax, top k and
    renormalisation up to float32 rounding, the same experts in the same order (ties: the lower expert)."""
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(37, 8, generator=g) * 3
    logits[5] = 0.25  # every expert tied: the lowest ones win, in order
    weights, experts = native().moe_route(logits, 2, renormalize)
    probs = torch.softmax(logits, dim=-1)
    want_w, want_e = torch.topk(probs, 2, dim=-1)
    if renormalize:
        want_w = want_w / want_w.sum(dim=-1, keepdim=True)
    assert experts.dtype == torch.int64 and experts[5].tolist() == [0, 1]
    assert torch.equal(experts[:5], want_e[:5]) and torch.equal(experts[6:], want_e[6:])
    torch.testing.assert_close(weights, want_w, rtol=1e-6, atol=1e-7)
    with pytest.raises(RuntimeError, match="top k"):
        native().moe_route(logits, 9, renormalize)
