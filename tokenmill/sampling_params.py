"""Per-request generation settings, validated once at the edge so the engine can trust them."""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.errors import InvalidRequestError
from tokenmill.structured.grammar import StructuredOutput, compile_grammar

MAX_LOGPROBS = 20
MAX_STOP_TOKEN_IDS = 256  # distinct ids: each is checked against every new token
MAX_LOGIT_BIAS = 300  # entries, as OpenAI limits them
# Below this a temperature is greedy: logits divided by it overflow float32 (1e-46 is 0 there) and the
# softmax of inf - inf is NaN, which once sampled nothing at all. vLLM draws the line at 1e-5 too.
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    """What to generate and how to choose each token. Field names follow vLLM's `SamplingParams`."""

    n: int = 1
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k cut
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N logprobs per generated token
    prompt_logprobs: int | None = None  # top-N logprobs per prompt token
    logit_bias: dict[int, float] = field(default_factory=dict)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured_output: StructuredOutput | None = None  # the output must match this (JSON schema, regex, ...)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        try:
            self.stop_token_ids = list(dict.fromkeys(self.stop_token_ids or []))  # repeats mean nothing more
        except TypeError:  # unhashable entries: validate() names the problem
            self.stop_token_ids = list(self.stop_token_ids)
        if self.top_k == -1:
            self.top_k = 0
        self.validate()
        if self.temperature < GREEDY_BELOW_TEMPERATURE:
            self.temperature = 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        def bad(param: str, why: str) -> InvalidRequestError:
            return InvalidRequestError(f"{param} {why}", param=param)

        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", f"must be an integer >= 1, got {self.n!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise bad("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad("min_tokens", f"must be an integer >= 0, got {self.min_tokens!r}")
        if self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if not (self.temperature >= 0.0) or self.temperature > 100.0:
            raise bad("temperature", f"must be in [0, 100], got {self.temperature!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise bad("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", f"must be -1, 0 (off) or a positive integer, got {self.top_k!r}")
        if not (0.0 <= self.min_p <= 1.0):
            raise bad("min_p", f"must be in [0, 1], got {self.min_p!r}")
        if not (0.0 < self.repetition_penalty <= 10.0):
            raise bad("repetition_penalty", f"must be in (0, 10], got {self.repetition_penalty!r}")
        if not (-2.0 <= self.presence_penalty <= 2.0):
            raise bad("presence_penalty", f"must be in [-2, 2], got {self.presence_penalty!r}")
        if not (-2.0 <= self.frequency_penalty <= 2.0):
            raise bad("frequency_penalty", f"must be in [-2, 2], got {self.frequency_penalty!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad("seed", f"must be an integer, got {self.seed!r}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or not 0 <= v <= MAX_LOGPROBS):
                raise bad(name, f"must be an integer in [0, {MAX_LOGPROBS}], got {v!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "must be non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be non-negative integers")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise bad("stop_token_ids", f"may hold at most {MAX_STOP_TOKEN_IDS} distinct ids, got "
                                        f"{len(self.stop_token_ids)}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise bad("logit_bias", f"may hold at most {MAX_LOGIT_BIAS} tokens, got {len(self.logit_bias)}")
        for tok, bias in self.logit_bias.items():
            if not isinstance(tok, int) or tok < 0:
                raise bad("logit_bias", f"keys must be token ids, got {tok!r}")
            if not (-100.0 <= bias <= 100.0):
                raise bad("logit_bias", f"values must be in [-100, 100], got {bias!r}")
        if self.structured_output is not None:
            if self.min_tokens:  # a finished grammar allows only end-of-sequence, which min_tokens forbids
                raise bad("min_tokens", "cannot be combined with structured output")
            compile_grammar(self.structured_output)  # a malformed constraint is the caller's 400 (cached)
