"""Structured output through the engine on the default model (float32, the exact reference): every output
matches its constraint; a constrained request gives the same tokens batched or alone, with speculative
decoding (ngram proposals, checked against the masks) and after preemption."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from tokenmill import LLM, SamplingParams
from tokenmill.errors import InvalidRequestError
from tokenmill.structured.grammar import StructuredOutput

pytestmark = pytest.mark.slow

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3}}}
BOOK = {"type": "object", "required": ["title", "year", "genre"],
        "properties": {"title": {"type": "string", "maxLength": 30}, "year": {"type": "integer", "minimum": 1000,
                                                                               "maximum": 2100},
                       "genre": {"enum": ["fiction", "history", "science"]}}}
# Sampled cases use bounded schemas: free JSON at temperature 0.8 may still be open at max_tokens.
CASES = [
    ("Describe a person as JSON.", StructuredOutput(json=PERSON), 0.0),
    ("List three fruits as JSON.", StructuredOutput(json_object=True), 0.0),
    ("Is water wet? Answer yes or no.", StructuredOutput(choice=["yes", "no", "maybe"]), 0.0),
    ("What is today's date?", StructuredOutput(regex=r"[0-9]{4}-[0-9]{2}-[0-9]{2}"), 0.0),
    ("Write an arithmetic expression.", StructuredOutput(grammar='start: sum " = " NUM\nsum: NUM " + " NUM\n'
                                                                 'NUM: /[1-9][0-9]?/'), 0.0),
    ("Describe a person as JSON.", StructuredOutput(json=PERSON), 1.0),
    ("Describe your favourite book as JSON.", StructuredOutput(json=BOOK), 0.8),
    ("Pick a colour.", StructuredOutput(choice=["red", "green", "blue"]), 1.0),
]
ALONE = (0, 2, 4, 5)  # one of each kind (sampled included) run alone too: alone costs a step per token each
ENGINE = dict(dtype="float32", quantization="none", max_model_len=512, max_num_batched_tokens=256)
MAX_TOKENS = 64


def _params(i: int, so: StructuredOutput, temperature: float) -> SamplingParams:
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=temperature, seed=100 + i, structured_output=so)


def _check(text: str, so: StructuredOutput) -> None:
    if so.json is not None:
        jsonschema.validate(json.loads(text), json.loads(so.json))
    elif so.json_object:
        assert isinstance(json.loads(text), dict), text
    elif so.choice is not None:
        assert text in so.choice
    elif so.regex is not None:
        assert re.fullmatch(so.regex, text), text
    else:
        assert re.fullmatch(r"[1-9][0-9]? \+ [1-9][0-9]? = [1-9][0-9]?", text), text


def _run(llm: LLM, idx: list[int]) -> list:
    convs = [[{"role": "user", "content": CASES[i][0]}] for i in idx]
    outs = llm.chat(convs, [_params(i, CASES[i][1], CASES[i][2]) for i in idx], use_tqdm=False)
    return [o.outputs[0] for o in outs]


@pytest.fixture(scope="module")
def batched():
    llm = LLM("default", kv_cache_memory="64MiB", **ENGINE)
    outs = _run(llm, list(range(len(CASES))))
    alone = {i: _run(llm, [i])[0] for i in ALONE}
    assert llm.engine.stats().num_preemptions == 0
    free = llm.chat([[{"role": "user", "content": CASES[i][0]}] for i in (0, 3)],
                    SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0), use_tqdm=False)
    return outs, alone, [(o.outputs[0].text, CASES[i][1]) for o, i in zip(free, (0, 3), strict=True)]


def test_every_output_matches_its_constraint(batched):
    outs, _, _ = batched
    for (prompt, so, _), out in zip(CASES, outs, strict=True):
        assert out.finish_reason == "stop", (prompt, out.text)
        _check(out.text, so)


def test_batched_equals_alone(batched):
    outs, alone, _ = batched
    for i, b in alone.items():
        assert outs[i].token_ids == b.token_ids, CASES[i][0]


def test_unconstrained_outputs_do_not_match(batched):
    """The constraint is what shapes the output: the same prompts unconstrained do not match it."""
    for text, so in batched[2]:
        with pytest.raises((ValueError, AssertionError, jsonschema.ValidationError)):
            _check(text, so)


@pytest.mark.parametrize("opts", [
    dict(speculative="ngram", num_speculative_tokens=4, speculative_max_batch=len(CASES), kv_cache_memory="64MiB"),
    dict(kv_cache_memory="8MiB", max_num_seqs=len(CASES)),  # preemption by recompute
    dict(num_threads=1, kv_cache_memory="64MiB"),  # a core left over: masks on the worker thread
], ids=["ngram-speculation", "preemption", "worker-thread-masks"])
def test_same_tokens_with_speculation_and_preemption(batched, opts):
    outs = batched[0]
    llm = LLM("default", **{**ENGINE, **opts})
    got = _run(llm, list(range(len(CASES))))
    stats = llm.engine.stats()
    if "speculative" in opts:
        assert stats.spec_num_draft_tokens > 0
    elif "num_threads" in opts:
        import os

        assert llm.engine.runner.grammar.background == (len(os.sched_getaffinity(0)) > 1)
    else:
        assert stats.num_preemptions > 0
    for i, (a, b) in enumerate(zip(outs, got, strict=True)):
        if CASES[i][2] == 0.0:
            assert a.token_ids == b.token_ids, CASES[i][0]
        _check(b.text, CASES[i][1])


@pytest.mark.parametrize("so,param", [
    (StructuredOutput(json='{"type": "object", "properties": {"a": {"type": "frobnicate"}}}'), "json"),
    (StructuredOutput(json="{not json"), "json"),
    (StructuredOutput(regex="[a-"), "regex"),
    (StructuredOutput(choice=[]), "choice"),
    (StructuredOutput(grammar="start: undefined_rule"), "grammar"),
    (StructuredOutput(regex="a", choice=["a"]), "structured_outputs"),
])
def test_bad_constraints_are_invalid_requests(so, param):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(structured_output=so)
    assert e.value.param == param


def test_min_tokens_with_structured_output_is_refused():
    with pytest.raises(InvalidRequestError, match="min_tokens"):
        SamplingParams(min_tokens=2, structured_output=StructuredOutput(json_object=True))


def test_ignore_eos_after_the_grammar_ends_gives_only_eos(caplog):
    """Under ignore_eos a finished grammar allows end-of-sequence only, step after step, without errors."""
    llm = LLM("default", kv_cache_memory="64MiB", **ENGINE)
    so = StructuredOutput(choice=["yes", "no"])
    out = llm.generate("Is the sky blue?", SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True,
                                                          structured_output=so), use_tqdm=False)[0].outputs[0]
    assert out.text in ("yes", "no") and len(out.token_ids) == 12
    eos = set(llm.tokenizer.eos_token_ids)
    first_eos = next(i for i, t in enumerate(out.token_ids) if t in eos)
    assert first_eos > 0 and all(t in eos for t in out.token_ids[first_eos:])
    assert "left its grammar" not in caplog.text
