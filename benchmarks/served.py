"""Served throughput at 32 concurrent streams, 128 in / 128 out: tokenmill against vLLM's CPU server and
llama-server, one server at a time (issue 16).

    python benchmarks/served.py [--prompts 128] [--vllm-dtype bfloat16] [--llama-quant Q4_0] [--peers vllm,llama] [--out FILE.json]

Each system is started on a free loopback port (tokenmill `serve` as shipped, `benchmarks/peers/vllm_cpu.sh
serve`, `benchmarks/peers/llama_cpp.sh serve` with 32 slots), waited for, then driven by `tokenmill bench serve`
(random token prompts, all sent at once, at most 32 in flight, 2 warm-up requests) and stopped before the next
starts. --tokenmill-extra passes flags to tokenmill (e.g. "--kv-cache-dtype int8" as a second tokenmill row).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from tokenmill.bench.launch import ServerProcess, free_port

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT / "benchmarks" / "peers"


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def measure(name: str, launch: str, env: dict, args, out_dir: Path) -> dict:
    """Start the server alone (tokenmill.bench.launch.ServerProcess: its own log, ready on /health, stopped with
    its children), drive it with `tokenmill bench serve`, stop it."""
    result = out_dir / f"{slug(name)}.json"
    with ServerProcess(launch, free_port(), out_dir / f"{slug(name)}.log", env=env) as server:
        subprocess.run([str(Path(sys.executable).with_name("tokenmill")), "bench", "serve", "--base-url",
                        server.base_url, "--dataset", "random", "--input-len", "128", "128", "--output-len", "128",
                        "128", "--num-prompts", str(args.prompts), "--max-concurrency", "32", "--label", name,
                        "--out", str(result)], check=True, stdout=subprocess.DEVNULL)
    m = json.loads(result.read_text())["metrics"]
    return {"output_tok_s": m["output_throughput"], "ttft_p50_s": m["ttft_s"]["median"],
            "ttft_p99_s": m["ttft_s"]["p99"], "tpot_p50_s": m["tpot_s"]["median"], "completed": m["completed"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--vllm-dtype", default="bfloat16")
    ap.add_argument("--llama-quant", default="Q4_0")
    ap.add_argument("--tokenmill-extra", action="append", default=[],
                    help="flags for a further tokenmill row, e.g. '--kv-cache-dtype int8'")
    ap.add_argument("--peers", default="vllm,llama", help="peers to run beside tokenmill (vllm, llama; '' for none)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/served.json"))
    args = ap.parse_args()
    peers = {p for p in args.peers.split(",") if p}
    from tokenmill.kernels.cpu import cpu_name

    out_dir = args.out.with_suffix("")  # each system's server log and load-generator JSON
    out_dir.mkdir(parents=True, exist_ok=True)
    tm = shlex.quote(str(Path(sys.executable).with_name("tokenmill")))
    systems = [("tokenmill", f"{tm} serve --model default --port {{port}}", {})]
    systems += [(f"tokenmill {extra}", f"{tm} serve --model default --port {{port}} {extra}", {})
                for extra in args.tokenmill_extra]
    if "vllm" in peers:
        systems.append((f"vLLM CPU ({args.vllm_dtype})", f"bash {shlex.quote(str(PEERS / 'vllm_cpu.sh'))} serve {{port}}",
                        {"VLLM_DTYPE": args.vllm_dtype}))
    if "llama" in peers:
        systems.append((f"llama-server ({args.llama_quant})",
                        f"bash {shlex.quote(str(PEERS / 'llama_cpp.sh'))} serve {{port}} {shlex.quote(args.llama_quant)}",
                        {}))
    res = {"cpu": cpu_name(), "prompts": args.prompts, "systems": {}}
    for name, launch, extra_env in systems:
        res["systems"][name] = measure(name, launch, extra_env, args, out_dir)
        print(name, res["systems"][name], flush=True)
    base = res["systems"]["tokenmill"]["output_tok_s"]
    print(f"CPU: {res['cpu']}; {args.prompts} requests, 128 in / 128 out, 32 concurrent streams")
    print("| system | output tok/s | TTFT p50 / p99 (s) | TPOT p50 (ms) | tokenmill × this |")
    print("|---|---|---|---|---|")
    for name, r in res["systems"].items():
        print(f"| {name} | {r['output_tok_s']:.1f} | {r['ttft_p50_s']:.2f} / {r['ttft_p99_s']:.2f} | "
              f"{1e3 * r['tpot_p50_s']:.0f} | {base / r['output_tok_s']:.2f} |")
    args.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
