"""Builds and loads the C++ CPU kernels: compiled once per machine kind with the host compiler, then cached.

Each kernel is compiled for the instruction set this CPU has (`cpu_isa()`: AVX-512 with VNNI, AVX2, or
plain x86-64), never `-march=native`: the ISA is part of the cache key, so a cache directory copied to or
shared with another CPU holds a separate build for it instead of one that dies with an illegal instruction.

If the compiler is missing or the build fails, callers fall back to plain PyTorch and a warning says so.
Set TOKENMILL_NO_NATIVE=1 to force the fallback. `prebuild()` builds every kernel up front, so the engine
compiles at start-up (or `tokenmill build-kernels` at install time), never inside its first request.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import platform
import time
from functools import cache
from pathlib import Path

logger = logging.getLogger(__name__)

_HERE = Path(__file__).parent
# module name -> its sources, the compiled one first (it #includes the rest: one translation unit parses
# torch's headers once, most of a build's time)
KERNELS = {
    "tokenmill_native": [_HERE / f for f in ("native.cpp", "block_linear.cpp", "fused.cpp", "paged_decode.cpp",
                                             "decoder.cpp", "simd.h")],
}
BASE_CFLAGS = ["-O3", "-fopenmp"]
# The ISAs we build for, best first: (name, /proc/cpuinfo flags it needs, compiler flags).
ISAS = [
    ("avx512-vnni", {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"},
     ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni"]),
    ("avx2", {"avx2", "fma", "f16c"}, ["-mavx2", "-mfma", "-mf16c"]),
    ("x86-64", set(), []),
]
# torch's build lock holds no pid: a process killed while holding it (a build, or even the no-op ninja run
# that every torch `load` does) leaves it behind and every later load waits on it forever. A compile
# takes about a minute (several on a busy machine), so a lock this old is stale.
STALE_LOCK_SECONDS = 600


def _cpuinfo(field: str) -> str | None:
    """The first value of a /proc/cpuinfo field (None off Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _cpu_flags() -> set[str]:
    return set((_cpuinfo("flags") or "").split())


@cache
def cpu_name() -> str:
    """The CPU's model name, for figures and cache keys."""
    return _cpuinfo("model name") or platform.processor() or "unknown"


@cache
def cpu_isa() -> tuple[str, tuple[str, ...]]:
    """(name, compiler flags) of the best ISA this CPU has; TOKENMILL_KERNEL_ISA picks a lower one."""
    flags = _cpu_flags()
    wanted = os.environ.get("TOKENMILL_KERNEL_ISA")
    for name, needs, cflags in ISAS:
        if needs <= flags and (wanted is None or wanted == name):
            return name, tuple(cflags)
    return ISAS[-1][0], ()


def kernel_build_id(name: str) -> str:
    """Names one build of a kernel: its source, ISA, flags and torch version. Anything measured on a kernel
    (tokenmill/quant/tuning.py) is cached under it, so a changed kernel is measured again."""
    import torch

    isa, cflags = cpu_isa()
    key_src = b"".join(p.read_bytes() for p in KERNELS[name]) + " ".join([*BASE_CFLAGS, *cflags, torch.__version__]).encode()
    return f"{name}-{isa}-{hashlib.sha256(key_src).hexdigest()[:16]}"


def _build_dir(name: str) -> Path:
    """One directory per build id, so a built library can be imported without torch's lock and never runs
    on a CPU it was not built for."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "tokenmill" / "kernels"
    return Path(root) / kernel_build_id(name)


def _clear_stale_lock(build_dir: Path) -> None:
    lock = build_dir / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_SECONDS:
        logger.warning("removing a stale kernel build lock (%.0f s old): %s", age, lock)
        lock.unlink(missing_ok=True)


def _import_built(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@cache
def _load(name: str):
    if os.environ.get("TOKENMILL_NO_NATIVE"):
        return None
    try:
        import torch  # noqa: F401  (the extension links against libtorch, which must be loaded first)
        from torch.utils.cpp_extension import load

        build_dir = _build_dir(name)
        built = build_dir / f"{name}.so"
        if built.exists():
            return _import_built(name, built)
        isa, cflags = cpu_isa()
        logger.info("compiling the %s kernel for %s (once per machine kind, about a minute)", name, isa)
        t0 = time.monotonic()
        build_dir.mkdir(parents=True, exist_ok=True)
        _clear_stale_lock(build_dir)
        module = load(name=name, sources=[str(KERNELS[name][0])], build_directory=str(build_dir),
                      extra_cflags=[*BASE_CFLAGS, *cflags], extra_ldflags=["-fopenmp"], verbose=False)
        logger.info("compiled %s in %.0f s", name, time.monotonic() - t0)
        return module
    except Exception as e:  # a missing compiler or headers must not stop the engine
        logger.warning("native CPU kernel %s unavailable (%s); using the PyTorch path", name, e)
        return None


def native():
    """The native module, or None. Every kernel lives in it; the accessors below name what a caller uses
    (paged attention is called through this one)."""
    return _load("tokenmill_native")


def block_linear():
    """The W4A8 / W8A8 block-quantized linear kernel (block_linear.cpp), or None."""
    return native()


def fused():
    """The fused element-wise ops (fused.cpp: residual add + RMSNorm, rotary + KV write, SiLU * mul), or None."""
    return native()


def decoder():
    """The whole-model forward pass on the kernels (decoder.cpp), or None."""
    return native()


def prebuild() -> dict[str, bool]:
    """Build (or load) every kernel now; -> which ones are available."""
    return {name: _load(name) is not None for name in KERNELS}


if __name__ == "__main__":  # `python -m tokenmill.kernels.cpu`: build every kernel now (make test does, before the suite)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(f"{cpu_isa()[0]}: {prebuild()}")
