"""Token masks of structured-output requests, computed beside the forward pass (the runner's side).

Each constrained request gets an llguidance matcher, created on its first step. A matcher's state is never
told what happened; it is derived from the request's own output tokens: before each mask it consumes the
tokens it has not seen yet. So preemption, speculative steps (several tokens at once) and recompute need no
special case, and a step that sampled nothing changes nothing.

Bringing matchers up to date happens on the calling thread (microseconds a token); the masks themselves,
the expensive part, are computed in one llguidance call for the whole step (it drops the GIL once), on a
worker thread started when the step starts and collected after the forward pass -- where a core is free
for it. One call, not one per request: a thread that needs the GIL back after every request waits up to
the interpreter's switch interval (5 ms) each time the forward pass holds it. Where the forward pass's
math threads already take every core, the masks are computed inline instead: a worker would preempt one
of those threads and stall the whole parallel region until the scheduler gives it its core back (on the
2-core AMD EPYC that cost a batch-1 step ~1 ms for ~0.1 ms of masks). Speculative proposals get a mask per position: the
mask after each proposal that the grammar allows; a proposal it forbids has probability 0 under its mask,
so verification rejects it.
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
        # The grammar is complete (its end-of-sequence consumed: tokens after it, under ignore_eos, are not
        # fed to it) or was left; either way only end-of-sequence is allowed from here on.
        self.ended = False


class GrammarMasks:
    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: list[int], background: bool = True):
        """background: compute masks on the worker thread, beside the forward pass (else inline)."""
        self.background = background
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32
        self._eos = [t for t in eos_token_ids if 0 <= t < vocab_size]
        self._executor = None  # llguidance's, one thread: the other core runs the forward pass meanwhile
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar")
        # Building llguidance's token trie takes ~0.5 s: done on the worker at start-up, off the load path.
        self._tokenizer: Future = self._pool.submit(self._build_tokenizer, tokenizer_json)
        self._tracked: dict[str, _Tracked] = {}
        self._pending: Future | None = None  # the last step's masks, which the caller may not have collected

    def _build_tokenizer(self, tokenizer_json: str):
        import llguidance

        self._executor = llguidance.LLExecutor(num_threads=1)
        return llguidance.LLTokenizer(tokenizer_json, n_vocab=self.vocab_size, eos_token=self._eos)

    def start(self, requests: list[MaskRequest]) -> Future[StepMasks]:
        """Begin computing this step's masks; collect them with .result() after the forward pass."""
        if self._pending is not None and not self._pending.done():
            # An abandoned step's masks may still be in flight on these matchers: let them finish first.
            self._pending.result()
        rows = sum(1 + len(r.proposals) for r in requests)
        bitmask = torch.full((rows, self.words), -1, dtype=torch.int32)
        first_row: dict[str, int] = {}
        jobs: list[tuple[object, int, list[int]]] = []  # (matcher, first row, proposals it allows)
        row = 0
        for r in requests:
            first_row[r.request_id] = row
            t = self._catch_up(r)
            if t.ended:
                for i in range(1 + len(r.proposals)):
                    self._eos_only(bitmask[row + i])
            else:
                # Rows past the first forbidden proposal are never sampled: left all-allowed.
                allowed = t.matcher.validate_tokens(r.proposals) if r.proposals else 0
                jobs.append((t.matcher, row, r.proposals[:allowed]))
            row += 1 + len(r.proposals)
        if self.background:
            self._pending = self._pool.submit(self._fill, jobs, bitmask, first_row)
            return self._pending
        done: Future[StepMasks] = Future()
        done.set_result(self._fill(jobs, bitmask, first_row))
        return done

    def release(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self._tracked.pop(rid, None)

    def _fill(self, jobs: list[tuple[object, int, list[int]]], bitmask: torch.Tensor,
              first_row: dict[str, int]) -> StepMasks:
        if jobs:
            ptr, one, rows = bitmask.data_ptr(), self.words * 4, bitmask.shape[0]
            plain = [(m, row) for m, row, drafts in jobs if not drafts]
            drafted = [job for job in jobs if job[2]]  # llguidance takes only non-empty drafts here
            if plain:
                self._executor.unsafe_compute_mask_ptr(plain, ptr, one, rows)
            if drafted:
                self._executor.unsafe_compute_mask_ptr_with_draft_token(drafted, ptr, one, rows)
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
        for tok in out[t.consumed:]:
            if t.ended:
                break
            if not t.matcher.consume_token(tok):
                self._fail(r.request_id, t, t.matcher.get_error())
            elif t.matcher.is_stopped():
                t.ended = True
        t.consumed = len(out)
        return t

    def _fail(self, rid: str, t: _Tracked, why: str) -> None:
        # Cannot happen while every token is sampled under the mask; if it does, end the request cleanly.
        logger.warning("structured output of %s left its grammar (%s): only end-of-sequence allowed now", rid, why)
        t.ended = True

    def _eos_only(self, row: torch.Tensor) -> None:
        row.zero_()
        for t in self._eos:
            row[t // 32] |= 1 << (t % 32) if t % 32 < 31 else -(1 << 31)
