"""Property-based fuzz of the whole request schema, through the real server and through the router in front
of it: 1,000 distinct requests (500 each), every one answered 200 or 4xx (408 and 429 included) with an
OpenAI error body, a stream ending in [DONE] or an error event, never a 5xx, never a hang; the engine alive
and serving afterwards. Then the acceptance cases of the hardening issue, every time: a huge integer in any
field is a 400 naming it, deeply nested JSON is a 400 everywhere (--lenient-fields too), and so is JSON text
inside a string field nested past Python's recursion limit.

The bodies cover every field of /v1/completions and /v1/chat/completions (tokenmill/server/api_models.py):
valid values, the limits and one past them (max_tokens up to and past the context, n at --max-n and past
it, logprobs / top_logprobs at 20 and 21, 64-bit seeds), integers of up to 4,300 digits (the most a JSON
parser accepts) in every field, floats at 1e308 and 1e-46, NaN and Infinity literals, wrong types, nulls,
unknown fields, nesting at and past the parser's depth limit, lone surrogates as raw `\\ud800` escapes and
as invalid UTF-8, NUL, RTL marks, emoji, long strings, chat messages with bad roles, content parts and tool
calls, tools and structured-output constraints, streaming or not; and bodies that are not JSON at all.

The model is a random-weight two-layer Llama with the default model's tokenizer, so a token costs little;
the server caps a request's work (--max-n 8, --max-request-cost, --request-timeout 5) and most bodies ask
for a few tokens: the module takes about a minute on two cores. Derandomized: the same requests every run.
"""

from __future__ import annotations

import collections
import json
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from router_helpers import RouterProcess, start_router
from server_helpers import ServerProcess, start_server

from tokenmill.models.loader import open_model
from tokenmill.tokenizer.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

EXAMPLES_PER_TARGET = 500  # server and router: 1,000 in all
CONTEXT = 512
MAX_N = 8
MAX_REQUEST_COST = 8192  # prompts x n x max_tokens x (1 + logprobs): a few seconds at most
VOCAB = 49152
SERVED = "tiny"
CLIENT_TIMEOUT_S = 30.0  # a request unanswered this long is a hang (the server answers 408 after 5 s)


# -- the model and the processes ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    transformers = pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("tiny-fuzz")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    transformers.LlamaForCausalLM(config).save_pretrained(out)
    Tokenizer.from_source(open_model("default")).save(out)
    return out


@pytest.fixture(scope="module")
def server(tiny_model) -> ServerProcess:
    s = start_server("--model", str(tiny_model), "--served-model-name", SERVED, "--dtype", "float32",
                     "--quantization", "none", "--max-model-len", str(CONTEXT), "--max-n", str(MAX_N),
                     "--max-request-cost", str(MAX_REQUEST_COST), "--request-timeout", "5",
                     "--no-log-requests")
    s.initial_engine_pid = s.engine_pid()
    yield s
    s.stop()
    if "Traceback" not in Path(s.log.name).read_text(errors="replace"):
        s.remove_log()  # else left for inspection


@pytest.fixture(scope="module")
def router(server, tiny_model) -> RouterProcess:
    r = start_router("--replicas", server.url, "--model", str(tiny_model), replicas=1)
    yield r
    r.stop()


# -- request bodies -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Raw:
    """JSON text placed as is where a value goes: what json.dumps cannot write (10,000 levels of nesting,
    a 4,300-digit number, 1e400, a malformed escape)."""

    text: str

    def __repr__(self) -> str:
        return f"Raw({self.text[:40]!r}{'...' if len(self.text) > 40 else ''} len={len(self.text)})"


def _nested(depth: int, kind: str = "[") -> Raw:
    if kind == "[":
        return Raw("[" * depth + "]" * depth)
    return Raw('{"a":' * depth + "1" + "}" * depth)


NINES = "9" * 4300  # the longest integer the JSON parser takes (Python's int-to-str limit: 4,300 digits)
HUGE_INTS = st.sampled_from([
    2**31 - 1, 2**31, -(2**31) - 1, 2**53 + 1, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64, 10**30, -(10**30),
    Raw(NINES), Raw("-" + NINES), Raw("1" + "0" * 4299), Raw("1" + "0" * 5000),
])
ODD_NUMBERS = st.sampled_from([
    Raw("1e400"), Raw("-1e400"), Raw("1e-400"), Raw("NaN"), Raw("Infinity"), Raw("-Infinity"), Raw("-0"),
    Raw("1E2"), Raw("0.0e0"), Raw("01"), Raw("1."), Raw(".5"), Raw("+1"), Raw("0x10"),
    1e308, -1e308, 5e-324, 1e-46, -0.0, 1.7976931348623157e308, 1.5, 2.0, "NaN", "nan", "inf", "-Infinity", "1",
])
NESTED = st.builds(_nested, st.sampled_from([3, 50, 199, 200, 201, 1000, 10_000]), st.sampled_from(["[", "{"]))

# Characters that break things: NUL and controls, RTL and zero-width marks, a BOM, noncharacters, emoji and
# astral characters, combining marks, quotes and backslashes, template and special-token syntax; and lone
# surrogates (json.dumps writes them as \ud800 escapes, or as invalid UTF-8 with surrogatepass).
_CHARS = "\x00\x01\x1f\x7f\u0085\u200b\u200d\u200e\u200f\u202e\u2028\u2029\ufeff\ufffe\uffff\U0001f600\U0001f468" \
         "\u200d\U0001f469\U0010ffff\u0301\u05d0\u0627\u4e2d\u00e9\"\\/\n\t\r{}%<>|a b"
_SURROGATES = "\ud800\udbff\udc00\udfff"
_PIECES = st.sampled_from(["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<tool_call>", "</tool_call>",
                           "{{ messages }}", "{% for x in y %}", "{{ raise_exception('x') }}", "\\u0000",
                           "Hello", " the", "\U0001f600" * 3])
SAFE_TEXT = st.one_of(  # valid strings, odd ones included (no lone surrogates)
    st.text(max_size=12),
    st.text(st.sampled_from(_CHARS), max_size=12),
    st.lists(st.one_of(_PIECES, st.text(st.sampled_from(_CHARS), max_size=3)), max_size=4).map("".join),
    st.sampled_from(["word " * 80, "\U0001f600" * 40, "\u202e\u05d0" * 30]),
)
SHORT_TEXT = st.one_of(SAFE_TEXT, st.text(st.sampled_from(_CHARS + _SURROGATES), max_size=12))
LONG_TEXT = st.sampled_from(["x" * 5000, "a " * 600, "\U0001f600" * 2000, "\u202e" * 3000, "\x00" * 1000,
                             "\ud800" * 500, "z" * 200_000])
TEXT = st.one_of(SHORT_TEXT, SHORT_TEXT, SHORT_TEXT, SHORT_TEXT, LONG_TEXT)
NONEMPTY = SAFE_TEXT.filter(bool)

_leaf = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), HUGE_INTS, ODD_NUMBERS, SHORT_TEXT, NESTED)
WILD = st.recursive(_leaf, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                     st.dictionaries(SHORT_TEXT, inner, max_size=3)),
                    max_leaves=6)

# JSON inside a JSON string (tool-call arguments, a schema given as text): parsed again, past the body's
# parser and its depth limit.
JSON_TEXTS = st.sampled_from(['{"a": 1}', "{", "", "null", "[" * 300 + "]" * 300, "[" * 5000 + "]" * 5000,
                              '{"a":' * 3000 + "1" + "}" * 3000, '{"a": ' + NINES + "}", '{"a": 1e400}', "NaN",
                              '"\\ud800"', '{"a": "\\udc00x"}', '{"\\ud800": 1}'])

@dataclass
class Field:
    """A field's values: `good` ones are valid; `bad` ones at or past a limit, of the wrong type, null,
    nested or huge; `any` mostly good, often bad."""

    good: st.SearchStrategy
    bad: st.SearchStrategy

    @property
    def any(self) -> st.SearchStrategy:
        return st.one_of(self.good, self.good, self.bad)

    def __or__(self, more: st.SearchStrategy) -> Field:
        return Field(self.good, self.bad | more)


def field(good, edge=(), wild=WILD) -> Field:
    good = good if isinstance(good, st.SearchStrategy) else st.sampled_from(good)
    if not isinstance(edge, st.SearchStrategy):
        edge = st.sampled_from(list(edge)) if edge else None
    return Field(good, wild if edge is None else st.one_of(edge, edge, wild))


BOOL = field([True, False], [None, 0, 1, "true"])
PROB = field([0.05, 0.5, 1.0], [0.0, 1e-300, -0.0, -0.1, 1.0000001, 1e308, 5e-324])
PENALTY = field([-2.0, 0.0, 0.5, 2.0], [2.0001, -2.5, 1e-300, 1e308])
SECONDS = field([5, 10.0, 86400], [1e-300, 0.001, 0.05, 0, -1, 86400.5, 1e308])
# Past the context, at it, and the largest a 1-token prompt leaves; 0 (valid only with echo).
MAX_TOKENS = field(st.integers(1, 12), [0, 1, 16, 64, 255, 510, 511, 512, 513, 8192, -1]) | HUGE_INTS
SMALL_IDS = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=8)

GOOD_SCHEMAS = st.sampled_from([
    {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
    {"type": "string", "maxLength": 3}, {"enum": ["a", "b", "\U0001f600"]}, {}, True,
    {"type": "array", "items": {"type": "boolean"}, "maxItems": 2}, {"type": "string", "format": "date-time"},
    {"type": "object", "properties": {"x": {"type": "number", "minimum": -1e308, "maximum": 1e308}}},
])
SCHEMAS = GOOD_SCHEMAS | st.sampled_from([
    False, {"type": "integer", "minimum": 10**30}, {"type": "integer", "minimum": 5, "maximum": 1},
    {"$ref": "#"}, {"type": "array", "items": {"$ref": "#"}}, {"type": "bogus"}, {"type": "string", "pattern": "("},
    {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, {"anyOf": []}, {"not": {}},
    {"type": "number", "minimum": 1e308, "maximum": -1e308}, {"type": "array", "minItems": 1000},
]) | JSON_TEXTS | WILD  # (a schema may be given as JSON text)
GOOD_REGEXES = st.sampled_from(["[a-z]{1,3}", "\\d{3}-\\d{2}", "a|b|\U0001f600", "(?i)x", "\\p{L}+", ".{0,5}"])
REGEXES = GOOD_REGEXES | st.sampled_from(["(a", "a{1000000}", "a{0}", ".*", "", "[", "\\", "x{2,1}",
                                          "(" * 150 + "a" + ")" * 150]) | WILD
GOOD_GRAMMARS = st.sampled_from(['start: "a"', 'start: "a" | "b"+', "start: /[0-9]+/", "start: %json {}"])
GRAMMARS = GOOD_GRAMMARS | st.sampled_from(["start: start", "bogus", ""]) | WILD
CHOICES = field(st.lists(NONEMPTY, min_size=1, max_size=3), [[], [""], ["a"] * 300, ["\ud800"]])

STRUCTURED = {  # at most one per valid request
    "response_format": field(st.one_of(
        st.just({"type": "text"}), st.just({"type": "json_object"}),
        st.builds(lambda s: {"type": "json_schema", "json_schema": {"name": "x", "schema": s, "strict": True}},
                  GOOD_SCHEMAS)),
        st.one_of(st.builds(lambda s: {"type": "json_schema", "json_schema": {"name": "x", "schema": s}}, SCHEMAS),
                  st.sampled_from([{"type": "json_schema"}, {"type": "xml"},
                                   {"type": "json_schema", "json_schema": {"name": "x"}}]))),
    "structured_outputs": field(st.one_of(
        st.builds(lambda s: {"json": s}, GOOD_SCHEMAS), st.builds(lambda r: {"regex": r}, GOOD_REGEXES),
        st.builds(lambda c: {"choice": c}, CHOICES.good), st.builds(lambda g: {"grammar": g}, GOOD_GRAMMARS),
        st.just({"json_object": True})), st.one_of(
        st.builds(lambda s: {"json": s}, SCHEMAS), st.builds(lambda r: {"regex": r}, REGEXES),
        st.builds(lambda c: {"choice": c}, CHOICES.any), st.builds(lambda g: {"grammar": g}, GRAMMARS),
        st.sampled_from([{}, {"regex": "a", "choice": ["a"]}, {"json_object": False}]))),
    "guided_json": field(GOOD_SCHEMAS | GOOD_SCHEMAS.map(json.dumps),  # an object, or the same as JSON text
                         SCHEMAS | JSON_TEXTS | st.just(Raw('"\\ud800"'))),
    "guided_regex": field(GOOD_REGEXES, REGEXES),
    "guided_choice": CHOICES,
    "guided_grammar": field(GOOD_GRAMMARS, GRAMMARS),
}
COMMON = {
    "model": field([SERVED, None], ["gpt-4", "", "default", "TINY", "\ud800", "m" * 10_000]),
    "n": field([1, 2, MAX_N], [0, -1, MAX_N + 1, 1024, 1025]) | HUGE_INTS,
    "max_tokens": MAX_TOKENS,
    "temperature": field([0, 0.7, 1.0, 2.0, 1e-46, 1e-5, 100], [100.5, -1, 1e308, -0.0]) | ODD_NUMBERS,
    "top_p": PROB | ODD_NUMBERS,
    "top_k": field([-1, 0, 1, 50, VOCAB, VOCAB + 1, 2**63 - 1], [-2]) | HUGE_INTS,
    "min_p": PROB,
    "repetition_penalty": field([1.0, 1.3, 1e-300, 10], [10.01, 0, -1]) | ODD_NUMBERS,
    "presence_penalty": PENALTY,
    "frequency_penalty": PENALTY,
    "logit_bias": field(
        st.one_of(st.dictionaries(st.integers(0, VOCAB - 1).map(str), st.floats(-100, 100), max_size=4),
                  st.just({str(i): -100 for i in range(300)}), st.just({str(i): 100 for i in range(300)}),
                  st.just({"05": 1, "5": 100})),
        st.one_of(
            st.dictionaries(st.sampled_from([str(VOCAB), "-1", "abc", "", " 5", "5.0", "1e3", str(10**30), NINES,
                                             "\ud800"]),
                            st.sampled_from([-100, 100, 0, 100.5, -1e308, 1e-300, "1"]), min_size=1, max_size=3),
            st.just({str(i): 1 for i in range(301)}), st.just({str(i): 0 for i in range(5000)}),
        )),
    "seed": field(st.integers(-(2**63), 2**63 - 1) | st.sampled_from([0, 2**63 - 1, -(2**63)]),
                  [2**63, -(2**63) - 1]) | HUGE_INTS,
    "stop": field(st.one_of(NONEMPTY, st.lists(NONEMPTY, max_size=4), st.just(["a"] * 16)),
                  [[""], "", ["a"] * 17, ["\ud800"], "x" * 10_000]),
    "stream": BOOL,
    "stream_options": field([{"include_usage": True}, {"include_usage": False}, {}],
                            [{"bogus": 1}, {"include_usage": None}, True]),
    "user": field(SAFE_TEXT | st.just("u" * 10_000), [5]),
    "unknown": Field(st.nothing(), WILD),  # a field of an unknown name: 400
    "min_tokens": field([0, 1], [2, 3, 511, -1]) | HUGE_INTS,
    "ignore_eos": BOOL,
    "priority": field([0, 1, -1, 2**31 - 1, -(2**31)], [2**31, -(2**31) - 1]) | HUGE_INTS,
    "timeout": SECONDS,
    "ttft_target": SECONDS,
    "stop_token_ids": field(st.lists(st.integers(0, VOCAB - 1), max_size=4) | st.just(list(range(256))),
                            [[VOCAB], [-1], list(range(257)), [5] * 1000]) | st.lists(HUGE_INTS, max_size=2),
    "include_stop_str_in_output": BOOL,
    "skip_special_tokens": BOOL,
    **STRUCTURED,
}
UNKNOWN_NAMES = st.sampled_from(["frobnicate", "", "\ud800", "__proto__", "prompt ", "PROMPT", "max-tokens",
                                 "x" * 1000, "messages" + "\x00"])

COMPLETION_ONLY = {
    "logprobs": field([0, 1, 5, 20], [21, -1, True]) | HUGE_INTS,
    "echo": BOOL,
    "suffix": field([None, ""], ["x", 5]),
    "best_of": field([None], [1, 2, 0, MAX_N]) | HUGE_INTS,
}

_ROLES = st.sampled_from(["system", "developer", "user", "user", "assistant", "tool", "wizard", "", "USER",
                          None, 5])
_PARTS = st.one_of(
    st.lists(st.builds(lambda t: {"type": "text", "text": t}, TEXT), max_size=3),
    st.sampled_from([[{"type": "image_url", "image_url": {"url": "x"}}], [{"type": "text"}],
                     [{"type": "text", "text": None}], [{"text": "a"}], ["a"]]),
)
_ARGUMENTS = st.one_of(JSON_TEXTS, SHORT_TEXT)
_TOOL_CALL = st.fixed_dictionaries(
    {"id": SHORT_TEXT, "function": st.fixed_dictionaries({"name": SHORT_TEXT, "arguments": _ARGUMENTS})},
    optional={"type": st.sampled_from(["function", "code"])})
MESSAGE = st.fixed_dictionaries(
    {"role": _ROLES},
    optional={"content": st.one_of(TEXT, TEXT, _PARTS, st.none(), WILD), "name": field(SHORT_TEXT, [5]).any,
              "tool_calls": field(st.lists(_TOOL_CALL, max_size=2), [[], None]).any, "tool_call_id": SHORT_TEXT})
_GOOD_CALL = st.builds(lambda i, args: {"id": i, "type": "function", "function": {"name": "f", "arguments": args}},
                       SAFE_TEXT, st.sampled_from(['{"a": 1}', "{}", "not json", '{"a": "\\ud83d\\ude00"}']) | JSON_TEXTS)
GOOD_MESSAGE = st.one_of(
    st.builds(lambda role, text: {"role": role, "content": text},
              st.sampled_from(["user", "system", "assistant", "developer", "tool", "user"]), SAFE_TEXT),
    st.builds(lambda parts: {"role": "user", "content": [{"type": "text", "text": t} for t in parts]},
              st.lists(SAFE_TEXT, max_size=3)),
    st.builds(lambda calls: {"role": "assistant", "content": None, "tool_calls": calls},
              st.lists(_GOOD_CALL, min_size=1, max_size=2)),
    st.builds(lambda text, i: {"role": "tool", "content": text, "tool_call_id": i, "name": "f"}, SAFE_TEXT, SAFE_TEXT),
)
GOOD_MESSAGES = st.lists(GOOD_MESSAGE, min_size=1, max_size=3)
MESSAGES = st.one_of(
    GOOD_MESSAGES, st.lists(MESSAGE, min_size=1, max_size=4), st.lists(st.one_of(GOOD_MESSAGE, MESSAGE), max_size=3),
    st.sampled_from([[], "hi", None, [None], [[]], [{}]]), st.builds(lambda m: [m] * 200, GOOD_MESSAGE),
    st.lists(st.builds(lambda t: {"role": "user", "content": t}, LONG_TEXT), min_size=1, max_size=2),
)
_GOOD_FUNCTION = st.fixed_dictionaries(
    {"name": st.sampled_from(["f", "get_weather", "a.b-c"])},
    optional={"description": SAFE_TEXT, "parameters": GOOD_SCHEMAS.filter(lambda s: isinstance(s, dict)),
              "strict": st.booleans()})
_FUNCTION = st.fixed_dictionaries(
    {"name": st.sampled_from(["f", "", "x" * 65, "bad name", "\u540d", "f\ud800"]) | SHORT_TEXT},
    optional={"description": TEXT, "parameters": SCHEMAS, "strict": BOOL.any})
TOOLS = field(
    st.lists(st.builds(lambda f: {"type": "function", "function": f}, _GOOD_FUNCTION), min_size=1, max_size=3)
    .map(lambda tools: [{"type": "function", "function": {"name": "f"}}, *tools]),
    st.lists(st.builds(lambda f: {"type": "function", "function": f}, _FUNCTION), min_size=1, max_size=3)
    | st.sampled_from([[], [{"type": "function"}], [{"type": "code", "function": {"name": "f"}}],
                       [{"type": "function", "function": {"name": "f"}}] * 129]))
CHAT_ONLY = {
    "max_completion_tokens": MAX_TOKENS,
    "logprobs": field([True, False], [1, None, "true"]),
    "top_logprobs": field([0, 1, 5, 20], [21, -1]) | HUGE_INTS,
    "tools": TOOLS,
    "tool_choice": field(["none", "auto", "required", {"type": "function", "function": {"name": "f"}}],
                         [{"type": "function", "function": {"name": "missing"}}, "bogus", 5, {"type": "function"}]),
    "parallel_tool_calls": BOOL,
    "functions": field([[], None], [[{"name": "f"}]]),
    "function_call": field(["none", None], ["auto", {"name": "f"}]),
    "modalities": field([["text"], None], [["audio"], []]),
    "service_tier": field(["auto", None], ["default", "flex"]),
    "store": field([False, None], [True]),
    "metadata": field([None], [{"a": "b"}, {}]),
    "reasoning_effort": field([None], ["low"]),
    "audio": field([None], [{}]),
    "prediction": field([None], [{"type": "content", "content": "x"}]),
    "web_search_options": field([None], [{}]),
}
PROMPT = field(
    st.one_of(NONEMPTY, st.lists(NONEMPTY, min_size=1, max_size=3), SMALL_IDS,
              st.lists(SMALL_IDS, min_size=1, max_size=2), st.sampled_from([[5] * 510, ["a"] * 64, [[5] * 3] * 32])),
    st.one_of(
        TEXT, st.lists(SHORT_TEXT, max_size=3),
        st.sampled_from(["", [], [[]], [VOCAB], [-1], [1, "a"], [[1], []], [1.0], [True], ["a"] * 1025,
                         [5] * 511, [5] * 512, [[5] * 511], ["a"] * 1024]),
        st.lists(HUGE_INTS, min_size=1, max_size=2),
        st.lists(st.lists(HUGE_INTS, min_size=1, max_size=2), min_size=1, max_size=2),
    ))

# Bodies that are not one JSON object: not JSON, not UTF-8, nested past any parser, or of the wrong type.
RAW_BODIES = st.sampled_from([
    b"", b" ", b"{", b"{bad json", b"null", b"42", b'"prompt"', b"[]", b"true", b"\x00\x01\x02", b"\xff\xfe{}",
    b"\xef\xbb\xbf{}", '{"prompt": "x"}'.encode("utf-16"), b'{"prompt": "x"} trailing', b'{"prompt": "x",}',
    b'{"prompt": "x", "prompt": 5}', b"{'prompt': 'x'}", b'{"prompt": "\\x41"}', b'{"prompt": "\\ud800"}',
    b'{"prompt": "\\udc00\\ud800", "max_tokens": 1}', b'{"prompt": "\xed\xa0\x80", "max_tokens": 1}',
    b'{"prompt": "a\\u0000b", "max_tokens": 1}', b'{"prompt": "x", "max_tokens": 1e400}',
    b'{"prompt": "x", "temperature": NaN}', b'{"prompt": "x", "temperature": Infinity}',
    b"[" * 10_000, b"{" * 10_000, b'{"a":' * 10_000, b'{"prompt": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",
    b'{"messages": ' + b"[" * 10_000, b"[" * 199 + b"]" * 199, b"[" * 200 + b"]" * 200,
    b'{"prompt": "x", "max_tokens": ' + NINES.encode() + b"}", b'{"prompt": "x", "n": 1' + b"0" * 5000 + b"}",
    b'{"prompt": "' + b"x" * (4 << 20) + b'"}',  # past --max-body-bytes: 413
])


class Case:
    def __init__(self, endpoint: str, body: bytes, stream: bool):
        self.endpoint = endpoint
        self.body = body
        self.stream = stream  # the body asks for a stream (stream: true)

    def __repr__(self) -> str:
        shown = self.body[:600].decode("utf-8", "backslashreplace")
        return f"Case({self.endpoint!r}, stream={self.stream}, {len(self.body)} bytes: {shown}" + (
            "...)" if len(self.body) > 600 else ")")


def encode(body: dict, ascii_only: bool) -> bytes:
    """body as JSON bytes, Raw values spliced in as written; ascii_only False writes lone surrogates as
    (invalid) UTF-8 bytes instead of \\ud800 escapes."""
    raws: list[str] = []

    def sub(v):
        if isinstance(v, Raw):
            raws.append(v.text)
            return f"\x00raw-{len(raws) - 1}\x00"
        if isinstance(v, dict):
            return {(sub(k) if isinstance(k, Raw) else k): sub(x) for k, x in v.items()}
        if isinstance(v, list):
            return [sub(x) for x in v]
        return v

    text = json.dumps(sub(body), ensure_ascii=ascii_only)
    for i, raw in enumerate(raws):
        text = text.replace(f'"\\u0000raw-{i}\\u0000"', raw, 1)
    return text.encode("utf-8", "surrogatepass")


@st.composite
def cases(draw) -> Case:
    """A third of the bodies valid in every field (they reach the engine: n, logprobs, stops, biases, seeds,
    structured output, tools, streaming); a third valid but for one field, which is at or past a limit, of
    the wrong type, huge or nested (what reaches the serving code's own checks); a third fuzzed in every
    field; and a few not JSON objects at all. Rare branches sit at the top of their draw's range: hypothesis
    tries 0, the simplest choice, the most."""
    if draw(st.integers(0, 99)) >= 95:
        return Case(draw(st.sampled_from(["completions", "chat/completions"])), draw(RAW_BODIES), False)
    chat = draw(st.booleans())
    mode = draw(st.sampled_from(["valid", "one bad field", "chaos"]))
    valid = mode != "chaos"
    fields = {**COMMON, **(CHAT_ONLY if chat else COMPLETION_ONLY)}
    pick = "good" if valid else "any"
    if chat:
        body: dict = {"messages": draw(GOOD_MESSAGES if valid else MESSAGES)}
    else:
        body = {"prompt": draw(getattr(PROMPT, pick))}
    names = sorted(set(fields) - set(STRUCTURED) - {"unknown", "tools", "tool_choice"}) if valid else sorted(fields)
    for name in draw(st.lists(st.sampled_from(names), max_size=4 if valid else 6, unique=True)):
        if name == "unknown":
            body[draw(UNKNOWN_NAMES)] = draw(WILD)
        else:
            body[name] = draw(getattr(fields[name], pick))
    if draw(st.integers(0, 3)) == 3:  # one output constraint
        name = draw(st.sampled_from(sorted(STRUCTURED)))
        body[name] = draw(getattr(STRUCTURED[name], pick))
    if chat and draw(st.integers(0, 3)) == 3:  # tools and a tool_choice ("required": a grammar of calls)
        body["tools"], body["tool_choice"] = draw(getattr(TOOLS, pick)), draw(getattr(CHAT_ONLY["tool_choice"], pick))
    if not chat and draw(st.integers(0, 5)) == 5:  # echo with logprobs (max_tokens 0: the prompt alone)
        body["echo"], body["logprobs"] = True, draw(getattr(COMPLETION_ONLY["logprobs"], pick))
        body["max_tokens"] = draw(st.sampled_from([0, 1, 2]))
    if valid:  # what makes a combination of valid values valid
        if "stream_options" in body:
            body["stream"] = True
        if "top_logprobs" in body:
            body["logprobs"] = True
        if body.get("min_tokens", 0) > body.get("max_tokens", 1):
            body["min_tokens"] = 0
    if mode == "one bad field":
        name = draw(st.sampled_from(sorted({*fields, "prompt/messages"})))
        if name == "unknown":
            body[draw(UNKNOWN_NAMES)] = draw(WILD)
        elif name == "prompt/messages":
            body.update({"messages": draw(MESSAGES)} if chat else {"prompt": draw(PROMPT.bad)})
        else:
            body[name] = draw(fields[name].bad)
    elif mode == "chaos" and draw(st.integers(0, 9)) == 9:  # a value nested at or past the parser's limit
        body[draw(st.sampled_from(sorted(fields)))] = draw(NESTED)
    elif mode == "chaos" and draw(st.integers(0, 19)) == 19:
        body.pop("messages" if chat else "prompt")
    # Keep the work small: most bodies ask for a few tokens; 1% for the rest of the context (no max_tokens),
    # 2% of the valid ones for a long output; the drawn max_tokens above reaches the context too.
    if "max_tokens" not in body and "max_completion_tokens" not in body and draw(st.integers(0, 99)) < 99:
        body["max_tokens"] = draw(st.integers(1, 12))
    if mode == "valid" and draw(st.integers(0, 49)) == 49:
        body["max_tokens"] = draw(st.sampled_from([64, 200, 450]))
    if draw(st.integers(0, 3)) == 3:
        body["stream"] = True
    ascii_only = valid or draw(st.integers(0, 3)) < 3
    return Case("chat/completions" if chat else "completions", encode(body, ascii_only), body.get("stream") is True)


# -- the property -------------------------------------------------------------------------------------------
def check_response(case: Case, r: httpx.Response, elapsed: float) -> None:
    status, text = r.status_code, r.text
    assert elapsed < CLIENT_TIMEOUT_S, f"took {elapsed:.1f}s"
    assert status == 200 or 400 <= status < 500, f"{status}: {text[:2000]}"
    if status != 200:
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"], err
        assert isinstance(err["type"], str) and err["type"], err
        return
    if r.headers["content-type"].startswith("text/event-stream"):
        assert case.stream, "an SSE stream for a body that did not ask for one"
        events = [e for e in text.split("\n\n") if e.strip()]
        assert events and events != ["data: [DONE]"], f"a stream with no event: {text[:500]}"
        for e in events:
            assert e.startswith("data: "), e[:500]
        ended = events[-1] == "data: [DONE]"
        last = events[-2] if ended and len(events) > 1 else events[-1]
        for e in events[:-1] if ended else events:
            obj = json.loads(e[len("data: "):])
            if "error" in obj:
                code = obj["error"]["code"]
                assert e is last, f"an error event before the end: {e[:500]}"
                assert isinstance(code, int) and 400 <= code < 500, f"a 5xx in the stream: {e[:2000]}"
                ended = True
            else:
                assert "choices" in obj, e[:500]
        assert ended, f"the stream ended without [DONE] or an error event: {text[-500:]}"
    else:
        assert not case.stream, f"a JSON body for a stream request: {text[:500]}"
        assert r.json()["choices"], text[:500]


def draw_cases(n: int) -> list[Case]:
    """n distinct requests, as hypothesis explores the strategy (derandomized: the same ones every run).
    They are drawn up front and all sent, and every failure reported, rather than the first one shrunk:
    shrinking would replay requests against a server whose state (a replica out of rotation) the first
    failure may have changed."""
    found: dict[bytes, Case] = {}

    class Enough(Exception):
        pass

    @settings(max_examples=3 * n, derandomize=True, database=None, deadline=None, phases=(Phase.generate,),
              suppress_health_check=list(HealthCheck), report_multiple_bugs=False)
    @given(case=cases())
    def collect(case):
        found.setdefault(case.body, case)  # hypothesis draws some bodies more than once
        if len(found) >= n:
            raise Enough  # (hypothesis has no other way to stop early)

    try:
        collect()
    except Enough:
        pass
    assert len(found) >= n, len(found)
    return list(found.values())[:n]


@pytest.fixture(scope="module")
def fuzz_cases() -> list[Case]:
    return draw_cases(2 * EXAMPLES_PER_TARGET)


def _client(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=CLIENT_TIMEOUT_S)


def fuzz(url: str, todo: list[Case]) -> None:
    failures: list[str] = []
    statuses: collections.Counter = collections.Counter()
    client = _client(url)
    last = 200
    try:
        for case in todo:
            t0 = time.monotonic()
            try:
                try:
                    r = client.post(f"/v1/{case.endpoint}", content=case.body,
                                    headers={"Content-Type": "application/json"})
                except httpx.TransportError:
                    if last < 500:
                        raise
                    # uvicorn drops the connection after an unhandled exception (the 5xx already reported);
                    # the pool's next request on it is reset: again on a new connection.
                    client.close()
                    client = _client(url)
                    t0 = time.monotonic()
                    r = client.post(f"/v1/{case.endpoint}", content=case.body,
                                    headers={"Content-Type": "application/json"})
                last = r.status_code
                statuses[r.status_code] += 1
                check_response(case, r, time.monotonic() - t0)
            except httpx.TimeoutException:
                failures.append(f"{case!r}\n  -> no answer in {CLIENT_TIMEOUT_S:.0f}s (a hang)")
                break  # what follows would wait as long
            except (AssertionError, ValueError, KeyError, TypeError, httpx.HTTPError) as e:
                failures.append(f"{case!r}\n  -> {type(e).__name__}: {str(e)[:1500]}")
            if len(failures) >= 20:
                break
    finally:
        client.close()
    print(f"{url}: {sum(statuses.values())} requests, statuses {dict(sorted(statuses.items()))}")
    assert not failures, f"{len(failures)} failing requests (of {sum(statuses.values())}):\n" + "\n".join(failures)


def test_fuzz_server(server, fuzz_cases):
    fuzz(server.url, fuzz_cases[:EXAMPLES_PER_TARGET])


def test_fuzz_router(router, fuzz_cases):
    fuzz(router.url, fuzz_cases[EXAMPLES_PER_TARGET:])


# -- the acceptance cases, every time -----------------------------------------------------------------------
INT_FIELDS = {
    "completions": ["n", "max_tokens", "seed", "top_k", "min_tokens", "priority", "logprobs", "best_of",
                    "stop_token_ids", "prompt"],
    "chat/completions": ["n", "max_tokens", "max_completion_tokens", "seed", "top_k", "min_tokens", "priority",
                         "top_logprobs", "stop_token_ids"],
}
FLOAT_FIELDS = ["temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
                "timeout", "ttft_target", "logit_bias"]
HUGE = ["10" + "0" * 29, "-1" + "0" * 30, NINES, "-" + NINES, str(2**63), str(-(2**63) - 1)]


def _base(endpoint: str) -> dict:
    return {"prompt": "Hi", "max_tokens": 1} if endpoint == "completions" else \
        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "logprobs": True}


@pytest.mark.parametrize("target", ["server", "router"])
def test_a_huge_integer_in_any_field_is_a_400_naming_it(target, request):
    """Up to the 4,300 digits a JSON parser takes; past that the body is not JSON (a 400 too, naming none)."""
    url = request.getfixturevalue(target).url
    with _client(url) as client:
        for endpoint, names in INT_FIELDS.items():
            for name in names + FLOAT_FIELDS:
                for huge in HUGE:
                    body = _base(endpoint)
                    body[name] = Raw(f"[{huge}]" if name in ("stop_token_ids", "prompt") else
                                     f'{{"1": {huge}}}' if name == "logit_bias" else huge)
                    r = client.post(f"/v1/{endpoint}", content=encode(body, True),
                                    headers={"Content-Type": "application/json"})
                    assert r.status_code == 400, (endpoint, name, huge[:40], r.status_code, r.text[:500])
                    assert r.json()["error"]["param"] == name, (endpoint, name, huge[:40], r.text[:500])
            body = _base(endpoint)
            body["n"] = Raw("1" + "0" * 5000)
            r = client.post(f"/v1/{endpoint}", content=encode(body, True), headers={"Content-Type": "application/json"})
            assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"], r.text[:500]


@pytest.fixture(scope="module")
def lenient() -> ServerProcess:
    """--lenient-fields parses the body once more, to drop unknown fields (the mock engine: no model)."""
    s = start_server("--mock", "--lenient-fields")
    yield s
    s.stop()


DEEP = b"[" * 10_000 + b"]" * 10_000


@pytest.mark.parametrize("target", ["server", "router", "lenient"])
def test_deeply_nested_json_is_a_400_everywhere(target, request):
    url = request.getfixturevalue(target).url
    bodies = [DEEP, b"[" * 10_000, b'{"a":' * 10_000 + b"1" + b"}" * 10_000]
    for key in ("prompt", "messages", "input", "tokens", "metadata", "guided_json", "logit_bias", "frobnicate"):
        bodies.append(b'{"%s": %s}' % (key.encode(), DEEP))
        bodies.append(b'{"prompt": "x", "messages": [{"role": "user", "content": "x"}], "%s": %s}' % (key.encode(),
                                                                                                     DEEP))
    paths = ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"]
    if target != "router":
        paths.append("/v1/embeddings")  # the router has no such route: 404
    with _client(url) as client:
        for path in paths:
            for body in bodies:
                r = client.post(path, content=body, headers={"Content-Type": "application/json"})
                assert r.status_code == 400, (path, body[:80], r.status_code, r.text[:500])
                assert r.json()["error"]["message"], r.text[:500]


# JSON text inside a JSON string, nested past Python's recursion limit: the body parses, the server's own
# json.loads of the string does not.
DEEP_TEXT = "[" * 5000 + "]" * 5000
CHAT = [{"role": "user", "content": "Hi"}]
TOOL = {"type": "function", "function": {"name": "f"}}
NESTED_INSIDE_STRINGS = [
    ("completions", {"prompt": "x", "max_tokens": 1, "guided_json": DEEP_TEXT}),
    ("completions", {"prompt": "x", "max_tokens": 1, "guided_json": '{"a":' * 5000 + "1" + "}" * 5000}),
    ("completions", {"prompt": "x", "max_tokens": 1, "structured_outputs": {"json": DEEP_TEXT}}),
    ("chat/completions", {"messages": CHAT, "max_tokens": 1, "guided_json": DEEP_TEXT}),
    ("chat/completions", {"max_tokens": 1, "messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": DEEP_TEXT}}]}]}),
    ("chat/completions", {"max_tokens": 1, "tools": [TOOL], "messages": [*CHAT, {"role": "assistant", "content": "",
        "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": DEEP_TEXT}}]}]}),
]
# Lone surrogates as escapes inside such JSON text: the body is valid, the text it decodes to is not UTF-8.
SURROGATES_INSIDE_STRINGS = [
    ("chat/completions", {"max_tokens": 1, "messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": args}}]}], **extra})
    for args in ('"\\ud800"', '{"a": "x\\udc00"}', '{"\\ud800": 1}') for extra in ({}, {"tools": [TOOL]})
] + [
    ("completions", {"prompt": "x", "max_tokens": 1, "guided_json": '{"enum": ["\\ud800"]}'}),
    ("completions", {"prompt": "x", "max_tokens": 1, "structured_outputs": {"json": '{"const": "\\udfff"}'}}),
]


@pytest.mark.parametrize("target", ["server", "router"])
def test_json_inside_strings_nested_or_with_lone_surrogates(target, request):
    """Nested past the limit: 400. A lone surrogate: 400, or 200 where the text is used as written."""
    url = request.getfixturevalue(target).url
    with _client(url) as client:
        for endpoint, body in NESTED_INSIDE_STRINGS + SURROGATES_INSIDE_STRINGS:
            r = client.post(f"/v1/{endpoint}", content=encode(body, True), headers={"Content-Type": "application/json"})
            allowed = (400,) if (endpoint, body) in NESTED_INSIDE_STRINGS else (200, 400)
            assert r.status_code in allowed, (endpoint, json.dumps(body)[:200], r.status_code, r.text[:1000])
            if r.status_code != 200:
                assert r.json()["error"]["message"], r.text[:500]


# -- afterwards: alive and serving --------------------------------------------------------------------------
def test_server_and_router_alive_and_serving_after_the_fuzz(server, router):
    assert server.proc.poll() is None and router.proc.poll() is None
    assert server.engine_pid() == server.initial_engine_pid, "the engine process was replaced"
    assert httpx.get(f"{server.url}/health", timeout=10).json() == {"status": "ok"}
    health = httpx.get(f"{router.url}/health", timeout=10)
    assert health.status_code == 200 and health.json()["healthy_replicas"] == 1, health.text
    for url in (server.url, router.url):
        for endpoint, body in (("completions", {"prompt": "Hello", "max_tokens": 3, "temperature": 0}),
                               ("chat/completions", {"messages": [{"role": "user", "content": "Hello"}],
                                                     "max_tokens": 3, "temperature": 0})):
            r = httpx.post(f"{url}/v1/{endpoint}", json=body, timeout=30)
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 3
    # Nothing unexpected raised on the way: an exception handled as a 500, or one in a background task.
    assert "Traceback" not in Path(server.log.name).read_text(errors="replace"), server.log_text(200)
    assert "Traceback" not in router.own_log(), router.log_text(200)
