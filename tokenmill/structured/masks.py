"""Token masks of structured-output requests, computed beside the forward pass (the runner's side).

Each constrained request gets an llguidance matcher, created on its first step. A matcher's state is never
told what happened; it is derived from the request's own output tokens: before each mask it consumes the
tokens it has not seen yet. So preemption, speculative steps (several tokens at once) and recompute need no
special case, and a step that sampled nothing changes nothing.

All matcher work runs on one worker thread (llguidance drops the GIL), started when the step starts and
collected after the forward pass, so it costs the step only what the forward pass does not hide.
Speculative proposals get a mask per position: the mask after each proposal that the grammar allows; a
proposal it forbids has probability 0 under its mask, so verification rejects it.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from tokenmill.structured.grammar import StructuredOutput, compile_grammar

logger = logging.getLogger(__name__)


@dataclass
class MaskRequest:
    """A constrained request that samples this step. The lists are the request's own: read, never changed."""

    request_id: str
    constraint: StructuredOutput
    output_token_ids: list[int]
    proposals: list[int]  # speculative tokens to verify this step (empty: one plain sample)


@dataclass
class StepMasks:
    """bitmask [rows, words] int32 (bit j of word w allows token 32w + j); first_row per request id, whose
    rows are 1 + len(proposals), in position order."""

    bitmask: torch.Tensor
    first_row: dict[str, int]


class _Tracked:
    def __init__(self, matcher) -> None:
        self.matcher = matcher
        self.consumed = 0  # output tokens the matcher has seen
        self.failed = False


class GrammarMasks:
    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: list[int]):
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32
        self._eos = [t for t in eos_token_ids if 0 <= t < vocab_size]
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar")
        # Building llguidance's token trie takes ~0.5 s: done on the worker at start-up, off the load path.
        self._tokenizer: Future = self._pool.submit(self._build_tokenizer, tokenizer_json)
        self._tracked: dict[str, _Tracked] = {}

    def _build_tokenizer(self, tokenizer_json: str):
        import llguidance

        return llguidance.LLTokenizer(tokenizer_json, n_vocab=self.vocab_size, eos_token=self._eos)

    def start(self, requests: list[MaskRequest]) -> Future[StepMasks]:
        """Begin computing this step's masks; collect them with .result() after the forward pass."""
        return self._pool.submit(self._compute, requests)

    def release(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self._tracked.pop(rid, None)

    # -- on the worker thread ------------------------------------------------------------------------
    def _compute(self, requests: list[MaskRequest]) -> StepMasks:
        rows = sum(1 + len(r.proposals) for r in requests)
        bitmask = torch.full((rows, self.words), -1, dtype=torch.int32)
        first_row: dict[str, int] = {}
        row = 0
        for r in requests:
            first_row[r.request_id] = row
            t = self._catch_up(r)
            m = t.matcher
            allowed = 0 if t.failed else m.validate_tokens(r.proposals) if r.proposals else 0
            for i in range(len(r.proposals) + 1):
                if t.failed:
                    self._eos_only(bitmask[row + i])
                elif i <= allowed:  # rows past the first forbidden proposal are never sampled
                    self._fill(m, bitmask[row + i])
                    if i < allowed:
                        m.consume_token(r.proposals[i])
            if allowed and not t.failed:
                m.rollback(allowed)
            row += 1 + len(r.proposals)
        return StepMasks(bitmask, first_row)

    def _catch_up(self, r: MaskRequest) -> _Tracked:
        t = self._tracked.get(r.request_id)
        if t is None:
            import llguidance

            t = self._tracked[r.request_id] = _Tracked(
                llguidance.LLMatcher(self._tokenizer.result(), compile_grammar(r.constraint), log_level=0))
            if t.matcher.is_error():
                self._fail(r.request_id, t, t.matcher.get_error())
        out = r.output_token_ids
        if not t.failed and len(out) > t.consumed:
            if not t.matcher.consume_tokens(out[t.consumed:]):
                self._fail(r.request_id, t, t.matcher.get_error())
        t.consumed = len(out)
        return t

    def _fail(self, rid: str, t: _Tracked, why: str) -> None:
        # Cannot happen while every token is sampled under the mask; if it does, end the request cleanly.
        logger.warning("structured output of %s left its grammar (%s): only end-of-sequence allowed now", rid, why)
        t.failed = True

    @staticmethod
    def _fill(matcher, row: torch.Tensor) -> None:
        matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())

    def _eos_only(self, row: torch.Tensor) -> None:
        row.zero_()
        for t in self._eos:
            row[t // 32] |= 1 << (t % 32) if t % 32 < 31 else -(1 << 31)
