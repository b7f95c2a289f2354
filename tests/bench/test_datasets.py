"""Datasets are token-exact with the default model's real tokenizer, seeded, and shaped as documented."""

from __future__ import annotations

import statistics

import pytest

from tokenmill.bench import datasets
from tokenmill.bench.datasets import DatasetError, build


@pytest.fixture(scope="module")
def tok(gguf_path):
    from tokenmill.tokenizer.tokenizer import Tokenizer

    return Tokenizer.from_path(gguf_path)


def _exact(tok, reqs):
    for r in reqs:
        assert tok.encode(r.prompt, add_special_tokens=False) == r.prompt_token_ids


def test_random_lengths_and_exactness(tok):
    reqs = build("random", tok, 20, input_len=(16, 200), output_len=(3, 9), vocab=(100, tok.vocab_size - 100))
    _exact(tok, reqs)
    assert all(16 <= r.prompt_len <= 200 and 3 <= r.output_len <= 9 for r in reqs)
    assert len({tuple(r.prompt_token_ids[:8]) for r in reqs}) == 20  # distinct prompts
    again = build("random", tok, 20, input_len=(16, 200), output_len=(3, 9), vocab=(100, tok.vocab_size - 100))
    assert [r.prompt_token_ids for r in again] == [r.prompt_token_ids for r in reqs]  # seeded


def test_chat_uses_the_template_and_a_heavy_tailed_length(tok):
    reqs = build("chat", tok, 120, seed=3)
    _exact(tok, reqs)
    assert all(r.prompt.startswith("<|im_start|>") and r.prompt.endswith("<|im_start|>assistant\n") for r in reqs)
    ins, outs = [r.prompt_len for r in reqs], [r.output_len for r in reqs]
    assert max(ins) <= 1024 and max(outs) <= 512 and min(outs) >= 4
    # log-normal around ShareGPT's means: the median sits well below the mean, and the spread is wide
    assert statistics.median(ins) < statistics.fmean(ins) and max(ins) > 3 * statistics.median(ins)
    assert 100 < statistics.fmean(ins) < 260 and 150 < statistics.fmean(outs) < 400


def test_shared_prefix_groups(tok):
    reqs = build("shared-prefix", tok, 9, groups=3, prefix_len=200, suffix_len=16, output_len=(5, 5))
    _exact(tok, reqs)
    assert [r.group for r in reqs] == [0, 1, 2] * 3  # interleaved
    plen = reqs[0].prompt_len - 16
    assert plen == 200 and all(r.prompt_len == 216 and r.output_len == 5 for r in reqs)
    for g in range(3):
        same = [r.prompt_token_ids[:plen] for r in reqs if r.group == g]
        assert all(s == same[0] for s in same)
        assert len({tuple(r.prompt_token_ids[plen:]) for r in reqs if r.group == g}) == 3  # distinct questions
    first_blocks = {tuple(r.prompt_token_ids[:16]) for r in reqs}
    assert len(first_blocks) == 3  # groups share no leading block


def test_long_input(tok):
    reqs = build("long-input", tok, 3, doc_len=600, output_len=(32, 32))
    _exact(tok, reqs)
    assert all(r.prompt_len == 600 and r.output_len == 32 for r in reqs)
    assert "document above" in reqs[0].prompt[-120:]


def test_bad_arguments(tok):
    with pytest.raises(DatasetError):
        build("random", tok, 0, vocab=(100, 200))
    with pytest.raises(DatasetError):
        build("random", tok, 2, input_len=(10, 5), vocab=(100, 200))
    with pytest.raises(DatasetError, match="unknown dataset"):
        build("wikitext", tok, 2)


def test_corpus_is_real_text():
    text = datasets.corpus_text()
    assert len(text) > 200_000
    assert "expression" in text and "statement" in text


def test_sharegpt_and_jsonl_files(tok, tmp_path):
    import json

    words = "the quick brown fox jumps over the lazy dog and keeps running far away " * 3
    convs = [{"conversations": [{"from": "human", "value": f"Question {i}: {words}"},
                                {"from": "gpt", "value": words[: 20 + 7 * i]}]} for i in range(12)]
    convs += [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": words}]},  # too short
              {"conversations": [{"from": "human", "value": words}]}, {"id": "no conversations"}]
    share = tmp_path / "share.json"
    share.write_text(json.dumps(convs))
    reqs = build("sharegpt", tok, 8, seed=3, path=str(share))
    assert len(reqs) == 8 and len({r.prompt for r in reqs}) == 8
    _exact(tok, reqs)
    replies = {c["conversations"][0]["value"]: c["conversations"][1]["value"] for c in convs[:12]}
    for r in reqs:  # the output length is the reply's own length in tokens
        assert r.output_len == len(tok.encode(replies[r.prompt], add_special_tokens=False))
    assert [r.prompt for r in build("sharegpt", tok, 8, seed=3, path=str(share))] == [r.prompt for r in reqs]
    with pytest.raises(DatasetError, match="usable"):
        build("sharegpt", tok, 13, path=str(share))

    lines = tmp_path / "p.jsonl"
    lines.write_text("\n".join(json.dumps({"prompt": f"{words} {i}", **({"output_len": 9} if i % 2 else {})})
                               for i in range(6)) + "\n")
    reqs = build("jsonl", tok, 6, path=str(lines), output_len=(5, 5))
    assert sorted(r.output_len for r in reqs) == [5, 5, 5, 9, 9, 9]
    for bad in (dict(name="jsonl", path=None), dict(name="jsonl", path=str(tmp_path / "missing.jsonl"))):
        with pytest.raises(DatasetError):
            build(bad["name"], tok, 1, path=bad["path"])
