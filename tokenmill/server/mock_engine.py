"""`tokenmill serve --mock`: the real server and the real engine core over a model-free runner.

Everything a router or autoscaler can observe is the real thing: the HTTP API, admission control, the
token-budget scheduler, the block pool with its prefix cache (so hit rates and KV usage behave as they
would), preemption, metrics. Only the forward pass is replaced: `MockRunner.execute` sleeps for a modelled
step time (fixed overhead + per prefill token + per decoding sequence, so steps slow down as the batch
grows) and emits deterministic ordinary tokens. No weights are loaded and torch is never imported; the
model file is read for its shape and tokenizer only.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from tokenmill.config import EngineConfig
from tokenmill.engine.core import EngineCore
from tokenmill.engine.policy import policy_from_config
from tokenmill.errors import StepInterrupted
from tokenmill.runner.batch import RunnerOutput, SeqInput
from tokenmill.server.engine_client import OnDeath, OnMessage, ThreadEngineClient
from tokenmill.server.protocol import FromEngine, Ready

logger = logging.getLogger(__name__)

_DEFAULT_KV_BYTES = 256 * 2**20
INTERRUPT_CHECKS = 8  # points in a step's first half where an interruptible mock step may stop


@dataclass(frozen=True)
class StepModel:
    """Seconds one engine step takes: base + prefill_per_token * prefill tokens + decode_per_seq * decodes."""

    base_s: float = 0.005
    prefill_per_token_s: float = 0.0001
    decode_per_seq_s: float = 0.0005

    def step_time(self, prefill_tokens: int, decode_seqs: int) -> float:
        return self.base_s + self.prefill_per_token_s * prefill_tokens + self.decode_per_seq_s * decode_seqs

    def describe(self) -> str:
        return (f"{self.base_s * 1e3:.2f} ms + {self.prefill_per_token_s * 1e3:.3f} ms/prefill token + "
                f"{self.decode_per_seq_s * 1e3:.3f} ms/decoding sequence")

    def step_seconds(self, seqs: list[SeqInput]) -> float:
        prefill = sum(len(s.token_ids) for s in seqs if s.start_pos < len(s.prompt_token_ids))
        decodes = sum(1 for s in seqs if s.start_pos >= len(s.prompt_token_ids))
        return self.step_time(prefill, decodes)


class StepSeconds(Protocol):
    """A model of step time: StepModel's three numbers, or a profile fitted on a machine
    (tokenmill.engine.step_time.StepTimeModel)."""

    def step_seconds(self, seqs: list[SeqInput]) -> float: ...

    def describe(self) -> str: ...


class MockRunner:
    """The engine's Runner protocol without a model: modelled step time, deterministic tokens."""

    def __init__(self, num_blocks: int, block_size: int, max_model_len: int, vocab_size: int,
                 eos_token_ids: list[int], model: StepSeconds, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic):
        """sleep and clock: real time by default; the planner passes a virtual clock and a sleep that
        advances it, so a step takes exactly its modelled time and no wall time."""
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.model = model
        self.sleep = sleep
        self.clock = clock
        self.eos = set(eos_token_ids)
        # Ordinary tokens only (past the specials at the start of most vocabularies), so outputs decode to text
        # and never stop early on an end-of-sequence token.
        self.lo = min(1000, vocab_size // 4)
        self.span = max(1, vocab_size - 2 * self.lo)

    def execute(self, seqs: list[SeqInput], interrupt: Callable[[], bool] | None = None) -> RunnerOutput:
        t0 = self.clock()
        seconds = self.model.step_seconds(seqs)
        if interrupt is not None:  # as the real model: asked at even points through the first half of the step
            slice_s = seconds / (2 * INTERRUPT_CHECKS)
            for _ in range(INTERRUPT_CHECKS):
                if interrupt():
                    raise StepInterrupted
                self.sleep(slice_s)
        out = RunnerOutput()
        for s in seqs:
            if s.prompt_next_ids is not None:  # prompt logprobs: every known next token is "likely"
                out.prompt_logprobs[s.request_id] = [
                    self._logprobs(t, s.params.prompt_logprobs or 0) for t in s.prompt_next_ids if t is not None]
            if s.sample:
                pos = s.start_pos + len(s.token_ids)
                tok = self.lo + (s.token_ids[-1] * 7919 + pos * 104729) % self.span
                while tok in self.eos:
                    tok += 1
                out.sampled[s.request_id] = tok
                if s.params.logprobs is not None:
                    out.logprobs[s.request_id] = self._logprobs(tok, s.params.logprobs)
        left = seconds - (self.clock() - t0)
        if left > 0:
            self.sleep(left)
        return out

    def _logprobs(self, token: int, top_n: int) -> tuple[float, list[int], list[float]]:
        # Made-up but well-formed: the chosen token is the most likely, then its neighbours in the vocabulary.
        top = [token] + [self.lo + (token - self.lo + k) % self.span for k in range(1, top_n)] if top_n else []
        return -0.25, top, [-0.25 - k for k in range(len(top))]

    def release(self, request_ids: list[str]) -> None:
        pass


def mock_core(config: EngineConfig, arch, model: StepSeconds, *, num_blocks: int | None = None,
              sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> EngineCore:
    """The real EngineCore (scheduler, policy, block pool, prefix cache) over a MockRunner of `model`.
    num_blocks: the KV pool's size; by default sized as the real runner would for this model (float32 only
    when asked for)."""
    max_model_len = config.max_model_len or arch.max_position_embeddings
    if num_blocks is None:
        itemsize = 4 if config.dtype in ("float32", "float") else 2
        per_block = arch.kv_block_bytes(config.block_size, config.kv_cache_dtype, itemsize)
        num_blocks = max(1, int(config.kv_cache_memory or _DEFAULT_KV_BYTES) // per_block)
    runner = MockRunner(num_blocks, config.block_size, max_model_len, arch.vocab_size, arch.eos_token_ids, model,
                        sleep=sleep, clock=clock)
    return EngineCore(runner, arch.vocab_size, arch.eos_token_ids,
                      max_num_batched_tokens=config.max_num_batched_tokens, max_num_seqs=config.max_num_seqs,
                      enable_prefix_caching=config.enable_prefix_caching, policy=policy_from_config(config),
                      interruptible_steps=config.interruptible_steps, clock=clock)


def build_mock_engine(config: EngineConfig, model: StepSeconds, send: Callable[[FromEngine], None]) -> EngineCore:
    from tokenmill.models.loader import open_model  # metadata only

    arch = open_model(config.model).arch
    engine = mock_core(config, arch, model)
    runner = engine.runner
    logger.info("mock engine: %d KV blocks of %d tokens, step time %s", runner.num_blocks, config.block_size,
                model.describe())
    send(Ready(runner.max_model_len, arch.vocab_size, runner.num_blocks, config.block_size, os.getpid()))
    return engine


class MockEngineClient(ThreadEngineClient):
    """The --inproc engine thread, running the mock engine."""

    def __init__(self, config: EngineConfig, on_message: OnMessage, on_death: OnDeath, model: StepSeconds):
        super().__init__(config, on_message, on_death)
        self.model = model

    def _build(self) -> tuple[EngineCore, None]:
        return build_mock_engine(self.config, self.model, self._deliver), None  # no embedding model
