"""Loads the C++ CPU kernels (compiled once per machine with the host compiler, then cached).

If the compiler is missing or the build fails, callers fall back to plain PyTorch and a warning says so.
Set TOKENMILL_NO_NATIVE=1 to force the fallback.
"""

from __future__ import annotations

import logging
import os
import time
from functools import cache
from pathlib import Path

logger = logging.getLogger(__name__)

NAME = "tokenmill_paged_decode"
# torch's build lock holds no pid: a build killed midway leaves it behind and every later load waits on it
# forever. A compile takes about a minute (several on a busy machine), so a lock this old is stale.
STALE_LOCK_SECONDS = 600


def _clear_stale_lock(build_dir: Path) -> None:
    lock = build_dir / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_SECONDS:
        logger.warning("removing a stale kernel build lock (%.0f s old): %s", age, lock)
        lock.unlink(missing_ok=True)


@cache
def native():
    if os.environ.get("TOKENMILL_NO_NATIVE"):
        return None
    try:
        from torch.utils.cpp_extension import _get_build_directory, load

        _clear_stale_lock(Path(_get_build_directory(NAME, verbose=False)))
        src = Path(__file__).with_name("paged_decode.cpp")
        return load(name=NAME, sources=[str(src)],
                    extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # a missing compiler or headers must not stop the engine
        logger.warning("native CPU attention kernel unavailable (%s); using the PyTorch path", e)
        return None
