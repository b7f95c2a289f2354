"""`tokenmill distill` end to end at toy size: the teacher generates, the student trains and its loss
falls, the directory it writes loads as a model and as a draft, and the trained student computes
exactly what our inference model computes from the saved weights."""

from __future__ import annotations

import json

import pytest
import torch

from tokenmill import LLM, SamplingParams
from tokenmill.entrypoints.cli import main
from tokenmill.spec.distill import Student

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    out = tmp_path_factory.mktemp("draft")
    rc = main(["distill", "--teacher", "default", "--out", str(out), "--layers", "1", "--hidden", "64",
               "--steps", "25", "--batch-size", "4", "--seq-len", "40", "--lr", "5e-3", "--warmup", "5",
               "--num-prompts", "2", "--samples-per-prompt", "2", "--gen-tokens", "12",
               "--teacher-kv-cache-memory", "64MiB"])
    assert rc == 0
    return out


def test_loss_falls_and_outputs_are_written(distilled):
    summary = json.loads((distilled / "distill.json").read_text())
    losses = summary["losses"]
    assert len(losses) == 25
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "loss.png"):
        assert (distilled / name).is_file(), name


def test_student_directory_loads_and_matches_training_model(distilled):
    from safetensors.torch import load_file

    llm = LLM(str(distilled), dtype="float32", kv_cache_memory="16MiB", max_model_len=256)
    prompt = llm.tokenizer.encode("The capital of France is")
    ours = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].token_ids
    student = Student(json.loads((distilled / "config.json").read_text()))
    student.load_hf_state_dict(load_file(str(distilled / "model.safetensors")))
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(6):  # greedy with the training model, recomputing the whole context each time
            ids.append(int(student.logits(student.hidden_states(torch.tensor([ids]))[0, -1]).argmax()))
    assert ours == ids[len(prompt):]
    spec = LLM("default", dtype="float32", kv_cache_memory="32MiB", max_model_len=256, speculative="draft",
               draft_model=str(distilled), num_speculative_tokens=2)
    plain = LLM("default", dtype="float32", kv_cache_memory="32MiB", max_model_len=256)
    p = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    assert spec.generate(prompt, p, use_tqdm=False)[0].outputs[0].token_ids == \
        plain.generate(prompt, p, use_tqdm=False)[0].outputs[0].token_ids
    assert spec.engine.stats().spec_num_draft_tokens > 0
    # The student carries the teacher's tokenizer and chat template.
    text = "Hello, world! <|im_start|>user"
    assert llm.tokenizer.encode(text) == plain.tokenizer.encode(text)
    assert llm.tokenizer.chat_template == plain.tokenizer.chat_template



def test_the_runs_compute_equals_the_closed_form(distilled):
    """training_compute.json against the arithmetic written out here from the run's settings: 3 x (2 x params
    x tokens + causal attention) for training, each teacher answer's prefill and decode for the data."""
    from tokenmill.models.loader import open_model

    summary = json.loads((distilled / "distill.json").read_text())
    c = json.loads((distilled / "training_compute.json").read_text())
    assert summary["compute"] == c
    h = json.loads((distilled / "config.json").read_text())
    d, L, V, inter = h["hidden_size"], h["num_hidden_layers"], h["vocab_size"], h["intermediate_size"]
    q, kv = h["num_attention_heads"] * h["head_dim"], h["num_key_value_heads"] * h["head_dim"]
    n = L * (d * (q + 2 * kv) + q * d + 3 * d * inter) + V * d  # linears + the (tied) LM head
    assert summary["parameters"] == n + (2 * L + 1) * d  # + the norms: the weights the trainer holds
    steps, batch, seq = 25, 4, 40  # the fixture's settings
    forward = 2 * n * seq + 4 * L * q * seq * (seq + 1) // 2
    assert c["student_training_flops"] == 3 * steps * batch * forward
    assert c["student"]["tokens_trained"] == steps * batch * seq

    t = open_model("default").arch
    tq, tkv = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    nt = t.num_layers * (t.hidden_size * (tq + 2 * tkv) + tq * t.hidden_size
                         + 3 * t.hidden_size * t.intermediate_size) + t.vocab_size * t.hidden_size
    answers = c["teacher"]["answer_lengths"]
    assert len(answers) == summary["teacher_answers"] == 4  # 2 prompts x 2 samples
    assert sum(o for _, o in answers) == summary["teacher_target_tokens"]
    gen = 0
    for p, o in answers:  # prompt positions 1..p, then generated tokens 2..o over contexts p+1 .. p+o-1
        gen += 2 * nt * (p + o - 1) + 4 * t.num_layers * tq * (p * (p + 1) // 2 + sum(range(p + 1, p + o)))
    hits = c["teacher"]["teacher_prefix_cache_hit_tokens"]  # the teacher engine's prefix-cache hits
    assert 0 <= hits <= sum(p for p, _ in answers)
    assert c["teacher_generation_flops"] == gen - 2 * nt * hits
    assert c["total_flops"] == c["student_training_flops"] + c["teacher_generation_flops"]



def test_the_served_student_counts_its_flops_and_the_ledger_reads_its_training_compute(distilled, tmp_path):
    """The chain the crossover check rests on (benchmarks/ledger_crossover.py times the crossing itself): the
    student served for real counts each request as its own shape says, and `tokenmill ledger --url ...
    --training-compute DIR` sets that against the compute the run counted."""
    import httpx
    from server_helpers import start_server

    from tokenmill.models.flops import FlopModel
    from tokenmill.models.loader import open_model

    training = json.loads((distilled / "training_compute.json").read_text())["total_flops"]
    student = FlopModel.of(open_model(str(distilled)).arch)
    assert student.active_params == json.loads((distilled / "training_compute.json").read_text())[
        "student"]["active_params"]
    server = start_server("--model", str(distilled), "--no-log-requests")
    try:
        before = httpx.get(f"{server.url}/v1/usage", timeout=10).json()["total"]["flops"]
        r = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
            "prompt": list(range(1000, 1100)), "max_tokens": 8, "ignore_eos": True, "temperature": 0.0})
        assert r.status_code == 200, r.text
        usage = httpx.get(f"{server.url}/v1/usage", timeout=10).json()
        assert usage["total"]["flops"] - before == pytest.approx(student.request(100, 8))
        out = tmp_path / "ledger.json"
        assert main(["ledger", "--url", server.url, "--training-compute", str(distilled), "--json", str(out)]) == 0
        report = json.loads(out.read_text())
        assert report["training_flops"] == training
        assert report["inference_flops_so_far"] >= usage["total"]["flops"]
        assert not report["passed"] and report["seconds_from_now"] > 0
    finally:
        server.stop()
    server.assert_clean_log()
    server.remove_log()
