"""The shape of a model, independent of the file format it came from."""

from __future__ import annotations

from dataclasses import dataclass, field

# Architectures the model code implements, by the name GGUF metadata or config.json `model_type` uses.
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


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
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    def kv_block_bytes(self, block_size: int, cache_dtype: str, itemsize: int) -> int:
        """Bytes one KV cache block takes: K and V, every layer and KV head. An int8 cache stores a float32
        scale per token and head beside the values (tokenmill/quant/kv.py); otherwise the model dtype's
        `itemsize` bytes per value."""
        per_token_head = self.head_dim + 4 if cache_dtype == "int8" else self.head_dim * itemsize
        return 2 * self.num_layers * block_size * self.num_kv_heads * per_token_head
