"""OpenAI-compatible completions and chat: request -> SamplingParams + token ids -> engine -> JSON or SSE."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from tokenmill.engine.policy import DEFAULT_TENANT
from tokenmill.errors import InvalidRequestError
from tokenmill.outputs import TokenLogprob
from tokenmill.sampling_params import MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_STOP_TOKEN_IDS, SamplingParams
from tokenmill.server.api_models import ChatCompletionRequest, CompletionRequest, _SamplingFields
from tokenmill.server.auth import KeyGrant
from tokenmill.server.frontend import Frontend, RequestHandle, Seq
from tokenmill.server.guard import GRANT
from tokenmill.server.tools import StreamedCalls, chat_prompt, parse_tool_calls, required_grammar
from tokenmill.structured.grammar import StructuredOutput, compile_grammar

logger = logging.getLogger(__name__)

_json = msgspec.json.Encoder()
MAX_STOP_STRINGS = 16
MAX_PROMPTS = 1024
# Prompts longer than this many characters are tokenized off the event loop, so they stall nobody else.
_TOKENIZE_INLINE_CHARS = 8192
_MIN_LOGPROB = -9999.0  # JSON has no -inf; OpenAI reports hopeless tokens like this
MAX_SECONDS = 86400.0  # largest timeout / ttft_target accepted
MAX_TENANT_CHARS = 64


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(_json.encode(obj), status_code=status, media_type="application/json", headers=headers)


def _sse(obj: Any) -> bytes:
    return b"data: " + _json.encode(obj) + b"\n\n"


def _lp(v: float) -> float:
    return v if v > _MIN_LOGPROB else _MIN_LOGPROB


def _top(d: dict[int, TokenLogprob], k: int) -> list[TokenLogprob]:
    return sorted(d.values(), key=lambda e: -e.logprob)[:k] if k else []


class OpenAIServing:
    def __init__(self, frontend: Frontend, served_model_name: str, accepted_names: set[str]):
        self.frontend = frontend
        self.served_model_name = served_model_name
        self.accepted_names = accepted_names
        self.priority_bounds = frontend.config.priority_bounds

    # -- validation ----------------------------------------------------------------------------------------
    def _check_model(self, model: str | None) -> None:
        if model is not None and model not in self.accepted_names:
            raise InvalidRequestError(
                f"model '{model}' does not exist; this server serves '{self.served_model_name}'", param="model")

    def _check_ids(self, ids: list[int], param: str) -> None:
        info = self.frontend.info
        assert info is not None
        if not ids:
            raise InvalidRequestError("the prompt is empty", param=param)
        vocab = info.vocab_size
        for t in ids:
            if not 0 <= t < vocab:
                raise InvalidRequestError(f"token id {t} is outside the vocabulary [0, {vocab})", param=param)
        if len(ids) >= info.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {len(ids)} tokens; this model's context is {info.max_model_len} tokens and at "
                "least one must be left for the output", param=param)

    def _max_tokens(self, requested: int | None, default: int | None, prompt_lens: list[int],
                    param: str) -> int:
        limit = self.frontend.max_total_tokens
        longest = max(prompt_lens)
        room = limit - longest
        if room < 1:
            raise InvalidRequestError(
                f"the prompt has {longest} tokens, which leaves no room for output in the "
                f"{limit}-token limit of this server (context and KV cache)", param="prompt")
        if requested is None:
            return room if default is None else min(default, room)
        if requested < 1:
            raise InvalidRequestError(f"{param} must be an integer >= 1, got {requested}", param=param)
        if requested > room:
            raise InvalidRequestError(
                f"this server's limit is {limit} tokens (context and KV cache), but the prompt ({longest} tokens) "
                f"plus {param} ({requested}) asks for {longest + requested}; lower {param} or shorten the prompt",
                param=param)
        return requested

    async def _structured(self, req: _SamplingFields) -> StructuredOutput | None:
        """The request's output constraint, from whichever of response_format, structured_outputs and the
        guided_* fields it used (one at most), compiled here (off the event loop) so a bad one is a 400."""
        found: list[tuple[str, StructuredOutput]] = []
        rf = req.response_format
        if rf is not None and rf.type == "json_object":
            found.append(("response_format", StructuredOutput(json_object=True)))
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                raise InvalidRequestError("response_format of type json_schema needs json_schema.schema",
                                          param="response_format")
            found.append(("response_format", StructuredOutput(json=rf.json_schema.schema_)))
        so = req.structured_outputs
        if so is not None:
            found.append(("structured_outputs", StructuredOutput(
                json=so.json_, json_object=bool(so.json_object), regex=so.regex, choice=so.choice, grammar=so.grammar)))
        for name, kind in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                           ("guided_grammar", "grammar")):
            value = getattr(req, name)
            if value is not None:
                found.append((name, StructuredOutput(**{kind: value})))
        if not found:
            return None
        if len(found) > 1:
            raise InvalidRequestError(f"at most one output constraint per request, got {', '.join(n for n, _ in found)}",
                                      param=found[1][0])
        param, constraint = found[0]
        try:
            constraint.kind  # noqa: B018 - exactly one field set
            await asyncio.to_thread(compile_grammar, constraint)
        except InvalidRequestError as e:
            raise InvalidRequestError(str(e), param=param) from None
        return constraint

    def _sampling_params(self, req: _SamplingFields, max_tokens: int, logprobs: int | None,
                         num_prompts: int, structured: StructuredOutput | None = None,
                         prompt_logprobs: int | None = None) -> SamplingParams:
        info = self.frontend.info
        assert info is not None
        vocab = info.vocab_size
        n = 1 if req.n is None else req.n
        max_n = self.frontend.config.max_n
        if not 1 <= n <= max_n:
            raise InvalidRequestError(f"n must be in [1, {max_n}], got {n}", param="n")
        if n * num_prompts > MAX_PROMPTS:
            raise InvalidRequestError(f"prompts x n must be at most {MAX_PROMPTS}, got {n * num_prompts}", param="n")
        cost = num_prompts * n * max_tokens * (1 + (logprobs or 0))
        limit = self.frontend.config.max_request_cost
        if cost > limit:
            raise InvalidRequestError(
                f"this request asks for too much work: prompts ({num_prompts}) x n ({n}) x max_tokens ({max_tokens}) "
                f"x (1 + logprobs ({logprobs or 0})) = {cost:,}, over the server's --max-request-cost of {limit:,}",
                param="max_tokens")
        if req.seed is not None and not -(2**63) <= req.seed < 2**63:
            raise InvalidRequestError("seed must fit in 64 bits", param="seed")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > MAX_STOP_STRINGS:
            raise InvalidRequestError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}", param="stop")
        if len(req.logit_bias or {}) > MAX_LOGIT_BIAS:
            raise InvalidRequestError(f"logit_bias may hold at most {MAX_LOGIT_BIAS} tokens, got "
                                      f"{len(req.logit_bias)}", param="logit_bias")
        bias: dict[int, float] = {}
        for key, value in (req.logit_bias or {}).items():
            try:
                tid = int(key)
            except ValueError:
                raise InvalidRequestError(f"logit_bias keys must be token ids, got {key!r}",
                                          param="logit_bias") from None
            if not 0 <= tid < vocab:
                raise InvalidRequestError(f"logit_bias token id {tid} is outside the vocabulary [0, {vocab})",
                                          param="logit_bias")
            bias[tid] = value  # '5' and '05' name one token: the last value wins
        stop_token_ids = list(dict.fromkeys(req.stop_token_ids or []))
        if len(stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidRequestError(f"at most {MAX_STOP_TOKEN_IDS} distinct stop_token_ids, got "
                                      f"{len(stop_token_ids)}", param="stop_token_ids")
        for t in stop_token_ids:
            if not 0 <= t < vocab:
                raise InvalidRequestError(f"stop token id {t} is outside the vocabulary [0, {vocab})",
                                          param="stop_token_ids")
        top_k = 0 if req.top_k is None else req.top_k
        if top_k > vocab:
            top_k = vocab  # a cut at or past the vocabulary keeps every token: same thing, and it fits 64 bits
        min_tokens = 0 if req.min_tokens is None else req.min_tokens
        if min_tokens > max_tokens:
            raise InvalidRequestError(f"min_tokens ({min_tokens}) must not exceed max_tokens ({max_tokens})",
                                      param="min_tokens")
        if structured is not None and min_tokens:
            raise InvalidRequestError("min_tokens cannot be combined with structured output", param="min_tokens")
        if req.stream_options is not None and not req.stream:
            raise InvalidRequestError("stream_options is only allowed with stream=true", param="stream_options")

        def opt(v, default):
            return default if v is None else v

        model = self.frontend.sampling_defaults  # the model's generation_config.json, where it has one
        if req.top_k is None and "top_k" in model:
            top_k = min(max(int(model["top_k"]), 0), vocab)
        return SamplingParams(
            n=n, max_tokens=max_tokens, min_tokens=min_tokens,
            temperature=opt(req.temperature, model.get("temperature", 1.0)), top_p=opt(req.top_p, model.get("top_p", 1.0)),
            top_k=top_k, min_p=opt(req.min_p, model.get("min_p", 0.0)),
            repetition_penalty=opt(req.repetition_penalty, model.get("repetition_penalty", 1.0)),
            presence_penalty=opt(req.presence_penalty, 0.0),
            frequency_penalty=opt(req.frequency_penalty, 0.0), seed=req.seed, stop=stop,
            stop_token_ids=stop_token_ids, ignore_eos=bool(req.ignore_eos), logprobs=logprobs,
            logit_bias=bias, skip_special_tokens=opt(req.skip_special_tokens, True),
            include_stop_str_in_output=bool(req.include_stop_str_in_output), structured_output=structured,
            prompt_logprobs=prompt_logprobs)

    def _priority(self, req: _SamplingFields, grant: KeyGrant | None) -> int:
        """The request's priority, clamped into its key's range (else the server's --priority-range): a client
        cannot claim more than it was granted."""
        p = 0 if req.priority is None else req.priority
        if not -(2**31) <= p < 2**31:
            raise InvalidRequestError("priority must fit in 32 bits", param="priority")
        bounds = grant.priority if grant is not None and grant.priority is not None else self.priority_bounds
        return p if bounds is None else min(max(p, bounds[0]), bounds[1])

    def _scheduling(self, req: _SamplingFields, http: Request) -> dict[str, Any]:
        """priority, tenant, ttft_target and timeout for Frontend.submit."""
        for name in ("timeout", "ttft_target"):
            v = getattr(req, name)
            if v is not None and not 0 < v <= MAX_SECONDS:
                raise InvalidRequestError(f"{name} must be a number of seconds in (0, {MAX_SECONDS}], got {v}",
                                          param=name)
        grant = http.scope.get("state", {}).get(GRANT)
        return {"priority": self._priority(req, grant), "tenant": tenant_of(req.user, http, grant),
                "ttft_target": req.ttft_target, "timeout": req.timeout}

    def _check_chars(self, chars: int, param: str) -> None:
        """Refuse, before tokenizing, text too long for any prompt: no token holds more than the vocabulary's
        longest piece, so past max_model_len times that many characters the prompt cannot fit. Tokenizing
        megabytes only to refuse them would take the engine's cores."""
        tok, info = self.frontend.tokenizer, self.frontend.info
        assert tok is not None
        if info is not None and chars > info.max_model_len * tok.longest_piece_chars:
            raise InvalidRequestError(f"{param} is {chars} characters: more than the {info.max_model_len} tokens "
                                      "this model takes could hold", param=param)

    async def _encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        tok = self.frontend.tokenizer
        assert tok is not None
        self._check_chars(len(text), "prompt")
        if len(text) <= _TOKENIZE_INLINE_CHARS:
            return tok.encode(text, add_special_tokens=add_special_tokens)
        return await asyncio.to_thread(tok.encode, text, add_special_tokens)

    async def render_chat(self, messages: list, add_generation_prompt: bool = True,
                          tools: list[dict[str, Any]] | None = None, tool_choice: Any = None) -> tuple[str, list[int]]:
        tok = self.frontend.tokenizer
        assert tok is not None
        convo = [m.model_dump(exclude_none=True) for m in messages]
        chars = sum(len(str(m.get("content") or "")) for m in convo)
        self._check_chars(chars, "messages")
        # Encoded exactly as the offline LLM.chat does (the template places any BOS token); long ones off the loop.
        if chars <= _TOKENIZE_INLINE_CHARS:
            return chat_prompt(tok, convo, tools, tool_choice, add_generation_prompt)
        return await asyncio.to_thread(chat_prompt, tok, convo, tools, tool_choice, add_generation_prompt)

    # -- endpoints -----------------------------------------------------------------------------------------
    async def completions(self, req: CompletionRequest, http: Request, arrival: float) -> Response:
        fe = self.frontend
        fe.check_available()
        self._check_model(req.model)
        req.check_unsupported()
        p = req.prompt
        if isinstance(p, str):
            p = [p]
        if not p:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        if len(p) > MAX_PROMPTS and not isinstance(p[0], int):
            raise InvalidRequestError(f"at most {MAX_PROMPTS} prompts per request", param="prompt")
        if isinstance(p[0], str):
            prompts = [await self._encode(t) for t in p]
        elif isinstance(p[0], list):
            prompts = [list(x) for x in p]
        else:
            prompts = [list(p)]
        for ids in prompts:
            self._check_ids(ids, "prompt")
        # echo (lm-eval's loglikelihood requests): the prompt comes back in front of the output, with its
        # logprobs when logprobs is set; max_tokens 0 asks for the prompt alone (one token is generated,
        # since the pass that scores the prompt samples one anyway, and not returned).
        echo = bool(req.echo)
        prompt_only = echo and req.max_tokens == 0
        max_tokens = self._max_tokens(1 if prompt_only else req.max_tokens, 16, [len(x) for x in prompts],
                                      "max_tokens")
        params = self._sampling_params(req, max_tokens, req.logprobs, len(prompts), await self._structured(req),
                                       prompt_logprobs=req.logprobs if echo else None)
        rid = f"cmpl-{uuid.uuid4().hex}"
        handle = fe.submit(rid, prompts, params, arrival=arrival, stream=bool(req.stream),
                           **self._scheduling(req, http))
        echoed = None
        if echo:
            tok = fe.tokenizer
            assert tok is not None
            echoed = [t if isinstance(t, str) else tok.decode(ids, skip_special_tokens=False)
                      for t, ids in zip(p if isinstance(p[0], str) else [None] * len(prompts), prompts, strict=True)]
        fmt = _CompletionFormat(self, rid, params, echoed, prompt_only)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return self._stream(handle, prompts, fmt, include_usage, chat=False)
        if not await self._wait(handle, http):
            return Response(status_code=499)
        return await _answer(handle, fmt, lambda: {
            "id": rid, "object": "text_completion", "created": fmt.created, "model": self.served_model_name,
            "choices": [fmt.choice(s) for s in handle.seqs], "usage": _usage(prompts, handle, prompt_only)})

    async def chat(self, req: ChatCompletionRequest, http: Request, arrival: float,
                   extra: dict[str, Any] | None = None) -> Response:
        """extra: fields added to the answer (when streaming, to a first chunk with no choices)."""
        fe = self.frontend
        fe.check_available()
        self._check_model(req.model)
        req.check_unsupported()
        if req.top_logprobs is not None and not req.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs=true", param="top_logprobs")
        if req.top_logprobs is not None and not 0 <= req.top_logprobs <= MAX_LOGPROBS:
            raise InvalidRequestError(f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {req.top_logprobs}",
                                      param="top_logprobs")
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        tool_choice = req.tool_choice if req.tool_choice is not None else ("auto" if tools else "none")
        if tool_choice != "none" and not tools:
            raise InvalidRequestError("tool_choice needs tools", param="tool_choice")
        offered = None if tool_choice == "none" else {t["function"]["name"] for t in tools or []}
        _, ids = await self.render_chat(req.messages, tools=tools, tool_choice=tool_choice)
        self._check_ids(ids, "messages")
        requested, param = req.max_tokens, "max_tokens"
        if req.max_completion_tokens is not None:
            requested, param = req.max_completion_tokens, "max_completion_tokens"
        max_tokens = self._max_tokens(requested, None, [len(ids)], param)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        structured = await self._structured(req)
        if tools and tool_choice not in ("none", "auto"):  # calls are required: constrain them
            if structured is not None:
                raise InvalidRequestError("a required tool call cannot be combined with another output constraint",
                                          param="tool_choice")
            only = None if isinstance(tool_choice, str) else tool_choice.function.name
            grammar = required_grammar(tools, only, req.parallel_tool_calls is not False)
            structured = StructuredOutput(grammar=grammar)
            try:
                await asyncio.to_thread(compile_grammar, structured)
            except InvalidRequestError as e:  # a function's parameters are not a schema we can enforce
                raise InvalidRequestError(str(e), param="tools") from None
        params = self._sampling_params(req, max_tokens, logprobs, 1, structured)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        handle = fe.submit(rid, [ids], params, arrival=arrival, stream=bool(req.stream),
                           **self._scheduling(req, http))
        fmt = _ChatFormat(self, rid, params, offered)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return self._stream(handle, [ids], fmt, include_usage, chat=True, extra=extra)
        if not await self._wait(handle, http):
            return Response(status_code=499)
        return await _answer(handle, fmt, lambda: {
            "id": rid, "object": "chat.completion", "created": fmt.created, "model": self.served_model_name,
            "choices": [fmt.choice(s) for s in handle.seqs], "usage": _usage([ids], handle), **(extra or {})})

    # -- waiting and streaming -------------------------------------------------------------------------------
    async def _wait(self, handle: RequestHandle, http: Request) -> bool:
        """Wait for a non-streaming request; False if the client left first (its request is aborted)."""
        done = asyncio.ensure_future(handle.wait())
        gone = asyncio.ensure_future(_disconnected(http))
        finished = False
        try:
            await asyncio.wait((done, gone), return_when=asyncio.FIRST_COMPLETED)
            finished = done.done()
        finally:
            if not finished:  # the client left (or this handler was cancelled): stop generating for nobody
                done.cancel()
                self.frontend.abort(handle)
            gone.cancel()
        if not finished:
            logger.info("client of %s disconnected; request aborted", handle.request_id)
            return False
        done.result()  # raises the request's error, if any
        return True

    def _stream(self, handle: RequestHandle, prompts: list[list[int]], fmt: _Format, include_usage: bool,
                chat: bool, extra: dict[str, Any] | None = None) -> StreamingResponse:
        async def events() -> AsyncIterator[bytes]:
            q = handle.queue
            assert q is not None
            try:
                if extra:
                    yield _sse({"id": fmt.rid, "object": fmt.chunk_object, "created": fmt.created,
                                "model": self.served_model_name, "choices": [], **extra})
                if chat:
                    yield b"".join(fmt.start_chunk(s, include_usage) for s in handle.seqs)
                end = False
                while not end:
                    items = [await q.get()]
                    while not q.empty():
                        items.append(q.get_nowait())
                    out = []
                    for item in items:
                        if item is None:
                            end = True
                            break
                        out.append(fmt.chunk(item[0], item[1], include_usage))
                    if out:
                        yield b"".join(out)
                if handle.error is not None:
                    yield _sse(error_body(handle.error))
                elif include_usage:
                    yield _sse({"id": fmt.rid, "object": fmt.chunk_object, "created": fmt.created,
                                "model": self.served_model_name, "choices": [],
                                "usage": _usage(prompts, handle, fmt.prompt_only)})
                yield b"data: [DONE]\n\n"
            finally:
                if not handle.done:
                    logger.info("client of %s disconnected mid-stream; request aborted", handle.request_id)
                    self.frontend.abort(handle)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def tenant_of(user: str | None, http: Request, grant: KeyGrant | None = None) -> str:
    """Whom a request counts against for fair sharing: the tenant its API key is bound to, else its OpenAI
    `user` field, else its API key (as a short hash: the key itself never reaches logs or metrics), else the
    shared default tenant."""
    if grant is not None and grant.tenant is not None:
        return "tenant:" + grant.tenant[:MAX_TENANT_CHARS]
    if user:
        return "user:" + user[:MAX_TENANT_CHARS]
    auth = http.headers.get("authorization", "")
    if auth.lower().startswith("bearer ") and len(auth) > 7:
        return "key:" + hashlib.sha256(auth[7:].encode()).hexdigest()[:12]
    return DEFAULT_TENANT


# Past this many output tokens x (1 + top logprobs), a non-streaming answer is built and encoded on a worker
# thread: n=64 with 20 logprobs is megabytes of JSON, tens of milliseconds the event loop owes other clients.
_ANSWER_INLINE_WORK = 4096


async def _answer(handle: RequestHandle, fmt: _Format, body: Callable[[], dict[str, Any]]) -> Response:
    work = sum(len(s.state.output.token_ids) for s in handle.seqs) * (1 + fmt.top_n)
    if work <= _ANSWER_INLINE_WORK:
        return json_response(body())
    return await asyncio.to_thread(lambda: json_response(body()))


async def _disconnected(http: Request) -> None:
    # The body is read already, so the next ASGI message is http.disconnect, whenever the client leaves.
    while True:
        if (await http.receive())["type"] == "http.disconnect":
            return


def _usage(prompts: list[list[int]], handle: RequestHandle, prompt_only: bool = False) -> dict[str, Any]:
    prompt = sum(len(p) for p in prompts)
    completion = 0 if prompt_only else sum(len(s.state.output.token_ids) for s in handle.seqs)
    usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                             "total_tokens": prompt + completion}
    if len(prompts) == 1 and handle.seqs:
        # OpenAI's field: prompt tokens whose KV the prefix cache served (the first choice's; later ones of n
        # find the first's blocks)
        usage["prompt_tokens_details"] = {"cached_tokens": handle.seqs[0].state.num_cached_tokens}
    return usage


def error_body(e: BaseException) -> dict[str, Any]:
    return {"error": {"message": str(e), "type": getattr(e, "error_type", "internal_error"),
                      "param": getattr(e, "param", None), "code": getattr(e, "http_status", 500)}}


class _Format:
    chunk_object = ""
    prompt_only = False

    def __init__(self, serving: OpenAIServing, rid: str, params: SamplingParams):
        self.rid = rid
        self.model = serving.served_model_name
        self.created = int(time.time())
        self.token_text: Callable[[int], str] = serving.frontend.token_text
        self.top_n = params.logprobs or 0
        self.want_logprobs = params.logprobs is not None

    def start_chunk(self, seq: Seq, include_usage: bool) -> bytes:
        return b""

    def chunk(self, seq: Seq, delta, include_usage: bool) -> bytes:
        raise NotImplementedError

    def choice(self, seq: Seq) -> dict[str, Any]:
        raise NotImplementedError

    def _wrap(self, choice: dict[str, Any], include_usage: bool) -> bytes:
        obj = {"id": self.rid, "object": self.chunk_object, "created": self.created, "model": self.model,
               "choices": [choice]}
        if include_usage:
            obj["usage"] = None
        return _sse(obj)


class _CompletionFormat(_Format):
    chunk_object = "text_completion"

    def __init__(self, serving: OpenAIServing, rid: str, params: SamplingParams, echoed: list[str] | None = None,
                 prompt_only: bool = False):
        """echoed: per prompt, its text to put in front of the output (echo); prompt_only: the output itself
        is not returned (echo with max_tokens 0)."""
        super().__init__(serving, rid, params)
        self._offsets: dict[int, int] = {}  # choice -> text offset of its next token
        self.echoed = echoed
        self.prompt_only = prompt_only
        self.n = params.n
        self._started: set[int] = set()  # choices whose echoed prompt was sent (streaming)

    def _logprobs(self, seq: Seq, token_ids: list[int], lps: list[dict[int, TokenLogprob] | None] | None,
                  ) -> dict | None:
        if not self.want_logprobs:
            return None
        text, tok_lps, top, offsets = [], [], [], []
        off = self._offsets.get(seq.index, 0)
        for tid, d in zip(token_ids, lps or [], strict=False):
            t = self.token_text(tid)
            text.append(t)
            if d is None:  # the prompt's first token: nothing predicts it
                tok_lps.append(None)
                top.append(None)
            else:
                tok_lps.append(_lp(d[tid].logprob))
                top.append({self.token_text(e.token_id): _lp(e.logprob) for e in _top(d, self.top_n)})
            offsets.append(off)
            off += len(t)
        self._offsets[seq.index] = off
        return {"tokens": text, "token_logprobs": tok_lps, "top_logprobs": top, "text_offset": offsets}

    def _head(self, seq: Seq) -> tuple[str, dict | None]:
        """The echoed prompt of seq's choice: its text and (with logprobs) its tokens' logprobs."""
        assert self.echoed is not None
        text = self.echoed[seq.index // self.n]
        state = seq.state
        lps = None
        if self.want_logprobs:
            lps = self._logprobs(seq, state.prompt_token_ids, state.prompt_logprobs)
        self._offsets[seq.index] = len(text)
        return text, lps

    @staticmethod
    def _join(head: dict | None, tail: dict | None) -> dict | None:
        if head is None or tail is None:
            return head or tail
        return {k: head[k] + tail[k] for k in head}

    def chunk(self, seq: Seq, delta, include_usage: bool) -> bytes:
        out = seq.state.output
        first = self.echoed is not None and seq.index not in self._started
        if not (first or delta.text or delta.finished or (self.want_logprobs and delta.token_ids)):
            return b""  # the detokenizer is holding these tokens' text back (partial character, maybe a stop)
        text, lps = "", None
        if first:
            self._started.add(seq.index)
            text, lps = self._head(seq)
        if not self.prompt_only:
            text += delta.text
            lps = self._join(lps, self._logprobs(seq, delta.token_ids, delta.logprobs))
        return self._wrap({"index": seq.index, "text": text, "logprobs": lps,
                           "finish_reason": self._finish(out) if delta.finished else None}, include_usage)

    def choice(self, seq: Seq) -> dict[str, Any]:
        out = seq.state.output
        text, lps = self._head(seq) if self.echoed is not None else ("", None)
        if not self.prompt_only:
            text += out.text
            lps = self._join(lps, self._logprobs(seq, out.token_ids, out.logprobs))
        return {"index": seq.index, "text": text, "logprobs": lps, "finish_reason": self._finish(out)}

    def _finish(self, out) -> str | None:
        return "length" if self.prompt_only else out.finish_reason


class _ChatFormat(_Format):
    chunk_object = "chat.completion.chunk"

    def __init__(self, serving: OpenAIServing, rid: str, params: SamplingParams, tools: set[str] | None = None):
        """tools: names of the functions offered (calls in the output are parsed out), or None."""
        super().__init__(serving, rid, params)
        self.tools = tools
        self._streams: dict[int, StreamedCalls] = {}

    def _logprobs(self, token_ids: list[int], lps: list[dict[int, TokenLogprob]] | None) -> dict | None:
        if not self.want_logprobs:
            return None
        content = []
        for tid, d in zip(token_ids, lps or [], strict=False):
            t = self.token_text(tid)
            content.append({"token": t, "logprob": _lp(d[tid].logprob), "bytes": list(t.encode()),
                            "top_logprobs": [{"token": (s := self.token_text(e.token_id)), "logprob": _lp(e.logprob),
                                              "bytes": list(s.encode())} for e in _top(d, self.top_n)]})
        return {"content": content}

    def start_chunk(self, seq: Seq, include_usage: bool) -> bytes:
        return self._wrap({"index": seq.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                           "finish_reason": None}, include_usage)

    def chunk(self, seq: Seq, delta, include_usage: bool) -> bytes:
        out = b""
        text, calls = delta.text, []
        parser = None
        if self.tools is not None:
            parser = self._streams.setdefault(seq.index, StreamedCalls(self.tools))
            text, calls = parser.feed(delta.text, final=delta.finished)
        if text or (self.want_logprobs and delta.token_ids):
            out = self._wrap({"index": seq.index, "delta": {"content": text},
                              "logprobs": self._logprobs(delta.token_ids, delta.logprobs), "finish_reason": None},
                             include_usage)
        first = parser.num_calls - len(calls) if parser is not None else 0
        for i, call in enumerate(calls):  # a call's name, then its arguments, as OpenAI streams them
            head = {"index": first + i, "id": call.id, "type": "function",
                    "function": {"name": call.name, "arguments": ""}}
            out += self._wrap({"index": seq.index, "delta": {"tool_calls": [head]}, "logprobs": None,
                               "finish_reason": None}, include_usage)
            out += self._wrap({"index": seq.index, "delta": {"tool_calls": [
                {"index": first + i, "function": {"arguments": call.arguments}}]}, "logprobs": None,
                "finish_reason": None}, include_usage)
        if delta.finished:
            out += self._wrap({"index": seq.index, "delta": {}, "logprobs": None,
                               "finish_reason": self._finish(seq, parser is not None and parser.num_calls > 0)},
                              include_usage)
        return out

    @staticmethod
    def _finish(seq: Seq, called: bool) -> str | None:
        reason = seq.state.output.finish_reason
        return "tool_calls" if called and reason == "stop" else reason

    def choice(self, seq: Seq) -> dict[str, Any]:
        out = seq.state.output
        message: dict[str, Any] = {"role": "assistant", "content": out.text}
        calls = []
        if self.tools is not None:
            message["content"], calls = parse_tool_calls(out.text, self.tools)
            if calls:
                message["tool_calls"] = [c.as_openai() for c in calls]
        return {"index": seq.index, "message": message, "logprobs": self._logprobs(out.token_ids, out.logprobs),
                "finish_reason": self._finish(seq, bool(calls))}
