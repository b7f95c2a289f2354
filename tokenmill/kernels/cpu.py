"""Loads the C++ CPU kernels (compiled once per machine with the host compiler, then cached).

If the compiler is missing or the build fails, callers fall back to plain PyTorch and a warning says so.
Set TOKENMILL_NO_NATIVE=1 to force the fallback.
"""

from __future__ import annotations

import logging
import os
from functools import cache
from pathlib import Path

logger = logging.getLogger(__name__)


@cache
def native():
    if os.environ.get("TOKENMILL_NO_NATIVE"):
        return None
    try:
        from torch.utils.cpp_extension import load

        src = Path(__file__).with_name("paged_decode.cpp")
        return load(name="tokenmill_paged_decode", sources=[str(src)],
                    extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # a missing compiler or headers must not stop the engine
        logger.warning("native CPU attention kernel unavailable (%s); using the PyTorch path", e)
        return None
