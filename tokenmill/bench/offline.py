"""Offline benchmarks: throughput over a seeded workload, single-stream latency, step overhead,
peak memory; tokenmill and Hugging Face transformers timed one after the other, never together."""

from __future__ import annotations

import json
import logging
import resource
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

from tokenmill.bench.workload import WorkItem, random_workload

logger = logging.getLogger(__name__)


@dataclass
class Result:
    system: str
    dtype: str
    requests: int
    output_tokens: int
    seconds: float
    extra: dict = field(default_factory=dict)

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.seconds


def tokenmill_throughput(llm, items: list[WorkItem], dtype: str) -> Result:
    from tokenmill import SamplingParams

    params = [SamplingParams(temperature=0.0, max_tokens=it.output_len, ignore_eos=True) for it in items]
    steps_before = llm.engine.num_steps
    t = time.perf_counter()
    outs = llm.generate([it.prompt_token_ids for it in items], params, use_tqdm=True)
    dt = time.perf_counter() - t
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    assert n_out == sum(it.output_len for it in items), "tokenmill returned the wrong number of tokens"
    return Result("tokenmill", dtype, len(items), n_out, dt, {"steps": llm.engine.num_steps - steps_before})


def load_hf(model_path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_path.parent), gguf_file=model_path.name,
                                                dtype=dtype).eval()


@torch.no_grad()
def hf_one_at_a_time(model, items: list[WorkItem], dtype: str) -> Result:
    n_out = 0
    t = time.perf_counter()
    for it in tqdm(items, desc="transformers 1-at-a-time"):
        ids = torch.tensor([it.prompt_token_ids])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=it.output_len,
                             min_new_tokens=it.output_len, do_sample=False, pad_token_id=0)
        n_out += out.shape[1] - ids.shape[1]
    return Result("transformers generate, one at a time", dtype, len(items), n_out, time.perf_counter() - t)


@torch.no_grad()
def hf_static_batches(model, items: list[WorkItem], dtype: str, batch: int = 16) -> Result:
    """Padded static batches: each batch runs until its longest request is done; only the tokens each
    request asked for count as output."""
    useful = 0
    t = time.perf_counter()
    for i in tqdm(range(0, len(items), batch), desc=f"transformers static batches of {batch}"):
        group = items[i:i + batch]
        width = max(len(it.prompt_token_ids) for it in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, it in enumerate(group):  # left padding, as generation needs
            ids[r, width - len(it.prompt_token_ids):] = torch.tensor(it.prompt_token_ids)
            mask[r, width - len(it.prompt_token_ids):] = 1
        longest = max(it.output_len for it in group)
        model.generate(ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest, do_sample=False,
                       pad_token_id=0)
        useful += sum(it.output_len for it in group)
    return Result(f"transformers generate, static batches of {batch}", dtype, len(items), useful,
                  time.perf_counter() - t)


def step_overhead(llm, batch: int, prompt_len: int = 128, steps: int = 32) -> dict:
    """Share of a decode step spent outside the model's forward (scheduling, inputs, sampling, detokenizing)."""
    from tokenmill import SamplingParams

    model = llm.engine.runner.model
    inner = model.forward
    spent = [0.0]

    def timed(*a, **k):
        t0 = time.perf_counter()
        r = inner(*a, **k)
        spent[0] += time.perf_counter() - t0
        return r

    items = random_workload(batch, (prompt_len, prompt_len), (steps, steps), 100, 40000, seed=7)
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    llm.generate([it.prompt_token_ids for it in items], params, use_tqdm=False)  # warm the prefix cache
    params = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True)
    model.forward = timed
    try:
        t = time.perf_counter()
        llm.generate([it.prompt_token_ids for it in items], params, use_tqdm=False)
        total = time.perf_counter() - t
    finally:
        model.forward = inner
    return {"batch": batch, "step_ms": 1e3 * total / steps, "outside_forward_share": 1 - spent[0] / total}


def tokenmill_latency(llm, prompt_len: int = 512, new: int = 128) -> dict:
    from tokenmill import SamplingParams

    llm.engine.kv.reset_prefix_cache()
    items = random_workload(1, (prompt_len, prompt_len), (new, new), 100, 40000, seed=11)
    ids = items[0].prompt_token_ids
    o = llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True), use_tqdm=False)[0]
    ttft = o.metrics.first_token_time - o.metrics.arrival_time
    llm.engine.kv.reset_prefix_cache()
    ids2 = random_workload(1, (prompt_len, prompt_len), (new, new), 100, 40000, seed=12)[0].prompt_token_ids
    o = llm.generate([ids2], SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True), use_tqdm=False)[0]
    m = o.metrics
    decode = (m.finished_time - m.first_token_time) / (new - 1)
    return {"ttft_s": ttft, "decode_tok_s": 1 / decode}


@torch.no_grad()
def hf_latency(model, prompt_len: int = 512, new: int = 128) -> dict:
    ids = torch.tensor([random_workload(1, (prompt_len, prompt_len), (new, new), 100, 40000, seed=11)[0]
                        .prompt_token_ids])
    t = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False, pad_token_id=0)
    ttft = time.perf_counter() - t
    t = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                   do_sample=False, pad_token_id=0)
    total = time.perf_counter() - t
    return {"ttft_s": ttft, "decode_tok_s": (new - 1) / (total - ttft)}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def save(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o))
