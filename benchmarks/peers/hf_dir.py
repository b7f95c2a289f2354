"""The default GGUF as a Hugging Face safetensors directory, for peers that load only those (transformers
serve, vLLM's CPU backend).

    python benchmarks/peers/hf_dir.py OUT_DIR DTYPE

transformers 5 keeps GGUF weights quantized and cannot save them; tokenmill's loader yields the same tensors
dequantized, under transformers' own names (checked token for token in tests/models).
"""

from __future__ import annotations

import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from tokenmill.models.loader import open_model


def main() -> None:
    out, dtype = sys.argv[1], getattr(torch, sys.argv[2])
    gguf = open_model("default").path
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):  # the weights are written dequantized
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(dict(open_model("default").iter_tensors()), strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    model.tie_weights()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(out)
    print("wrote", out)


if __name__ == "__main__":
    main()
