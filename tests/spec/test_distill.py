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

