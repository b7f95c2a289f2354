"""Keep CPython's cyclic garbage collector out of latency measurements and request paths.

A collection stops the process while it walks every tracked object of the generations it collects. In a
process that has imported torch, FastAPI or transformers, a full (generation 2) pass takes tens of
milliseconds (25-100 ms measured in our server and load-generator processes), at a moment nobody chose:
inside some request's time to first token, or between a token's arrival and its timestamp.

- `freeze_startup_heap()`: for long-lived processes (engine, frontend, router). Everything alive once
  start-up is over (modules, the model, the app) moves to the permanent generation, which collections
  skip; later passes only walk what requests allocated since. The collector stays on.
- `collector_paused()`: for bounded load generators. No collection runs while requests are being timed
  (timeit turns the collector off for the same reason); reference counting still frees acyclic garbage,
  and what cycles pile up is freed once the run ends.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


def freeze_startup_heap() -> None:
    gc.collect()  # collect start-up's own garbage first, so it is not frozen for the process's life
    gc.freeze()


@contextmanager
def collector_paused() -> Iterator[None]:
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
