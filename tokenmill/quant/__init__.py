"""Weight-only int8/int4 linear layers, GGUF block repacking, and the int8 KV cache format."""
