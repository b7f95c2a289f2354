"""Admission control's pure parts: work ahead per policy, the wait prediction, the reject decision (exactly
when the prediction exceeds the target), the drain-rate meter and bounded labels."""

from __future__ import annotations

import math

import pytest

from tokenmill.server.admission import (
    MIN_DRAIN_SHARE,
    RETRY_AFTER_MAX_S,
    ArrivalMeter,
    DrainMeter,
    LabelLimiter,
    QueuedWork,
    decide,
    predict_wait,
    work_ahead,
)


def q(priority=0, deadline=math.inf, tenant="t", tokens=100):
    return QueuedWork(priority, deadline, tenant, tokens)


QUEUE = [q(0, 5.0, "a", 100), q(1, 2.0, "a", 200), q(0, 9.0, "b", 50), q(2, 1.0, "c", 400)]


def test_work_ahead_follows_each_policy_order():
    new = q(1, 3.0, "b", 10)
    # fcfs / priority: every queued request of equal or better priority, plus its own prompt.
    assert work_ahead("fcfs", QUEUE, new) == 10 + 100 + 200 + 50
    assert work_ahead("priority", QUEUE, new) == 10 + 100 + 200 + 50
    # deadline: every queued request with an earlier or equal deadline.
    assert work_ahead("deadline", QUEUE, new) == 10 + 200 + 400
    # fair: its own tenant's queue, and as much of each other tenant's as it needs itself.
    assert work_ahead("fair", QUEUE, new) == (50 + 10) + min(300, 60) + min(400, 60)
    with pytest.raises(ValueError):
        work_ahead("lottery", QUEUE, new)


def test_predict_wait():
    assert predict_wait(500, 250.0) == 2.0
    assert predict_wait(500, None) is None
    assert predict_wait(500, 0.0) is None
    # Better work arriving at 150 tokens/s leaves 100 of the 250 drained per second.
    assert predict_wait(500, 250.0, overtaking_rate=150.0) == 5.0
    # More better work than the drain: the request still gets its floor share, not an infinite wait.
    assert predict_wait(500, 250.0, overtaking_rate=400.0) == pytest.approx(500 / (MIN_DRAIN_SHARE * 250.0))


def test_arrival_meter_rate_of_more_important_work():
    m = ArrivalMeter(window_s=10.0)
    assert m.rate_above(0.0, 5) == 0.0
    m.observe(1.0, 0, 300)
    m.observe(2.0, 1, 200)
    m.observe(3.0, 5, 1000)
    assert m.rate_above(3.0, 5) == pytest.approx(50.0)  # 300 + 200 tokens of priority < 5 in 10 s
    assert m.rate_above(3.0, 1) == pytest.approx(30.0)
    assert m.rate_above(3.0, 0) == 0.0  # nothing outranks priority 0
    assert m.rate_above(11.5, 5) == pytest.approx(20.0)  # the priority-0 arrival slid out of the window


@pytest.mark.parametrize("predicted", [0.5, 0.999, 1.0, 1.001, 1.5, 7.2, 1000.0])
@pytest.mark.parametrize("target,max_delay", [(1.0, None), (None, 1.0), (1.0, 3.0), (3.0, 1.0)])
def test_decide_rejects_exactly_when_prediction_exceeds_limit(predicted, target, max_delay):
    limit = min(v for v in (target, max_delay) if v is not None)
    rej = decide(predicted, target, max_delay)
    assert (rej is not None) == (predicted > limit)
    if rej is not None:
        assert rej.limit_s == limit
        assert rej.reason == ("ttft_target" if target == limit else "queue_delay")
        # Retry-After is the excess wait, rounded up, at least 1 s and capped.
        assert rej.retry_after_s == max(1, min(RETRY_AFTER_MAX_S, math.ceil(predicted - limit)))


def test_decide_admits_without_target_rate_or_anything_ahead():
    assert decide(10.0, None, None) is None
    assert decide(None, 0.1, 0.1) is None
    assert decide(10.0, 1.0, None, nothing_ahead=True) is None


def test_drain_meter_counts_only_backlogged_time():
    m = DrainMeter(window_s=10.0, min_backlog_s=0.2)
    assert m.rate is None
    m.observe(0.0, 0, backlogged=False)
    m.observe(5.0, 0, backlogged=False)  # an idle server: no time counted, no rate
    assert m.rate is None
    m.observe(5.5, 100, backlogged=True)
    m.observe(6.0, 100, backlogged=True)
    assert m.rate == pytest.approx(200 / 1.0)
    m.observe(8.0, 0, backlogged=False)  # idle again: the rate stands
    assert m.rate == pytest.approx(200.0)
    m.observe(20.0, 50, backlogged=True)  # older samples slid out of the window
    assert m.rate == pytest.approx(50 / 12.0)


def test_label_limiter_bounds_cardinality():
    lim = LabelLimiter(3)
    assert [lim(v) for v in ["a", "b", "a", "c", "d", "e", "b"]] == ["a", "b", "a", "c", "other", "other", "b"]
