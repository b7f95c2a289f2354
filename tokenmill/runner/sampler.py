"""Turn a batch of logits into one token per request, vectorized over the batch.

Order of processing follows vLLM:
  1. logprobs to return are taken from the raw logits (log_softmax before anything else);
  2. logit_bias; min_tokens (eos and stop tokens masked); repetition penalty (HF semantics, prompt +
     output); presence / frequency penalties (OpenAI semantics, output only);
  3. greedy rows take the argmax here;
  4. the other rows: temperature, top-k, top-p, min-p, then the exponential race
     argmax(probs / Exp(1) noise), which needs no host sync and lets each seeded row draw its noise from
     its own generator, so a seed gives the same tokens whatever else shares the batch.

A batch of plain greedy rows (no penalty, bias or min_tokens) takes a single argmax.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tokenmill.kernels.cpu import fused
from tokenmill.sampling_params import SamplingParams

_NEG_INF = float("-inf")
# Exp(1) noise can be exactly 0; then a masked token (p == 0) would give 0 / 0 = NaN, which argmax
# prefers over every number. Clamping the noise to the smallest normal float keeps masked tokens at 0.
_MIN_NOISE = torch.finfo(torch.float32).tiny
_SEED_MASK = 0xFFFF_FFFF_FFFF_FFFF  # torch.Generator.manual_seed accepts only 64-bit values
TOP_P_CANDIDATES = (64, 1024)  # CPU top-p: candidate set sizes tried before a full sort


@dataclass
class SamplingRow:
    """One row of the logits batch: a request that samples a token this step."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # generated so far, before this step's token
    generator: torch.Generator | None = None  # the request's own when it has a seed; else the shared one


@dataclass
class SampledLogprobs:
    token_logprob: float  # logprob of the sampled (or given) token
    top_ids: list[int]  # top-N token ids, most likely first
    top_logprobs: list[float]


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[SampledLogprobs | None]  # None for rows that did not ask for logprobs


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A request's own generator: same seed, same noise, whatever batch the request lands in."""
    g = torch.Generator(device=device)
    g.manual_seed(seed & _SEED_MASK)
    return g


def _is_plain_greedy(row: SamplingRow) -> bool:
    p = row.params
    return (
        p.temperature == 0.0
        and not p.logit_bias
        and p.repetition_penalty == 1.0
        and p.presence_penalty == 0.0
        and p.frequency_penalty == 0.0
        and len(row.output_token_ids) >= p.min_tokens
    )


@functools.cache
def _argmax_block(vocab: int) -> int | None:
    """A divisor of vocab near 1024 to split rows into blocks for argmax_rows; None if there is none."""
    for size in (*range(1024, 255, -1), *range(1025, 4097)):
        if vocab % size == 0:
            return size
    return None


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """torch.argmax(x, dim=-1) for [B, V]: the same indices (first maximum, NaN counts as the maximum).

    On CPU torch's argmax keeps an index per lane and runs ~15x slower than amax; taking the maximum of
    each block of ~1024 columns, then argmax over the blocks and inside the winning block, is 3-8x faster
    at V=49152 (B=1..64). The first block holding the row maximum holds its first occurrence.
    """
    vocab = x.shape[-1]
    block = _argmax_block(vocab) if x.device.type == "cpu" and vocab >= 8192 else None
    if block is None:
        return x.argmax(dim=-1)
    blocks = x.unflatten(-1, (vocab // block, block))
    best = blocks.amax(dim=-1).argmax(dim=-1)
    inner = blocks[torch.arange(x.shape[0], device=x.device), best].argmax(dim=-1)
    return best.mul_(block).add_(inner)


def _index(ids: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.long, device=device)


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)


def _top_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, ns: list[int]) -> list[SampledLogprobs]:
    """Per row: the logprob of token_ids[i] and the top ns[i] entries, from [R, V] logprobs."""
    token_lp = logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1).tolist()
    n_max = min(max(ns, default=0), logprobs.shape[1])
    if n_max > 0:
        top = logprobs.topk(n_max, dim=-1)  # sorted, most likely first
        top_lp, top_ids = top.values.tolist(), top.indices.tolist()
    else:
        top_lp = top_ids = [[] for _ in ns]
    return [SampledLogprobs(token_lp[i], top_ids[i][:n], top_lp[i][:n]) for i, n in enumerate(ns)]


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """In place: logits[rows[i]] keeps only the tokens bitmask[i] allows (int32 words; bit j of word w
    allows token 32w + j, llguidance's layout); every other column, padded ones included, becomes -inf.
    Structured output's masks, applied before sampling or verification so both draw from the constrained
    distribution (logprobs too, as in vLLM)."""
    if not rows:
        return
    dev = logits.device
    if dev.type == "cpu" and logits.dtype == torch.float32 and logits.stride(1) == 1:
        kernels = fused()
        if kernels is not None:  # ~10x faster: whole words of ones or zeros skip the per-bit work
            kernels.apply_token_bitmask_(logits, bitmask.contiguous(), _index(rows, dev))
            return
    shifts = torch.arange(32, dtype=torch.int32, device=dev)
    allowed = (bitmask.to(dev).unsqueeze(-1) >> shifts).bitwise_and_(1).flatten(1).bool()
    cols = min(logits.shape[1], allowed.shape[1])
    idx = _index(rows, dev)
    sub = logits.index_select(0, idx)
    sub[:, :cols].masked_fill_(~allowed[:, :cols], _NEG_INF)
    sub[:, cols:] = _NEG_INF
    logits.index_copy_(0, idx, sub)


def _flat_ids(seqs: list[tuple[int, list[int]]], vocab: int, device: torch.device) -> torch.Tensor:
    """row * vocab + token for every token of every listed (row, tokens) pair."""
    toks: list[int] = []
    for _, seq in seqs:
        toks.extend(seq)
    lengths = torch.tensor([len(seq) for _, seq in seqs], device=device)
    row_ids = torch.repeat_interleave(_index([i for i, _ in seqs], device), lengths)
    return row_ids.mul_(vocab).add_(_index(toks, device))


def _top_p_threshold(probs: torch.Tensor, top_p: torch.Tensor, stages: list[int]) -> torch.Tensor:
    """Per row [R, 1]: the smallest probability inside the smallest most-likely set whose mass reaches
    top_p. Each stage k looks at the top k only; rows whose top k do not reach top_p go on to the next
    stage and finally to a full sort."""
    vocab = probs.shape[1]
    thresh = torch.empty((probs.shape[0], 1), dtype=probs.dtype, device=probs.device)
    pending: torch.Tensor | None = None  # rows still open; None: all of them
    for k in (*stages, vocab):
        p = probs if pending is None else probs.index_select(0, pending)
        tp = top_p if pending is None else top_p.index_select(0, pending)
        vals = p.topk(k, dim=-1).values if k < vocab else p.sort(dim=-1, descending=True).values
        cum = vals.cumsum(dim=-1)  # never decreases, so counting entries below top_p finds the cut
        n_keep = (cum < tp).sum(dim=-1, keepdim=True).add_(1).clamp_(max=k)  # top token always kept
        t = vals.gather(1, n_keep - 1)
        if k == vocab:
            covered = None
        else:
            covered = cum[:, -1:] >= tp
            t = torch.where(covered, t, 0.0)  # placeholder, overwritten by a later stage
        if pending is None:
            thresh.copy_(t)
        else:
            thresh.index_copy_(0, pending, t)
        if covered is None or bool(covered.all()):
            break
        open_rows = (~covered).squeeze(1).nonzero().squeeze(1)
        pending = open_rows if pending is None else pending.index_select(0, open_rows)
    return thresh


def prompt_logprobs(
    logits: torch.Tensor, next_ids: list[int], n: int, vocab_size: int | None = None
) -> list[SampledLogprobs]:
    """Logprobs of prompt tokens: logits[i] predicts next_ids[i]; top-n alongside.

    vocab_size cuts off padded vocabulary columns, which must not take probability mass.
    """
    if logits.shape[0] != len(next_ids):
        raise ValueError(f"{logits.shape[0]} logit rows for {len(next_ids)} next tokens")
    if not next_ids:
        return []
    if vocab_size is not None:
        logits = logits[:, :vocab_size]
    lp = torch.log_softmax(logits.float(), dim=-1)
    return _top_logprobs(lp, _index(next_ids, lp.device), [n] * len(next_ids))


class Sampler:
    """Samples one token per row of a [B, V] logits batch; see the module docstring for the order."""

    def __init__(self, vocab_size: int, eos_token_ids: Sequence[int], seed: int = 0):
        self.vocab_size = vocab_size
        self.eos_token_ids = [t for t in eos_token_ids if 0 <= t < vocab_size]
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}  # shared, one per device

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        n = len(rows)
        # Rows past len(rows) (padded batch) and columns past vocab_size (padded LM head) are ignored.
        logits = logits[:n, : self.vocab_size]
        for row in rows:
            if not _is_plain_greedy(row):
                tokens = self._sample(logits, rows)
                break
        else:  # fast path, the common decode step: one argmax over the raw logits (logprobs or not)
            tokens = argmax_rows(logits)
        lp_rows = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        logprobs: list[SampledLogprobs | None] = [None] * n
        if lp_rows:
            idx = _index(lp_rows, logits.device)
            some = logits.index_select(0, idx) if len(lp_rows) < n else logits
            # Raw logprobs: before any penalty or temperature, as vLLM returns them by default.
            raw = torch.log_softmax(some.float(), dim=-1)
            ns = [rows[i].params.logprobs or 0 for i in lp_rows]
            for i, lp in zip(lp_rows, _top_logprobs(raw, tokens.index_select(0, idx), ns), strict=True):
                logprobs[i] = lp
        return SamplerOutput(tokens.tolist(), logprobs)

    def adjust_logits(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """A float32 copy of the logits after logit_bias, min_tokens and the penalties (what greedy
        rows take the argmax of). The caller's tensor is left untouched."""
        x = logits[: len(rows), : self.vocab_size]
        x = x.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        self._apply_logit_bias(x, rows)
        self._apply_min_tokens(x, rows)
        self._apply_penalties(x, rows)
        return x

    # -- steps -------------------------------------------------------------------------------------

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        x = self.adjust_logits(logits, rows)
        greedy = [i for i, r in enumerate(rows) if r.params.temperature == 0.0]
        if len(greedy) == len(rows):
            return argmax_rows(x)
        if not greedy:  # x is already our own copy, sample it in place
            return self._random_sample(x, rows)
        random = [i for i, r in enumerate(rows) if r.params.temperature != 0.0]
        tokens = torch.empty(len(rows), dtype=torch.long, device=x.device)
        gi = _index(greedy, x.device)
        tokens.index_copy_(0, gi, argmax_rows(x.index_select(0, gi)))
        if random:
            ri = _index(random, x.device)
            tokens.index_copy_(0, ri, self._random_sample(x.index_select(0, ri), [rows[i] for i in random]))
        return tokens

    def _apply_logit_bias(self, x: torch.Tensor, rows: list[SamplingRow]) -> None:
        r_idx: list[int] = []
        t_idx: list[int] = []
        bias: list[float] = []
        for i, row in enumerate(rows):
            for tok, b in row.params.logit_bias.items():
                if tok < self.vocab_size:  # ids past the vocabulary can never be sampled anyway
                    r_idx.append(i)
                    t_idx.append(tok)
                    bias.append(b)
        if r_idx:
            dev = x.device
            x.index_put_(
                (_index(r_idx, dev), _index(t_idx, dev)),
                torch.tensor(bias, dtype=x.dtype, device=dev),
                accumulate=True,
            )

    def _apply_min_tokens(self, x: torch.Tensor, rows: list[SamplingRow]) -> None:
        r_idx: list[int] = []
        t_idx: list[int] = []
        for i, row in enumerate(rows):
            p = row.params
            if len(row.output_token_ids) < p.min_tokens:
                # eos is masked even with ignore_eos: min_tokens asks for that many non-stop tokens.
                stops = self.eos_token_ids + [t for t in p.stop_token_ids if t < self.vocab_size]
                r_idx.extend([i] * len(stops))
                t_idx.extend(stops)
        if r_idx:
            dev = x.device
            x.index_put_((_index(r_idx, dev), _index(t_idx, dev)), torch.tensor(_NEG_INF, device=dev))

    def _apply_penalties(self, x: torch.Tensor, rows: list[SamplingRow]) -> None:
        # Sparse: only the (row, token) entries that occurred are touched, never a [B, V] pass.
        vocab, dev = x.shape[1], x.device
        flat_x = x.view(-1)  # x is our own contiguous copy
        rep = [
            (i, r.prompt_token_ids + r.output_token_ids)
            for i, r in enumerate(rows)
            if r.params.repetition_penalty != 1.0
        ]
        if rep:
            # HF semantics over prompt + output: a seen token's positive logit is divided by the
            # penalty, a negative one multiplied, so the penalty always makes it less likely.
            flat = _flat_ids(rep, vocab, dev).unique()
            rp = torch.tensor([r.params.repetition_penalty for r in rows], device=dev)[flat // vocab]
            vals = flat_x[flat]
            flat_x[flat] = torch.where(vals > 0, vals / rp, vals * rp)

        freq_pres = [
            (i, r.output_token_ids)
            for i, r in enumerate(rows)
            if (r.params.presence_penalty != 0.0 or r.params.frequency_penalty != 0.0) and r.output_token_ids
        ]
        if freq_pres:
            # OpenAI semantics over output tokens only: logit -= count * freq + (count > 0) * presence.
            flat, counts = _flat_ids(freq_pres, vocab, dev).unique(return_counts=True)
            row = flat // vocab
            freq = torch.tensor([r.params.frequency_penalty for r in rows], device=dev)[row]
            pres = torch.tensor([r.params.presence_penalty for r in rows], device=dev)[row]
            flat_x.index_add_(0, flat, -(counts * freq + pres))

    def _random_sample(self, s: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Sample one token per row of s (our own copy, modified in place); no row is greedy."""
        return self.race(self._probs_inplace(s, rows), rows)

    def probs(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """[R, V] float32: the distribution each (non-greedy) row samples from, after logit_bias,
        min_tokens, penalties, temperature, top-k, top-p and min-p."""
        return self._probs_inplace(self.adjust_logits(logits, rows), rows)

    def race(self, probs: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """One token per row of probs (modified in place; need not sum to 1), drawn with each row's
        generator: argmax(probs / Exp(1) noise) picks token i with probability probs[i] / sum."""
        noise = self._draw_noise(probs.shape, rows, probs.device).clamp_min_(_MIN_NOISE)
        return argmax_rows(probs.div_(noise))

    def _probs_inplace(self, s: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        dev = s.device
        temps = [r.params.temperature for r in rows]
        if any(t != 1.0 for t in temps):
            s.div_(_column(temps, dev))
        self._apply_top_k(s, rows)
        self._apply_top_p(s, rows)
        self._apply_min_p(s, rows)
        return torch.softmax(s, dim=-1)

    @staticmethod
    def _subset(
        s: torch.Tensor, rows: list[SamplingRow], wanted: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The wanted rows of s (s itself when that is all of them) and their index, if a subset."""
        if len(wanted) == len(rows):
            return s, None
        idx = _index(wanted, s.device)
        return s.index_select(0, idx), idx

    def _apply_top_k(self, s: torch.Tensor, rows: list[SamplingRow]) -> None:
        vocab = s.shape[1]
        wanted = [j for j, r in enumerate(rows) if 0 < r.params.top_k < vocab]
        if not wanted:
            return
        sub, idx = self._subset(s, rows, wanted)
        ks = [rows[j].params.top_k for j in wanted]
        kth = sub.topk(max(ks), dim=-1).values  # one topk for the largest k, then each row's k-th
        kth = kth.gather(1, _index(ks, s.device).sub_(1).unsqueeze(1))
        sub.masked_fill_(sub < kth, _NEG_INF)  # ties with the k-th value are all kept
        if idx is not None:
            s.index_copy_(0, idx, sub)

    def _apply_top_p(self, s: torch.Tensor, rows: list[SamplingRow]) -> None:
        wanted = [j for j, r in enumerate(rows) if r.params.top_p < 1.0]
        if not wanted:
            return
        sub, idx = self._subset(s, rows, wanted)
        probs = torch.softmax(sub, dim=-1)
        top_p = _column([rows[j].params.top_p for j in wanted], s.device)
        # A full sort costs ~2.5 ms per row of 49k on CPU, while the top-p set is nearly always a few
        # dozen tokens: there, try the top candidates first and sort only the rows they do not cover.
        # On accelerators one sort is cheap and needs no host sync.
        stages = [k for k in TOP_P_CANDIDATES if k < probs.shape[1]] if s.device.type == "cpu" else []
        sub.masked_fill_(probs < _top_p_threshold(probs, top_p, stages), _NEG_INF)
        if idx is not None:
            s.index_copy_(0, idx, sub)

    def _apply_min_p(self, s: torch.Tensor, rows: list[SamplingRow]) -> None:
        wanted = [j for j, r in enumerate(rows) if r.params.min_p > 0.0]
        if not wanted:
            return
        sub, idx = self._subset(s, rows, wanted)
        probs = torch.softmax(sub, dim=-1)
        floor = probs.amax(dim=-1, keepdim=True) * _column([rows[j].params.min_p for j in wanted], s.device)
        sub.masked_fill_(probs < floor, _NEG_INF)
        if idx is not None:
            s.index_copy_(0, idx, sub)

    def _draw_noise(self, shape: torch.Size, rows: list[SamplingRow], device: torch.device) -> torch.Tensor:
        """Exp(1) noise, [S, V]. A seeded row's noise comes only from its own generator, V draws per
        step, so its tokens do not depend on its position or neighbours; the rest share one draw."""
        # Uniform draws turned into Exp(1) by -log(1 - u): the same distribution as exponential_(),
        # which is ~5x slower on CPU. u in [0, 1) gives noise in [0, 16.6], 0 clamped by the caller.
        noise = torch.empty(shape, device=device)
        unseeded = [j for j, r in enumerate(rows) if r.generator is None]
        if len(unseeded) == len(rows):
            noise.uniform_(generator=self._shared_generator(device))
        else:
            if unseeded:
                shared = torch.empty((len(unseeded), shape[1]), device=device)
                shared.uniform_(generator=self._shared_generator(device))
                noise.index_copy_(0, _index(unseeded, device), shared)
            for j, r in enumerate(rows):
                g = r.generator
                if g is None:
                    continue
                if g.device == noise.device:
                    noise[j].uniform_(generator=g)
                else:  # a CPU generator for a row on an accelerator: draw on the CPU, then copy
                    noise[j].copy_(torch.empty(shape[1], device=g.device).uniform_(generator=g))
        return noise.neg_().log1p_().neg_()

    def shared_generator(self, device: torch.device) -> torch.Generator:
        """The generator of rows without a seed of their own (one per device)."""
        return self._shared_generator(device)

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        g = self._generators.get(device)
        if g is None:
            g = self._generators[device] = make_generator(self._seed, device)
        return g
