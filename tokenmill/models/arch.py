"""The shape of a model, independent of the file format it came from."""

from __future__ import annotations

from dataclasses import dataclass, field

# Architectures the model code implements, by the name GGUF metadata or config.json `model_type` uses.
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gemma3_text")
# Hugging Face model types read as another: Gemma 3's multimodal config holds the text model in text_config.
ARCHITECTURE_ALIASES = {"gemma3": "gemma3_text"}


@dataclass(frozen=True)
class MoEConfig:
    """A mixture-of-experts MLP: a router picks top_k of num_experts SwiGLU experts per token.

    Every supported architecture routes the same way, softmax over the router's logits then the top k, and
    differs in whether the k weights are renormalised to sum to 1 (Mixtral always; Qwen-MoE and OLMoE by
    norm_topk_prob). Qwen2-MoE adds a shared expert every token runs, scaled by sigmoid(shared gate)."""

    num_experts: int
    top_k: int
    intermediate_size: int  # of one expert
    norm_topk_prob: bool
    shared_intermediate_size: int = 0  # 0: no shared expert
    dense_layers: tuple[int, ...] = ()  # layers whose MLP stays dense (Qwen2/3-MoE mlp_only_layers, sparse step)


@dataclass(frozen=True)
class ExpertNames:
    """Where an architecture's checkpoints keep the router and expert e's matrices, inside a layer."""

    router: str
    expert: str  # a prefix with {e}
    gate: str
    up: str
    down: str


@dataclass
class ModelArchConfig:
    architecture: str  # one of SUPPORTED_ARCHITECTURES
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Hugging Face style: {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, ...}
    # or {"rope_type": "linear", "factor": 2.0}; None for plain RoPE.
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2)
    sliding_window: int | None = None  # None: full attention
    # per layer "sliding_attention" or "full_attention" (Gemma 3); empty: every layer slides when sliding_window is set
    layer_types: tuple[str, ...] = ()
    rope_local_theta: float | None = None  # the sliding layers' own rope base (Gemma 3)
    query_pre_attn_scalar: float | None = None  # attention scale is its inverse square root (Gemma); None: head_dim's
    hidden_act: str = "silu"  # the MLP gate's activation: silu, or gelu_pytorch_tanh (Gemma)
    # RMSNorm on q and k before rotary: "head" over each head (Qwen3), "all" over the whole projection (OLMoE)
    qk_norm: str | None = None
    clip_qkv: float | None = None  # OLMoE: q, k, v clamped to [-clip, clip]
    moe: MoEConfig | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    @property
    def is_gemma(self) -> bool:
        """Gemma's layer: norms before and after attention and MLP, weights as (1 + w), scaled embeddings."""
        return self.architecture == "gemma3_text"

    def layer_window(self, i: int) -> int | None:
        """Layer i's sliding window in tokens (a query at p reads positions > p - window), None for full attention."""
        if self.sliding_window is None:
            return None
        if self.layer_types:
            return self.sliding_window if self.layer_types[i] == "sliding_attention" else None
        return self.sliding_window

    def kv_groups(self) -> list[tuple[int | None, tuple[int, ...]]]:
        """The KV cache's layer groups, (window, layers), all of one size: a block of the paged cache belongs to
        one group and holds the KV of each of its layers, so a sliding group frees blocks that fall out of its
        window while a full-attention group keeps them. One group of every layer when all attend alike. Else
        the size is the rarer kind's count (Gemma 3 270M: its 3 full layers, and 5 groups of 3 sliding ones),
        a last short group padded (its missing layers' memory unused)."""
        by_window: dict[int | None, list[int]] = {}
        for i in range(self.num_layers):
            by_window.setdefault(self.layer_window(i), []).append(i)
        if len(by_window) == 1:
            (window, layers), = by_window.items()
            return [(window, tuple(layers))]
        size = min(len(layers) for layers in by_window.values())
        return [(window, tuple(layers[j:j + size])) for window, layers in by_window.items()
                for j in range(0, len(layers), size)]

    @property
    def kv_group_size(self) -> int:
        return max(len(layers) for _, layers in self.kv_groups())

    def is_moe_layer(self, i: int) -> bool:
        return self.moe is not None and i not in self.moe.dense_layers

    def layer_shapes(self, i: int) -> dict[str, tuple[int, ...]]:
        """Layer i's tensors in Hugging Face naming (after "model.layers.{i}.") with their shapes."""
        h, q, kv, d = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.head_dim
        shapes: dict[str, tuple[int, ...]] = {
            "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h)}
        if self.attention_bias:
            shapes |= {"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)}
        shapes["self_attn.o_proj.weight"] = (h, q)
        if self.qk_norm is not None:
            shapes |= {"self_attn.q_norm.weight": (d if self.qk_norm == "head" else q,),
                       "self_attn.k_norm.weight": (d if self.qk_norm == "head" else kv,)}
        if self.is_moe_layer(i):
            moe = self.moe
            names = self.expert_names()
            shapes[names.router] = (moe.num_experts, h)
            for e in range(moe.num_experts):
                p = names.expert.format(e=e)
                shapes |= {p + names.gate: (moe.intermediate_size, h), p + names.up: (moe.intermediate_size, h),
                           p + names.down: (h, moe.intermediate_size)}
            if moe.shared_intermediate_size:
                s = moe.shared_intermediate_size
                shapes |= {"mlp.shared_expert.gate_proj.weight": (s, h), "mlp.shared_expert.up_proj.weight": (s, h),
                           "mlp.shared_expert.down_proj.weight": (h, s), "mlp.shared_expert_gate.weight": (1, h)}
        else:
            shapes |= {"mlp.gate_proj.weight": (self.intermediate_size, h),
                       "mlp.up_proj.weight": (self.intermediate_size, h),
                       "mlp.down_proj.weight": (h, self.intermediate_size)}
        shapes |= {"input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,)}
        if self.is_gemma:
            shapes |= {"pre_feedforward_layernorm.weight": (h,), "post_feedforward_layernorm.weight": (h,)}
        return shapes

    def expert_names(self) -> ExpertNames:
        if self.architecture == "mixtral":
            return ExpertNames("block_sparse_moe.gate.weight", "block_sparse_moe.experts.{e}.", "w1.weight",
                               "w3.weight", "w2.weight")
        return ExpertNames("mlp.gate.weight", "mlp.experts.{e}.", "gate_proj.weight", "up_proj.weight",
                           "down_proj.weight")

    def kv_block_bytes(self, block_size: int, cache_dtype: str, itemsize: int) -> int:
        """Bytes one KV cache block takes: K and V, every layer of a KV group and KV head. An int8 cache stores a
        float32 scale per token and head beside the values (tokenmill/quant/kv.py), a float16 one 2 bytes a
        value; otherwise the model dtype's `itemsize` bytes per value."""
        if cache_dtype == "int8":
            per_token_head = self.head_dim + 4
        else:
            per_token_head = self.head_dim * (2 if cache_dtype == "float16" else itemsize)
        return 2 * self.kv_group_size * block_size * self.num_kv_heads * per_token_head
