"""A model-free runner for engine tests: 'samples' a token that depends only on the sequence so far,
so any scheduling (batched, chunked, preempted, prefix-hit, speculative, abandoned steps) must produce the
same tokens.

With `spec_oracle` it also proposes speculative tokens: the true continuation for a varying number of
positions, then deliberately wrong tokens, so verification accepts some and rejects the rest.

With `windows` it has KV groups, as a sliding-window model: each group writes its own block table and reads
back what its layers would (a full group the whole context, a windowed group the window of every query in
the step), checking that each slot holds that group's KV of the right position and token."""

from __future__ import annotations

from collections.abc import Callable

from tokenmill.errors import StepInterrupted
from tokenmill.runner.batch import ProposeInput, RunnerOutput, SeqInput


class FakeRunner:
    def __init__(self, num_blocks: int = 64, block_size: int = 4, max_model_len: int = 256, vocab: int = 50,
                 spec_oracle: bool = False, windows: tuple[int | None, ...] = (None,)):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.vocab = vocab
        self.kv_group_windows = windows  # what EngineCore reads to build its KV cache manager
        self.steps: list[list[SeqInput]] = []  # completed steps
        self.interrupted: list[list[SeqInput]] = []  # abandoned ones
        self.released: list[str] = []
        # What each KV slot holds (group, position, token), to check that prefix hits and shared blocks
        # carry the right tokens.
        self.slots: dict[int, tuple[int, int, int]] = {}
        self.spec_oracle = spec_oracle
        self.proposed: list[list[tuple[str, int, int]]] = []  # (request, tokens, max proposals)

    def next_token(self, history: list[int]) -> int:
        return (sum(history) * 31 + len(history)) % self.vocab

    def _slot(self, table: list[int], p: int) -> int:
        return table[p // self.block_size] * self.block_size + p % self.block_size

    def execute(self, seqs: list[SeqInput], interrupt: Callable[[], bool] | None = None) -> RunnerOutput:
        assert all(len(s.block_ids) == len(self.kv_group_windows) for s in seqs), "one block table per group"
        if interrupt is not None and interrupt():
            # What an abandoned forward pass leaves: this step's slots hold K/V of some layers only. Poisoned,
            # so a later step that reads one before recomputing it fails the content check below.
            for s in seqs:
                for g, table in enumerate(s.block_ids):
                    for i in range(len(s.token_ids)):
                        p = s.start_pos + i
                        self.slots[self._slot(table, p)] = (g, p, -1)
            self.interrupted.append(seqs)
            raise StepInterrupted
        self.steps.append(seqs)
        out = RunnerOutput()
        windowed = any(w is not None for w in self.kv_group_windows)
        for s in seqs:
            end = s.start_pos + len(s.token_ids)
            real_ids = [b for table in s.block_ids for b in table if not (windowed and b == 0)]
            assert len(set(real_ids)) == len(real_ids), "a block in two places"
            spec = s.token_ids[len(s.token_ids) - s.num_spec:] if s.num_spec else []
            expected = (s.prompt_token_ids + s.output_token_ids + spec)[:end]
            for g, (table, w) in enumerate(zip(s.block_ids, self.kv_group_windows, strict=True)):
                assert len(table) * self.block_size >= end, "blocks do not cover the tokens"
                for i, tok in enumerate(s.token_ids):
                    p = s.start_pos + i
                    assert not (windowed and table[p // self.block_size] == 0), "writing into the null block"
                    self.slots[self._slot(table, p)] = (g, p, tok)
                # Read back what this group's layers attend to: the whole context, or every query's window.
                first = 0 if w is None else max(0, s.start_pos - w + 1)
                for p in range(first, end):
                    assert not (windowed and table[p // self.block_size] == 0), "a window reads the null block"
                    got = self.slots[self._slot(table, p)]
                    assert got[:2] == (g, p), f"group {g} position {p}: slot holds {got}"
                    assert got[2] == expected[p], "KV cache content differs from the request's tokens"
            history = expected
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
