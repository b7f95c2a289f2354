"""Request bodies of the OpenAI-compatible API, validated strictly.

Unknown fields are rejected (extra="forbid"), wrong JSON types are rejected (strict=True: no "5" for 5),
and OpenAI parameters we know but do not implement are listed so the 400 says so in plain words.
Value ranges are checked by SamplingParams and the serving code, which name the parameter. Integers are
bounded here, once, by their type (`Int64`): JSON allows any number of digits, and a 4000-digit max_tokens
or logprobs once reached arithmetic whose result Python cannot format (over 4300 digits), a 500.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tokenmill.errors import UnsupportedParameterError

# Every integer parameter: a signed 64-bit value (what a seed may be), else a 400 naming the field. Token id
# lists inside a prompt/input union stay plain `int`: a bound there would make pydantic report the union's
# first (string) branch; the serving code checks each id against the vocabulary and names the field itself.
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool | None = None


class JsonSchemaFormat(_Strict):
    name: str
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None  # always enforced here: the output matches the schema whatever this says


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Strict):
    """vLLM's `structured_outputs` extension: exactly one constraint."""

    json_: dict[str, Any] | bool | str | None = Field(default=None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


class _SamplingFields(_Strict):
    model: str | None = None
    n: Int64 | None = None
    max_tokens: Int64 | None = None
    temperature: float | None = None
    top_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    seed: Int64 | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Extensions (vLLM's names).
    top_k: Int64 | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: Int64 | None = None
    ignore_eos: bool | None = None
    priority: Int64 | None = None
    # tokenmill extensions: seconds until the request is aborted with a timeout error; its TTFT target
    # (deadline policy and admission control).
    timeout: float | None = None
    ttft_target: float | None = None
    stop_token_ids: list[Int64] | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    # Structured output: OpenAI's response_format, vLLM's structured_outputs and its older guided_* fields.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | bool | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    # OpenAI parameters tokenmill does not implement. Accepted only when absent/null or at the value that
    # means "off", so a request is never served while silently ignoring what it asked for.
    UNSUPPORTED: ClassVar[dict[str, Any]] = {}

    def check_unsupported(self) -> None:
        for name, harmless in self.UNSUPPORTED.items():
            value = getattr(self, name)
            if value is None or value == harmless:
                continue
            raise UnsupportedParameterError(f"'{name}' is not supported by this server", param=name)


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: Int64 | None = None
    echo: bool | None = None
    suffix: Any = None
    best_of: Int64 | None = None

    UNSUPPORTED: ClassVar[dict[str, Any]] = {"suffix": ""}

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise UnsupportedParameterError("'best_of' other than n is not supported by this server",
                                            param="best_of")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None  # None only on an assistant message that calls tools
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant
    tool_call_id: str | None = None  # tool: the call this message answers

    @model_validator(mode="after")
    def _content_or_calls(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (only an assistant message with tool_calls may omit it)")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return self


class FunctionSpec(_Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; absent: no arguments
    strict: bool | None = None  # always enforced when the call is required: arguments match the schema


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int64 | None = None
    logprobs: bool | None = None
    top_logprobs: Int64 | None = None
    tools: list[Tool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # Known, not implemented (the pre-tools API):
    functions: Any = None
    function_call: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    service_tier: Any = None
    store: Any = None
    metadata: Any = None

    UNSUPPORTED: ClassVar[dict[str, Any]] = {
        "functions": [], "function_call": "none",
        "modalities": ["text"], "audio": None, "prediction": None,
        "reasoning_effort": None, "web_search_options": None, "service_tier": "auto", "store": False,
        "metadata": None,
    }


class RagOptions(_Strict):
    top_k: Int64 | None = None  # passages retrieved (default 4)
    max_context_tokens: Int64 | None = None  # the model's tokens the passages may take (default 1024)
    hybrid: bool | None = None  # dense + BM25 fused by rank (default); false: dense only
    order: Literal["index", "score"] | None = None  # passages in the index's order (default: prefix-cache hits) or best first


class RagChatCompletionRequest(ChatCompletionRequest):
    rag: RagOptions | None = None


class EmbeddingRequest(_Strict):
    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: Int64 | None = None  # accepted only as the model's own size: this model cannot shorten
    user: str | None = None


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | None = None


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[Int64]
