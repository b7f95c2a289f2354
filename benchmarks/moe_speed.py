"""An MoE model's decode step against two dense models: one with the same active parameters, one with the same
total parameters (issue 19).

    python benchmarks/moe_speed.py --moe DIR [--quantization w4a8] [--batches 1 4 16 32] [--out FILE.json]

DIR is a Mixtral-format directory (e.g. from `tokenmill upcycle --experts 8 --top-k 2`). The two dense peers
are built beside it with random weights (the timing does not depend on the values): the MoE's attention and
shapes, an MLP of top_k x (same active) or experts x (same total) the expert's intermediate size. Each model
in turn (one process each, never two at once) decodes `--steps` tokens for B sequences of 16-token prompts;
a figure is the median decode step time over the steps, prefill excluded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def build_dense(moe_dir: Path, out: Path, inter: int) -> None:
    """A random-weight Llama with the MoE's attention and an MLP of `inter`."""
    import torch
    from safetensors.torch import save_file

    cfg = json.loads((moe_dir / "config.json").read_text())
    h, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    dense = {k: v for k, v in cfg.items() if k not in ("num_local_experts", "num_experts_per_tok", "sliding_window")}
    dense |= {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "intermediate_size": inter}
    g = torch.Generator().manual_seed(0)
    w = lambda *s: torch.randn(*s, generator=g) * 0.02  # noqa: E731
    sd = {"model.embed_tokens.weight": w(cfg["vocab_size"], h), "model.norm.weight": torch.ones(h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        sd |= {p + "self_attn.q_proj.weight": w(q, h), p + "self_attn.k_proj.weight": w(kv, h),
               p + "self_attn.v_proj.weight": w(kv, h), p + "self_attn.o_proj.weight": w(h, q),
               p + "mlp.gate_proj.weight": w(inter, h), p + "mlp.up_proj.weight": w(inter, h),
               p + "mlp.down_proj.weight": w(h, inter), p + "input_layernorm.weight": torch.ones(h),
               p + "post_attention_layernorm.weight": torch.ones(h)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dense, indent=1))
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in moe_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name == "generation_config.json":
            (out / f.name).write_bytes(f.read_bytes())


def child(model: str, quantization: str, batches: list[int], steps: int) -> dict:
    from tokenmill import LLM, SamplingParams

    llm = LLM(model, quantization=quantization, kv_cache_memory="512MiB", max_model_len=256)
    engine = llm.engine
    out = {}
    for b in batches:
        params = SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True)
        for i in range(b):
            engine.add_request([100 + (i * 7 + j) % 40000 for j in range(16)], params, request_id=f"b{b}r{i}")
        while engine.scheduler.waiting or any(r.num_computed_tokens < r.num_prompt_tokens
                                              for r in engine.scheduler.running):
            engine.step()
        times = []
        while engine.has_unfinished():
            t0 = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t0)
        out[b] = 1e3 * statistics.median(times)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--moe", required=True, type=Path)
    ap.add_argument("--quantization", default="w4a8", help="the engine's --quantization for all three models")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 32])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=2, help="visits per model, alternating; the minimum is kept")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--child", nargs=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.quantization, args.batches, args.steps)))
        return
    from tokenmill.kernels.cpu import cpu_name

    cfg = json.loads((args.moe / "config.json").read_text())
    inter, e, k = cfg["intermediate_size"], cfg["num_local_experts"], cfg["num_experts_per_tok"]
    models = {"moe": args.moe, "dense, same active": args.moe.parent / f"{args.moe.name}-dense-active",
              "dense, same total": args.moe.parent / f"{args.moe.name}-dense-total"}
    for name, size in (("dense, same active", k * inter), ("dense, same total", e * inter)):
        if not (models[name] / "model.safetensors").exists():
            build_dense(args.moe, models[name], size)
    best: dict[str, dict[str, float]] = {}
    for _ in range(args.rounds):
        for name, path in models.items():
            r = subprocess.run([sys.executable, __file__, "--moe", str(args.moe), "--quantization", args.quantization,
                                "--steps", str(args.steps), "--batches", *map(str, args.batches), "--child", str(path)],
                               capture_output=True, text=True, check=True, env=os.environ)
            ms = json.loads(r.stdout.strip().splitlines()[-1])
            best[name] = {b: min(v, best.get(name, {}).get(b, v)) for b, v in ms.items()}
    print(f"CPU: {cpu_name()}; {e} experts, top {k}, expert MLP {inter}; --quantization {args.quantization}; "
          f"median decode step (ms), best of {args.rounds} visits")
    print("| batch | MoE | dense, same active | dense, same total | MoE / same active | MoE / same total |")
    print("|---|---|---|---|---|---|")
    for b in map(str, args.batches):
        m, a, t = best["moe"][b], best["dense, same active"][b], best["dense, same total"][b]
        print(f"| {b} | {m:.2f} | {a:.2f} | {t:.2f} | {m / a:.2f} | {m / t:.2f} |")
    if args.out:
        args.out.write_text(json.dumps({"cpu": cpu_name(), "config": cfg, "quantization": args.quantization,
                                        "step_ms": best}, indent=1))


if __name__ == "__main__":
    main()
