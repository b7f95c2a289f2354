"""The usage ledger: FLOPs per request by the model's shape (closed forms against brute force), counted per
finished request on the real server (cached prompt tokens free), and the lifetime ledger's crossover
prediction against the moment a steady load actually passes a given training compute."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from server_helpers import start_server

from tokenmill.models.flops import FlopModel
from tokenmill.models.loader import open_model
from tokenmill.planning.ledger import crossover, rate


def _brute(m: FlopModel, prompt: int, output: int, cached: int) -> float:
    def attended(pos: int) -> int:
        return pos if m.window is None else min(pos, m.window)

    total = sum(2 * m.active_params + m.attention_per_position * attended(p + 1) for p in range(cached, prompt))
    total += sum(2 * m.active_params + m.attention_per_position * attended(prompt + k) for k in range(1, output))
    return float(total)


@pytest.mark.parametrize("window", [None, 7])
def test_closed_forms_equal_the_sum_over_positions(window):
    m = FlopModel(1000, 30, window)
    for prompt, output, cached in ((1, 1, 0), (20, 5, 0), (20, 5, 16), (33, 40, 32), (5, 0, 0)):
        assert m.request(prompt, output, cached) == _brute(m, prompt, output, cached)


def test_the_default_models_active_parameters():
    m = FlopModel.of(open_model("default").arch)
    assert 130e6 < m.active_params < 170e6  # SmolLM2-135M: ~106M in its layers plus the 28M LM head


@pytest.fixture(scope="module")
def server():
    s = start_server("--mock", "--mock-base-ms", "2", "--mock-decode-ms-per-seq", "0.1")
    yield s
    s.stop()
    s.assert_clean_log()
    s.remove_log()


def _usage(server) -> dict:
    return httpx.get(f"{server.url}/v1/usage", timeout=10).json()


def _complete(server, prompt: list[int], max_tokens: int, user: str = "alice") -> None:
    r = httpx.post(f"{server.url}/v1/completions", timeout=30, json={
        "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "user": user})
    assert r.status_code == 200, r.text


@pytest.mark.slow
def test_the_server_counts_each_requests_flops_and_cached_tokens_are_free(server):
    m = FlopModel.of(open_model("default").arch)
    before = _usage(server)["total"]["flops"]
    prompt = list(range(500, 540))  # 40 tokens: two full blocks of 16 can be cached
    _complete(server, prompt, 5)
    first = _usage(server)
    assert first["total"]["flops"] - before == pytest.approx(m.request(40, 5, 0))
    _complete(server, prompt, 5, user="bob")
    second = _usage(server)
    assert second["total"]["flops"] - first["total"]["flops"] == pytest.approx(m.request(40, 5, 32))
    assert second["tenants"]["user:bob"]["cached_tokens"] == 32
    assert second["model"]["active_params"] == m.active_params


@pytest.mark.slow
def test_the_predicted_crossover_matches_when_a_steady_load_passes_it(server):
    """A model whose 'training' took as much compute as 60 of these requests, served a steady 8 requests/s:
    the ledger measures the rate over 3 s and predicts the crossing; the load then runs until it happens."""
    per_request = FlopModel.of(open_model("default").arch).request(64, 8, 0)
    stop = threading.Event()

    def load() -> None:
        i = 0
        next_t = time.monotonic()
        while not stop.is_set():
            _complete(server, [1000 + (i * 131 + j) % 40000 for j in range(64)], 8, user="steady")
            i += 1
            next_t += 0.125  # each request takes well under this: the rate holds
            time.sleep(max(0.0, next_t - time.monotonic()))

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    try:
        time.sleep(1.0)  # steady state
        a = _usage(server)
        training = a["total"]["flops"] + 60 * per_request
        time.sleep(3.0)
        b = _usage(server)
        predicted = crossover(b, rate(a, b), training)
        assert not predicted["passed"]
        at = b["now"] + predicted["seconds_from_now"]
        while (u := _usage(server))["total"]["flops"] < training:
            assert time.time() < at + 30, "the load never passed the training compute"
            time.sleep(0.02)
    finally:
        stop.set()
        worker.join(10)
    observed = u["now"] - a["now"]
    assert (at - a["now"]) == pytest.approx(observed, rel=0.05), (predicted, observed)


def test_the_ledger_refuses_snapshots_of_different_runs():
    a = {"since": 1.0, "now": 10.0, "uptime_s": 9.0, "total": {"flops": 10.0}}
    b = {"since": 2.0, "now": 20.0, "uptime_s": 18.0, "total": {"flops": 30.0}}
    with pytest.raises(ValueError, match="restarted"):
        rate(a, b)
    assert rate(a) == pytest.approx(10 / 9)
    assert crossover(b, 0.0, 100.0)["date_utc"] is None and crossover(b, 1.0, 20.0)["passed"]


def test_the_ledger_takes_a_distill_runs_counted_compute(tmp_path, capsys):
    """`tokenmill ledger --training-compute DIR`: the total a distill run wrote, against a saved /v1/usage."""
    import json

    from tokenmill.entrypoints.cli import main

    (tmp_path / "training_compute.json").write_text(json.dumps(
        {"total_flops": 3e12, "student_training_flops": 2e12, "teacher_generation_flops": 1e12}))
    usage = tmp_path / "usage.json"
    usage.write_text(json.dumps({"since": 0.0, "now": 100.0, "uptime_s": 100.0,
                                 "total": {"flops": 1e12, "requests": 10}, "model": None}))
    for source in (tmp_path, tmp_path / "training_compute.json"):
        out = tmp_path / "report.json"
        assert main(["ledger", "--usage", str(usage), "--training-compute", str(source), "--json", str(out)]) == 0
        report = json.loads(out.read_text())
        assert report["training_flops"] == 3e12
        assert report["seconds_from_now"] == pytest.approx(200.0)  # 2e12 left at 1e10 FLOPs/s
    assert main(["ledger", "--usage", str(usage), "--training-compute", str(tmp_path / "missing")]) == 2
    assert "cannot read the training compute" in capsys.readouterr().err
