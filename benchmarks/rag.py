"""Retrieval against the whole context, through the real server, on a generated corpus with exact answers.

    python benchmarks/rag.py --out benchmarks/results/rag_zen4          # ~15 min on 2 cores

The corpus (tokenmill/rag/synthetic.py: invented companies, people and towns, facts found nowhere else) is
--documents documents, ~200,000 of the default model's tokens; the subset is its first documents up to
--subset-tokens, small enough for the model's 8,192-token context. One question per document.

Runs, one server at a time, the default model (`tokenmill serve`, its defaults) on all cores:
  full context   every subset document in the system message (numbered as RAG numbers its passages), the
                 question as the user message: POST /v1/chat/completions;
  RAG (subset)   --rag-index over the subset: POST /v1/rag/chat/completions, --top-k passages;
  RAG (corpus)   --rag-index over the whole corpus (where full context cannot run at all), with the passages in
                 the index's order (the default) and, for comparison, best first (`rag.order: score`);
each at 1 and at 16 concurrent streams (closed loop: each stream asks its next question when answered), each
run on a freshly started server, with the prefix cache on (the server's default: full context then pays for
its documents once, on the first question), and again with it off (--no-enable-prefix-caching: each request
pays for its own context, and the share of TTFT that cached passages save is seen). Exact match: the answer's words appear in the reply as a whole run.
TTFT is measured by the client (streaming) from sending the request to the first content token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tokenmill.bench.launch import ServerProcess, free_port
from tokenmill.kernels.cpu import cpu_name
from tokenmill.rag.prompt import INSTRUCTION
from tokenmill.rag.synthetic import answered, corpus, questions


def full_context_system(docs) -> str:
    body = "\n\n".join(f"[{i + 1}] {d.text.strip()}" for i, d in enumerate(docs))
    return f"{INSTRUCTION}\n\n{body}"


async def ask(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    start = time.perf_counter()
    ttft, text, usage, citations = None, [], None, None
    async with client.stream("POST", url, json={**body, "stream": True, "stream_options": {"include_usage": True}},
                             timeout=600) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: {r.status_code} {await r.aread()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "citations" in chunk:
                citations = chunk["citations"]
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk.get("choices", []):
                piece = c.get("delta", {}).get("content")
                if piece:
                    if ttft is None:
                        ttft = time.perf_counter() - start
                    text.append(piece)
    return {"ttft": ttft if ttft is not None else time.perf_counter() - start, "text": "".join(text),
            "usage": usage, "citations": citations, "e2e": time.perf_counter() - start}


async def run_workload(base: str, path: str, items: list[tuple[dict, str, str]], streams: int) -> dict:
    """items: (request body, expected answer, the document holding it); `streams` workers take them in order."""
    queue = list(enumerate(items))
    results: list[dict | None] = [None] * len(items)

    async def worker(client):
        while queue:
            i, (body, _, _) = queue.pop(0)
            results[i] = await ask(client, base + path, body)

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=streams + 2)) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(streams)))
        wall = time.perf_counter() - start
    ttfts = sorted(r["ttft"] for r in results)
    prompt = [r["usage"]["prompt_tokens"] for r in results]
    cached = [r["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0) for r in results]
    out_tokens = sum(r["usage"]["completion_tokens"] for r in results)
    correct = [answered(r["text"], ans) for r, (_, ans, _) in zip(results, items, strict=True)]
    hit_source = [None if r["citations"] is None else src in {c["source"] for c in r["citations"]}
                  for r, (_, _, src) in zip(results, items, strict=True)]
    return {"requests": len(items), "streams": streams, "exact_match": sum(correct) / len(correct),
            "prompt_tokens_mean": statistics.mean(prompt), "cached_share": sum(cached) / sum(prompt),
            "ttft_p50": _pct(ttfts, 50), "ttft_p99": _pct(ttfts, 99), "wall_s": wall,
            "requests_per_s": len(items) / wall, "output_tokens_per_s": out_tokens / wall,
            "retrieved_answer_source": (sum(bool(h) for h in hit_source) / len(hit_source)
                                        if hit_source[0] is not None else None)}


def _pct(sorted_values: list[float], p: float) -> float:
    k = (len(sorted_values) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--documents", type=int, default=1080, help="~200,000 tokens")
    ap.add_argument("--subset-tokens", type=int, default=7600, help="the subset's documents, in the model's tokens")
    ap.add_argument("--corpus-questions", type=int, default=64, help="questions over the whole corpus")
    ap.add_argument("--cold-questions", type=int, default=16,
                    help="questions for full context with the prefix cache off (each pays ~8,000 tokens of prefill)")
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--max-context-tokens", type=int, default=600)
    ap.add_argument("--chunk-tokens", type=int, default=160)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--streams", default="1,16")
    ap.add_argument("--server-args", default="", help="extra `tokenmill serve` flags")
    ap.add_argument("--workdir", default=None, help="keep the corpus and indexes here (default: a temporary dir)")
    ap.add_argument("--out", required=True, help="OUT.json and OUT.md")
    args = ap.parse_args()

    from tokenmill.config import EngineConfig
    from tokenmill.engine.replica import load_tokenizer
    from tokenmill.rag.build import build_index

    work = Path(args.workdir or tempfile.mkdtemp(prefix="tokenmill-rag-"))
    tok = load_tokenizer(EngineConfig(model="default"))[1]
    docs = corpus(seed=0, documents=args.documents)
    lengths = [len(tok.encode(d.text, add_special_tokens=False)) for d in docs]
    n_subset = 0
    while n_subset < len(docs) and sum(lengths[:n_subset + 1]) <= args.subset_tokens:
        n_subset += 1
    subset = docs[:n_subset]
    for name, ds in (("corpus", docs), ("subset", subset)):
        d = work / name
        if not d.is_dir():
            d.mkdir(parents=True)
            for doc in ds:
                (d / doc.name).write_text(doc.text)
        print(f"indexing the {name} ({len(ds)} documents, {sum(lengths[:len(ds)])} tokens)", file=sys.stderr)
        build_index([str(d)], work / f"{name}.index", chunk_tokens=args.chunk_tokens, overlap=32)

    sub_q = questions(subset, 1)
    all_q = questions(docs, 1)[::max(1, len(docs) // args.corpus_questions)][:args.corpus_questions]
    system = full_context_system(subset)
    sampling = {"model": "default", "max_tokens": args.max_tokens, "temperature": 0}
    rag_opts = {"top_k": args.top_k, "max_context_tokens": args.max_context_tokens}

    def full_items(qs):
        return [({**sampling, "messages": [{"role": "system", "content": system},
                                           {"role": "user", "content": q.text}]}, q.answer, q.source) for q in qs]

    def rag_items(qs, order="index"):
        return [({**sampling, "messages": [{"role": "user", "content": q.text}], "rag": {**rag_opts, "order": order}},
                 q.answer, q.source) for q in qs]

    streams = [int(s) for s in args.streams.split(",")]
    rows = []
    for caching in (True, False):
        corpus_kinds = ("RAG (corpus)", "RAG (corpus), best first") if caching else ("RAG (corpus)",)
        for index, qs, kinds in (("subset", sub_q, ("full context", "RAG (subset)")), ("corpus", all_q, corpus_kinds)):
            flags = f"--kv-cache-memory 6GiB {args.server_args}" + ("" if caching else " --no-enable-prefix-caching")
            cmd = (f"{sys.executable} -m tokenmill.entrypoints.cli serve --port {{port}} --log-level WARNING "
                   f"--rag-index {work / (index + '.index')} {flags}")
            for kind in kinds:
                path = "/v1/chat/completions" if kind == "full context" else "/v1/rag/chat/completions"
                items = (full_items(qs if caching else qs[:args.cold_questions]) if kind == "full context"
                         else rag_items(qs, "score" if kind.endswith("best first") else "index"))
                for n in streams:
                    # A fresh server each time: no run finds the prefix cache warmed by another.
                    port = free_port()
                    server = ServerProcess(cmd, port, Path(args.out).with_suffix(".server.log")).start()
                    try:
                        print(f"{kind}, prefix cache {'on' if caching else 'off'}, {n} streams", file=sys.stderr)
                        r = asyncio.run(run_workload(server.base_url, path, items, n))
                    finally:
                        server.stop()
                    r.update(kind=kind, prefix_cache=caching)
                    rows.append(r)
                    print(json.dumps(r), file=sys.stderr)
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    result = {"cpu": cpu_name(), "documents": len(docs), "corpus_tokens": sum(lengths), "subset_documents": n_subset,
              "subset_tokens": sum(lengths[:n_subset]), "args": vars(args), "rows": rows}
    Path(args.out).with_suffix(".json").write_text(json.dumps(result, indent=1))
    Path(args.out).with_suffix(".md").write_text(report(result))
    print(report(result))
    return 0


def report(r: dict) -> str:
    lines = [f"CPU: {r['cpu']}. Corpus {r['documents']} documents, {r['corpus_tokens']} tokens; subset "
             f"{r['subset_documents']} documents, {r['subset_tokens']} tokens.", "",
             "| workload | prefix cache | streams | exact match | answer's document retrieved | prompt tokens | cached "
             "| TTFT p50 s | TTFT p99 s | requests/s | output tok/s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        found = "—" if x["retrieved_answer_source"] is None else f"{x['retrieved_answer_source']:.0%}"
        lines.append(f"| {x['kind']} | {'on' if x['prefix_cache'] else 'off'} | {x['streams']} | "
                     f"{x['exact_match']:.1%} | {found} | {x['prompt_tokens_mean']:.0f} | {x['cached_share']:.0%} | "
                     f"{x['ttft_p50']:.3f} | {x['ttft_p99']:.3f} | {x['requests_per_s']:.2f} | "
                     f"{x['output_tokens_per_s']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
