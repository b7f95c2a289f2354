"""Structured output: what a request asks its output to match, compiled into an llguidance grammar.

A request names one constraint (vLLM's `StructuredOutputsParams` names): a JSON schema, any JSON object, a
regular expression, a choice among strings, or a Lark grammar (llguidance's dialect; llama.cpp's GBNF is
accepted too). llguidance (the grammar engine llama.cpp and vLLM use) turns it into one grammar string.
Compiling checks the constraint, so a bad schema or regex is a 400 naming the parameter at the edge, never
a failure inside a step. This module imports no torch: the frontend uses it.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

from tokenmill.errors import InvalidRequestError

MAX_SPEC_CHARS = 64 * 1024  # a schema, regex or grammar this long is refused before compiling it
MAX_CHOICES = 256

# JSON written compactly (", " and ": "), with no whitespace of the model's choosing between tokens: a
# small model asked for JSON would otherwise pad with newlines until max_tokens. Strings stay free.
_JSON_OPTIONS = {"whitespace_flexible": False}


@dataclass
class StructuredOutput:
    """Exactly one field set. `json` is a JSON schema as JSON text (a dict is serialized on construction)."""

    json: str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # Lark (llguidance's dialect) or GBNF

    def __post_init__(self) -> None:
        if isinstance(self.json, dict | bool):  # a schema given as an object (true: anything)
            self.json = json.dumps(self.json)

    @property
    def kind(self) -> str:
        set_ = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        if self.json_object:
            set_.append("json_object")
        if len(set_) != 1:
            raise InvalidRequestError(
                f"structured output takes exactly one of json, json_object, regex, choice, grammar; got "
                f"{', '.join(set_) or 'none'}", param="structured_outputs")
        return set_[0]

    def key(self) -> tuple[str, str]:
        """(kind, text): what the compiled grammar depends on."""
        kind = self.kind
        if kind == "json_object":
            return kind, ""
        if kind == "choice":
            return kind, json.dumps(self.choice)
        return kind, getattr(self, kind)


def compile_grammar(so: StructuredOutput) -> str:
    """The llguidance grammar for so; InvalidRequestError when the constraint is malformed."""
    return _compile(*so.key())


@functools.lru_cache(maxsize=256)
def _compile(kind: str, text: str) -> str:
    # Cached: the same constraint is checked at the edge, again when the engine decodes the request, and
    # again for each of n completions; clients reuse few schemas.
    import llguidance

    if len(text) > MAX_SPEC_CHARS:
        raise InvalidRequestError(f"the {kind} constraint is {len(text):,} characters, over the limit of "
                                  f"{MAX_SPEC_CHARS:,}", param=kind)
    try:
        if kind == "json_object":
            grammar = llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=_JSON_OPTIONS)
        elif kind == "json":
            schema = json.loads(text)
            if not isinstance(schema, dict | bool):
                raise InvalidRequestError("a JSON schema must be an object or a boolean", param="json_schema")
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
        elif kind == "regex":
            grammar = llguidance.LLMatcher.grammar_from_regex(text)
        elif kind == "choice":
            choices = json.loads(text)
            if not choices or len(choices) > MAX_CHOICES or not all(isinstance(c, str) and c for c in choices):
                raise InvalidRequestError(f"choice must be 1 to {MAX_CHOICES} non-empty strings", param="choice")
            grammar = llguidance.LLMatcher.grammar_from_lark(
                "start: " + " | ".join(json.dumps(c) for c in dict.fromkeys(choices)))
        elif kind == "grammar":
            grammar = llguidance.grammar_from("grammar", text)
        else:  # pragma: no cover - StructuredOutput.kind names only the above
            raise AssertionError(kind)
    except InvalidRequestError:
        raise
    except (ValueError, RecursionError) as e:  # malformed or too deeply nested schema JSON, GBNF that does not convert
        raise InvalidRequestError(f"invalid {kind} constraint: {e}", param=kind) from None
    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if failed:
        raise InvalidRequestError(f"invalid {kind} constraint: {messages[0].strip()}", param=kind)
    return grammar
