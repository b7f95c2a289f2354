"""Greedy decoding and top-k logprobs from Hugging Face transformers: the definition of correct."""

from __future__ import annotations

import torch


@torch.no_grad()
def hf_greedy(model, prompt_ids: list[int], max_new: int, topk: int = 5):
    """Returns (tokens, per-step top-k {id: logprob}) decoding greedily with the KV cache."""
    ids = torch.tensor([prompt_ids])
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)  # the prompt's last logits only (a 262k vocab)
    past = out.cache if hasattr(out, "cache") and out.cache is not None else out.past_key_values
    logits = out.logits[0, -1].float()
    tokens, tops = [], []
    for _ in range(max_new):
        lp = torch.log_softmax(logits, -1)
        tok = int(torch.argmax(logits))
        v, i = lp.topk(topk)
        tokens.append(tok)
        tops.append({int(a): float(b) for a, b in zip(i, v, strict=True)} | {tok: float(lp[tok])})
        out = model(input_ids=torch.tensor([[tok]]), cache=past, use_cache=True)
        past = out.cache if hasattr(out, "cache") and out.cache is not None else out.past_key_values
        logits = out.logits[0, -1].float()
    return tokens, tops


def check_logprobs_close(ours_tokens, ours_tops, ref_tokens, ref_tops, atol: float, name: str) -> int:
    """As vLLM's check: exact until the first divergence, which must be a near-tie (each side's token in
    the other's top-k). Logprobs compared where the prefixes agree. Returns the number of tokens that agree."""
    agree = 0
    for i, (a, b) in enumerate(zip(ours_tokens, ref_tokens, strict=True)):
        if a != b:
            assert a in ref_tops[i] and b in ours_tops[i], f"{name}: token {i} differs ({a} vs {b}), not a near-tie"
            return agree
        for tok, ref_lp in ref_tops[i].items():
            if tok in ours_tops[i]:
                assert abs(ours_tops[i][tok] - ref_lp) <= atol, \
                    f"{name}: logprob of {tok} at step {i}: {ours_tops[i][tok]} vs {ref_lp}"
        agree += 1
    return agree
