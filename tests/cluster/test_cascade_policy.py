"""The cascade's pure parts: signals, the decision, calibration to an escalation rate on held-out scores, the
router's fit, the fitted file, the flags' validation, and the task generator's grading."""

import math
import random

import numpy as np
import pytest

from tokenmill.cluster.cascade_config import CascadeConfig
from tokenmill.cluster.cascade_policy import (
    CascadeFit,
    PromptRouter,
    escalate,
    escalation_share,
    mean_entropy,
    neg_mean_logprob,
    threshold_for_rate,
    top_entropy,
)
from tokenmill.errors import ConfigError
from tokenmill.eval.cascade_tasks import generate, grade, split


def test_signals():
    assert neg_mean_logprob([-0.5, -1.5, -9.0], first=2) == pytest.approx(1.0)
    assert neg_mean_logprob([], first=4) == 0.0
    # Two equally likely tokens: ln 2; a certain one: 0; top-N missing mass counts as one more outcome.
    assert top_entropy([math.log(0.5), math.log(0.5)]) == pytest.approx(math.log(2))
    assert top_entropy([0.0]) == pytest.approx(0.0)
    assert top_entropy([math.log(0.5)]) == pytest.approx(math.log(2))
    assert mean_entropy([[0.0], [math.log(0.5), math.log(0.5)], [math.log(0.25)] * 4], first=2) == \
        pytest.approx(math.log(2) / 2)


def test_decision_is_strictly_above_the_threshold():
    assert escalate(1.0, 0.5) and not escalate(0.5, 0.5) and not escalate(0.1, 0.5)
    assert not escalate(1e9, threshold_for_rate([], 0.0))
    assert escalate(-1e9, threshold_for_rate([], 1.0))


@pytest.mark.parametrize("rate", [0.05, 0.1, 0.25, 0.33, 0.5, 0.8, 0.95])
def test_calibrated_rate_holds_on_held_out_data(rate):
    """The threshold put at the calibration sample's quantile escalates within 3 points of the target on another
    sample of the same distribution (and exactly on the calibration sample itself)."""
    rng = np.random.default_rng(0)
    calib, heldout = rng.gamma(2.0, 1.0, 4000), rng.gamma(2.0, 1.0, 4000)
    t = threshold_for_rate(calib, rate)
    assert escalation_share(calib, t) == pytest.approx(round(rate * 4000) / 4000)
    assert abs(escalation_share(heldout, t) - rate) <= 0.03


def test_calibration_edges():
    with pytest.raises(ConfigError):
        threshold_for_rate([1.0], 1.5)
    with pytest.raises(ConfigError):
        threshold_for_rate([], 0.5)
    assert escalation_share([1, 2, 3, 4], threshold_for_rate([1, 2, 3, 4], 0.5)) == 0.5
    assert escalation_share([1, 2, 3], threshold_for_rate([1, 2, 3], 0.01)) == 0.0


def test_router_learns_a_separable_label_and_round_trips(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 8))
    y = (x[:, 0] + 0.5 * x[:, 3] > 0.3).astype(float)
    r = PromptRouter.fit(x, y)
    assert np.mean((r.scores(x) > 0.5) == (y > 0.5)) > 0.95
    fit = CascadeFit("default", "gemma3", router=r, heldout={"router": r.scores(x).tolist(), "logprob": [0.1, 0.9]})
    fit.save(tmp_path / "f.json")
    back = CascadeFit.load(tmp_path / "f.json")
    assert back.router.score(x[0]) == pytest.approx(r.score(x[0]))
    assert back.threshold("logprob", 0.5) == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="no held-out scores"):
        back.threshold("entropy", 0.5)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ConfigError, match="not a version"):
        CascadeFit.load(tmp_path / "bad.json")


@pytest.mark.parametrize("kwargs, message", [
    ({"cascade": "default"}, "two comma-separated"),
    ({"cascade": "default,http://x:1", "escalate_rate": 0.0}, "not one of each"),
    ({"cascade": "default,gemma3"}, "exactly one of"),
    ({"cascade": "default,gemma3", "escalate_rate": 0.2, "escalate_threshold": 1.0}, "exactly one of"),
    ({"cascade": "default,gemma3", "escalate_rate": 1.5}, r"\[0, 1\]"),
    ({"cascade": "default,gemma3", "escalate_rate": 0.3}, "--cascade-fit"),
    ({"cascade": "default,gemma3", "escalate_rate": 0.0, "cascade_signal": "router"}, "--cascade-fit"),
    ({"escalate_rate": 0.3}, "needs --cascade"),
])
def test_bad_flags(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        CascadeConfig(**kwargs)


def test_cli_reports_bad_flags(capsys):
    from tokenmill.entrypoints.cli import main

    assert main(["serve", "--cascade", "default,gemma3", "--escalate-rate", "0.3"]) == 2
    assert "--cascade-fit" in capsys.readouterr().err


def test_tasks_are_reproducible_and_graded():
    a, b = generate(60, seed=3), generate(60, seed=3)
    assert a == b and len({t.family for t in a}) == 2
    assert all(t.prompt.endswith("\nA:") for t in a)
    parts = split(a, (0.5, 0.5), seed=1)
    assert sorted(t.id for p in parts for t in p) == sorted(t.id for t in a)
    assert grade(" 7 + 5 = 12", "12") and not grade(" 12 + 5", "12") and not grade("", "12")
    assert grade(" The capital is Paris.\nRome", "Paris") and not grade(" Rome\nParis", "Paris")
    rng = random.Random(0)
    assert all(grade(t.answer, t.answer) for t in generate(40, seed=rng.randrange(100)))


def test_router_reads_both_logprob_formats_and_streams_a_finished_answer():
    import json
    import types

    from tokenmill.cluster.cascade import CascadeRouter, _as_sse

    me = types.SimpleNamespace(signal="logprob", first_tokens=2)
    chat = {"choices": [{"logprobs": {"content": [{"logprob": -1.0, "top_logprobs": []},
                                                  {"logprob": -3.0, "top_logprobs": []},
                                                  {"logprob": -9.0, "top_logprobs": []}]}}]}
    assert CascadeRouter._confidence(me, chat, True) == pytest.approx(2.0)
    comp = {"choices": [{"logprobs": {"token_logprobs": [-0.5, -0.5, -7.0], "top_logprobs": [{"a": -0.5}] * 3}}]}
    assert CascadeRouter._confidence(me, comp, False) == pytest.approx(0.5)
    me.signal = "entropy"
    assert CascadeRouter._confidence(me, comp, False) == pytest.approx(top_entropy([-0.5]))

    body = {"id": "x", "object": "chat.completion", "created": 1, "model": "default", "cascade": {"escalated": False},
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1}}
    events = _as_sse(body, {"stream_options": {"include_usage": True}}).decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    first = json.loads(events[0][6:])
    assert first["choices"][0]["delta"]["content"] == "hi" and first["object"] == "chat.completion.chunk"
    assert json.loads(events[1][6:])["usage"]["prompt_tokens"] == 3
