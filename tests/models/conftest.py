"""Fixtures shared by the model tests."""

from __future__ import annotations

import pytest
import torch
from hf_reference import GgufReference


@pytest.fixture(scope="session")
def default_reference(gguf_path) -> GgufReference:
    """transformers on the default GGUF in float32, once for every module that compares with it."""
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    return GgufReference(gguf_path)


@pytest.fixture(scope="session")
def hf_default_model(default_reference):
    """transformers' own load of the default GGUF in float32."""
    return default_reference.model
