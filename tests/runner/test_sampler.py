"""Sampler tests: each transformation against a direct reference, truncation never leaking a masked
token, sampled frequencies against the intended distribution (chi-square), per-seed reproducibility
independent of the batch, and logprobs."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.errors import InvalidRequestError
from tokenmill.runner import sampler as sampler_module
from tokenmill.runner.sampler import (
    Sampler,
    SamplingRow,
    argmax_rows,
    make_generator,
    prompt_logprobs,
)
from tokenmill.sampling_params import MAX_LOGIT_BIAS, MAX_STOP_TOKEN_IDS, SamplingParams

EOS = 2
FAST = settings(max_examples=40, deadline=None, derandomize=True, database=None)


def make_row(
    prompt: list[int] | None = None,
    output: list[int] | None = None,
    generator: torch.Generator | None = None,
    **params: object,
) -> SamplingRow:
    return SamplingRow(SamplingParams(**params), list(prompt or [1]), list(output or []), generator)


def randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson goodness of fit; the chi-square survival function is the regularized upper gamma."""
    counts, probs = counts.double(), probs.double()
    expected = probs * counts.sum()
    assert bool((expected >= 5).all()), "too few draws per bin for a chi-square test"
    stat = ((counts - expected) ** 2 / expected).sum()
    df = torch.tensor((len(probs) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(df, stat / 2))


def draw_counts(logits_row: torch.Tensor, n: int, seed: int = 1234, **params: object) -> torch.Tensor:
    """Counts of n unseeded draws from one distribution, as one batch of n identical rows."""
    vocab = logits_row.shape[0]
    out = Sampler(vocab, [], seed=seed)(logits_row.expand(n, vocab), [make_row(**params) for _ in range(n)])
    return torch.bincount(torch.tensor(out.token_ids), minlength=vocab)


# -- greedy, bias, min_tokens, penalties --------------------------------------------------------------


def test_greedy_is_argmax_and_ignores_padding() -> None:
    vocab = 100
    logits = randn(12, vocab + 28, seed=0)
    logits[:, vocab:] = 1e6  # padded LM-head columns must never win
    rows = [make_row(temperature=0.0) for _ in range(8)]  # rows 8..11 are batch padding
    out = Sampler(vocab, [EOS])(logits, rows)
    assert out.token_ids == logits[:8, :vocab].argmax(-1).tolist()
    assert out.logprobs == [None] * 8
    assert Sampler(vocab, [EOS])(logits, []).token_ids == []


def test_stop_token_ids_are_deduplicated_and_both_lists_capped() -> None:
    assert SamplingParams(stop_token_ids=[5] * 10_000 + [7, 5]).stop_token_ids == [5, 7]
    with pytest.raises(InvalidRequestError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=list(range(MAX_STOP_TOKEN_IDS + 1)))
    with pytest.raises(InvalidRequestError, match="logit_bias"):
        SamplingParams(logit_bias={i: 1.0 for i in range(MAX_LOGIT_BIAS + 1)})


@pytest.mark.parametrize("temperature", [1e-46, 5e-324, 1e-6])
def test_a_temperature_too_small_to_divide_by_is_greedy(temperature: float) -> None:
    """Logits divided by 1e-46 overflow to inf and the softmax to NaN; such a request once returned empty
    text. It is greedy instead, like temperature 0."""
    assert SamplingParams(temperature=temperature).greedy
    assert not SamplingParams(temperature=1e-4).greedy
    logits = randn(3, 50, seed=1, scale=5.0)
    out = Sampler(50, [EOS])(logits, [make_row(temperature=temperature) for _ in range(3)])
    assert out.token_ids == logits.argmax(-1).tolist()


@pytest.mark.parametrize("vocab", [49152, 32000, 151936, 50257, 8209])
def test_argmax_rows_equals_torch_argmax(vocab: int) -> None:
    gen = torch.Generator().manual_seed(vocab)
    x = torch.randint(0, 4, (9, vocab + 5), generator=gen).float()[:, :vocab]  # many ties, padded view
    x[1] = float("-inf")
    x[2, vocab // 3] = float("nan")
    x[3, [7, vocab - 1]] = float("nan")
    x[4, vocab - 1] = 10.0
    x[5, 0] = 10.0
    for t in (x, x.bfloat16(), x[:0], x[:1]):
        assert torch.equal(argmax_rows(t), t.argmax(dim=-1))


def test_logit_bias_changes_greedy_choice() -> None:
    logits = torch.zeros(2, 10)
    logits[:, 3] = 5.0
    logits[:, 4] = 4.0
    rows = [make_row(temperature=0.0, logit_bias={7: 10.0}), make_row(temperature=0.0, logit_bias={3: -2.0})]
    assert Sampler(10, [EOS])(logits, rows).token_ids == [7, 4]


def test_min_tokens_blocks_eos_and_stop_tokens() -> None:
    logits = torch.zeros(4, 10)
    logits[:, EOS] = 9.0
    logits[:, 5] = 8.0  # a stop token
    logits[:, 6] = 7.0
    greedy = {"temperature": 0.0, "min_tokens": 2, "max_tokens": 4, "stop_token_ids": [5]}
    rows = [
        make_row(output=[], **greedy),
        make_row(output=[1], **greedy),
        make_row(output=[1, 1], **greedy),  # min_tokens reached: eos allowed again
        make_row(output=[], ignore_eos=True, **greedy),  # eos stays masked during min_tokens
    ]
    assert Sampler(10, [EOS])(logits, rows).token_ids == [6, 6, EOS, 6]

    # Sampling: eos and the stop token carry nearly all the mass, yet never come out.
    out = Sampler(10, [EOS])(
        logits.new_zeros(500, 10).index_fill_(1, torch.tensor([EOS, 5]), 20.0),
        [make_row(temperature=1.0, min_tokens=3, stop_token_ids=[5]) for _ in range(500)],
    )
    assert not {EOS, 5} & set(out.token_ids)


def reference_adjust(logits: torch.Tensor, row: SamplingRow, eos: list[int]) -> list[float]:
    """A direct loop over the tokens: the semantics the sampler has to match."""
    x = logits.double().tolist()
    p = row.params
    for tok, bias in p.logit_bias.items():
        x[tok] += bias
    if len(row.output_token_ids) < p.min_tokens:
        for tok in eos + p.stop_token_ids:
            x[tok] = float("-inf")
    if p.repetition_penalty != 1.0:
        for tok in set(row.prompt_token_ids + row.output_token_ids):
            x[tok] = x[tok] / p.repetition_penalty if x[tok] > 0 else x[tok] * p.repetition_penalty
    for tok, count in Counter(row.output_token_ids).items():
        x[tok] -= count * p.frequency_penalty + p.presence_penalty
    return x


token_lists = st.lists(st.integers(0, 19), max_size=12)


@FAST
@given(
    rows=st.lists(
        st.tuples(
            token_lists,
            token_lists,
            st.sampled_from([1.0, 0.5, 1.3, 2.0]),
            st.sampled_from([0.0, 0.7, -1.5]),
            st.sampled_from([0.0, 0.4, -0.9]),
            st.dictionaries(st.integers(0, 19), st.floats(-100, 100), max_size=3),
            st.integers(0, 3),
        ),
        min_size=1,
        max_size=6,
    ),
    seed=st.integers(0, 1000),
)
def test_adjust_logits_matches_loop_reference(rows: list[tuple], seed: int) -> None:
    vocab = 20
    logits = randn(len(rows), vocab, seed=seed, scale=3.0)
    batch = [
        make_row(
            prompt or [0],
            output,
            repetition_penalty=rep,
            presence_penalty=pres,
            frequency_penalty=freq,
            logit_bias=bias,
            min_tokens=min_tokens,
            max_tokens=8,
            stop_token_ids=[7],
        )
        for prompt, output, rep, pres, freq, bias, min_tokens in rows
    ]
    before = logits.clone()
    got = Sampler(vocab, [EOS]).adjust_logits(logits, batch)
    assert torch.equal(logits, before), "the caller's logits must not be modified"
    want = torch.tensor(
        [reference_adjust(logits[i], r, [EOS]) for i, r in enumerate(batch)], dtype=torch.float64
    )
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


def test_penalties_change_greedy_choice() -> None:
    logits = torch.zeros(4, 10)
    logits[:, 5] = 2.0
    logits[:, 6] = 1.9
    rows = [
        make_row(output=[5], temperature=0.0, presence_penalty=0.5),
        make_row(prompt=[5], temperature=0.0, repetition_penalty=1.2),  # 2.0 / 1.2 < 1.9
        make_row(output=[5, 5], temperature=0.0, frequency_penalty=0.1),  # 2.0 - 0.2 < 1.9
        make_row(output=[5], temperature=0.0, frequency_penalty=0.05),  # 2.0 - 0.05 still wins
    ]
    assert Sampler(10, [EOS])(logits, rows).token_ids == [6, 6, 6, 5]


# -- truncation never leaks ----------------------------------------------------------------------------


def surely_masked(logits: torch.Tensor, p: SamplingParams, tok: int) -> bool:
    """Whether top-k / top-p / min-p must drop tok, computed independently in float64 from the
    definitions (rank, mass of the more likely tokens, ratio to the most likely). Tokens within a small
    margin of a cut count as allowed, so rounding cannot make the test flaky. NumPy: single-threaded,
    so a busy machine does not slow it down."""
    z = (logits.numpy() / np.float32(p.temperature)).astype(np.float64)
    zt = z[tok]
    keep = np.ones(z.shape, dtype=bool)
    if 0 < p.top_k < z.shape[0]:
        if int((z > zt + 1e-4).sum()) >= p.top_k:
            return True
        keep = z >= np.partition(z, -p.top_k)[-p.top_k]
    if p.top_p < 1.0:
        e = np.where(keep, np.exp(z - z.max()), 0.0)
        if e[z > zt].sum() / e.sum() > p.top_p + 1e-4:  # the set before tok already reaches top_p
            return True
    # The ratio to the most likely token does not depend on what top-k / top-p removed.
    return float(np.exp(zt - z.max())) < p.min_p * (1 - 1e-4)


truncation = st.fixed_dictionaries(
    {
        "temperature": st.floats(0.05, 3.0),
        "top_k": st.integers(0, 60),
        "top_p": st.floats(0.01, 1.0),
        "min_p": st.floats(0.0, 1.0),
    }
)


@FAST
@given(params=truncation, seed=st.integers(0, 2**31), scale=st.sampled_from([0.5, 3.0]))
def test_truncation_never_emits_masked_tokens(params: dict, seed: int, scale: float) -> None:
    vocab, batch = 50, 100
    logits = randn(batch, vocab, seed=seed, scale=scale)
    rows = [make_row(**params) for _ in range(batch)]
    before = logits.clone()
    out = Sampler(vocab, [EOS], seed=seed)(logits, rows)
    assert torch.equal(logits, before), "the caller's logits must not be modified"
    for i, tok in enumerate(out.token_ids):
        assert not surely_masked(logits[i], rows[i].params, tok), (i, tok)


@FAST
@given(per_row=st.lists(truncation, min_size=8, max_size=8), seed=st.integers(0, 2**31))
def test_mixed_truncation_in_one_batch_never_leaks(per_row: list[dict], seed: int) -> None:
    vocab = 50
    logits = randn(len(per_row) * 8, vocab, seed=seed, scale=2.0)
    rows = [
        make_row(generator=make_generator(seed + i) if i % 3 == 0 else None, **per_row[i % len(per_row)])
        for i in range(logits.shape[0])
    ]
    out = Sampler(vocab, [EOS], seed=seed)(logits, rows)
    for i, tok in enumerate(out.token_ids):
        assert not surely_masked(logits[i], rows[i].params, tok), (i, tok)


def test_truncation_never_leaks_at_full_vocab() -> None:
    vocab, batch, steps = 49152, 64, 4
    choice = torch.Generator().manual_seed(7)

    def pick(options: list) -> object:
        return options[int(torch.randint(len(options), (1,), generator=choice))]

    for step in range(steps):
        rows = [
            make_row(
                temperature=pick([0.3, 0.8, 1.5]),
                top_k=pick([0, 1, 5, 50, 1000]),
                top_p=pick([1.0, 0.5, 0.9, 0.99]),
                min_p=pick([0.0, 0.05, 0.3]),
            )
            for _ in range(batch)
        ]
        # Flat rows need thousands of tokens for top_p (the full-sort path), peaked rows a few.
        scale = torch.tensor([pick([0.5, 2.0, 6.0]) for _ in range(batch)]).unsqueeze(1)
        logits = randn(batch, vocab, seed=100 + step) * scale
        out = Sampler(vocab, [EOS], seed=step)(logits, rows)
        for i, tok in enumerate(out.token_ids):
            assert not surely_masked(logits[i], rows[i].params, tok), (step, i, tok)


def test_zero_noise_cannot_leak_masked_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    # Exp(1) noise can be exactly 0; 0/0 would be NaN for masked tokens and argmax picks NaN.
    def zeros(self: Sampler, shape: torch.Size, rows: list, device: torch.device) -> torch.Tensor:
        return torch.zeros(shape, device=device)

    monkeypatch.setattr(Sampler, "_draw_noise", zeros)
    logits = randn(32, 50, seed=3, scale=3.0)
    rows = [make_row(temperature=1.0, top_k=3) for _ in range(32)]
    out = Sampler(50, [EOS])(logits, rows)
    top3 = logits.topk(3, dim=-1).indices
    for i, tok in enumerate(out.token_ids):
        assert tok in top3[i].tolist()


def test_top_p_candidate_stages_match_full_sort(monkeypatch: pytest.MonkeyPatch) -> None:
    # Rows covered by the top 64, by the top 1024, and only by a full sort.
    vocab = 5000
    scale = torch.tensor([8.0, 4.0, 1.5, 0.2] * 6).unsqueeze(1)
    logits = randn(24, vocab, seed=11) * scale
    rows = [make_row(temperature=1.0, top_p=[0.9, 0.95, 0.5][i % 3]) for i in range(24)]
    staged = Sampler(vocab, [EOS], seed=5)(logits, rows).token_ids
    monkeypatch.setattr(sampler_module, "TOP_P_CANDIDATES", ())
    full_sort = Sampler(vocab, [EOS], seed=5)(logits, rows).token_ids
    assert staged == full_sort


# -- distributions ---------------------------------------------------------------------------------


LOGITS_10 = torch.tensor([1.2, -0.3, 0.5, 2.0, 0.0, -1.0, 0.9, 1.5, -0.6, 0.3])


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.5])
def test_temperature_sampling_matches_softmax(temperature: float) -> None:
    counts = draw_counts(LOGITS_10, 20000, temperature=temperature)
    assert chi2_pvalue(counts, torch.softmax(LOGITS_10.double() / temperature, 0)) > 1e-3


def test_chi_square_rejects_the_wrong_distribution() -> None:
    counts = draw_counts(LOGITS_10, 20000, temperature=0.7)
    assert chi2_pvalue(counts, torch.softmax(LOGITS_10.double(), 0)) < 1e-3


def test_seeded_rows_match_softmax() -> None:
    # Many requests, one draw each from its own generator: the seeds together must give the distribution.
    n = 5000
    rows = [make_row(temperature=1.0, seed=i, generator=make_generator(i)) for i in range(n)]
    out = Sampler(10, [])(LOGITS_10.expand(n, 10), rows)
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=10)
    assert chi2_pvalue(counts, torch.softmax(LOGITS_10.double(), 0)) > 1e-3


def truncated(probs: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    kept = probs * keep
    return kept / kept.sum()


@pytest.mark.parametrize(
    ("params", "keep"),
    [
        # softmax sorted: 3 .317, 7 .192, 0 .143, 6 .106, 2 .071, ... (cumulative .317 .509 .652 .757 ...)
        ({"top_p": 0.7}, [0, 3, 6, 7]),
        ({"top_p": 0.6}, [0, 3, 7]),
        ({"top_k": 3}, [0, 3, 7]),
        ({"min_p": 0.3}, [0, 3, 6, 7]),  # p / p_max: 1, .61, .45, .33, then .22
        ({"top_k": 4, "top_p": 0.5}, [3, 7]),  # renormalized over four: .419 .673
        ({"top_p": 0.9, "min_p": 0.4}, [0, 3, 7]),
    ],
)
def test_truncated_distribution_is_renormalized(params: dict, keep: list[int]) -> None:
    probs = torch.softmax(LOGITS_10.double(), 0)
    mask = torch.zeros(10, dtype=torch.bool)
    mask[keep] = True
    counts = draw_counts(LOGITS_10, 20000, temperature=1.0, **params)
    assert counts[~mask].sum() == 0
    assert chi2_pvalue(counts[mask], truncated(probs, mask)[mask]) > 1e-3


# -- seeds ------------------------------------------------------------------------------------------


def seeded_sequence(seed: int, steps: int, companions: int, sampler_seed: int = 0) -> list[int]:
    """Generate with one seeded request; companions > 0 puts it at a different row each step among
    seeded and unseeded neighbours with other settings (and a padded logits batch)."""
    vocab = 1000
    sampler = Sampler(vocab, [EOS], seed=sampler_seed)
    target = dict(
        temperature=0.9, top_k=200, top_p=0.95, min_p=0.01, repetition_penalty=1.1, presence_penalty=0.2
    )
    others = [
        {"temperature": 0.0},
        {"temperature": 1.2},
        {"temperature": 0.7, "top_p": 0.8},
        {"temperature": 1.0, "top_k": 5},
        {"temperature": 0.5, "min_p": 0.1, "frequency_penalty": 0.5},
    ]
    gen = make_generator(seed)
    neighbours = [
        make_row(generator=make_generator(1000 + j) if j % 2 else None, **others[j % len(others)])
        for j in range(companions)
    ]
    out: list[int] = []
    for step in range(steps):
        row = make_row([5, 6, 7], out, generator=gen, seed=seed, **target)
        pos = (step * 7) % (companions + 1)
        batch = neighbours[:pos] + [row] + neighbours[pos:]
        logits = randn(len(batch) + 2, vocab + 16, seed=10_000 + step, scale=2.0)  # 2 padded rows
        logits[pos, :vocab] = randn(vocab, seed=step, scale=2.0)  # the target's logits depend on step only
        out.append(sampler(logits, batch).token_ids[pos])
    return out


def test_seed_reproducible_regardless_of_batch() -> None:
    alone = seeded_sequence(seed=42, steps=20, companions=0)
    assert seeded_sequence(seed=42, steps=20, companions=0, sampler_seed=9) == alone
    assert seeded_sequence(seed=42, steps=20, companions=5) == alone
    assert seeded_sequence(seed=42, steps=20, companions=11, sampler_seed=3) == alone
    assert seeded_sequence(seed=43, steps=20, companions=0) != alone


def test_make_generator_accepts_any_int_seed() -> None:
    for seed in (0, -1, 2**70, -(2**70)):
        a = torch.rand(4, generator=make_generator(seed))
        assert torch.equal(a, torch.rand(4, generator=make_generator(seed)))


# -- logprobs ---------------------------------------------------------------------------------------


def test_logprobs_come_from_raw_logits() -> None:
    vocab = 300
    logits = randn(5, vocab, seed=21, scale=3.0)
    rows = [
        make_row(
            [1, 2], [3], logprobs=5, temperature=0.8, top_k=20, repetition_penalty=1.5, logit_bias={4: 5.0}
        ),
        make_row(logprobs=0, temperature=1.0),
        make_row(temperature=1.0),
        make_row(logprobs=3, temperature=0.0, presence_penalty=1.0, output=[7]),
        make_row(logprobs=20, temperature=0.0),
    ]
    out = Sampler(vocab, [EOS])(logits, rows)
    raw = torch.log_softmax(logits.double(), dim=-1)
    assert out.logprobs[2] is None
    for i, row in enumerate(rows):
        lp = out.logprobs[i]
        if row.params.logprobs is None:
            continue
        assert lp is not None
        n = row.params.logprobs
        tok = out.token_ids[i]
        assert lp.token_logprob == pytest.approx(raw[i, tok].item(), abs=1e-5)
        assert len(lp.top_ids) == len(lp.top_logprobs) == n
        assert lp.top_logprobs == sorted(lp.top_logprobs, reverse=True)
        assert lp.top_ids == raw[i].topk(n).indices.tolist() if n else lp.top_ids == []
        torch.testing.assert_close(torch.tensor(lp.top_logprobs, dtype=torch.float64), raw[i].topk(n).values)


def test_logprobs_on_the_greedy_fast_path() -> None:
    logits = randn(3, 300, seed=22, scale=3.0)
    rows = [
        make_row(temperature=0.0, logprobs=2),
        make_row(temperature=0.0),
        make_row(temperature=0.0, logprobs=0),
    ]
    out = Sampler(300, [EOS])(logits, rows)
    raw = torch.log_softmax(logits.double(), dim=-1)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs[1] is None
    first, last = out.logprobs[0], out.logprobs[2]
    assert first is not None and last is not None
    assert first.top_ids == raw[0].topk(2).indices.tolist() and first.top_ids[0] == out.token_ids[0]
    assert first.token_logprob == pytest.approx(raw[0].max().item(), abs=1e-5)
    assert (last.top_ids, last.top_logprobs) == ([], [])
    assert last.token_logprob == pytest.approx(raw[2].max().item(), abs=1e-5)


def test_prompt_logprobs() -> None:
    vocab = 64
    logits = randn(6, vocab + 8, seed=4)
    logits[:, vocab:] = 50.0  # padding columns must take no probability
    next_ids = [3, 9, 0, 63, 12, 5]
    got = prompt_logprobs(logits, next_ids, 4, vocab_size=vocab)
    raw = torch.log_softmax(logits[:, :vocab].double(), dim=-1)
    for i, lp in enumerate(got):
        assert lp.token_logprob == pytest.approx(raw[i, next_ids[i]].item(), abs=1e-5)
        assert lp.top_ids == raw[i].topk(4).indices.tolist()
        assert lp.top_logprobs == pytest.approx(raw[i].topk(4).values.tolist(), abs=1e-5)
    assert [lp.top_ids for lp in prompt_logprobs(logits[:, :vocab], next_ids, 0)] == [[]] * 6
    with pytest.raises(ValueError):
        prompt_logprobs(logits, next_ids[:3], 1)


def test_token_bitmask_kernel_equals_torch_path(monkeypatch):
    """The native mask kernel and the PyTorch fallback forbid the same tokens, padded columns included."""
    import tokenmill.runner.sampler as sampler_mod

    g = torch.Generator().manual_seed(0)
    vocab, words = 1000, 32  # 1024 mask bits: the last 24 name no token
    logits = torch.randn(5, vocab + 24, generator=g)
    mask = torch.randint(-(2**31), 2**31 - 1, (3, words), dtype=torch.int32, generator=g)
    mask[0, :10] = 0
    mask[1, 10:20] = -1
    rows = [4, 0, 2]
    native = logits.clone()
    sampler_mod.apply_token_bitmask(native, mask, rows)
    monkeypatch.setattr(sampler_mod, "fused", lambda: None)
    fallback = logits.clone()
    sampler_mod.apply_token_bitmask(fallback, mask, rows)
    assert torch.equal(native, fallback)
    assert torch.equal(native[[1, 3]], logits[[1, 3]])  # rows without a mask untouched
    bits = (mask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)).bitwise_and(1).flatten(1).bool()
    for i, r in enumerate(rows):
        allowed = bits[i, : vocab + 24]
        assert torch.equal(native[r][allowed], logits[r][allowed])
        assert torch.isneginf(native[r][~allowed]).all()
