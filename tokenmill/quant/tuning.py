"""Start-up measurement: from how many rows a dense float GEMM beats the block-quantized kernel.

The answer depends on the CPU (AMX makes bfloat16 GEMMs cheap from a few rows; on AVX2 float32 wins only
from a few dozen) and on the model's shapes, so it is measured once on this machine for the model's widest
layer shape and cached on disk by CPU, kernel build (source, ISA, torch version), shape and dtype.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

ROWS = (1, 2, 4, 8, 16, 32, 64, 128)


def _cache_path() -> Path:
    root = os.environ.get("TOKENMILL_CACHE") or Path.home() / ".cache" / "tokenmill"
    return Path(root) / "tuning.json"


def _best_of(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_dense_from_rows(n: int, k: int, q4: bool, dtype: torch.dtype) -> int | None:
    """The fewest rows at which F.linear on a dense [n, k] `dtype` matrix is faster than the block kernel
    (None: never, up to the largest size tried)."""
    from tokenmill.quant.block import BlockLinear, quantize_q4, quantize_q8

    torch.manual_seed(0)
    w = torch.randn(n, k) * 0.02
    if q4:
        qs, d, m = quantize_q4(w)
    else:
        (qs, d), m = quantize_q8(w), None
    lin = BlockLinear(qs, d, m, q4, None, dtype)
    dense = w.to(dtype)
    for rows in ROWS:
        x = torch.randn(rows, k).to(dtype)
        reps = 5 if rows <= 16 else 3
        t_block = _best_of(lambda: lin(x), reps)  # noqa: B023
        t_dense = _best_of(lambda: F.linear(x, dense), reps)  # noqa: B023
        if t_dense < t_block:
            return rows
    return None


def dense_from_rows(n: int, k: int, q4: bool, dtype: torch.dtype) -> int | None:
    """measure_dense_from_rows, cached on disk; the log says what was chosen and why."""
    from tokenmill.kernels.cpu import cpu_name, kernel_build_id

    # The kernel's build id (source, ISA, torch version) is in the key: a choice measured on an older
    # kernel is stale (one cached before the q4 interleave kept prefill on a dense copy that had become slower).
    key = f"{cpu_name()}|{kernel_build_id('tokenmill_native')}|{torch.get_num_threads()} threads|" \
          f"{'w4a8' if q4 else 'w8a8'} {n}x{k}|{str(dtype).removeprefix('torch.')}"
    path = _cache_path()
    # Two processes starting at once must not measure separately and disagree (the choice decides how
    # prompt positions are rounded): the first measures under the lock, the others wait and read its answer.
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_suffix(".lock"), "a")  # noqa: SIM115 - held across the block below
    except OSError as e:
        logger.warning("cannot lock the kernel-choice cache (%s): measuring without it", e)
        lock = contextlib.nullcontext()
    with lock:
        if not isinstance(lock, contextlib.nullcontext):
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            cache = json.loads(path.read_text())
        except (OSError, ValueError):
            cache = {}
        if key in cache:
            rows = cache[key]
            how = "cached measurement"
        else:
            t0 = time.monotonic()
            rows = measure_dense_from_rows(n, k, q4, dtype)
            how = f"measured in {time.monotonic() - t0:.1f} s"
            cache[key] = rows
            try:
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(cache, indent=1))
                tmp.replace(path)
            except OSError as e:
                logger.warning("could not cache the kernel choice (%s)", e)
    if rows is None:
        logger.info("linear layers: the block kernel at every batch size (%s: %s)", how, key)
    else:
        logger.info("linear layers: the block kernel below %d rows, a dense %s copy from there (%s: %s)", rows,
                    str(dtype).removeprefix("torch."), how, key)
    return rows
