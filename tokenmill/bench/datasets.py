"""Benchmark datasets built offline, token-exact: every prompt is a list of token ids together with a text
that the model's tokenizer encodes to exactly those ids, so a server fed either form sees the same prompt.

Datasets (all seeded, no network):
- random: uniform random token ids, lengths uniform in ranges (the vLLM/`bench throughput` workload).
- chat: user turns rendered with the model's chat template, over real text; input and output lengths are
  drawn from log-normal distributions shaped after ShareGPT's published statistics (mean prompt ~161 and
  mean reply ~338 tokens, the figures in the vLLM paper), clipped to a range.
- shared-prefix: G groups, each with its own long system prompt; requests of a group differ only in a short
  question after it (what automatic prefix caching exists for). Groups are interleaved in arrival order.
- long-input: a long document and a short instruction that asks for output grounded in it (quote, continue,
  summarize): the case prefix caching and prompt-lookup speculation exist for.
- sharegpt / jsonl (--dataset-path FILE): your own traffic. ShareGPT JSON (a list of {"conversations":
  [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}, ...]}) gives the first human turn as the
  prompt and the reply's length in tokens as the output length, as vLLM's benchmark reads it; JSONL has one
  {"prompt": ..., "output_len": N} per line (output_len optional: then --output-len). The prompt text is
  sent as written (its own tokenization is the prompt's ids), seeded sample of the usable records.

The real text is the Python Language Reference as CPython ships it in `pydoc_data.topics` (the help()
topics; ~465 k characters, ~113 k tokens with the default model; PSF License 2.0). It is part of every
Python installation, so nothing is downloaded and nothing is vendored.

Tokenization happens here, before a run; the load generator only sends what this module built.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from typing import Protocol

from tokenmill.errors import ConfigError

logger = logging.getLogger(__name__)

DATASETS = ("random", "chat", "shared-prefix", "long-input", "sharegpt", "jsonl")
# Records vLLM's ShareGPT reader skips: prompts or replies under 4 tokens, prompts over 1024, pairs over 2048.
FILE_MIN_TOKENS, FILE_MAX_PROMPT, FILE_MAX_TOTAL = 4, 1024, 2048
# ShareGPT (vLLM paper, Kwon et al. 2023, fig. 11): mean input 161.31, mean output 337.99 tokens, both
# heavy-tailed. Log-normal with these means; sigma sets the tail.
CHAT_INPUT_MEAN, CHAT_OUTPUT_MEAN = 161.0, 338.0
CHAT_SIGMA = 0.9

_INSTRUCTIONS = (
    "Quote the first paragraph of the document above word for word.",
    "Continue the document above from where it stops, in the same style.",
    "Summarize the document above in one paragraph, reusing its own wording.",
    "List every keyword that the document above defines, with its definition as written.",
)


class TokenizerLike(Protocol):
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str: ...


@dataclass
class BenchRequest:
    prompt_token_ids: list[int]
    prompt: str  # encodes (add_special_tokens=False) to exactly prompt_token_ids
    output_len: int
    group: int = -1  # shared-prefix group, else -1

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


class DatasetError(ConfigError):
    """A dataset that cannot be built as asked (bad lengths, too little text)."""


def corpus_text() -> str:
    """The real text the chat, shared-prefix and long-input datasets draw from (see the module doc)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k].strip() for k in sorted(topics))


def exact(tok: TokenizerLike, ids: list[int], n: int, pad: list[int] | None = None) -> tuple[list[int], str]:
    """ids cut or padded to n tokens, adjusted until decode -> encode gives back exactly n ids.

    Decoding and re-encoding is not the identity (a cut can split a word or a UTF-8 character; random ids
    merge), so the ids are replaced by the re-encoding of their text and cut or padded again until stable.
    """
    pad = list(pad or [])
    cur = list(ids[:n])
    for _ in range(16):
        while len(cur) < n:
            if not pad:
                raise DatasetError(f"not enough text to build a {n}-token prompt")
            cur.append(pad.pop(0))
        text = tok.decode(cur, skip_special_tokens=False)
        again = tok.encode(text, add_special_tokens=False)
        if again == cur:
            return cur, text
        cur = again[:n]
    raise DatasetError(f"could not build a token-exact prompt of {n} tokens")


def _join_exact(tok: TokenizerLike, head: list[int], body: list[int]) -> tuple[list[int], str]:
    """head + body as one prompt; checks the round trip over the joint (a boundary merge is a DatasetError)."""
    ids = head + body
    text = tok.decode(ids, skip_special_tokens=False)
    if tok.encode(text, add_special_tokens=False) != ids:
        raise DatasetError("prompt pieces merge across their boundary when re-encoded")
    return ids, text


def _framed(tok: TokenizerLike, corpus: _Corpus, rng: random.Random, head: list[int], n: int, tail: list[int],
            start: int | None = None) -> tuple[list[int], str]:
    """head + a passage of n real-text tokens + tail, token-exact; passages whose edges merge with the
    frame when re-encoded (a space or newline joining its neighbour) are skipped for another."""
    for attempt in range(32):
        at = start if start is not None and attempt == 0 else rng.randrange(len(corpus.ids))
        body, _ = corpus.passage(tok, at, n)
        try:
            return _join_exact(tok, head, body + tail)
        except DatasetError:
            continue
    raise DatasetError(f"could not frame a {n}-token passage token-exactly")


def _rand_ids(rng: random.Random, n: int, lo: int, hi: int) -> list[int]:
    return [rng.randrange(lo, hi) for _ in range(n)]


def random_dataset(tok: TokenizerLike, num: int, input_len: tuple[int, int], output_len: tuple[int, int],
                   vocab: tuple[int, int], seed: int = 0) -> list[BenchRequest]:
    rng = random.Random(seed)
    out = []
    for _ in range(num):
        n = rng.randint(*input_len)
        ids, text = exact(tok, _rand_ids(rng, n, *vocab), n, _rand_ids(rng, 4 * n + 16, *vocab))
        out.append(BenchRequest(ids, text, rng.randint(*output_len)))
    return out


class _Corpus:
    def __init__(self, tok: TokenizerLike, text: str):
        self.ids = tok.encode(text, add_special_tokens=False)
        if len(self.ids) < 64:
            raise DatasetError("the corpus is too short")

    def passage(self, tok: TokenizerLike, start: int, n: int) -> tuple[list[int], str]:
        """n tokens of real text starting near `start` (wrapping), exact under a round trip."""
        total = len(self.ids)
        start %= total
        raw = (self.ids[start:] + self.ids)[: n + 64]
        return exact(tok, raw, n, (self.ids * (1 + (n + 64) // total))[: n + 64])


def _lognormal_len(rng: random.Random, mean: float, lo: int, hi: int) -> int:
    mu = math.log(mean) - CHAT_SIGMA**2 / 2  # so that the distribution's mean is `mean`
    return max(lo, min(hi, round(rng.lognormvariate(mu, CHAT_SIGMA))))


def _template_pieces(tok: TokenizerLike, system: str | None = None) -> tuple[list[int], list[int]]:
    """Token ids before and after the user's text in the model's chat template (empty if it has none)."""
    marker = "\u2063MARK\u2063"
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": marker}]
    try:
        rendered = tok.apply_chat_template(msgs, add_generation_prompt=True)
    except Exception:  # no template: plain text
        return [], []
    before, _, after = rendered.partition(marker)
    return tok.encode(before, add_special_tokens=False), tok.encode(after, add_special_tokens=False)


def chat_dataset(tok: TokenizerLike, num: int, input_range: tuple[int, int] = (16, 1024), output_range: tuple[int, int] = (4, 512),
                 seed: int = 0, text: str | None = None) -> list[BenchRequest]:
    rng = random.Random(seed)
    corpus = _Corpus(tok, text or corpus_text())
    head, tail = _template_pieces(tok)
    out = []
    for _ in range(num):
        n_in = _lognormal_len(rng, CHAT_INPUT_MEAN, input_range[0], input_range[1])
        ids, prompt = _framed(tok, corpus, rng, head, max(1, n_in - len(head) - len(tail)), tail)
        out.append(BenchRequest(ids, prompt, _lognormal_len(rng, CHAT_OUTPUT_MEAN, *output_range)))
    return out


def shared_prefix_dataset(tok: TokenizerLike, num: int, groups: int, prefix_len: int, suffix_len: int, output_len: int,
                          seed: int = 0, text: str | None = None) -> list[BenchRequest]:
    """`groups` system prompts of prefix_len tokens, each followed by distinct questions of suffix_len tokens.

    The shared part is identical token for token within a group (it is the same id list), and groups share
    nothing with each other beyond the first few tokens."""
    if groups < 1:
        raise DatasetError("shared-prefix needs at least one group")
    rng = random.Random(seed)
    corpus = _Corpus(tok, text or corpus_text())
    stride = max(1, len(corpus.ids) // groups)
    prefixes = []
    for g in range(groups):
        # A tag first, so two groups never share a leading block even if the corpus repeats.
        tag = tok.encode(f"Group {g} instructions:\n", add_special_tokens=False)
        sep = tok.encode("\n\n", add_special_tokens=False)
        ids, _ = _framed(tok, corpus, rng, tag, max(1, prefix_len - len(tag) - len(sep)), sep,
                         start=g * stride + rng.randrange(stride))
        prefixes.append(ids)
    out = []
    for i in range(num):
        g = i % groups
        ids, prompt = _framed(tok, corpus, rng, prefixes[g], suffix_len, [])
        out.append(BenchRequest(ids, prompt, output_len, group=g))
    return out


def long_input_dataset(tok: TokenizerLike, num: int, doc_len: int, output_len: int, seed: int = 0,
                       text: str | None = None) -> list[BenchRequest]:
    rng = random.Random(seed)
    corpus = _Corpus(tok, text or corpus_text())
    out = []
    for i in range(num):
        instr = tok.encode("\n\n" + _INSTRUCTIONS[i % len(_INSTRUCTIONS)] + "\n", add_special_tokens=False)
        ids, prompt = _framed(tok, corpus, rng, [], max(1, doc_len - len(instr)), instr)
        out.append(BenchRequest(ids, prompt, output_len))
    return out


def _file_records(name: str, path: str) -> list[tuple[str, str | int | None]]:
    """(prompt text, the reply text or an output length or None) per record of a ShareGPT or JSONL file."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            if name == "jsonl":
                rows = [json.loads(line) for line in f if line.strip()]
                return [(r["prompt"], r.get("output_len", r.get("max_tokens"))) for r in rows
                        if isinstance(r, dict) and isinstance(r.get("prompt"), str)]
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise DatasetError(f"cannot read --dataset-path {path}: {e}") from None
    out: list[tuple[str, str | int | None]] = []
    for rec in data if isinstance(data, list) else []:
        turns = rec.get("conversations") if isinstance(rec, dict) else None
        if isinstance(turns, list) and len(turns) >= 2 and all(isinstance(t, dict) for t in turns[:2]):
            human, reply = turns[0].get("value"), turns[1].get("value")
            if isinstance(human, str) and isinstance(reply, str):
                out.append((human, reply))
    return out


def file_dataset(tok: TokenizerLike, name: str, path: str, num: int, output_len: tuple[int, int] | None,
                 seed: int = 0) -> list[BenchRequest]:
    rng = random.Random(seed)
    usable = []
    for prompt, reply in _file_records(name, path):
        ids = tok.encode(prompt, add_special_tokens=False)
        if isinstance(reply, str):
            n_out = len(tok.encode(reply, add_special_tokens=False))
        elif isinstance(reply, int) and reply > 0:
            n_out = reply
        else:
            n_out = rng.randint(*(output_len or (128, 128)))
        if output_len is not None and isinstance(reply, str):
            n_out = min(max(n_out, output_len[0]), output_len[1])
        if (len(ids) < FILE_MIN_TOKENS or n_out < FILE_MIN_TOKENS or len(ids) > FILE_MAX_PROMPT
                or len(ids) + n_out > FILE_MAX_TOTAL):
            continue
        usable.append(BenchRequest(ids, prompt, n_out))
    if len(usable) < num:
        raise DatasetError(f"{path} has {len(usable)} usable records ({FILE_MIN_TOKENS}-{FILE_MAX_PROMPT} prompt "
                           f"tokens, at most {FILE_MAX_TOTAL} with the output); --num-prompts asks for {num}")
    return rng.sample(usable, num)


def build(name: str, tok: TokenizerLike, num: int, *, seed: int = 0, input_len: tuple[int, int] | None = None,
          output_len: tuple[int, int] | None = None, vocab: tuple[int, int] | None = None, groups: int = 4,
          prefix_len: int = 1024, suffix_len: int = 32, doc_len: int = 2048,
          path: str | None = None) -> list[BenchRequest]:
    """One dataset by name. Ranges left None take the dataset's defaults: random 128/128; chat clips its
    log-normal lengths to input 16-1024 and output 4-512; shared-prefix and long-input output
    `output_len[0]` tokens (default 64)."""
    if num < 1:
        raise DatasetError("--num-prompts must be at least 1")
    for r in (input_len, output_len):
        if r is not None and not 1 <= r[0] <= r[1]:
            raise DatasetError(f"bad length range {r[0]}..{r[1]}: need 1 <= MIN <= MAX")
    if name == "random":
        if vocab is None:
            raise DatasetError("the random dataset needs the vocabulary range")
        return random_dataset(tok, num, input_len or (128, 128), output_len or (128, 128), vocab, seed)
    if name == "chat":
        return chat_dataset(tok, num, input_len or (16, 1024), output_len or (4, 512), seed)
    if name in ("sharegpt", "jsonl"):
        if not path:
            raise DatasetError(f"the {name} dataset reads a file: give --dataset-path")
        return file_dataset(tok, name, path, num, output_len, seed)
    fixed_out = (output_len or (64, 64))[0]
    if name == "shared-prefix":
        return shared_prefix_dataset(tok, num, groups, prefix_len, suffix_len, fixed_out, seed)
    if name == "long-input":
        return long_input_dataset(tok, num, doc_len, fixed_out, seed)
    raise DatasetError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
