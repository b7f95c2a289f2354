"""One request at a time through each server: where a latency-bound user sees tokenmill against llama.cpp.

    python benchmarks/single_stream.py --out benchmarks/results/single_stream   # ~6 min on 2 idle cores

Systems, each a fresh server pinned to cores 0-1, visited A B C D A B C D (the second visit of each is the
noise band): tokenmill as shipped (bf16), tokenmill with the GGUF's Q4_1 nibbles repacked to int4 and
float32 compute (`--quantization int4 --dtype float32`: the fastest single-stream configuration of the
quantization benchmark), llama.cpp's `llama-server` on the same Q4_1 GGUF, and on its Q8_0 requantization
(the suite's peer). Closed loop at concurrency 1, random token-exact prompts of 128 tokens, 128 output
tokens each. Writes OUT.json and OUT.md (TPOT and output tok/s per visit, ratios to llama.cpp).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
from pathlib import Path

from tokenmill.bench import datasets
from tokenmill.bench.launch import ServerProcess
from tokenmill.bench.serve import load_tokenizer, run_point

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT / "benchmarks" / "peers"
SYSTEMS = [  # (name, launch command, load generator backend)
    ("tokenmill-bf16", f"{PEERS}/tokenmill.sh serve {{port}}", "openai"),
    ("tokenmill-int4-f32", f"TOKENMILL_DTYPE=float32 {PEERS}/tokenmill.sh serve {{port}} --quantization int4",
     "openai"),
    ("llama.cpp-Q4_1", f"{PEERS}/llama_cpp.sh serve {{port}}", "llama.cpp"),
    ("llama.cpp-Q8_0", f"{PEERS}/llama_cpp.sh serve {{port}} Q8_0", "llama.cpp"),
]
SLO = {"ttft": 2.0, "tpot": 0.1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/single_stream", help="writes OUT.json and OUT.md")
    ap.add_argument("--num-prompts", type=int, default=6)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--port", type=int, default=8131)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tok = load_tokenizer("default")
    reqs = datasets.build("random", tok, args.num_prompts, seed=0, input_len=(128, 128),
                          output_len=(args.output_len, args.output_len), vocab=(100, tok.vocab_size - 100))
    out = Path(args.out)
    runs: dict[str, list[dict]] = {}
    for rep in range(args.repeats):
        for name, launch, backend in SYSTEMS:
            with ServerProcess(launch, args.port, out.parent / "logs" / f"single_stream.{name}.log", cpus="0-1") as s:
                res = run_point(s.base_url, reqs, backend=backend, model=None, request_rate=math.inf,
                                burstiness=1.0, max_concurrency=1, seed=0, slo=SLO, warmup=2, label=name)
            m = res["metrics"]
            runs.setdefault(name, []).append({"output_tok_s": m["output_throughput"],
                                              "tpot_ms": 1e3 * m["tpot_s"]["median"],
                                              "ttft_ms": 1e3 * m["ttft_s"]["median"],
                                              "completed": m["completed"], "requests": m["num_requests"]})
            logging.info("%s rep %d: %.1f tok/s, TPOT p50 %.1f ms", name, rep, m["output_throughput"],
                         1e3 * m["tpot_s"]["median"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "runs": runs}, indent=2))
    ref = statistics.mean(r["output_tok_s"] for r in runs["llama.cpp-Q4_1"])
    lines = ["| system | output tok/s per visit | TPOT p50 ms per visit | TTFT p50 ms | vs llama.cpp Q4_1 |",
             "|---|---|---|---|---|"]
    for name, rs in runs.items():
        tps = " / ".join(f"{r['output_tok_s']:.1f}" for r in rs)
        tpots = " / ".join(f"{r['tpot_ms']:.1f}" for r in rs)
        ratio = statistics.mean(r["output_tok_s"] for r in rs) / ref
        lines.append(f"| {name} | {tps} | {tpots} | {statistics.median(r['ttft_ms'] for r in rs):.0f} | {ratio:.2f}× |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
