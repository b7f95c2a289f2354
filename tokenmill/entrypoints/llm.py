"""The offline API: `LLM(model=...).generate(prompts, params)`, shaped like vLLM's."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import replace

from tqdm import tqdm

from tokenmill.config import EngineConfig
from tokenmill.engine.output_processor import CompletionState
from tokenmill.engine.replica import build_replica
from tokenmill.errors import InvalidRequestError
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

Prompt = str | list[int]


class LLM:
    """Every engine option is a keyword argument: `LLM(model="default", kv_cache_memory="1GiB")`."""

    def __init__(self, model: str = "default", **engine_options):
        self.config = EngineConfig.from_kwargs(model=model, **engine_options)
        self.replica = build_replica(self.config)
        self.tokenizer = self.replica.tokenizer
        self.engine = self.replica.engine
        self._ids = itertools.count()

    def _prompt_ids(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, list | tuple) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise InvalidRequestError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}",
                                  param="prompt")

    def generate(self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, priority: Sequence[int] | None = None) -> list[RequestOutput]:
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # one prompt, as text or as token ids
        prompts = list(prompts)
        if params is None:
            params = SamplingParams()
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(plist) != len(prompts):
            raise InvalidRequestError(f"{len(prompts)} prompts but {len(plist)} sampling params")
        return self._run([self._prompt_ids(p) for p in prompts], plist, use_tqdm, priority)

    def chat(self, messages: list[dict] | Sequence[list[dict]], params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True) -> list[RequestOutput]:
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        # The template places any BOS token; message content is encoded as text, control tokens' spellings too.
        encoded: list[tuple[str | None, list[int]]] = [
            self.tokenizer.encode_chat(c, add_generation_prompt=add_generation_prompt) for c in convs]
        plist = [params or SamplingParams()] * len(convs) if not isinstance(params, Sequence) else list(params)
        return self._run(encoded, plist, use_tqdm, None)

    def _run(self, encoded: list[tuple[str | None, list[int]]], plist: list[SamplingParams], use_tqdm: bool,
             priority: Sequence[int] | None) -> list[RequestOutput]:
        results: list[RequestOutput] = []
        states: dict[str, tuple[RequestOutput, CompletionState]] = {}
        try:
            for i, ((text, ids), p) in enumerate(zip(encoded, plist, strict=True)):
                base = f"offline-{next(self._ids)}"
                ro = RequestOutput(base, text, ids, [])
                results.append(ro)
                for j in range(p.n):
                    child = p if p.n == 1 else _child_params(p, j)
                    rid = base if p.n == 1 else f"{base}-{j}"
                    st = CompletionState(self.tokenizer, ids, child, j)
                    ro.outputs.append(st.output)
                    states[rid] = (ro, st)
                    self.engine.add_request(ids, child, request_id=rid,
                                            priority=priority[i] if priority else 0,
                                            cache_salt=base if p.n > 1 else None)
        except Exception:
            for rid in states:
                self.engine.abort_request(rid)
            self.engine.step()  # drain the abort updates
            raise
        bar = tqdm(total=len(states), desc="generate", unit="req", disable=not use_tqdm or len(states) < 2)
        remaining = len(states)
        while remaining:
            for u in self.engine.step():
                entry = states.get(u.request_id)
                if entry is None or entry[1].output.finished:
                    continue  # the engine's echo of an abort we sent after a stop string
                ro, st = entry
                delta = st.process(u)
                if delta.needs_abort:
                    self.engine.abort_request(u.request_id)
                if u.prompt_logprobs is not None:
                    ro.prompt_logprobs = st.prompt_logprobs
                if delta.finished:
                    ro.metrics = st.metrics
                    ro.num_cached_tokens = st.num_cached_tokens
                    remaining -= 1
                    bar.update(1)
        bar.close()
        return results


def _child_params(p: SamplingParams, j: int) -> SamplingParams:
    # Each of the n completions gets its own stream of randomness, reproducible from the parent seed.
    return replace(p, n=1, seed=None if p.seed is None else p.seed + j)
