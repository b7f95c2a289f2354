"""Rejection sampling keeps the target distribution: chi-square over many seeded draws against the
processed target softmax, and the same test rejects deliberately wrong samplers."""

from __future__ import annotations

import pytest
import torch

from tokenmill.runner.sampler import Sampler, make_generator
from tokenmill.sampling_params import SamplingParams
from tokenmill.spec import rejection
from tokenmill.spec.rejection import SpecRow, verify

V = 8
DRAWS = 6000
# Chi-square critical value for 7 degrees of freedom at p = 0.001: a correct sampler fails 1 in 1000 runs
# at most (the draws are seeded, so the outcome is in fact fixed).
CHI2_CRIT_7 = 24.32


def _logits() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randn(3, V, generator=g) * 1.5  # rows: positions 0, 1, 2 (two proposals)


def _target(row: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The processed target distribution, computed independently of the sampler."""
    x = row / params.temperature
    if params.top_k:
        kth = x.topk(params.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    return torch.softmax(x, dim=-1)


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum()
    keep = probs > 0
    assert counts[~keep].sum() == 0, "a token outside the target's support was emitted"
    exp = probs[keep] * n
    return float(((counts[keep] - exp) ** 2 / exp).sum())


def _histograms(params: SamplingParams, proposals: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Emitted-token histograms over DRAWS requests verified in one batch, each with its own seed."""
    sampler = Sampler(V, eos_token_ids=[], seed=0)
    logits = _logits().repeat(DRAWS, 1)
    rows = [SpecRow(params, [1, 2], [3], proposals, make_generator(1000 + i)) for i in range(DRAWS)]
    first = torch.zeros(V)
    second = torch.zeros(V)  # second emitted token, given the first proposal was accepted
    for toks, _ in verify(sampler, logits, rows):
        first[toks[0]] += 1
        if toks[0] == proposals[0] and len(toks) > 1:
            second[toks[1]] += 1
    return first, second


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=5)])
def test_emitted_tokens_follow_the_target_distribution(params):
    logits = _logits()
    p0, p1 = _target(logits[0], params), _target(logits[1], params)
    proposals = [int(p0.argsort()[-2]), int(p1.argsort()[-1])]  # a likely, not the likeliest, first guess
    first, second = _histograms(params, proposals)
    assert _chi2(first, p0) < CHI2_CRIT_7
    assert second.sum() > 300
    assert _chi2(second, p1) < CHI2_CRIT_7


def test_a_sampler_that_accepts_every_proposal_fails(monkeypatch):
    params = SamplingParams(temperature=1.0)
    p0 = _target(_logits()[0], params)
    monkeypatch.setattr(rejection, "accept_draft", lambda u, p: True)
    first, _ = _histograms(params, [int(p0.argsort()[-2]), 0])
    assert _chi2(first, p0) > 10 * CHI2_CRIT_7


def test_a_sampler_that_resamples_without_removing_the_rejected_token_fails(monkeypatch):
    # Drawing the replacement from p instead of norm(max(0, p - q)) over-weights the proposal.
    params = SamplingParams(temperature=1.0)
    p0 = _target(_logits()[0], params)
    real_race = Sampler.race

    def race_with_rejected_token_restored(self, probs, rows):
        return real_race(self, torch.softmax(_logits()[:1] / params.temperature, dim=-1).expand_as(probs).clone(),
                         rows)

    monkeypatch.setattr(Sampler, "race", race_with_rejected_token_restored)
    first, _ = _histograms(params, [int(p0.argsort()[-2]), 0])
    assert _chi2(first, p0) > 2 * CHI2_CRIT_7


def test_greedy_rows_take_the_target_argmax_at_each_position():
    sampler = Sampler(V, eos_token_ids=[])
    logits = _logits()
    best = logits.argmax(-1).tolist()
    greedy = SamplingParams(temperature=0.0)
    cases = {  # proposals -> emitted tokens
        (best[0], best[1]): [best[0], best[1], best[2]],  # all accepted, then the bonus token
        (best[0], (best[1] + 1) % V): [best[0], best[1]],  # second rejected: the target's own token
        ((best[0] + 1) % V, best[1]): [best[0]],  # first rejected
    }
    for props, want in cases.items():
        (toks, lps), = verify(sampler, logits, [SpecRow(greedy, [1], [2], list(props))])
        assert toks == want and lps is None


def test_logprobs_are_those_of_the_emitted_tokens():
    sampler = Sampler(V, eos_token_ids=[])
    logits = _logits()
    params = SamplingParams(temperature=0.9, logprobs=3, seed=5)
    raw = torch.log_softmax(logits, dim=-1)
    for i in range(50):
        (toks, lps), = verify(sampler, logits, [SpecRow(params, [1], [2], [3, 4], make_generator(i))])
        assert len(lps) == len(toks)
        for pos, (t, (lp, top_ids, top_lps)) in enumerate(zip(toks, lps, strict=True)):
            assert lp == pytest.approx(float(raw[pos, t]), abs=1e-6)
            assert top_ids == raw[pos].topk(3).indices.tolist()
            assert top_lps == pytest.approx(raw[pos].topk(3).values.tolist(), abs=1e-6)


def test_seeded_requests_reproduce_in_any_batch():
    sampler = Sampler(V, eos_token_ids=[])
    logits = _logits()
    params = SamplingParams(temperature=1.0, seed=7)
    alone = verify(sampler, logits, [SpecRow(params, [1], [2], [3, 4], make_generator(7))])[0][0]
    other = SpecRow(SamplingParams(temperature=1.0), [9], [9], [1, 2], None)
    batched = verify(sampler, torch.cat([logits, logits]), [other, SpecRow(params, [1], [2], [3, 4],
                                                                           make_generator(7))])
    assert batched[1][0] == alone
