"""`tokenmill cascade fit`: label prompts by whether the small model's answer matches the large one's, train the
prompt router (logistic regression on all-MiniLM-L6-v2 embeddings) on one part, and keep every signal's scores on
the held-out part, from which `serve --cascade ... --escalate-rate R` takes its threshold.

`collect()` runs both models offline (greedy, logprobs) on the task set (tokenmill.eval.cascade_tasks) and is
shared with benchmarks/cascade.py.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tokenmill.cluster.cascade_policy import (
    CascadeFit,
    PromptRouter,
    confidence_score,
    embed_text,
    escalation_share,
    threshold_for_rate,
)
from tokenmill.config import EngineConfig
from tokenmill.eval.cascade_tasks import Task, generate, grade, split

logger = logging.getLogger(__name__)

MAX_TOKENS = 8


@dataclass
class Record:
    """One task through both models."""

    task: Task
    small_text: str
    large_text: str
    small_ok: bool
    large_ok: bool
    small_tokens: int  # prompt + completion, in the small model's tokens
    large_tokens: int
    logprob: float  # difficulty scores
    entropy: float
    embedding: list[float] | None = None
    router: float | None = None

    @property
    def disagree(self) -> bool:
        """The answers differ: neither first line's words contain the other's ('yellow' matches 'The answer is
        yellow.'; the large model often answers in a sentence)."""
        s, g = _words(self.small_text), _words(self.large_text)
        return not (s <= g or g <= s)


def _words(text: str) -> set[str]:
    line = next((ln for ln in text.splitlines() if ln.strip()), "")
    return set("".join(ch if ch.isalnum() else " " for ch in line.lower()).split())


def _run(model: str, tasks: list[Task], top_n: int, first_tokens: int, options: dict):
    from tokenmill.entrypoints.llm import LLM
    from tokenmill.models.flops import FlopModel
    from tokenmill.models.loader import open_model
    from tokenmill.sampling_params import SamplingParams

    llm = LLM(model=model, **options)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=top_n, stop=["\n"])
    outs = llm.generate([t.prompt for t in tasks], params, use_tqdm=True)
    rows = []
    for o in outs:
        c = o.outputs[0]
        toks = [d[t].logprob for d, t in zip(c.logprobs or (), c.token_ids, strict=False)]
        tops = [[e.logprob for e in d.values()] for d in c.logprobs or ()]
        rows.append((c.text, len(o.prompt_token_ids) + len(c.token_ids),
                     confidence_score("logprob", toks, tops, first_tokens),
                     confidence_score("entropy", toks, tops, first_tokens)))
    n_active = FlopModel.of(open_model(llm.config.model).arch).active_params
    del llm
    gc.collect()
    return rows, n_active


def embed(texts: list[str], model: str = "default") -> np.ndarray:
    from tokenmill.models.bert import BertEncoder
    from tokenmill.models.sentence_model import load_embedding_tokenizer, resolve_embedding_model

    path = resolve_embedding_model(model)
    tok, enc = load_embedding_tokenizer(path), BertEncoder(path)
    limit = enc.config.max_seq_length
    ids = [e.ids[:limit - 1] + e.ids[-1:] if len(e.ids) > limit else e.ids for e in tok.encode_batch(texts)]
    out = [enc.embed(ids[i:i + 32]).float().numpy() for i in range(0, len(ids), 32)]
    return np.concatenate(out) if out else np.zeros((0, enc.dim), np.float32)


def collect(tasks: list[Task], small: str, large: str, first_tokens: int = 4, top_n: int = 5,
            embedding_model: str | None = "default", embed_chars: int = 512,
            options: dict | None = None) -> tuple[list[Record], dict[str, int]]:
    """Both models' greedy answers and the small one's signals for every task; (records, active params)."""
    options = options or {}
    srows, n_small = _run(small, tasks, top_n, first_tokens, options)
    lrows, n_large = _run(large, tasks, top_n, first_tokens, options)
    vecs = embed([embed_text(t.prompt, embed_chars) for t in tasks], embedding_model) if embedding_model else None
    recs = [Record(t, s[0], g[0], grade(s[0], t.answer), grade(g[0], t.answer), s[1], g[1], s[2], s[3],
                   None if vecs is None else vecs[i].tolist())
            for i, (t, s, g) in enumerate(zip(tasks, srows, lrows, strict=True))]
    return recs, {"small": n_small, "large": n_large}


def fit(recs: list[Record], small: str, large: str, first_tokens: int, top_n: int, embedding_model: str,
        embed_chars: int, train_share: float = 0.5, seed: int = 0) -> CascadeFit:
    """The router trained on one part (label: the answers differ), every signal's scores on the other."""
    idx = list(range(len(recs)))
    train_idx, held_idx = split(idx, (train_share, 1 - train_share), seed=seed)  # type: ignore[arg-type]
    x = np.array([recs[i].embedding for i in train_idx])
    y = np.array([float(recs[i].disagree) for i in train_idx])
    router = PromptRouter.fit(x, y)
    held = [recs[i] for i in held_idx]
    hx = np.array([r.embedding for r in held])
    heldout = {"logprob": [r.logprob for r in held], "entropy": [r.entropy for r in held],
               "router": router.scores(hx).tolist()}
    train_acc = float(np.mean((router.scores(x) > 0.5) == (y > 0.5)))
    held_y = np.array([float(r.disagree) for r in held])
    report = {"train": len(train_idx), "heldout": len(held), "disagree_share_train": float(y.mean()),
              "disagree_share_heldout": float(held_y.mean()), "router_train_accuracy": train_acc,
              "router_heldout_accuracy": float(np.mean((np.array(heldout["router"]) > 0.5) == (held_y > 0.5))),
              "small_accuracy": float(np.mean([r.small_ok for r in recs])),
              "large_accuracy": float(np.mean([r.large_ok for r in recs]))}
    return CascadeFit(small, large, first_tokens, top_n, embedding_model, embed_chars, router, heldout, report)


def _cmd_fit(args: argparse.Namespace, engine_config: Callable[[argparse.Namespace], EngineConfig]) -> int:
    from tokenmill.errors import ConfigError

    if args.tasks < 8:
        raise ConfigError("--tasks must be >= 8 (half train the router, half calibrate it)")
    if not 0.1 <= args.train_share <= 0.9:
        raise ConfigError("--train-share must lie in [0.1, 0.9]")
    small, large = args.small, args.large
    tasks = generate(args.tasks, seed=args.seed)
    options = {"kv_cache_memory": args.kv_cache_memory}
    recs, _ = collect(tasks, small, large, args.first_tokens, args.top_logprobs, args.embedding_model,
                      args.embed_chars, options)
    f = fit(recs, small, large, args.first_tokens, args.top_logprobs, args.embedding_model, args.embed_chars,
            args.train_share, args.seed)
    f.save(args.out)
    rates = {f"{r:.2f}": {s: escalation_share(f.heldout[s], threshold_for_rate(f.heldout[s], r))
                          for s in f.heldout} for r in (0.1, 0.25, 0.5)}
    print(json.dumps({"out": args.out, **f.report, "heldout_share_at_rate": rates}, indent=1))
    return 0


def add_cascade_parser(sub, add_engine_args, engine_config) -> None:
    p = sub.add_parser("cascade", help="the difficulty cascade's router: fit it",
                       description="Difficulty cascade tools (serve one with `tokenmill serve --cascade SMALL,LARGE`).")
    csub = p.add_subparsers(dest="cascade_command", required=True)
    f = csub.add_parser("fit", help="label prompts by small/large agreement, train the prompt router, calibrate",
                        description="Run the small and the large model (greedy, offline) on generated checkable "
                        "tasks (tokenmill.eval.cascade_tasks), label each prompt by whether their answers differ, "
                        "train a logistic-regression router on the prompts' all-MiniLM-L6-v2 embeddings on "
                        "--train-share of them, and keep every signal's scores on the rest (held out) for "
                        "--escalate-rate calibration. Writes a JSON file for `serve --cascade-fit`.")
    add = f.add_argument
    add("--small", default="default", help="the small model (default: default)")
    add("--large", default="gemma3", help="the large model (default: gemma3)")
    add("--out", required=True, help="the fitted cascade JSON to write")
    add("--tasks", type=int, default=400, help="tasks to generate and label (default: 400)")
    add("--seed", type=int, default=0, help="task generator and split seed (default: 0)")
    add("--train-share", type=float, default=0.5, help="share of tasks training the router (default: 0.5)")
    add("--first-tokens", type=int, default=4, help="answer tokens the confidence signals judge (default: 4)")
    add("--top-logprobs", type=int, default=5, help="top logprobs per token for the entropy signal (default: 5)")
    add("--embedding-model", default="default", help="the prompt embedding model (default: all-MiniLM-L6-v2)")
    add("--embed-chars", type=int, default=512, help="the prompt's last characters embedded (default: 512)")
    add("--kv-cache-memory", default="256MiB", help="each model's KV cache while labelling (default: 256MiB)")
    f.set_defaults(func=lambda a: _cmd_fit(a, engine_config))
