"""Tool calling through the real server and the official `openai` client: a required call and a named one
(arguments constrained by the function's schema, so they always parse), the round trip with the tool's
result in history, streamed tool-call deltas reassembled as the SDK does, `auto` parsing, `none`, and
LangChain's ChatOpenAI with a bound tool when it is installed."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from server_helpers import ServerProcess, start_server

pytestmark = pytest.mark.slow

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "maxLength": 40},
                                  "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a timezone",
    "parameters": {"type": "object", "required": ["timezone"],
                   "properties": {"timezone": {"type": "string", "maxLength": 40}}}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server() -> ServerProcess:
    s = start_server()
    yield s
    assert s.stop() == 0, s.log_text()
    s.assert_clean_log()
    s.remove_log()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)


def _check_weather_args(arguments: str) -> dict:
    args = json.loads(arguments)
    assert set(args) == {"city", "unit"} and args["unit"] in ("celsius", "fahrenheit") and len(args["city"]) <= 40
    return args


def test_required_call_round_trip(client):
    first = client.chat.completions.create(model="default", messages=ASK, tools=[WEATHER, TIME],
                                           tool_choice="required", parallel_tool_calls=False, max_tokens=80,
                                           temperature=0)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    calls = choice.message.tool_calls
    assert len(calls) == 1 and calls[0].function.name in ("get_weather", "get_time")
    # The assistant's calls and the tool's answer go back into history; the model answers in text.
    history = [*ASK, choice.message.model_dump(exclude_none=True)]
    history += [{"role": "tool", "tool_call_id": c.id, "content": json.dumps({"temperature": 21})} for c in calls]
    second = client.chat.completions.create(model="default", messages=history, tools=[WEATHER, TIME],
                                            tool_choice="none", max_tokens=30, temperature=0)
    assert second.choices[0].message.content and not second.choices[0].message.tool_calls


def test_named_function_single_call(client):
    done = client.chat.completions.create(
        model="default", messages=ASK, tools=[WEATHER, TIME], max_tokens=80, temperature=0.8, seed=11,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    calls = done.choices[0].message.tool_calls
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    _check_weather_args(calls[0].function.arguments)


def test_streamed_calls_reassemble(client):
    stream = client.chat.completions.create(model="default", messages=ASK, tools=[WEATHER], stream=True,
                                            tool_choice="required", parallel_tool_calls=False, max_tokens=80,
                                            temperature=0)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for c in chunk.choices:
            for d in c.delta.tool_calls or []:
                entry = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                entry["id"] = entry["id"] or d.id
                entry["name"] += (d.function.name or "") if d.function else ""
                entry["arguments"] += (d.function.arguments or "") if d.function else ""
            finish = c.finish_reason or finish
    assert finish == "tool_calls" and calls
    for entry in calls.values():
        assert entry["id"] and entry["name"] == "get_weather"
        _check_weather_args(entry["arguments"])


def test_auto_parses_what_the_model_writes(client):
    # A few-shot history in the call format: whatever the model writes, a well-formed call is parsed out of
    # the text and anything else stays content.
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
        {"role": "assistant", "content": "It is 21 degrees in Paris."},
        {"role": "user", "content": "And the weather in Rome?"}]
    done = client.chat.completions.create(model="default", messages=history, tools=[WEATHER], max_tokens=60,
                                          temperature=0)
    msg = done.choices[0].message
    if msg.tool_calls:
        assert done.choices[0].finish_reason == "tool_calls"
        assert "<tool_call>" not in (msg.content or "")
        for c in msg.tool_calls:
            json.loads(c.function.arguments)
    else:
        assert msg.content and done.choices[0].finish_reason in ("stop", "length")


def test_tool_errors_are_400(server):
    def post(body: dict) -> httpx.Response:
        return httpx.post(f"{server.url}/v1/chat/completions", timeout=30,
                          json={"model": "default", "messages": ASK, "max_tokens": 4, **body})

    for body, param in [({"tool_choice": "required"}, "tool_choice"),
                        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
                         "tool_choice"),
                        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
                        ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
                         "tool_choice")]:
        r = post(body)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["param"] == param, r.text


def test_langchain_bound_tool(server):
    lc = pytest.importorskip("langchain_openai")
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        return "21 degrees"

    llm = lc.ChatOpenAI(base_url=f"{server.url}/v1", api_key="none", model="default", temperature=0, max_tokens=60)
    reply = llm.bind_tools([get_weather], tool_choice="get_weather").invoke("What is the weather in Paris?")
    assert reply.tool_calls and reply.tool_calls[0]["name"] == "get_weather"
    assert isinstance(reply.tool_calls[0]["args"].get("city"), str)
