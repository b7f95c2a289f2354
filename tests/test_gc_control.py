import gc

import pytest

from tokenmill.gc_control import collector_paused, freeze_startup_heap


def _make_cycles(n: int) -> None:
    for _ in range(n):
        a: list = []
        a.append(a)


def test_no_collection_runs_while_paused_and_the_collector_comes_back():
    runs: list[int] = []

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            runs.append(info["generation"])

    gc.callbacks.append(on_gc)
    try:
        assert gc.isenabled()
        with collector_paused():
            runs.clear()  # a collection may have started between registering the callback and here
            assert not gc.isenabled()
            _make_cycles(50_000)  # ~70 automatic generation-0 collections' worth of allocations
            during = list(runs)
        assert during == []
        assert gc.isenabled()
        _make_cycles(50_000)
        assert runs, "the collector did not resume after the pause"
    finally:
        gc.callbacks.remove(on_gc)


def test_pause_restores_the_collector_on_error_and_keeps_it_off_if_it_was_off():
    with pytest.raises(RuntimeError), collector_paused():
        raise RuntimeError("boom")
    assert gc.isenabled()
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()  # the caller had turned it off: not ours to turn on
    finally:
        gc.enable()


def test_freeze_moves_the_live_heap_out_of_collections():
    before = gc.get_freeze_count()
    try:
        freeze_startup_heap()
        # Everything alive now (this test run's modules included) is frozen: thousands of objects.
        assert gc.get_freeze_count() > before + 1000
        assert gc.isenabled()
    finally:
        gc.unfreeze()
