"""Fixtures shared by the model tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def hf_default_model(gguf_path):
    """transformers' own load of the default GGUF in float32, once for every module that compares with it
    (dequantizing the file in Python takes ~20 s on 2 cores)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                          dtype=torch.float32)
    return m.eval()
