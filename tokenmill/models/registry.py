"""Which model class runs an architecture."""

from __future__ import annotations

from tokenmill.models.arch import ModelArchConfig
from tokenmill.models.gemma3 import Gemma3Model
from tokenmill.models.llama import LlamaModel


def model_class(arch: ModelArchConfig) -> type[LlamaModel]:
    return Gemma3Model if arch.is_gemma else LlamaModel
