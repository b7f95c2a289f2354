"""How many math threads to run, given what other processes are using of this process's cores.

The engine's math threads meet at a barrier after every op (OpenMP). When another process keeps one of
the cores busy, the thread sharing that core runs half the time and every op waits for it, while its
sibling spins: measured on the 2-core AMD EPYC (benchmarks/neighbour.py), a decode step of 32 sequences
went from 127 ms to 462 ms median (3.6x) beside one CPU-bound process, and batch-1 steps had a p90 of
142 ms against 15 ms idle. On one thread the same steps took 223 ms and 16 ms. So between steps the
governor looks at how much CPU other processes used on this process's cores since it last looked and
gives the engine the cores that are left.

Changing the thread count must not change results: the runner enables this only for models whose every
op computes a row the same at any thread count (the native block kernels; a float BLAS GEMM may round
differently on one thread than on two).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def busy_ticks_on(cpus: set[int] | None = None) -> int | None:
    """CPU time every process has used on these CPUs (clock ticks; None: all), or None off Linux."""
    total = 0
    try:
        with open("/proc/stat") as f:
            for line in f:
                if not line.startswith("cpu"):
                    break
                name, *fields = line.split()
                if name == "cpu" or (cpus is not None and int(name[3:]) not in cpus):
                    continue
                # user nice system idle iowait irq softirq steal: busy is all but idle and iowait
                v = [int(x) for x in fields[:8]]
                total += v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
    except (OSError, ValueError):
        return None
    return total


def machine_busy_ticks() -> int | None:
    """CPU time every process has used on the cores this process may run on (others' use of other cores
    is no concern of its threads)."""
    try:
        cpus = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        cpus = None
    return busy_ticks_on(cpus)


def own_ticks() -> int | None:
    """CPU time this process (all its threads) has used, in clock ticks."""
    try:
        with open("/proc/self/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the command name may hold spaces
    return int(fields[11]) + int(fields[12])  # utime, stime


class ThreadGovernor:
    """Call before_step() before each step; it returns the thread count to run with (and sets it).

    Every `interval_s` it measures the cores other processes used over the interval. The engine runs on
    max_threads minus those cores, never fewer than one: a thread is given up for each whole core others
    use and one more once they use `drop_at` of the next; it comes back only when they fall below
    `return_below` of it, so a neighbour hovering at the threshold does not flip the count every interval."""

    def __init__(self, max_threads: int, set_threads: Callable[[int], None], *, interval_s: float = 1.0,
                 drop_at: float = 0.5, return_below: float = 0.3,
                 machine_ticks: Callable[[], int | None] = machine_busy_ticks,
                 own: Callable[[], int | None] = own_ticks, clock: Callable[[], float] = time.monotonic):
        self.max_threads = max(1, max_threads)
        self.threads = self.max_threads
        self._set = set_threads
        self.interval_s = interval_s
        self.drop_at, self.return_below = drop_at, return_below
        self._machine, self._own, self._clock = machine_ticks, own, clock
        self._last = (clock(), machine_ticks(), own())
        self.others_cores = 0.0  # the last measurement
        self.changes = 0

    def before_step(self) -> int:
        now = self._clock()
        t0, m0, o0 = self._last
        if now - t0 < self.interval_s:
            return self.threads
        m1, o1 = self._machine(), self._own()
        self._last = (now, m1, o1)
        if None in (m0, o0, m1, o1):
            return self.threads
        self.others_cores = max(0.0, (m1 - m0) - (o1 - o0)) / CLOCK_TICKS / (now - t0)
        want = self._target(self.others_cores)
        if want != self.threads:
            logger.info("other processes used %.2f cores over the last %.1f s: %d math thread(s), was %d",
                        self.others_cores, now - t0, want, self.threads)
            self.threads = want
            self._set(want)
            self.changes += 1
        return self.threads

    def _target(self, others: float) -> int:
        def lost(threshold: float) -> int:  # a thread per whole core others use, one more from `threshold` of the next
            return math.floor(others) + (1 if others - math.floor(others) >= threshold else 0)

        now = self.max_threads - self.threads
        if lost(self.drop_at) > now:
            now = lost(self.drop_at)
        elif lost(self.return_below) < now:  # back up only once clearly below the level that took them
            now = lost(self.return_below)
        return max(1, self.max_threads - now)
