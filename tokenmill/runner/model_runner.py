"""Turns one scheduler decision into one flattened forward pass and one sampled token per sequence."""

from __future__ import annotations

import logging
import math
import mmap
import os
import time
from collections.abc import Callable
from concurrent.futures import Future

import torch

from tokenmill.config import EngineConfig
from tokenmill.errors import ConfigError
from tokenmill.layers.attention import AttentionMetadata
from tokenmill.models.llama import QuantSpec
from tokenmill.models.loader import ModelSource
from tokenmill.models.registry import model_class
from tokenmill.quant.block import BLOCK_MODES, RowKinds
from tokenmill.runner.batch import ProposeInput, RunnerOutput, SeqInput
from tokenmill.runner.sampler import (
    Sampler,
    SamplingRow,
    apply_token_bitmask,
    make_generator,
    prompt_logprobs,
)
from tokenmill.runner.threads import ThreadGovernor
from tokenmill.structured.masks import GrammarMasks, MaskRequest, StepMasks

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "half": torch.float16}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' asked for, but torch sees no CUDA device")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name in ("float16", "half") and device.type == "cpu":
        # CPU matmuls in float16 run on slow reference paths and our native kernels do not take it.
        raise ConfigError(f"--dtype {name} is for CUDA; on the CPU use bfloat16 (AMX) or float32")
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16
    # On CPUs with AMX tiles bfloat16 matmuls are several times faster than float32 once a step
    # batches a few sequences (DESIGN.md's measurements); elsewhere bfloat16 is emulated and slower.
    return torch.bfloat16 if torch.backends.cpu.get_cpu_capability() == "AMX" or _has_amx() else torch.float32


def _has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return " amx_bf16" in f.read()
    except OSError:
        return False


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 4 << 30


def zeroed(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor. On the CPU it lies in anonymous memory, which the kernel zero-fills page by page on first
    touch: torch.zeros would write the whole KV budget (a quarter of free memory by default: 3.5 s of a server's
    start-up on a 2-core VM) and make all of it resident before the first request needs any."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    # The tensor keeps the mapping alive (it holds the buffer), and unmaps it when the last view goes.
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).view(shape)


# Verification chunks up to this long are attended as single-token decodes (see attention_entries).
MAX_SPLIT_CHUNK = 17


def attention_entries(chunks: list[tuple[int, int, list[int], bool]]) -> tuple[list[int], list[int], list[list[int]]]:
    """(start, length, block table, split) per sequence -> AttentionMetadata.build's starts, lengths, tables.

    A short chunk marked `split` (a speculative verification: the last real token plus the proposals) is
    handed over as one single-token decode per position, with the same block table: every layer writes
    the whole step's K/V before it attends, so the query at position p reading the first p + 1 slots is
    exactly causal attention. All of them then go through the one batched decode call, the same kernel a
    plain decode step uses, instead of one masked attention call per sequence.
    """
    starts: list[int] = []
    lens: list[int] = []
    tables: list[list[int]] = []
    for start, n, table, split in chunks:
        if split and 1 < n <= MAX_SPLIT_CHUNK:
            starts.extend(range(start, start + n))
            lens.extend([1] * n)
            tables.extend([table] * n)
        else:
            starts.append(start)
            lens.append(n)
            tables.append(table)
    return starts, lens, tables


class ModelRunner:
    def __init__(self, config: EngineConfig, source: ModelSource, eos_token_ids: list[int],
                 tokenizer_json: str | None = None):
        """tokenizer_json: the model's tokenizer.json text, for structured output's token masks (without it,
        a constrained request fails)."""
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.config = config
        self.device = pick_device(config.device)
        self.dtype = pick_dtype(config.dtype, self.device)
        if config.kv_cache_dtype == "float16" and self.dtype != torch.float32:  # before the weights load
            raise ConfigError(f"--kv-cache-dtype float16 is for a float32 model; this one runs in "
                              f"{str(self.dtype).removeprefix('torch.')} (use model)")
        arch = source.arch
        self.arch = arch
        self.max_model_len = config.max_model_len or arch.max_position_embeddings
        if self.max_model_len > arch.max_position_embeddings:
            raise ConfigError(f"max_model_len {self.max_model_len} exceeds the model's context of "
                              f"{arch.max_position_embeddings} tokens")
        if self.device.type == "cpu":
            from tokenmill.kernels.cpu import prebuild

            # Compile (first run on this kind of CPU) or load every native kernel now, before /health says
            # ready, never inside the first request.
            prebuild()
        t0 = time.monotonic()
        act = torch.bfloat16 if config.quant_compute_dtype == "auto" else _DTYPES[config.quant_compute_dtype]
        # Rows need sorting into prompt / output positions only when a dense copy exists to run prompts on.
        dense_from_rows = self._dense_from_rows(config, arch)
        self.split_prompt_rows = dense_from_rows is not None
        quant = QuantSpec(config.quantization, config.quant_group_size, config.lm_head_quantization, act,
                          dense_from_rows)
        self.model = model_class(arch)(arch, self.dtype, self.device, self.max_model_len, quant)
        # Quantizing: GGUF Q8_0/Q4_0/Q4_1 tensors arrive as blocks, to be repacked without a float copy.
        self.model.load_weights(source.iter_tensors(keep_blocks=(quant.mode, quant.lm_head_mode) != ("none", "none")), str(source.path))
        logger.info("loaded %s (%s, %d layers) as %s on %s in %.1f s, weights %s", source.path.name,
                    arch.architecture, arch.num_layers, str(self.dtype).removeprefix("torch."), self.device,
                    time.monotonic() - t0, self.model.weight_report())
        self.block_size = config.block_size
        self.kv_storage = self._kv_storage()
        self.kv_int8 = self.kv_storage == "int8"
        self.num_blocks = self._size_kv_cache()
        # The paged cache in KV groups of layers (ModelArchConfig.kv_groups): one tensor set per slot of a group;
        # a layer reads and writes its slot's tensors at its group's block ids, so a block id is one group's. The
        # engine keeps a block table per group and frees a sliding group's blocks that fall out of its window.
        groups = arch.kv_groups()
        self.kv_group_windows = tuple(window for window, _ in groups)
        shape = (self.num_blocks, self.block_size, arch.num_kv_heads, arch.head_dim)
        # zeros: the null block is never written, so a path that gathers it and masks it never meets a NaN
        z = lambda s, dt: zeroed(s, dt, self.device)  # noqa: E731
        if self.kv_int8:  # (K, V, K scales, V scales): one float32 scale per token per KV head
            slots = [(z(shape, torch.int8), z(shape, torch.int8), z(shape[:3], torch.float32),
                      z(shape[:3], torch.float32)) for _ in range(arch.kv_group_size)]
        else:
            dt = torch.float16 if self.kv_storage == "float16" else self.dtype
            slots = [(z(shape, dt), z(shape, dt)) for _ in range(arch.kv_group_size)]
        self.kv_caches = [slots[0]] * arch.num_layers
        for _, layers in groups:
            for slot, layer in enumerate(layers):
                self.kv_caches[layer] = slots[slot]
        self.sampler = Sampler(arch.vocab_size, eos_token_ids, seed=config.seed)
        # Structured output's masks beside the forward pass only where a core is left over for them.
        spare_core = torch.get_num_threads() < len(os.sched_getaffinity(0))
        self.grammar = (GrammarMasks(tokenizer_json, arch.vocab_size, eos_token_ids, background=spare_core)
                        if tokenizer_json else None)
        self.generators: dict[str, torch.Generator] = {}
        self.proposer = self._make_proposer()
        self.threads = self._make_thread_governor()

    def _make_thread_governor(self) -> ThreadGovernor | None:
        """A governor of the math thread count, where results cannot depend on it: every linear on a native
        block kernel (no dense float copy for prompts), attention on the native kernel, no draft model, no
        MoE router (a float GEMM)."""
        if not self.config.adapt_threads or self.device.type != "cpu" or self.split_prompt_rows:
            return None
        from tokenmill.kernels.cpu import native

        linears = [lin for layer in self.model.layers for lin in layer.linears()]
        if native() is None or self.config.speculative == "draft" or self.model.cfg.moe is not None or \
                any(lin.kind not in BLOCK_MODES for lin in [*linears, self.model.lm_head]):
            return None
        return ThreadGovernor(torch.get_num_threads(), torch.set_num_threads)

    def _dense_from_rows(self, config: EngineConfig, arch) -> int | None:
        """Block formats with --prefill-dense-copy: the batch size from which a dense copy beats the block
        kernel, measured on this CPU (cached); None keeps no dense copy."""
        if self.device.type != "cpu" or {config.quantization, config.lm_head_quantization} <= {"none", "int8", "int4"}:
            return None
        from tokenmill.kernels.cpu import block_linear
        from tokenmill.quant.tuning import dense_from_rows

        if block_linear() is None:
            if config.quantization in ("w4a8", "w8a8"):
                raise ConfigError(f"--quantization {config.quantization} needs the native kernel, which did not "
                                  "build (see the warning above)")
            return None
        if not config.prefill_dense_copy:
            return None
        q4 = config.quantization in ("auto", "w4a8")
        return dense_from_rows(2 * arch.intermediate_size, arch.hidden_size, q4, self.dtype)

    def _make_proposer(self):
        """The speculative proposer --speculative asks for (None without speculation)."""
        kind = self.config.speculative
        if kind == "ngram":
            from tokenmill.spec.ngram import NgramProposer

            return NgramProposer()
        if kind == "draft":
            from tokenmill.models.loader import open_model
            from tokenmill.spec.draft import DraftProposer

            # As many tokens as the target's cache, plus room for every running request's proposals.
            k = self.config.num_speculative_tokens
            extra = self.config.max_num_seqs * -(-k // self.block_size)
            return DraftProposer.from_source(open_model(self.config.draft_model), self.arch.vocab_size, self.dtype,
                                             self.device, self.num_blocks + extra, self.block_size, self.max_model_len)
        if kind == "early-exit":
            from tokenmill.spec.early_exit import early_exit_proposer

            k = self.config.num_speculative_tokens
            extra = self.config.max_num_seqs * -(-k // self.block_size)
            return early_exit_proposer(self.model, self.config.exit_head, self.num_blocks + extra, self.block_size,
                                       self.max_model_len)
        return None

    def propose(self, inputs: list[ProposeInput]) -> dict[str, list[int]]:
        return self.proposer.propose(inputs) if self.proposer is not None else {}

    def _kv_storage(self) -> str:
        """What the KV cache holds: "model" (the model dtype), "float16" or "int8"; --kv-cache-dtype resolved.

        auto is float16 where a float32 model's linear layers all run on the block kernels (so its step is not
        float32-exact anyway) and the native attention kernel reads the cache: decode attention reads every
        cached token every step, and at batch 64 that read was as costly as all the linear layers (issue 16's
        step breakdown). float16 keeps 11 significant bits of K and V; `tokenmill eval` measures what that costs
        and tests/quant/test_quant_model.py bounds it. Anywhere else auto is the model dtype."""
        kind = self.config.kv_cache_dtype
        if kind != "auto":  # float16 beside a non-float32 model was refused in __init__
            return kind
        if self.dtype != torch.float32 or self.device.type != "cpu":
            return "model"
        from tokenmill.kernels.cpu import native

        linears = [lin for layer in self.model.layers for lin in layer.linears()]
        if native() is None or not linears or any(lin.kind not in BLOCK_MODES for lin in linears):
            return "model"
        return "float16"

    def _size_kv_cache(self) -> int:
        per_block = self.arch.kv_block_bytes(self.block_size, self.kv_storage, self.dtype.itemsize)
        budget = self.config.kv_cache_memory
        if budget is None:
            budget = int(available_memory(self.device) * self.config.kv_cache_memory_fraction)
        elif self.device.type == "cpu" and budget > (free := available_memory(self.device)):
            # The cache's pages are only touched as requests fill it (zeroed()), so a budget the machine cannot hold
            # would not fail here but mid-serving, when the kernel runs out of memory: refuse it now.
            raise ConfigError(f"--kv-cache-memory {budget / 2**30:.1f} GiB is more than the {free / 2**30:.1f} GiB "
                              f"of memory free; ask for less (or leave it unset: a share of free memory)")
        n = budget // per_block
        if n < 1:
            raise ConfigError(f"KV cache budget of {budget} bytes holds no block of {per_block} bytes")
        kv_dtype = self.kv_storage if self.kv_storage != "model" else str(self.dtype).removeprefix("torch.")
        if self.config.kv_cache_dtype == "auto":
            kv_dtype += " (--kv-cache-dtype auto)"
        logger.info("KV cache: %d blocks of %d tokens (%.0f MiB, %s)", n, self.block_size,
                    n * per_block / 2**20, kv_dtype)
        return n

    @property
    def kv_bytes(self) -> int:
        tensors = {id(t): t for layer in self.kv_caches for t in layer}  # the groups share their slots' tensors
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def expert_tokens(self) -> dict[int, list[int]]:
        """The target model's expert load (tokens per expert, by MoE layer); {} for a dense model."""
        return self.model.expert_tokens()

    def release(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.generators.pop(rid, None)
        if self.grammar is not None:
            self.grammar.release(request_ids)
        if self.proposer is not None:
            self.proposer.release(request_ids)

    @torch.no_grad()
    def execute(self, seqs: list[SeqInput], interrupt: Callable[[], bool] | None = None) -> RunnerOutput:
        """One step's forward pass and sampling. interrupt: see LlamaModel.forward (it is asked only before
        anything but K/V slots of this step's own positions has been written)."""
        if self.threads is not None:
            self.threads.before_step()
        masks = self._start_masks(seqs)  # computed on a worker thread while the forward pass runs
        ids: list[int] = []
        pos: list[int] = []
        logit_rows: list[int] = []
        is_prompt: list[bool] = []  # per row: a prompt position (block formats may run it on a dense copy)
        row = 0
        for s in seqs:
            n = len(s.token_ids)
            ids.extend(s.token_ids)
            pos.extend(range(s.start_pos, s.start_pos + n))
            n_prompt = len(s.prompt_token_ids)
            if self.split_prompt_rows:
                # prompt positions of this chunk: a run from its start, then output positions
                k = min(max(n_prompt - s.start_pos, 0), n)
                is_prompt.extend([True] * k + [False] * (n - k))
            if s.prompt_next_ids is not None:
                logit_rows.extend(range(row, row + n))
            elif s.sample and s.num_spec:  # every position from the last real token on
                logit_rows.extend(range(row + n - 1 - s.num_spec, row + n))
            elif s.sample:
                logit_rows.append(row + n - 1)
            row += n
        dev = self.device
        # one AttentionMetadata per KV group: the same rows, each group's own block tables
        metas = [AttentionMetadata.build(*attention_entries([(s.start_pos, len(s.token_ids), s.block_ids[g],
                                                              s.num_spec > 0) for s in seqs]),
                                         self.block_size, self.dtype, dev) for g in range(len(self.kv_group_windows))]
        logits = self.model.forward(torch.tensor(ids, dtype=torch.long, device=dev),
                                    torch.tensor(pos, dtype=torch.long, device=dev), metas, self.kv_caches,
                                    torch.tensor(logit_rows, dtype=torch.long, device=dev), interrupt,
                                    RowKinds.from_mask(is_prompt, dev) if is_prompt else None,
                                    RowKinds.from_mask([is_prompt[r] for r in logit_rows], dev) if is_prompt else None)
        return self._sample(seqs, logits, masks.result() if masks is not None else None)

    def _start_masks(self, seqs: list[SeqInput]) -> Future[StepMasks] | None:
        wanted = [MaskRequest(s.request_id, s.params.structured_output, s.output_token_ids,
                              s.token_ids[len(s.token_ids) - s.num_spec:] if s.num_spec and s.prompt_next_ids is None
                              else [])
                  for s in seqs if s.sample and s.params.structured_output is not None]
        if not wanted:
            return None
        if self.grammar is None:
            raise RuntimeError("structured output needs the runner to have the tokenizer (tokenizer_json)")
        return self.grammar.start(wanted)

    def _sample(self, seqs: list[SeqInput], logits: torch.Tensor, masks: StepMasks | None = None) -> RunnerOutput:
        out = RunnerOutput()
        rows: list[SamplingRow] = []
        sample_idx: list[int] = []
        owners: list[str] = []
        spec: list[tuple[SeqInput, int]] = []  # (seq, first logits row) of requests with proposals
        masked_rows: list[int] = []  # logits rows under a structured-output mask, and their mask rows
        mask_rows: list[int] = []
        r = 0
        for s in seqs:
            first_mask = masks.first_row.get(s.request_id) if masks is not None else None
            if s.num_spec and s.sample and s.prompt_next_ids is None:
                spec.append((s, r))
                if first_mask is not None:
                    masked_rows.extend(range(r, r + s.num_spec + 1))
                    mask_rows.extend(range(first_mask, first_mask + s.num_spec + 1))
                r += s.num_spec + 1
                continue
            if s.prompt_next_ids is not None:
                n = len(s.token_ids)
                # Positions that predict a prompt token get its logprob; the last row may sample.
                known = [(i, t) for i, t in enumerate(s.prompt_next_ids) if t is not None]
                if known:
                    lp = prompt_logprobs(logits[[r + i for i, _ in known]], [t for _, t in known],
                                         s.params.prompt_logprobs or 0, vocab_size=self.arch.vocab_size)
                    out.prompt_logprobs[s.request_id] = [(e.token_logprob, e.top_ids, e.top_logprobs) for e in lp]
                last = r + n - 1
                r += n
            elif s.sample:
                last = r
                r += 1
            else:
                continue
            if s.sample:
                rows.append(SamplingRow(s.params, s.prompt_token_ids, s.output_token_ids, self._generator(s)))
                sample_idx.append(last)
                owners.append(s.request_id)
                if first_mask is not None:
                    masked_rows.append(last)
                    mask_rows.append(first_mask)
        if masked_rows:
            assert masks is not None
            apply_token_bitmask(logits, masks.bitmask[mask_rows], masked_rows)
        if rows:
            in_order = sample_idx == list(range(logits.shape[0]))
            res = self.sampler(logits if in_order else logits[sample_idx], rows)
            for rid, tok, lp in zip(owners, res.token_ids, res.logprobs, strict=True):
                out.sampled[rid] = tok
                if lp is not None:
                    out.logprobs[rid] = (lp.token_logprob, lp.top_ids, lp.top_logprobs)
        if spec:
            self._verify(spec, logits, out)
        return out

    def _generator(self, s: SeqInput) -> torch.Generator | None:
        if s.params.seed is None:
            return None
        gen = self.generators.get(s.request_id)
        if gen is None:
            gen = self.generators[s.request_id] = make_generator(s.params.seed)
        return gen

    def _verify(self, spec: list[tuple[SeqInput, int]], logits: torch.Tensor, out: RunnerOutput) -> None:
        from tokenmill.spec.rejection import SpecRow, verify

        rows = torch.cat([torch.arange(r, r + s.num_spec + 1) for s, r in spec]).to(logits.device)
        reqs = [SpecRow(s.params, s.prompt_token_ids, s.output_token_ids, s.token_ids[len(s.token_ids) - s.num_spec:],
                        self._generator(s)) for s, _ in spec]
        for (s, _), (toks, lps) in zip(spec, verify(self.sampler, logits.index_select(0, rows), reqs), strict=True):
            out.spec_sampled[s.request_id] = toks
            if lps is not None:
                out.spec_logprobs[s.request_id] = lps
