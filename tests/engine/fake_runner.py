"""A model-free runner for engine tests: 'samples' a token that depends only on the sequence so far,
so any scheduling (batched, chunked, preempted, prefix-hit) must produce the same tokens."""

from __future__ import annotations

from tokenmill.runner.batch import RunnerOutput, SeqInput


class FakeRunner:
    def __init__(self, num_blocks: int = 64, block_size: int = 4, max_model_len: int = 256, vocab: int = 50):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.vocab = vocab
        self.steps: list[list[SeqInput]] = []
        self.released: list[str] = []
        # What each KV slot holds, to check that prefix hits and shared blocks carry the right tokens.
        self.slots: dict[int, tuple[int, int]] = {}

    def execute(self, seqs: list[SeqInput]) -> RunnerOutput:
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
            expected = (s.prompt_token_ids + s.output_token_ids)[:end]
            assert history == expected, "KV cache content differs from the request's tokens"
            if s.sample:
                out.sampled[s.request_id] = (sum(history) * 31 + len(history)) % self.vocab
        return out

    def release(self, request_ids: list[str]) -> None:
        self.released.extend(request_ids)
