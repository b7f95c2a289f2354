"""Render bench_results/offline_*.json (from benchmarks/offline.sh) as the Markdown tables in BENCHMARKS.md."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def render(path: Path) -> str:
    r = json.loads(path.read_text())
    res = r["results"]
    base = res[0]["output_tok_s"]
    w = r["workload"]
    lines = [f"### {path.name}: {w['num_prompts']} requests, input {w['input_len'][0]}–{w['input_len'][1]}, "
             f"output {w['output_len'][0]}–{w['output_len'][1]} tokens (seed {w['seed']}), {r['threads']} threads",
             "", "| system | dtype | requests | output tokens | seconds | output tok/s | tokenmill ÷ system |",
             "|---|---|---|---|---|---|---|"]
    for x in res:
        lines.append(f"| {x['system']} | {x['dtype']} | {x['requests']} | {x['output_tokens']} | {x['seconds']:.1f} | "
                     f"{x['output_tok_s']:.1f} | {base / x['output_tok_s']:.2f}× |")
    if "tokenmill_latency" in r:
        t, h = r["tokenmill_latency"], r.get("hf_latency")
        lines += ["", "| single stream (512-token prompt) | tokenmill | transformers | ratio |", "|---|---|---|---|"]
        if h:
            lines.append(f"| TTFT | {t['ttft_s'] * 1e3:.0f} ms | {h['ttft_s'] * 1e3:.0f} ms | "
                         f"{h['ttft_s'] / t['ttft_s']:.2f}× faster |")
            lines.append(f"| decode | {t['decode_tok_s']:.1f} tok/s | {h['decode_tok_s']:.1f} tok/s | "
                         f"{t['decode_tok_s'] / h['decode_tok_s']:.2f}× |")
    for o in r.get("tokenmill_step_overhead", []):
        lines.append(f"\nStep overhead at batch {o['batch']}: step {o['step_ms']:.1f} ms, "
                     f"{100 * o['outside_forward_share']:.1f} % outside the model forward.")
    lines.append(f"\nPeak RSS {r['tokenmill_peak_rss_mib']:.0f} MiB with a KV cache of {r['tokenmill_kv_mib']:.0f} MiB.")
    return "\n".join(lines)


if __name__ == "__main__":
    paths = [Path(p) for p in sys.argv[1:]] or sorted(Path("bench_results").glob("offline_*.json"))
    print("\n\n".join(render(p) for p in paths))
