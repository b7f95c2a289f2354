"""Fixtures shared by the model tests."""

from __future__ import annotations

import pytest
import torch
from hf_reference import hf_from_gguf


@pytest.fixture(scope="session")
def hf_default_model(gguf_path):
    """transformers' own load of the default GGUF in float32, once for every module that compares with it."""
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    return hf_from_gguf(gguf_path)
