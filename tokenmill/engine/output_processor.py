"""Frontend per-token work, done once per token: detokenize, stop strings, logprob dicts, metrics.

Shared by the offline `LLM` and the server, so both produce the same text for the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.engine.core import RequestUpdate
from tokenmill.outputs import CompletionOutput, RequestMetrics, TokenLogprob
from tokenmill.runner.batch import Logprobs
from tokenmill.sampling_params import SamplingParams
from tokenmill.tokenizer.detokenizer import IncrementalDetokenizer
from tokenmill.tokenizer.tokenizer import Tokenizer


def logprob_dict(tokenizer: Tokenizer, token_id: int, lp: Logprobs) -> dict[int, TokenLogprob]:
    chosen, top_ids, top_lps = lp
    ids = [token_id, *top_ids]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    out = {token_id: TokenLogprob(token_id, chosen, pieces[0])}
    for tid, v, piece in zip(top_ids, top_lps, pieces[1:], strict=True):
        out.setdefault(tid, TokenLogprob(tid, v, piece))
    return out


@dataclass
class Delta:
    """What one engine update adds to one completion: text and tokens that are now final."""

    text: str
    token_ids: list[int]
    logprobs: list[dict[int, TokenLogprob]] | None
    finished: bool
    needs_abort: bool  # a stop string ended it: the engine must stop generating


class CompletionState:
    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], params: SamplingParams, index: int):
        self.tokenizer = tokenizer
        self.params = params
        self.prompt_token_ids = prompt_token_ids
        self.detok = IncrementalDetokenizer(tokenizer, prompt_token_ids, params.stop,
                                            skip_special_tokens=params.skip_special_tokens,
                                            include_stop_str_in_output=params.include_stop_str_in_output)
        self.output = CompletionOutput(index, logprobs=[] if params.logprobs is not None else None)
        self.metrics: RequestMetrics | None = None
        self.prompt_logprobs: list[dict[int, TokenLogprob] | None] | None = None
        self.num_cached_tokens = 0

    def process(self, u: RequestUpdate) -> Delta:
        out = self.output
        if self.output.finished:
            return Delta("", [], None, True, False)
        out.token_ids.extend(u.new_token_ids)
        new_lps = None
        if out.logprobs is not None and u.new_logprobs:
            new_lps = [logprob_dict(self.tokenizer, t, lp) for t, lp in zip(u.new_token_ids, u.new_logprobs, strict=True)]
            out.logprobs.extend(new_lps)
        if u.prompt_logprobs is not None:
            self.prompt_logprobs = [None] + [
                logprob_dict(self.tokenizer, tok, lp)
                for tok, lp in zip(self.prompt_token_ids[1:], u.prompt_logprobs[1:], strict=True)]
        text = self.detok.add(u.new_token_ids) if u.new_token_ids else ""
        needs_abort = False
        if self.detok.stopped:
            out.finish_reason, out.stop_reason = "stop", self.detok.stop_reason
            needs_abort = u.finish_reason is None
        elif u.finish_reason is not None:
            text += self.detok.flush()
            out.finish_reason = u.finish_reason
            last = out.token_ids[-1] if out.token_ids else None
            if u.finish_reason == "stop" and last in self.params.stop_token_ids:
                out.stop_reason = last
        out.text = self.detok.text
        self.num_cached_tokens = u.num_cached_tokens
        self.metrics = RequestMetrics(u.arrival_time, u.first_scheduled_time, u.first_token_time,
                                      u.finished_time, u.num_preemptions)
        return Delta(text, list(u.new_token_ids), new_lps, out.finished, needs_abort)
