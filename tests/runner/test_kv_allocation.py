"""The paged KV cache starts as zeros without writing them: its memory becomes resident page by page as
blocks are used, not all at once at start-up; so a budget the machine cannot hold is refused at start."""

from __future__ import annotations

import gc

import pytest
import torch

from tokenmill import LLM
from tokenmill.errors import ConfigError
from tokenmill.runner.model_runner import zeroed


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def test_a_large_cache_is_zero_writable_and_not_resident_until_touched():
    before = _rss_mib()
    x = zeroed((1024, 16, 4, 64, 128), torch.float16, torch.device("cpu"))  # 1 GiB
    assert x.shape == (1024, 16, 4, 64, 128) and x.dtype == torch.float16 and x.is_contiguous()
    assert _rss_mib() - before < 64  # torch.zeros would have made all 1024 MiB resident here
    block = x[517]
    assert not block.any()  # reads as zeros (the pages read map the shared zero page)
    block.fill_(1.5)
    assert x[517].float().sum().item() == 1.5 * block.numel() and not x[516].any() and not x[518].any()
    assert _rss_mib() - before < 64  # one 1 MiB block written: about that much resident
    del x, block
    gc.collect()


def test_int8_and_empty_shapes():
    x = zeroed((3, 5), torch.int8, torch.device("cpu"))
    assert x.dtype == torch.int8 and not x.any()
    x += 7
    assert int(x.sum()) == 105
    assert zeroed((0, 16, 3, 64), torch.float32, torch.device("cpu")).shape == (0, 16, 3, 64)


def test_a_budget_larger_than_free_memory_is_refused_at_start():
    # With the pages touched only as requests arrive, an impossible budget would otherwise fail mid-serving.
    with pytest.raises(ConfigError, match="more than the .* GiB of memory free"):
        LLM("default", kv_cache_memory="100000GiB")
