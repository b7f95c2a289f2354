"""Early-exit self-speculation never changes greedy output: the default model in float32, prompts batched, a KV
cache small enough to force preemption, with an exit head after the last layer (the target's own norm and head:
nearly every proposal accepted) and one after layer 3 over a subset of the vocabulary (mostly rejected); a head
trained by `tokenmill distill --exit-layer` loads and is exact on the default block formats; bad flags and
heads are refused with clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from tokenmill import LLM, SamplingParams
from tokenmill.config import EngineConfig
from tokenmill.entrypoints.cli import main
from tokenmill.errors import ConfigError
from tokenmill.models.loader import open_model
from tokenmill.spec.early_exit import base_identity, load_exit_head, save_exit_head

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return",
    "1, 2, 3, 4, 5, 6, 7,",
    "Repeat after me: the quick brown fox jumps over the lazy dog. The quick brown",
    "<|im_start|>user\nName three colors.<|im_end|>\n<|im_start|>assistant\n",
    "Q: What is 2 + 2?\nA: 4\nQ: What is 3 + 3?\nA:",
    "Paris, London, Berlin, Madrid, Rome, Paris, London,",
    "red green blue red green blue red",
]
MAX_TOKENS = 16
# float32 weights: the exact reference, where even a preempted request's recomputed K/V is bit-identical.
ENGINE = dict(dtype="float32", quantization="none", max_model_len=256, max_num_batched_tokens=128)


def _params(i: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=2 if i % 2 else None)


def _generate(llm: LLM):
    outs = llm.generate(PROMPTS, [_params(i) for i in range(len(PROMPTS))], use_tqdm=False)
    return [o.outputs[0] for o in outs], llm.engine.stats()


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """Plain outputs, and two heads written from the target's own weights: after the last layer with its
    final norm and whole head; after layer 3 over 1,024 rows of it (every 48th token)."""
    llm = LLM("default", kv_cache_memory="64MiB", **ENGINE)
    outs, stats = _generate(llm)
    assert stats.num_preemptions == 0
    model = llm.engine.runner.model
    arch = llm.replica.source.arch
    base = base_identity(arch, "default")
    last, early = tmp_path_factory.mktemp("last"), tmp_path_factory.mktemp("early")
    save_exit_head(last, model.norm, model.embed, torch.arange(arch.vocab_size), arch.num_layers, base)
    rows = torch.arange(0, arch.vocab_size, 48)
    save_exit_head(early, model.norm, model.embed[rows], rows, 3, base)
    return outs, last, early


def _check_same(plain_outs, outs):
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain_outs]
    for a, b in zip(outs, plain_outs, strict=True):
        assert (a.logprobs is None) == (b.logprobs is None)
        for la, lb in zip(a.logprobs or [], b.logprobs or [], strict=True):
            assert la.keys() == lb.keys()
            for t in la:
                assert la[t].logprob == pytest.approx(lb[t].logprob, abs=1e-3)


def test_head_after_the_last_layer_is_exact_batched_under_preemption_and_accepted(plain):
    plain_outs, last, _ = plain
    llm = LLM("default", kv_cache_memory="3MiB", speculative="early-exit", exit_head=str(last),
              num_speculative_tokens=3, speculative_max_batch=len(PROMPTS), **ENGINE)
    outs, stats = _generate(llm)
    _check_same(plain_outs, outs)
    assert stats.num_preemptions > 0, "the small KV cache should have forced preemption"
    # The view of all 30 layers under the target's own head proposes what the target picks.
    assert stats.spec_num_accepted_tokens >= 0.9 * stats.spec_num_draft_tokens > 0


def test_early_head_over_a_vocabulary_subset_is_exact(plain):
    plain_outs, _, early = plain
    llm = LLM("default", kv_cache_memory="3MiB", speculative="early-exit", exit_head=str(early),
              num_speculative_tokens=2, speculative_max_batch=len(PROMPTS), **ENGINE)
    outs, stats = _generate(llm)
    _check_same(plain_outs, outs)
    assert stats.num_preemptions > 0
    assert stats.spec_num_draft_tokens > 0
    proposer = llm.engine.runner.proposer
    assert len(proposer.model.layers) == 3 and len(proposer.kv_caches) == 3
    # The view shares the target's layer weights: nothing copied.
    assert proposer.model.layers[0] is llm.engine.runner.model.layers[0]


def test_distilled_exit_heads_load_and_are_exact_on_the_block_formats(tmp_path):
    out = tmp_path / "heads"
    rc = main(["distill", "--teacher", "default", "--out", str(out), "--exit-layer", "2", "6", "--exit-vocab", "512",
               "--steps", "20", "--batch-size", "2", "--seq-len", "32", "--lr", "2e-3", "--warmup", "2",
               "--num-prompts", "2", "--samples-per-prompt", "2", "--gen-tokens", "16",
               "--teacher-kv-cache-memory", "32MiB"])
    assert rc == 0
    summary = json.loads((out / "distill.json").read_text())
    assert set(summary["heads"]) == {"2", "6"}
    for n in (2, 6):
        meta = json.loads((out / f"layer-{n}" / "exit_head.json").read_text())
        assert meta["exit_layer"] == n and meta["vocab_rows"] == 512
        assert meta["base_model"]["num_layers"] == 30 and len(meta["losses"]) == 20
    prompt = [PROMPTS[0], PROMPTS[4]]
    p = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    opts = dict(kv_cache_memory="32MiB", max_model_len=256)
    want = [o.outputs[0].token_ids for o in LLM("default", **opts).generate(prompt, p, use_tqdm=False)]
    spec = LLM("default", speculative="early-exit", exit_head=str(out / "layer-6"), num_speculative_tokens=3,
               speculative_max_batch=2, **opts)
    assert [o.outputs[0].token_ids for o in spec.generate(prompt, p, use_tqdm=False)] == want
    assert spec.engine.stats().spec_num_draft_tokens > 0
    if spec.engine.runner.model.native is not None:  # the block formats on CPU: the view decodes natively too
        assert spec.engine.runner.proposer.model.native is not None


def test_bad_flags_and_heads_are_refused_clearly(tmp_path, gguf_path):
    with pytest.raises(ConfigError, match="needs --exit-head"):
        EngineConfig(speculative="early-exit")
    with pytest.raises(ConfigError, match="only used with --speculative early-exit"):
        EngineConfig(exit_head=str(tmp_path))
    with pytest.raises(ConfigError, match="no such file"):
        EngineConfig(speculative="early-exit", exit_head=str(tmp_path / "missing"))
    arch = open_model(str(gguf_path)).arch
    with pytest.raises(ConfigError, match="exit_head.safetensors"):
        load_exit_head(tmp_path, arch)
    h = arch.hidden_size
    base = base_identity(arch, "default")
    save_exit_head(tmp_path / "wide", torch.ones(h + 1), torch.zeros(4, h + 1), torch.arange(4), 2,
                   {**base, "hidden_size": h + 1})
    with pytest.raises(ConfigError, match="hidden_size"):
        load_exit_head(tmp_path / "wide", arch)
    save_exit_head(tmp_path / "deep", torch.ones(h), torch.zeros(4, h), torch.arange(4), arch.num_layers + 1, base)
    with pytest.raises(ConfigError, match="exit layer"):
        load_exit_head(tmp_path / "deep", arch)
    save_exit_head(tmp_path / "ids", torch.ones(h), torch.zeros(4, h), torch.tensor([0, 1, 2, arch.vocab_size]), 2,
                   base)
    with pytest.raises(ConfigError, match="token ids"):
        load_exit_head(tmp_path / "ids", arch)
    save_exit_head(tmp_path / "ok", torch.ones(h), torch.zeros(4, h), torch.arange(4), 2, base)
    assert load_exit_head(tmp_path / "ok" / "exit_head.safetensors", arch)[0] == 2  # the file itself also names it
    with pytest.raises(SystemExit):  # argparse: --exit-layer takes integers
        main(["distill", "--out", str(tmp_path / "x"), "--exit-layer", "six"])
    with pytest.raises(ConfigError, match="--exit-layer 31"):
        from tokenmill.spec.distill import distill
        from tokenmill.spec.distill_config import DistillConfig

        distill(DistillConfig(out=str(tmp_path / "y"), exit_layer=[31], num_prompts=1, samples_per_prompt=1,
                              gen_tokens=2, teacher_kv_cache_memory="16MiB"))
