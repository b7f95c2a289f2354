"""Engine <-> frontend messages survive msgpack, and the request schema rejects what it should. No model."""

from __future__ import annotations

import msgspec
import pytest
from pydantic import ValidationError

from tokenmill.engine.core import EngineStats, RequestUpdate
from tokenmill.errors import UnsupportedParameterError
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.api_models import ChatCompletionRequest, CompletionRequest
from tokenmill.server.app import _validation_message
from tokenmill.server.protocol import (
    AbortRequests,
    AddRejected,
    AddRequest,
    Failed,
    Ready,
    Shutdown,
    Updates,
    from_engine_codec,
    to_engine_codec,
)


def test_to_engine_roundtrip():
    enc, dec = to_engine_codec()
    params = SamplingParams(n=1, max_tokens=7, temperature=0.5, seed=2**63 - 1, stop=["\n"], logit_bias={3: -2.0},
                            logprobs=2)
    for msg in (AddRequest("r-0-0", [1, 2, 3], params, priority=-3, arrival_time=12.5, cache_salt="r-0"),
                AbortRequests(["a", "b"]), Shutdown()):
        assert dec.decode(enc.encode(msg)) == msg


def test_decoded_params_are_validated():
    enc, dec = to_engine_codec()
    raw = msgspec.msgpack.encode(["add", "r", [1], {"temperature": -1.0}, 0, 0.0, None])
    with pytest.raises(msgspec.ValidationError, match="temperature"):
        dec.decode(raw)


def test_from_engine_roundtrip():
    enc, dec = from_engine_codec()
    update = RequestUpdate("r", [5], "length", [(-0.1, [5, 6], [-0.1, -2.3])], [None, (-1.0, [2], [-1.0])],
                           num_prompt_tokens=2, arrival_time=1.0, first_scheduled_time=1.1, first_token_time=1.2,
                           finished_time=1.3)
    stats = EngineStats(1, 2, 0.25, 10, 4, 0, 20, 30, 5)
    for msg in (Ready(8192, 49152, 728, 16, 123), Failed("boom"), AddRejected("r", "too long", "prompt"),
                Updates(3.0, [update], stats, 0.02)):
        assert dec.decode(enc.encode(msg)) == msg


@pytest.mark.parametrize("body,kind,param", [
    (b'{"prompt": "x", "foo": 1}', "unknown parameter 'foo'", "foo"),
    (b'{"prompt": "x", "n": "2"}', "invalid value for 'n'", "n"),
    (b'{"prompt": "x", "temperature": NaN}', "invalid value for 'temperature'", "temperature"),
    (b'{"prompt": "\xff"}', "not valid JSON", None),
    (b"[1]", "must be a JSON object", None),
    (b"{}", "missing required parameter 'prompt'", "prompt"),
])
def test_validation_messages(body, kind, param):
    with pytest.raises(ValidationError) as e:
        CompletionRequest.model_validate_json(body)
    message, got_param = _validation_message(e.value)
    assert kind in message and got_param == param


def test_known_but_unsupported_parameters():
    chat = ChatCompletionRequest.model_validate_json(
        b'{"messages": [{"role": "user", "content": "hi"}], "functions": [{"name": "f"}]}')
    with pytest.raises(UnsupportedParameterError, match="functions") as e:
        chat.check_unsupported()
    assert e.value.param == "functions"
    # The values that mean "off" are accepted: nothing asked for is being ignored.
    ChatCompletionRequest.model_validate_json(
        b'{"messages": [{"role": "user", "content": "hi"}], "tools": [], "response_format": {"type": "text"},'
        b' "store": false, "tool_choice": "none"}').check_unsupported()
    with pytest.raises(UnsupportedParameterError, match="suffix"):
        CompletionRequest.model_validate_json(b'{"prompt": "x", "suffix": "tail"}').check_unsupported()
    CompletionRequest.model_validate_json(b'{"prompt": "x", "echo": false, "best_of": 1}').check_unsupported()
