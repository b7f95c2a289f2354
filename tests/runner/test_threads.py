"""The math-thread governor: what it decides from others' CPU use, that it measures a real neighbour, and
that the model it is enabled for computes the same on one thread as on two."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tokenmill import LLM, SamplingParams
from tokenmill.runner.threads import CLOCK_TICKS, ThreadGovernor


class FakeProc:
    """Others' CPU use scripted per interval, in cores; this process uses none."""

    def __init__(self):
        self.now = 0.0
        self.machine = 0
        self.set_to: list[int] = []

    def advance(self, others_cores: float, seconds: float = 1.0) -> None:
        self.now += seconds
        self.machine += round(others_cores * seconds * CLOCK_TICKS)

    def governor(self, max_threads: int) -> ThreadGovernor:
        return ThreadGovernor(max_threads, self.set_to.append, machine_ticks=lambda: self.machine,
                              own=lambda: 0, clock=lambda: self.now)


def test_a_busy_neighbour_takes_a_thread_and_gives_it_back_only_when_clearly_gone():
    p = FakeProc()
    g = p.governor(2)
    seen = []
    for others in (0.1, 0.95, 0.95, 0.4, 0.45, 0.2, 0.6, 1.7):
        p.advance(others)
        seen.append(g.before_step())
    # 0.4 and 0.45 are below the 0.5 that took the thread, not below the 0.3 that gives it back
    assert seen == [2, 1, 1, 1, 1, 2, 1, 1]
    assert p.set_to == [1, 2, 1]


def test_between_measurements_nothing_changes_and_never_below_one_thread():
    p = FakeProc()
    g = p.governor(4)
    p.advance(1.6)
    assert g.before_step() == 2  # one whole core and 0.6 of the next
    p.machine += 10 * CLOCK_TICKS  # a burst, but less than an interval has passed
    p.now += 0.2
    assert g.before_step() == 2
    p.advance(7.0)
    assert g.before_step() == 1
    assert p.set_to == [2, 1]


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="reads /proc")
def test_it_measures_a_real_cpu_bound_neighbour():
    set_to: list[int] = []
    g = ThreadGovernor(2, set_to.append, interval_s=0.0)
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        g.before_step()  # starts the interval
        time.sleep(1.5)
        g.before_step()
    finally:
        spin.kill()
        spin.wait()
    assert 0.7 <= g.others_cores <= 2.5, g.others_cores  # one process spinning (and whatever else runs here)
    assert g.threads == 1 and set_to == [1]


def test_enabled_for_the_default_model_which_computes_the_same_on_one_thread_as_on_two():
    """The governor may change the thread count between any two steps: the block-kernel model must give the
    same logprobs, greedy and sampled, batched or not, on either count."""
    llm = LLM(model="default", adapt_threads=False, kv_cache_memory="64MiB")
    assert llm.engine.runner.threads is None
    on = LLM(model="default", kv_cache_memory="64MiB")
    if on.engine.runner.threads is None:
        pytest.skip("the default model is not on the native block kernels on this machine")
    prompts = ["The mill by the river", "Write a short poem about flour and wind, in four lines."]
    params = [SamplingParams(temperature=0.0, max_tokens=12, logprobs=3, ignore_eos=True),
              SamplingParams(temperature=0.8, top_p=0.9, max_tokens=12, logprobs=3, seed=7, ignore_eos=True)]
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (2, 1):
            torch.set_num_threads(threads)
            outs = [llm.generate(prompts, p, use_tqdm=False) for p in params]
            runs.append([(c.token_ids, [{t: lp.logprob for t, lp in d.items()} for d in c.logprobs])
                         for o in outs for r in o for c in r.outputs])
    finally:
        torch.set_num_threads(before)
    assert runs[0] == runs[1]
