"""Put this directory on PYTHONPATH and every Python process started below it (a load generator, `tokenmill
serve`, its engine process) prints each garbage collection that took over 2 ms, with its generation, to
stderr: how the pauses quoted in BENCHMARKS.md (fair e2e section) were found.

    PYTHONPATH=benchmarks/gc_pause_hook .venv/bin/python -m pytest -q -s tests/server/test_server_fair_load.py

The test process's own pauses print to the terminal; the server's go to its log, which the test deletes
when it passes (start `tokenmill serve` by hand under load to keep them)."""

import gc
import os
import sys
import time

_started = [0.0]


def _report(phase: str, info: dict) -> None:
    if phase == "start":
        _started[0] = time.perf_counter()
        return
    took = time.perf_counter() - _started[0]
    if took > 0.002:
        print(f"GCPAUSE pid {os.getpid()} gen {info['generation']} {took * 1e3:.1f} ms collected {info['collected']}",
              file=sys.stderr, flush=True)


gc.callbacks.append(_report)
