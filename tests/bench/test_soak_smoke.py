"""benchmarks/soak.py end to end against the mock engine, a few seconds per phase with short server deadlines:
it runs, every hostile kind gets an answer that is right for it, and the gate passes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SOAK = Path(__file__).resolve().parents[2] / "benchmarks" / "soak.py"
# Raw-socket kinds that must come round in 10 s. (A stream nobody reads is cut only once the socket buffers
# fill, which the mock may not reach in a smoke run's time: its outcome is checked by the hostile-client tests.)
RAW_KINDS = {"slowloris", "silent", "slow_body", "leaver"}


def run_soak(out: Path, log: Path) -> tuple[int | None, str]:
    """(exit code or None when it ran past its time, output). A run past its time is asked for its threads'
    stacks (soak.py dumps them on SIGUSR1) before it is stopped."""
    proc = subprocess.Popen(
        [sys.executable, str(SOAK), "--mock", "--duration", "10", "--baseline-duration", "4", "--window", "5",
         "--slowloris", "4", "--hostile-rate", "8", "--max-queue-delay", "2", "--lost-after", "20", "--out", str(out),
         "--log", str(log), "--", "--header-timeout", "1", "--body-timeout", "2", "--write-timeout", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        return proc.wait(60), proc.stdout.read()  # a run takes ~31 s on either CPU (a mock engine)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)
        time.sleep(2)
        # SIGTERM, not SIGKILL first: soak.py then stops the server it started (in a session of its own, which a
        # kill of soak.py would leave running for the rest of the suite).
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        return None, proc.communicate()[0]


def test_soak_smoke_run_against_the_mock(tmp_path):
    out = tmp_path / "soak.json"
    code, output = run_soak(out, tmp_path / "server.log")
    if code is None:
        # Rarely (one fresh-clone run in four on a 2-core VM, twice so far) the load generator stops making
        # progress in its first phase, an await that never returns on the client's side. One retry keeps CI
        # from failing on it; the stuck run's stacks stay in the message if the retry fails too.
        first = output
        code, output = run_soak(out, tmp_path / "server-retry.log")
        output = f"{output}\n--- the first run, stuck ---\n{first[-6000:]}"
    assert code == 0, output[-8000:]
    report = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    assert report["verdict"]["pass"] and report["server_log_problems"] == []
    for phase in ("baseline", "hostile"):
        assert report["phases"][phase]["outcomes"].get("ok", 0) > 0
        assert report["phases"][phase]["rss"]["total"]["max_mb"] > 0
    counts = report["hostile"]["counts"]
    assert report["hostile"]["unexpected_examples"] == [], report["hostile"]
    finished = {kind for kind, c in counts.items() if set(c) - {"unfinished"}}
    assert RAW_KINDS <= finished, counts
    assert len(finished - RAW_KINDS) >= 8, counts  # most one-shot bad requests came round in 10 s
