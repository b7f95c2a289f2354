"""Tool calls parsed out of model output, whole and streamed in arbitrary pieces; the grammar that makes
calls required accepts exactly the offered functions with schema-valid arguments."""

from __future__ import annotations

import json

import llguidance
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.errors import InvalidRequestError
from tokenmill.server.tools import (
    StreamedCalls,
    closed_objects,
    parse_tool_calls,
    render_messages,
    required_grammar,
)

OFFERED = {"get_weather", "get_time"}
TEXT = ('Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>{"name": "get_time", "arguments": {"timezone": "CET"}}</tool_call>'
        '<tool_call>{"name": "unknown", "arguments": {}}</tool_call> done <tool')


def test_whole_output():
    content, calls = parse_tool_calls(TEXT, OFFERED)
    assert [c.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].arguments) == {"city": "Paris"}
    # an unknown function's block and the unfinished tag stay content, as written
    assert content.startswith("Let me check.") and '"unknown"' in content and content.endswith("done <tool")
    assert parse_tool_calls("no calls here", OFFERED) == ("no calls here", [])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(TEXT)), max_size=12))
def test_streamed_in_any_pieces_equals_whole(cuts):
    s = StreamedCalls(OFFERED)
    bounds = [0, *sorted(set(cuts)), len(TEXT)]
    text, names = "", []
    for a, b in zip(bounds, bounds[1:], strict=False):
        t, calls = s.feed(TEXT[a:b], final=b == len(TEXT))
        text += t
        names += [c.name for c in calls]
    content, calls = parse_tool_calls(TEXT, OFFERED)
    assert names == [c.name for c in calls]
    assert text.replace("\n", "").replace(" ", "") == content.replace("\n", "").replace(" ", "")


def test_required_grammar_accepts_only_offered_calls():
    tools = [{"type": "function", "function": {"name": n, "parameters": {
        "type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}} for n in sorted(OFFERED)]
    grammar = llguidance.LLMatcher.grammar_from_lark(required_grammar(tools, None, True))
    assert llguidance.LLMatcher.validate_grammar(grammar) == ""
    with pytest.raises(InvalidRequestError):
        required_grammar(tools, "missing", True)


def test_required_arguments_take_only_declared_parameters():
    """An object schema that does not say is closed; one that says (or has patternProperties) keeps its word;
    nested objects, arrays and $defs likewise; the caller's schema is not changed."""
    schema = {"type": "object", "properties": {
        "city": {"type": "string"},
        "when": {"type": "object", "properties": {"day": {"type": "integer"}}},
        "tags": {"type": "array", "items": {"type": "object", "properties": {"k": {"type": "string"}}}},
        "extra": {"type": "object", "additionalProperties": {"type": "object"}},
        "ref": {"$ref": "#/$defs/place"}},
        "$defs": {"place": {"properties": {"lat": {"type": "number"}}}}}
    closed = closed_objects(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["when"]["additionalProperties"] is False
    assert closed["properties"]["tags"]["items"]["additionalProperties"] is False
    assert closed["properties"]["extra"]["additionalProperties"] == {"type": "object", "additionalProperties": False}
    assert closed["$defs"]["place"]["additionalProperties"] is False
    assert "additionalProperties" not in schema and closed_objects({"type": "object", "patternProperties": {
        "^x": {}}}).get("additionalProperties") is None
    assert closed_objects({"type": "object", "additionalProperties": True})["additionalProperties"] is True
    grammar = required_grammar([{"type": "function", "function": {"name": "f", "parameters": schema}}], "f", False)
    body = json.loads(grammar.split("%json", 1)[1].strip())
    assert body["properties"]["arguments"] == closed


def test_history_rendered_for_templates_without_tools():
    tools = [{"type": "function", "function": {"name": "get_weather"}}]
    msgs = [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "X"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    out, extra = render_messages(msgs, tools, native=False)
    assert extra == {} and out[0]["role"] == "system" and "get_weather" in out[0]["content"]
    assert '"arguments": {"city": "X"}' in out[2]["content"] and "<tool_call>" in out[2]["content"]
    assert out[3] == {"role": "tool", "content": "<tool_response>\nsunny\n</tool_response>"}
    native, extra = render_messages(msgs, tools, native=True)
    assert extra == {"tools": tools} and native[1]["tool_calls"][0]["function"]["arguments"] == {"city": "X"}
