"""The suite's report: ratios of run means and the A/A noise band, from synthetic results (no servers)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

SUITE = Path(__file__).resolve().parents[2] / "benchmarks" / "suite.py"


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("bench_suite", SUITE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_suite"] = mod  # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        del sys.modules["bench_suite"]


def _res(out_tok_s, ttft=0.5, tpot=0.05, goodput=1.0, rate=1.0):
    s = {"mean": ttft, "median": ttft, "p90": ttft, "p99": ttft}
    t = {"mean": tpot, "median": tpot, "p90": tpot, "p99": tpot}
    return {"settings": {"request_rate": rate}, "metrics": {
        "output_throughput": out_tok_s, "goodput": goodput, "ttft_s": s, "tpot_s": t, "e2e_s": s,
        "completed": 4, "num_requests": 4, "short": 0, "long": 0, "errors": 0}}


def test_ratio_and_noise_band(suite):
    assert suite._aa([100.0, 110.0]) == pytest.approx(5 / 105)
    assert suite._aa([100.0]) is None
    ratio, band = suite._ratio_cell([200.0, 220.0], [100.0, 100.0], higher_better=True)
    assert ratio == "2.10×" and band.startswith("±5 %") and "within noise" not in band
    ratio, band = suite._ratio_cell([1.0, 1.2], [1.05], higher_better=False)  # latency: lower is better
    assert ratio == f"{1.05 / 1.1:.2f}×" and "peer ran once" in band and "within noise" in band
    assert suite._ratio_cell([], [1.0], True) == ("—", "—")
    assert suite._ratio_cell([1.0], [math.nan], True) == ("—", "—")


def test_report_renders_every_section(suite, tmp_path):
    profile = suite.PROFILES["smoke"]
    results = {}
    for name, speed in (("tokenmill", 200.0), ("llama.cpp-Q8_0", 100.0), ("tokenmill-noprefix", 50.0)):
        d = results.setdefault(name, {})
        for s in suite.scenarios(profile):
            if name == "tokenmill-noprefix" and s["name"] != "shared-prefix":
                continue
            ttft = 2.0 if name == "tokenmill-noprefix" else 0.4
            d[s["name"]] = [_res(speed, ttft=ttft, rate=s["rate"]), _res(speed * 1.02, ttft=ttft, rate=s["rate"])]
    systems = suite.systems_for(profile, ["tokenmill", "llama.cpp"])
    args = SimpleNamespace(server_cpus="0-1", systems=["tokenmill", "llama.cpp"], out_dir=str(tmp_path))
    md = suite.report(results, systems, "smoke", profile, args, "2026-01-01 00:00 UTC", 60.0)
    assert "| llama.cpp-Q8_0 | 100.0 / 102.0 | 2.00× | ±2 % |" in md  # offline output tok/s
    assert "| tokenmill, prefix caching on | 0.400 / 0.400 |" in md and "5.00×" in md  # 2.0 s / 0.4 s
    assert "Highest rate meeting the SLO" in md and "| tokenmill | 2 / 2 | 1.00× |" in md
    assert "Requests flagged" in md and "none" in md
