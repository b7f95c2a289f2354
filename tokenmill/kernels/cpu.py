"""Loads the C++ CPU kernels (compiled once per machine with the host compiler, then cached).

If the compiler is missing or the build fails, callers fall back to plain PyTorch and a warning says so.
Set TOKENMILL_NO_NATIVE=1 to force the fallback.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import time
from functools import cache
from pathlib import Path

logger = logging.getLogger(__name__)

NAME = "tokenmill_paged_decode"
SOURCE = Path(__file__).with_name("paged_decode.cpp")
CFLAGS = ["-O3", "-march=native", "-fopenmp"]
# torch's build lock holds no pid: a process killed while holding it (a build, or even the no-op ninja run
# that every torch `load` does) leaves it behind and every later load waits on it forever. A compile
# takes about a minute (several on a busy machine), so a lock this old is stale.
STALE_LOCK_SECONDS = 600


def _build_dir() -> Path:
    """One directory per source and flags, so a built library can be imported without torch's lock."""
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(CFLAGS).encode()).hexdigest()[:16]
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "tokenmill" / "kernels"
    return Path(root) / f"{NAME}-{key}"


def _clear_stale_lock(build_dir: Path) -> None:
    lock = build_dir / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_SECONDS:
        logger.warning("removing a stale kernel build lock (%.0f s old): %s", age, lock)
        lock.unlink(missing_ok=True)


def _import_built(path: Path):
    spec = importlib.util.spec_from_file_location(NAME, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@cache
def native():
    if os.environ.get("TOKENMILL_NO_NATIVE"):
        return None
    try:
        import torch  # noqa: F401  (the extension links against libtorch, which must be loaded first)
        from torch.utils.cpp_extension import load

        build_dir = _build_dir()
        built = build_dir / f"{NAME}.so"
        if built.exists():
            return _import_built(built)
        build_dir.mkdir(parents=True, exist_ok=True)
        _clear_stale_lock(build_dir)
        return load(name=NAME, sources=[str(SOURCE)], build_directory=str(build_dir), extra_cflags=CFLAGS,
                    extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # a missing compiler or headers must not stop the engine
        logger.warning("native CPU attention kernel unavailable (%s); using the PyTorch path", e)
        return None
