"""Processes that must not outlive their parent: an engine whose frontend was killed (`kill -9`, OOM) or a
replica whose router was, would otherwise hold its cores, memory and port for nobody."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM, parent_pid: int | None = None) -> None:
    """Ask the kernel (Linux) to send `sig` to this process when its parent thread exits. Safe between fork
    and exec. With parent_pid, exit at once if that parent is already gone (it may die before the request)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)
