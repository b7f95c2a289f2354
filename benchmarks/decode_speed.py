"""Issue 16's speed figures in one run: tokenmill's weight formats against llama.cpp's best configuration.

    python benchmarks/decode_speed.py --out benchmarks/results/decode_speed   # ~10 min on 2 idle cores

One thing runs at a time (never tokenmill and a peer at once), all on the default model:
- single stream: tokenmill `LLM` (one request, 128 random prompt tokens, 128 output tokens; decode speed is
  127 tokens over the time between the first and the last) for each --formats entry; llama.cpp
  `llama-bench -p 0 -n 128 -t 2` (tg128) on the shipped Q4_1 and its Q4_0 / Q8_0 requantizations.
- offline: tokenmill `LLM.generate` on N distinct random prompts x 128 in / 128 out (output tokens over the
  whole time, prefill included); llama.cpp `llama-batched-bench -npp 128 -ntg 128 -npl 32` (output tokens
  over its total time), each quantization.
--single-rounds R then visits every system R more times for single-stream speed alone, alternating, and
reports medians (the single figures above move by a fifth between runs on these VMs).
--model GGUF runs both systems on that one file instead (e.g. an upcycled MoE converted by llama.cpp's own
script, or `--model gemma3`). Needs the llama.cpp peer built (`benchmarks/peers/llama_cpp.sh build`). Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import time
from pathlib import Path

from tokenmill.kernels.cpu import cpu_name

ROOT = Path(__file__).resolve().parents[1]
LLAMA = ROOT / "benchmarks" / "peers" / "llama_cpp.sh"
MODEL = "default"  # --model


def tokenmill_llm(fmt: str):
    """fmt: a --quantization value, optionally with ":KV" (a --kv-cache-dtype: model, float16, int8; else auto)
    and then "-pyloop" (the native decoder off: LlamaModel.forward's Python loop over the same kernels)."""
    from tokenmill import LLM

    if fmt.endswith("-pyloop"):
        os.environ["TOKENMILL_NATIVE_DECODER"] = "0"
    else:
        os.environ.pop("TOKENMILL_NATIVE_DECODER", None)
    quantization, _, kv = fmt.removesuffix("-pyloop").partition(":")
    return LLM(MODEL, quantization=quantization, kv_cache_dtype=kv or "auto", kv_cache_memory="2GiB",
               max_model_len=1024)


def single_stream(llm) -> float:
    """Decode tok/s of one request: 128 random prompt tokens, 127 output tokens after the first."""
    from tokenmill import SamplingParams
    from tokenmill.bench.workload import random_workload

    vocab = llm.tokenizer.vocab_size
    one = random_workload(1, (128, 128), (128, 128), 100, vocab - 100, seed=1)[0].prompt_token_ids
    llm.generate([one], SamplingParams(max_tokens=16, ignore_eos=True), use_tqdm=False)  # warm-up

    def timed(n: int) -> float:
        t0 = time.perf_counter()
        llm.generate([one], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True),
                     use_tqdm=False)
        return time.perf_counter() - t0

    first = min(timed(1) for _ in range(3))
    full = min(timed(128) for _ in range(2))
    return 127 / (full - first)


def tokenmill_figures(fmt: str, offline_prompts: int) -> dict:
    from tokenmill import SamplingParams
    from tokenmill.bench.workload import random_workload

    llm = tokenmill_llm(fmt)
    vocab = llm.tokenizer.vocab_size
    tok_s = single_stream(llm)
    items = random_workload(offline_prompts, (128, 128), (128, 128), 100, vocab - 100, seed=0)
    t0 = time.perf_counter()
    outs = llm.generate([it.prompt_token_ids for it in items],
                        SamplingParams(max_tokens=128, temperature=0, ignore_eos=True), use_tqdm=False)
    offline_s = time.perf_counter() - t0
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    report = llm.engine.runner.model.weight_report()
    return {"single_stream_tok_s": tok_s, "offline_output_tok_s": out_tokens / offline_s,
            "offline_s": offline_s, "offline_prompts": offline_prompts, "weights": report}


def llama_model(qtype: str) -> str:
    if MODEL != "default":  # --model: llama.cpp runs the very file tokenmill runs
        return MODEL
    if qtype == "Q4_1":
        return subprocess.check_output([str(ROOT / ".venv/bin/python"), "-c",
                                        "from tokenmill.models.loader import resolve_model_path as r; print(r('default'))"],
                                       text=True).strip()
    return subprocess.check_output(["bash", str(LLAMA), "quantize", qtype], text=True).strip().splitlines()[-1]


def llama_bin(name: str) -> str:
    return os.path.join(subprocess.check_output(["bash", str(LLAMA), "path"], text=True).strip(), name)


def llama_tg128(model: str) -> float:
    bench = subprocess.run([llama_bin("llama-bench"), "-m", model, "-p", "0", "-n", "128", "-t", "2", "-o", "json"],
                           capture_output=True, text=True, check=True)
    return json.loads(bench.stdout)[0]["avg_ts"]


def single_stream_rounds(formats: list[str], quants: list[str], rounds: int) -> dict[str, list[float]]:
    """Single-stream speed only, every system visited once per round (A B C A B C ...): this VM's speed drifts
    by a fifth within minutes, so a ratio is read from visits close in time."""
    import gc

    visits: dict[str, list[float]] = {}
    models = {q: llama_model(q) for q in quants}
    for r in range(rounds):
        for fmt in formats:
            llm = tokenmill_llm(fmt)
            visits.setdefault(f"tokenmill {fmt}", []).append(single_stream(llm))
            del llm
            gc.collect()
        for q in quants:
            visits.setdefault(f"llama.cpp {q}", []).append(llama_tg128(models[q]))
        print(f"round {r}:", {k: round(v[-1], 1) for k, v in visits.items()}, flush=True)
    return visits


def llama_figures(qtype: str) -> dict:
    model = llama_model(qtype)
    tg = llama_tg128(model)
    batched = subprocess.run([llama_bin("llama-batched-bench"), "-m", model, "-c", "8448", "-b", "2048", "-ub", "512",
                              "-npp", "128", "-ntg", "128", "-npl", "32", "-t", "2", "-tb", "2"],
                             capture_output=True, text=True, check=True)
    # The result row: |  PP |  TG |  B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s |
    row = [r for r in batched.stdout.splitlines() if re.match(r"\|\s+128\s+\|\s+128\s+\|\s+32\s+\|", r)][0]
    cells = [c.strip() for c in row.strip("|").split("|")]
    total_s = float(cells[8])
    return {"tg128_tok_s": tg, "batched32_output_tok_s": 32 * 128 / total_s, "batched32_total_s": total_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/decode_speed")
    ap.add_argument("--formats", default="auto,w8a8,none", help="tokenmill --quantization values to measure (suffix :KV: that --kv-cache-dtype; "
                         "-pyloop: native decoder off)")
    ap.add_argument("--offline-prompts", type=int, default=200)
    ap.add_argument("--llama-quants", default="Q4_0,Q4_1,Q8_0")
    ap.add_argument("--model", default="default",
                    help="a GGUF both systems run as it is (e.g. an upcycled MoE converted by llama.cpp's script); "
                         "--llama-quants then names it")
    ap.add_argument("--single-rounds", type=int, default=0,
                    help="then this many alternating rounds of single-stream runs only (medians reported)")
    args = ap.parse_args()
    global MODEL
    MODEL = args.model
    if MODEL != "default":
        from tokenmill.models.loader import resolve_model_path

        MODEL = str(resolve_model_path(MODEL))  # a short name (gemma3) -> its file, which llama.cpp runs too
    if MODEL != "default" and args.llama_quants == ap.get_default("llama_quants"):
        args.llama_quants = Path(MODEL).name
    res: dict = {"cpu": cpu_name(), "model": MODEL, "tokenmill": {}, "llama.cpp": {}}
    for fmt in args.formats.split(","):
        res["tokenmill"][fmt] = tokenmill_figures(fmt, args.offline_prompts)
        print(fmt, res["tokenmill"][fmt], flush=True)
    for q in args.llama_quants.split(","):
        res["llama.cpp"][q] = llama_figures(q)
        print(q, res["llama.cpp"][q], flush=True)
    best_tg = max(v["tg128_tok_s"] for v in res["llama.cpp"].values())
    best_b = max(v["batched32_output_tok_s"] for v in res["llama.cpp"].values())
    lines = [f"CPU: {res['cpu']} (2 cores); llama.cpp best tg128 {best_tg:.1f} tok/s, best 32-sequence batch "
             f"{best_b:.1f} output tok/s", "",
             "| tokenmill format | single stream tok/s | × llama.cpp best | offline output tok/s | × llama.cpp best |",
             "|---|---|---|---|---|"]
    for fmt, v in res["tokenmill"].items():
        lines.append(f"| {fmt} | {v['single_stream_tok_s']:.1f} | {v['single_stream_tok_s'] / best_tg:.2f} | "
                     f"{v['offline_output_tok_s']:.1f} | {v['offline_output_tok_s'] / best_b:.2f} |")
    lines += ["", "| llama.cpp | tg128 tok/s | 32 sequences, output tok/s |", "|---|---|---|"]
    lines += [f"| {q} | {v['tg128_tok_s']:.1f} | {v['batched32_output_tok_s']:.1f} |" for q, v in res["llama.cpp"].items()]
    if args.single_rounds:
        import statistics

        visits = single_stream_rounds(args.formats.split(","), args.llama_quants.split(","), args.single_rounds)
        res["single_stream_rounds"] = visits
        med = {k: statistics.median(v) for k, v in visits.items()}
        best = max(v for k, v in med.items() if k.startswith("llama.cpp"))
        lines += ["", f"Single stream, {args.single_rounds} alternating rounds (median of visits; each visit's "
                      "tok/s in order):", "", "| system | median tok/s | × llama.cpp best median | visits |",
                  "|---|---|---|---|"]
        lines += [f"| {k} | {m:.1f} | {m / best:.2f} | {' / '.join(f'{x:.1f}' for x in visits[k])} |"
                  for k, m in med.items()]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
