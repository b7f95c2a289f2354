"""Verifying speculative proposals against the target's logits, all requests at once.

For a request with proposals s_1..s_j the target computed logits at j + 1 positions in one forward
pass: position i predicts the token after s_1..s_i. Proposals are deterministic (prompt lookup, or a
greedy draft), i.e. the proposal distribution q is one-hot, and Leviathan et al.'s rule becomes:

- accept s_{i+1} with probability min(1, p_i(s_{i+1}) / q(s_{i+1})) = p_i(s_{i+1});
- at the first rejection, emit a token drawn from norm(max(0, p_i - q)) = p_i with s_{i+1} removed;
- if all j are accepted, emit a token drawn from p_j (the "bonus" token).

Every emitted token is then distributed exactly as the target's p (after penalties, temperature,
top-k/top-p/min-p: the distribution the plain sampler draws from), so speculation never changes what a
sampled request produces in distribution. Greedy requests take the target's argmax at each position and
stop at the first proposal that differs: exactly the plain greedy output. Random numbers come from each
seeded request's own generator, so a seed still reproduces whatever else shares the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.runner.batch import Logprobs
from tokenmill.runner.sampler import Sampler, SamplingRow, _top_logprobs, argmax_rows
from tokenmill.sampling_params import SamplingParams


@dataclass
class SpecRow:
    """One request whose proposals are verified; its logits rows are len(proposals) + 1, in order."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # before this step's tokens
    proposals: list[int]
    generator: torch.Generator | None = None


def accept_draft(u: float, p: float) -> bool:
    """Accept a deterministic proposal whose target probability is p, given u ~ U[0, 1)."""
    return u < p


def _needs_history(p: SamplingParams, num_out: int) -> bool:
    # Rows whose processing depends on the tokens emitted before them.
    return (p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
            or num_out < p.min_tokens)


def verify(sampler: Sampler, logits: torch.Tensor, reqs: list[SpecRow]) -> list[tuple[list[int], list[Logprobs] | None]]:
    """logits [sum(len(proposals) + 1), V'] -> per request: emitted tokens (1 .. len(proposals) + 1) and
    their logprobs (raw, as the plain sampler returns them) when the request asks for them."""
    logits = logits[:, : sampler.vocab_size]
    dev = logits.device
    rows: list[SamplingRow] = []
    first: list[int] = []  # first logits row of each request
    for r in reqs:
        first.append(len(rows))
        hist = _needs_history(r.params, len(r.output_token_ids))
        for i in range(len(r.proposals) + 1):
            out = r.output_token_ids + r.proposals[:i] if hist and i else r.output_token_ids
            rows.append(SamplingRow(r.params, r.prompt_token_ids, out, r.generator))

    greedy = [i for i, row in enumerate(rows) if row.params.temperature == 0.0]
    random = [i for i, row in enumerate(rows) if row.params.temperature != 0.0]
    target: dict[int, int] = {}
    if greedy:
        x = logits if len(greedy) == len(rows) else logits[greedy]
        g_rows = [rows[i] for i in greedy]
        if any(_needs_history(r.params, 0) or r.params.logit_bias for r in g_rows):
            x = sampler.adjust_logits(x, g_rows)
        target = dict(zip(greedy, argmax_rows(x).tolist(), strict=True))
    probs = None
    local: dict[int, int] = {}  # logits row -> row of probs
    p_prop: list[float] = []
    if random:
        local = {row: i for i, row in enumerate(random)}
        probs = sampler.probs(logits if len(random) == len(rows) else logits[random], [rows[i] for i in random])
        # Target probability of each proposal at the position that predicts it: one gather, one sync.
        at, toks = [], []
        for r, f in zip(reqs, first, strict=True):
            if r.params.temperature != 0.0:
                at.extend(local[f + i] for i in range(len(r.proposals)))
                toks.extend(r.proposals)
        if at:
            p_prop = probs[torch.tensor(at, device=dev), torch.tensor(toks, device=dev)].tolist()

    emitted: list[list[int]] = []
    final_rows: list[int] = []  # probs rows to draw a token from, and the token to exclude (-1: none)
    final_excl: list[int] = []
    final_owner: list[int] = []
    k = 0
    for n, (r, f) in enumerate(zip(reqs, first, strict=True)):
        j = len(r.proposals)
        if r.params.temperature == 0.0:
            toks = []
            for i in range(j + 1):
                toks.append(target[f + i])
                if i == j or toks[-1] != r.proposals[i]:
                    break
            emitted.append(toks)
            continue
        g = r.generator if r.generator is not None else sampler.shared_generator(dev)
        us = torch.rand(j, generator=g, device=g.device).tolist()
        toks = []
        excl = -1
        for i in range(j):
            if accept_draft(us[i], p_prop[k + i]):
                toks.append(r.proposals[i])
            else:
                excl = r.proposals[i]
                break
        k += j
        emitted.append(toks)
        final_rows.append(local[f + len(toks)])
        final_excl.append(excl)
        final_owner.append(n)
    if final_rows:
        assert probs is not None
        fp = probs[torch.tensor(final_rows, device=dev)]
        ex = [(i, t) for i, t in enumerate(final_excl) if t >= 0]
        if ex:  # the residual max(0, p - q) with q one-hot: p with the rejected proposal removed
            fp[[i for i, _ in ex], [t for _, t in ex]] = 0.0
        race_rows = [SamplingRow(reqs[n].params, [], [], reqs[n].generator) for n in final_owner]
        for n, t in zip(final_owner, sampler.race(fp, race_rows).tolist(), strict=True):
            emitted[n].append(t)

    results: list[tuple[list[int], list[Logprobs] | None]] = [(e, None) for e in emitted]
    want = [n for n, r in enumerate(reqs) if r.params.logprobs is not None]
    if want:
        lp_rows = [first[n] + i for n in want for i in range(len(emitted[n]))]
        lp_toks = [t for n in want for t in emitted[n]]
        raw = torch.log_softmax(logits[torch.tensor(lp_rows, device=dev)].float(), dim=-1)
        ns = [reqs[n].params.logprobs or 0 for n in want for _ in emitted[n]]
        lps = _top_logprobs(raw, torch.tensor(lp_toks, device=dev), ns)
        i = 0
        for n in want:
            m = len(emitted[n])
            results[n] = (emitted[n], [(e.token_logprob, e.top_ids, e.top_logprobs) for e in lps[i:i + m]])
            i += m
    return results
