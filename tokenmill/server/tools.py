"""Tool calling on the chat API: tools into the prompt, tool calls out of the output (no torch).

Format: the Hermes-style one most open chat models are trained on -- each call a JSON object
`{"name": ..., "arguments": {...}}` between `<tool_call>` and `</tool_call>`, tool results in role `tool`
messages. A chat template that knows tools (it reads the `tools` variable) renders them itself; for one
that does not (the default SmolLM2), the tools are described in the system message and past calls and
results written out in the same format, so the model sees one convention either way.

tool_choice: "none" offers no tools; "auto" offers them and parses whatever calls the model writes;
"required" and a named function constrain the output with a grammar (calls only, arguments matching the
function's JSON schema), so the calls always parse.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from tokenmill.errors import InvalidRequestError

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.DOTALL)
_COMPACT = {"whitespace_flexible": False}


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text
    id: str

    def as_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def template_knows_tools(template: str | None) -> bool:
    return template is not None and re.search(r"\btools\b", template) is not None


def _arguments_object(text: str) -> Any:
    """A client's tool-call arguments as the object they spell, for the template; the text as it came when it
    is not JSON, nests too deeply, or holds lone surrogates (escaped in the text, unencodable once parsed)."""
    try:
        obj = json.loads(text)
        json.dumps(obj, ensure_ascii=False).encode()
        return obj
    except (ValueError, RecursionError):
        return text


def render_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, native: bool,
                    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Messages (OpenAI dicts) and extra template variables for the chat template. native: the template
    renders tools itself (it gets `tools` and tool_calls with arguments as objects, transformers' shape)."""
    if native:
        out = []
        for m in messages:
            if m.get("tool_calls"):
                m = {**m, "tool_calls": [{**c, "function": {**c["function"],
                                                            "arguments": _arguments_object(c["function"]["arguments"])}}
                                         for c in m["tool_calls"]]}
            out.append(m)
        return out, ({"tools": tools} if tools else {})
    out = []
    for m in messages:
        role, content = m["role"], m.get("content")
        if role == "assistant" and m.get("tool_calls"):
            content = content or ""
            calls = "\n".join(f"{OPEN}\n" + json.dumps({"name": c["function"]["name"],
                                                        "arguments": _arguments_object(c["function"]["arguments"])},
                                                       ensure_ascii=False) + f"\n{CLOSE}" for c in m["tool_calls"])
            content = f"{content}\n{calls}" if content else calls
        elif role == "tool" and content is not None:
            content = f"<tool_response>\n{content}\n</tool_response>"
        out.append({"role": role, "content": content})
    if tools:
        described = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        guide = ("You can call functions to help answer. The functions, as JSON schemas, are listed inside "
                 f"<tools></tools>:\n<tools>\n{described}\n</tools>\nTo call one, answer with a JSON object holding "
                 f"its name and arguments between tags:\n{OPEN}\n"
                 '{"name": <function name>, "arguments": <arguments as a JSON object>}'
                 f"\n{CLOSE}\nFunction results come back in <tool_response></tool_response>.")
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{guide}"}
        else:
            out.insert(0, {"role": "system", "content": guide})
    return out, {}


def required_grammar(tools: list[dict[str, Any]], only: str | None, parallel: bool) -> str:
    """A Lark grammar (llguidance's dialect) for output made only of tool calls: one (only, or parallel
    false) or several, each naming an offered function with arguments matching its schema."""
    chosen = [t["function"] for t in tools if only is None or t["function"]["name"] == only]
    if not chosen:
        raise InvalidRequestError(f"tool_choice names {only!r}, which is not among the tools", param="tool_choice")
    options = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                "properties": {"name": {"const": f["name"]},
                               "arguments": closed_objects(f.get("parameters") or {"type": "object", "properties": {}})}}
               for f in chosen]
    schema = {**(options[0] if len(options) == 1 else {"anyOf": options}), "x-guidance": _COMPACT}
    repeat = "call (\"\\n\" call)*" if parallel and only is None else "call"
    return (f"start: {repeat}\n"
            f"call: {json.dumps(OPEN + chr(10))} body {json.dumps(chr(10) + CLOSE)}\n"
            f"body: %json {json.dumps(schema)}\n")


_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")


def closed_objects(schema: Any) -> Any:
    """A copy of a JSON schema in which an object that does not say whether it takes undeclared properties
    takes none. A required call's arguments are then only the parameters the function declares: without
    this, JSON Schema's default lets a small model go on inventing keys until max_tokens cuts the call in
    half (vLLM's xgrammar backend closes objects the same way by default)."""
    if isinstance(schema, list):
        return [closed_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed_objects(v) if k in ("items", "additionalProperties", "not", "if", "then", "else")
           or k in _SUBSCHEMA_LISTS else v for k, v in schema.items()}
    for k in _SUBSCHEMA_MAPS:
        if isinstance(schema.get(k), dict):
            out[k] = {name: closed_objects(s) for name, s in schema[k].items()}
    is_object = schema.get("type") == "object" or "properties" in schema
    if is_object and "additionalProperties" not in schema and "patternProperties" not in schema:
        out["additionalProperties"] = False
    return out


def parse_tool_calls(text: str, offered: set[str]) -> tuple[str | None, list[ParsedCall]]:
    """(content outside the calls, or None if nothing is left; the calls) from a model's output. A block
    that is not a JSON object naming an offered function stays in the content, as the model wrote it."""
    calls: list[ParsedCall] = []
    kept: list[str] = []
    pos = 0
    for m in _CALL.finditer(text):
        call = _one_call(m.group(1), offered)
        if call is None:
            continue
        kept.append(text[pos:m.start()])
        pos = m.end()
        calls.append(call)
    kept.append(text[pos:])
    content = "".join(kept).strip()
    return (content or None) if calls else text, calls


def _one_call(body: str, offered: set[str]) -> ParsedCall | None:
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict) or obj.get("name") not in offered:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    arguments = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return ParsedCall(obj["name"], arguments, f"call_{uuid.uuid4().hex[:24]}")


class StreamedCalls:
    """Streaming: text deltas in, (content to send now, calls completed now) out. Text that may be the start
    of a call is held until it is known; a call goes out whole once its closing tag arrives."""

    def __init__(self, offered: set[str]):
        self.offered = offered
        self._buf = ""
        self.num_calls = 0

    def feed(self, text: str, final: bool = False) -> tuple[str, list[ParsedCall]]:
        self._buf += text
        out: list[str] = []
        calls: list[ParsedCall] = []
        while True:
            start = self._buf.find(OPEN)
            if start < 0:
                break
            end = self._buf.find(CLOSE, start)
            if end < 0:
                if final:
                    break
                out.append(self._buf[:start])
                self._buf = self._buf[start:]
                self.num_calls += len(calls)
                return "".join(out), calls
            call = _one_call(self._buf[start + len(OPEN):end].strip(), self.offered)
            if call is None:
                out.append(self._buf[:end + len(CLOSE)])
            else:
                out.append(self._buf[:start])
                calls.append(call)
            self._buf = self._buf[end + len(CLOSE):]
        if final:
            out.append(self._buf)
            self._buf = ""
        else:
            # Hold back a tail that could begin "<tool_call>".
            keep = next((k for k in range(min(len(OPEN) - 1, len(self._buf)), 0, -1)
                         if OPEN.startswith(self._buf[-k:])), 0)
            out.append(self._buf[:len(self._buf) - keep])
            self._buf = self._buf[len(self._buf) - keep:]
        self.num_calls += len(calls)
        text_out = "".join(out)
        if self.num_calls and not text_out.strip():
            text_out = ""  # whitespace between calls is not content
        return text_out, calls


def _conversation(tokenizer, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                  tool_choice: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    convo = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):  # text parts
            content = "\n".join(p["text"] for p in content)
        convo.append({**m, "role": "system" if m["role"] == "developer" else m["role"], "content": content})
    offered = tools if tools and tool_choice != "none" else None
    return render_messages(convo, offered, template_knows_tools(tokenizer.chat_template))


def chat_text(tokenizer, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
              tool_choice: Any = None, add_generation_prompt: bool = True) -> str:
    """The prompt text of a chat request (OpenAI message dicts), tools included unless tool_choice is
    "none": what the router hashes for prefix affinity."""
    convo, extra = _conversation(tokenizer, messages, tools, tool_choice)
    return tokenizer.apply_chat_template(convo, add_generation_prompt=add_generation_prompt, **extra)


def chat_prompt(tokenizer, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                tool_choice: Any = None, add_generation_prompt: bool = True) -> tuple[str, list[int]]:
    """chat_text and its token ids, message content encoded as plain text (Tokenizer.encode_chat)."""
    convo, extra = _conversation(tokenizer, messages, tools, tool_choice)
    return tokenizer.encode_chat(convo, add_generation_prompt=add_generation_prompt, **extra)
