"""Metrics from raw timestamps, against values computed by hand (pure logic, no server)."""

from __future__ import annotations

import math
import statistics

import pytest

from tokenmill.bench.loadgen import arrival_times
from tokenmill.bench.metrics import RequestRecord, compute, parse_slo
from tokenmill.bench.serve import max_rate_meeting_slo
from tokenmill.errors import ConfigError


def rec(i, sent, chunks, end, out, asked=None, prompt_len=10):
    return RequestRecord(i, prompt_len, asked if asked is not None else out, scheduled=sent, sent=sent,
                         chunks=chunks, end=end, output_tokens=out, tokens_source="usage")


def test_hand_computed_run():
    records = [
        # TTFT 0.5, chunks 0.1 apart, 4 tokens: TPOT (1.0 - 0.5) / 3
        rec(0, 0.0, [0.5, 0.6, 0.7, 0.8], 1.0, 4),
        # TTFT 1.0, 3 tokens, ITLs 0.2 and 0.4, e2e 2.0: TPOT (2.0 - 1.0) / 2 = 0.5
        rec(1, 0.5, [1.5, 1.7, 2.1], 2.5, 3),
        # asked 5, got 2: flagged short, not counted anywhere
        rec(2, 0.0, [0.1, 0.2], 4.0, 2, asked=5),
        # failed
        RequestRecord(3, 10, 5, error="HTTP 500: boom"),
    ]
    m = compute(records, {"ttft": 0.8})
    assert (m["completed"], m["short"], m["long"], m["errors"]) == (2, 1, 0, 1)
    assert m["duration_s"] == pytest.approx(4.0)  # first send (0.0) to last end (4.0)
    assert m["request_throughput"] == pytest.approx(2 / 4.0)
    assert m["output_throughput"] == pytest.approx(7 / 4.0)
    assert m["input_throughput"] == pytest.approx(20 / 4.0)
    assert m["ttft_s"]["mean"] == pytest.approx(0.75)
    assert m["ttft_s"]["median"] == pytest.approx(0.75)
    assert m["tpot_s"]["mean"] == pytest.approx(((0.5 / 3) + 0.5) / 2)
    itls = [0.1, 0.1, 0.1, 0.2, 0.4]
    assert m["itl_s"]["mean"] == pytest.approx(statistics.fmean(itls))
    assert m["itl_s"]["p99"] == pytest.approx(0.4 - 0.01 * 4 * (0.4 - 0.2))  # linear interpolation
    assert m["e2e_s"]["mean"] == pytest.approx((1.0 + 2.0) / 2)
    assert m["good_requests"] == 1 and m["goodput"] == pytest.approx(1 / 4.0)


def test_long_output_is_flagged_too():
    m = compute([rec(0, 0.0, [0.1, 0.2], 0.3, 3, asked=2)])
    assert m["long"] == 1 and m["completed"] == 0 and math.isnan(m["ttft_s"]["mean"])


def test_goodput_uses_every_limit():
    r = rec(0, 0.0, [0.1, 0.3, 0.5], 0.5, 3)  # TTFT 0.1, TPOT 0.2, e2e 0.5
    assert compute([r], {"ttft": 0.2, "tpot": 0.25})["good_requests"] == 1
    assert compute([r], {"ttft": 0.2, "tpot": 0.15})["good_requests"] == 0
    assert compute([r], {"e2e": 0.4})["good_requests"] == 0


def test_parse_slo():
    assert parse_slo("ttft=2.0,tpot=0.1") == {"ttft": 2.0, "tpot": 0.1}
    assert parse_slo(None) == {}
    for bad in ("ttft", "latency=1", "ttft=-1", "ttft=fast"):
        with pytest.raises(ConfigError):
            parse_slo(bad)


def test_poisson_and_gamma_arrivals():
    n, rate = 4000, 8.0
    t = arrival_times(n, rate, 1.0, seed=1)
    gaps = [b - a for a, b in zip(t, t[1:], strict=False)]
    assert statistics.fmean(gaps) == pytest.approx(1 / rate, rel=0.05)
    cv2 = statistics.pvariance(gaps) / statistics.fmean(gaps) ** 2
    assert cv2 == pytest.approx(1.0, rel=0.1)  # exponential gaps
    t = arrival_times(n, rate, 0.25, seed=1)
    gaps = [b - a for a, b in zip(t, t[1:], strict=False)]
    assert statistics.fmean(gaps) == pytest.approx(1 / rate, rel=0.1)
    assert statistics.pvariance(gaps) / statistics.fmean(gaps) ** 2 == pytest.approx(4.0, rel=0.2)
    assert arrival_times(3, float("inf")) == [0.0, 0.0, 0.0]
    assert arrival_times(5, 2.0, seed=3) == arrival_times(5, 2.0, seed=3)
    with pytest.raises(ValueError):
        arrival_times(3, 0.0)


def _point(rate, p99_ttft, p99_tpot, completed=10):
    return {"settings": {"request_rate": rate}, "metrics": {
        "completed": completed, "num_requests": 10, "ttft_s": {"p99": p99_ttft}, "tpot_s": {"p99": p99_tpot},
        "e2e_s": {"p99": 9.0}}}


def test_highest_rate_meeting_slo():
    slo = {"ttft": 2.0, "tpot": 0.1}
    pts = [_point(1, 0.5, 0.05), _point(2, 1.9, 0.09), _point(4, 3.0, 0.05), _point(8, 1.0, 0.5)]
    assert max_rate_meeting_slo(pts, slo) == 2
    assert [p["meets_slo"] for p in pts] == [True, True, False, False]
    assert max_rate_meeting_slo([_point(1, 0.5, 0.05, completed=9)], slo) is None  # a lost request fails
