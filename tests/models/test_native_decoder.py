"""The native decoder (kernels/decoder.cpp) computes what LlamaModel.forward's Python loop computes, bit for
bit: logits, the K/V it writes, whole generations with logprobs, and where an interrupted step stops."""

from __future__ import annotations

import pytest
import torch

from tokenmill import LLM, SamplingParams
from tokenmill.errors import StepInterrupted
from tokenmill.kernels.cpu import decoder
from tokenmill.layers.attention import AttentionMetadata

pytestmark = pytest.mark.skipif(decoder() is None, reason="no compiler here: the native kernels are not built")

PROMPTS = ["The capital of France is", "def fib(n):\n    if n < 2:\n        return n\n    return",
           "<|im_start|>user\nName three colors.<|im_end|>\n<|im_start|>assistant\n", "1, 2, 3, 4, 5,"]


@pytest.fixture(scope="module", params=["model", "float16", "int8"])
def llm(request):
    """The default model with a KV cache in the model dtype, in float16 (auto's choice here) and in int8."""
    return LLM("default", kv_cache_memory="32MiB", max_model_len=512, max_num_batched_tokens=64,
               kv_cache_dtype=request.param)


def _python_loop(model):
    class Loop:
        def __enter__(self):
            self.saved, model.native = model.native, None

        def __exit__(self, *exc):
            model.native = self.saved
    return Loop()


def _mixed_step(runner):
    """A step with a decode row, a prompt chunk after a cached prefix and a cold prompt: (args of forward)."""
    bs = runner.block_size
    seqs = [(40, 1, list(range(1, 4))), (20, 9, list(range(4, 6))), (0, 13, list(range(6, 8)))]
    ids = torch.randint(100, 40000, (sum(n for _, n, _ in seqs),), generator=torch.Generator().manual_seed(0))
    pos = torch.cat([torch.arange(s, s + n) for s, n, _ in seqs])
    meta = AttentionMetadata.build([s for s, _, _ in seqs], [n for _, n, _ in seqs], [t for _, _, t in seqs], bs,
                                   runner.dtype, runner.device)
    return ids, pos, meta, torch.tensor([0, 9, 10, 22])


def test_native_forward_equals_the_python_loop(llm):
    _check_forward(llm)


def test_native_forward_equals_the_python_loop_in_bfloat16():
    """The model dtype where the CPU has AMX (the default there): activations, KV and outputs in bfloat16."""
    _check_forward(LLM("default", dtype="bfloat16", kv_cache_memory="8MiB", max_model_len=256))


def _check_forward(llm):
    runner = llm.engine.runner
    model = runner.model
    assert model.native is not None, "the default model on CPU should run on the native decoder"
    g = torch.Generator().manual_seed(1)
    for layer in runner.kv_caches:  # earlier context for the rows that attend to a cached prefix
        for t in layer:
            if t.dtype == torch.int8:
                t.copy_(torch.randint(-127, 128, t.shape, generator=g))
            else:
                t.uniform_(0.01, 1.0, generator=g) if t.dim() == 3 else t.normal_(generator=g)
    before = [tuple(t.clone() for t in layer) for layer in runner.kv_caches]
    ids, pos, meta, rows = _mixed_step(runner)
    native = model.forward(ids, pos, meta, runner.kv_caches, rows)
    native_kv = [tuple(t.clone() for t in layer) for layer in runner.kv_caches]
    for layer, saved in zip(runner.kv_caches, before, strict=True):
        for t, s in zip(layer, saved, strict=True):
            t.copy_(s)
    with _python_loop(model):
        loop = model.forward(ids, pos, meta, runner.kv_caches, rows)
    assert native.dtype == torch.float32 and native.shape == (4, model.cfg.vocab_size) and native.isfinite().all()
    assert torch.equal(native, loop)
    for a, b in zip(native_kv, runner.kv_caches, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_generations_are_identical_with_and_without_it(llm):
    params = [SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=3),
              SamplingParams(temperature=1.0, seed=7, max_tokens=24, ignore_eos=True, logprobs=3)]
    def run():  # the second run hits the first one's prefix cache: a hit computes the same as a cold prompt
        outs = llm.generate(PROMPTS * 2, params * 4, use_tqdm=False)
        return [(o.outputs[0].token_ids, [{t: lp.logprob for t, lp in d.items()} for d in o.outputs[0].logprobs])
                for o in outs]
    native = run()
    with _python_loop(llm.engine.runner.model):
        loop = run()
    assert native == loop


@pytest.mark.parametrize("stop_at", [None, 1, 7])
def test_an_interrupt_stops_where_the_python_loop_stops(llm, stop_at):
    runner = llm.engine.runner
    model = runner.model
    ids, pos, meta, rows = _mixed_step(runner)
    asked = {}
    for name in ("native", "loop"):
        calls = []

        def interrupt(calls=calls):
            calls.append(1)
            return len(calls) == stop_at
        if name == "native":
            assert model.native is not None
            if stop_at is None:
                model.forward(ids, pos, meta, runner.kv_caches, rows, interrupt)
            else:
                with pytest.raises(StepInterrupted):
                    model.forward(ids, pos, meta, runner.kv_caches, rows, interrupt)
        else:
            with _python_loop(model):
                try:
                    model.forward(ids, pos, meta, runner.kv_caches, rows, interrupt)
                except StepInterrupted:
                    pass
        asked[name] = len(calls)
    assert asked["native"] == asked["loop"] == (stop_at or model.cfg.num_layers // 2)
