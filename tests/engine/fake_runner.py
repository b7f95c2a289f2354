"""A model-free runner for engine tests: 'samples' a token that depends only on the sequence so far,
so any scheduling (batched, chunked, preempted, prefix-hit, speculative, abandoned steps) must produce the
same tokens.

With `spec_oracle` it also proposes speculative tokens: the true continuation for a varying number of
positions, then deliberately wrong tokens, so verification accepts some and rejects the rest."""

from __future__ import annotations

from collections.abc import Callable

from tokenmill.errors import StepInterrupted
from tokenmill.runner.batch import ProposeInput, RunnerOutput, SeqInput


class FakeRunner:
    def __init__(self, num_blocks: int = 64, block_size: int = 4, max_model_len: int = 256, vocab: int = 50,
                 spec_oracle: bool = False):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.vocab = vocab
        self.steps: list[list[SeqInput]] = []  # completed steps
        self.interrupted: list[list[SeqInput]] = []  # abandoned ones
        self.released: list[str] = []
        # What each KV slot holds, to check that prefix hits and shared blocks carry the right tokens.
        self.slots: dict[int, tuple[int, int]] = {}
        self.spec_oracle = spec_oracle
        self.proposed: list[list[tuple[str, int, int]]] = []  # (request, tokens, max proposals)

    def next_token(self, history: list[int]) -> int:
        return (sum(history) * 31 + len(history)) % self.vocab

    def execute(self, seqs: list[SeqInput], interrupt: Callable[[], bool] | None = None) -> RunnerOutput:
        if interrupt is not None and interrupt():
            # What an abandoned forward pass leaves: this step's slots hold K/V of some layers only. Poisoned,
            # so a later step that reads one before recomputing it fails the content check below.
            for s in seqs:
                for i in range(len(s.token_ids)):
                    p = s.start_pos + i
                    self.slots[s.block_ids[p // self.block_size] * self.block_size + p % self.block_size] = (p, -1)
            self.interrupted.append(seqs)
            raise StepInterrupted
        self.steps.append(seqs)
        out = RunnerOutput()
        for s in seqs:
            end = s.start_pos + len(s.token_ids)
            assert len(s.block_ids) * self.block_size >= end, "blocks do not cover the tokens"
            assert len(set(s.block_ids)) == len(s.block_ids)
            for i, tok in enumerate(s.token_ids):
                p = s.start_pos + i
                self.slots[s.block_ids[p // self.block_size] * self.block_size + p % self.block_size] = (p, tok)
            history = []
            for p in range(end):  # read the whole context back through the block table
                pos, tok = self.slots[s.block_ids[p // self.block_size] * self.block_size + p % self.block_size]
                assert pos == p
                history.append(tok)
            spec = s.token_ids[len(s.token_ids) - s.num_spec:] if s.num_spec else []
            expected = (s.prompt_token_ids + s.output_token_ids + spec)[:end]
            assert history == expected, "KV cache content differs from the request's tokens"
            if s.sample and s.num_spec:  # greedy verification: the target's token at each position
                real = history[:end - s.num_spec]
                toks = []
                for i in range(s.num_spec + 1):
                    toks.append(self.next_token(real + spec[:i]))
                    if i == s.num_spec or toks[-1] != spec[i]:
                        break
                out.spec_sampled[s.request_id] = toks
            elif s.sample:
                out.sampled[s.request_id] = self.next_token(history)
        return out

    def propose(self, inputs: list[ProposeInput]) -> dict[str, list[int]]:
        self.proposed.append([(p.request_id, p.num_tokens, p.max_tokens) for p in inputs])
        if not self.spec_oracle:
            return {}
        out = {}
        for p in inputs:
            history = p.prompt_token_ids + p.output_token_ids
            good = (len(history) * 7) % (p.max_tokens + 1)  # 0..k proposals right, the rest wrong
            toks = []
            for i in range(p.max_tokens):
                t = self.next_token(history + toks)
                toks.append(t if i < good else (t + 1) % self.vocab)
            out[p.request_id] = toks
        return out

    def release(self, request_ids: list[str]) -> None:
        self.released.extend(request_ids)
