"""`tokenmill rag index | query`: build a retrieval index from documents; ask it (and, with --answer, the model)
a question offline. Serving it is `tokenmill serve --rag-index INDEX`."""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable

from tokenmill.config import EngineConfig


def add_rag_parser(sub, add_engine_args: Callable[[argparse.ArgumentParser], None],
                   engine_config: Callable[[argparse.Namespace], EngineConfig]) -> None:
    p = sub.add_parser("rag", help="retrieval: index documents, query the index",
                       description="Retrieval-augmented generation. `rag index` splits documents into chunks, embeds "
                       "them and stores a vector (faiss) and BM25 index; `rag query` retrieves for a question and, "
                       "with --answer, answers it from the passages. `tokenmill serve --rag-index INDEX` serves "
                       "POST /v1/rag/chat/completions.")
    rsub = p.add_subparsers(dest="rag_command", required=True)

    ix = rsub.add_parser("index", help="build or update an index from files and directories",
                         description="Index text, Markdown, HTML and PDF files (directories are walked). Into an "
                         "existing index only new and changed files are embedded again; files no longer given are "
                         "dropped.")
    ix.add_argument("paths", nargs="+", metavar="DIR|FILE")
    ix.add_argument("--out", required=True, help="the index directory (created, or updated in place)")
    ix.add_argument("--embedding-model", default="default",
                    help="sentence-transformers BERT directory, or 'default' (all-MiniLM-L6-v2)")
    ix.add_argument("--chunk-tokens", type=int, default=200,
                    help="chunk size in the embedding model's tokens (default: 200)")
    ix.add_argument("--overlap", type=int, default=40, help="tokens a chunk shares with the next (default: 40)")
    ix.add_argument("--no-progress", action="store_true", help="no progress bar")
    ix.set_defaults(func=_cmd_index)

    q = rsub.add_parser("query", help="retrieve passages for a question (and answer it with --answer)")
    q.add_argument("index", metavar="INDEX")
    q.add_argument("question")
    q.add_argument("--top-k", type=int, default=4, help="passages to retrieve (default: 4)")
    q.add_argument("--dense", action="store_true", help="dense retrieval only (default: dense + BM25, fused)")
    q.add_argument("--max-context-tokens", type=int, default=1024,
                   help="the model's tokens the passages may take (default: 1024)")
    q.add_argument("--answer", action="store_true", help="answer from the passages with the model (engine flags)")
    q.add_argument("--max-tokens", type=int, default=128, help="answer tokens with --answer (default: 128)")
    q.add_argument("--json", action="store_true", help="one JSON object")
    add_engine_args(q)
    q.set_defaults(func=lambda args: _cmd_query(args, engine_config(args)))


def _cmd_index(args: argparse.Namespace) -> int:
    from tokenmill.rag.build import build_index

    report = build_index(args.paths, args.out, args.embedding_model, args.chunk_tokens, args.overlap,
                         progress=not args.no_progress)
    print(json.dumps({"out": args.out, **dataclasses.asdict(report)}))
    return 0


def _cmd_query(args: argparse.Namespace, config: EngineConfig) -> int:
    import numpy as np

    from tokenmill.errors import TokenmillError
    from tokenmill.models.bert import BertEncoder
    from tokenmill.models.sentence_model import load_embedding_tokenizer, resolve_embedding_model
    from tokenmill.rag.prompt import build_context, with_context
    from tokenmill.rag.store import RagStore

    if args.top_k < 1 or args.max_context_tokens < 1:
        raise TokenmillError("--top-k and --max-context-tokens must be positive")
    store = RagStore.load(args.index)
    model_dir = resolve_embedding_model(store.manifest.embedding_model)
    ids = load_embedding_tokenizer(model_dir).encode(args.question).ids
    encoder = BertEncoder(model_dir)
    limit = encoder.config.max_seq_length
    if len(ids) > limit:
        ids = ids[:limit - 1] + ids[-1:]
    vector = encoder.embed([ids])[0].numpy().astype(np.float32)
    hits = store.search(args.question, vector, args.top_k, "dense" if args.dense else "hybrid")
    out: dict = {"question": args.question}
    if args.answer:
        from tokenmill import LLM, SamplingParams

        llm = LLM(**dataclasses.asdict(config))
        tok = llm.tokenizer
        context = build_context(hits, lambda _, text: len(tok.encode(text, add_special_tokens=False)),
                                args.max_context_tokens)
        messages = with_context([{"role": "user", "content": args.question}], context)
        res = llm.chat([messages], SamplingParams(max_tokens=args.max_tokens, temperature=0.0))[0]
        out["answer"] = res.outputs[0].text
        hits = context.hits
    out["passages"] = [{"index": i + 1, "source": h.chunk.source, "chunk_id": h.chunk_id, "score": round(h.score, 6),
                        "text": h.chunk.text} for i, h in enumerate(hits)]
    if args.json:
        print(json.dumps(out, ensure_ascii=False))
        return 0
    if "answer" in out:
        print(out["answer"].strip(), end="\n\n")
    for p in out["passages"]:
        print(f"[{p['index']}] {p['source']} (chunk {p['chunk_id']}, score {p['score']:.4f})")
        print("    " + p["text"].strip().replace("\n", "\n    "))
    return 0
