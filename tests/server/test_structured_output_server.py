"""Structured output through the real server and the official `openai` client: `.parse()` into a pydantic
model, json_object, a streamed schema, vLLM's guided_* and structured_outputs fields on both endpoints, and
a 400 naming the parameter for every malformed constraint."""

from __future__ import annotations

import json
import re
from typing import Literal

import httpx
import openai
import pytest
from pydantic import BaseModel, Field
from server_helpers import ServerProcess, start_server

pytestmark = pytest.mark.slow


class City(BaseModel):
    name: str = Field(max_length=30)
    country: str = Field(max_length=30)
    population_millions: int = Field(ge=0, le=100)
    climate: Literal["hot", "mild", "cold"]


@pytest.fixture(scope="module")
def server() -> ServerProcess:
    s = start_server("--no-inproc")  # the constraint crosses the process boundary in the request message
    yield s
    assert s.stop() == 0, s.log_text()
    s.assert_clean_log()
    s.remove_log()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)


def test_parse_into_a_pydantic_model(client):
    for temperature in (0.0, 1.0):
        done = client.chat.completions.parse(
            model="default", messages=[{"role": "user", "content": "Describe Paris as JSON."}],
            response_format=City, max_tokens=80, temperature=temperature, seed=3)
        msg = done.choices[0].message
        assert done.choices[0].finish_reason == "stop", msg.content
        assert isinstance(msg.parsed, City), msg.content


def test_json_object(client):
    done = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Return a JSON object with keys name and age for Alice, 30."}],
        response_format={"type": "json_object"}, max_tokens=300, temperature=0)
    assert done.choices[0].finish_reason == "stop", done.choices[0].message.content
    assert isinstance(json.loads(done.choices[0].message.content), dict)


def test_streamed_schema(client):
    # Closed as strict mode means it (OpenAI rejects a strict schema without it): extra keys would leave the output's
    # length to the model, not the schema.
    schema = {**City.model_json_schema(), "additionalProperties": False}
    chunks = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Describe Tokyo as JSON."}], stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}},
        max_tokens=80, temperature=0)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    City.model_validate_json(text)


def test_vllm_fields_on_both_endpoints(client):
    choice = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Is fire cold?"}], max_tokens=5, temperature=0,
        extra_body={"guided_choice": ["yes", "no"]})
    assert choice.choices[0].message.content in ("yes", "no")
    date = client.completions.create(model="default", prompt="The date today is ", max_tokens=12, temperature=0.7,
                                     extra_body={"structured_outputs": {"regex": r"[0-9]{4}-[0-9]{2}-[0-9]{2}"}})
    assert re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", date.choices[0].text)
    obj = client.completions.create(model="default", prompt="A JSON list of two numbers: ", max_tokens=20,
                                    temperature=0, n=2, extra_body={"guided_json": {
                                        "type": "array", "items": {"type": "integer"}, "minItems": 2,
                                        "maxItems": 2}})
    for c in obj.choices:
        assert len(json.loads(c.text)) == 2


@pytest.mark.parametrize("body,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wat"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"response_format": {"type": "xml"}}, None),
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_grammar": "start: nowhere"}, "guided_grammar"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex"),
    ({"guided_json": {"type": "object"}, "min_tokens": 3}, "min_tokens"),
])
def test_malformed_constraints_are_400(server, body, param):
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=30, json={
        "model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param, err
