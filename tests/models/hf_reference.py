"""Greedy decoding and top-k logprobs from Hugging Face transformers: the definition of correct."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
from pathlib import Path

import torch

HF_REFERENCE_CACHE = Path(os.environ.get("TOKENMILL_HF_REFERENCE_CACHE",
                                         Path.home() / ".cache" / "tokenmill" / "hf-reference"))


def hf_from_gguf(path: Path):
    """transformers' own load of a GGUF file, in float32, eval mode.

    Its GGUF reader walks the file's whole vocabulary in Python, twice (config, then weights): ~20 s for the
    default model and ~35 s for Gemma 3's 262k tokens on 2 cores, per test session. The converted model is
    kept as safetensors under HF_REFERENCE_CACHE, keyed by the file's name and contents and the transformers
    version, so later sessions on the machine (a fresh clone's new venv included) load it in a second."""
    import transformers

    d = HF_REFERENCE_CACHE / f"{path.name}-{_digest(path)}-transformers{transformers.__version__}"
    if not (d / "config.json").is_file():
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                  dtype=torch.float32)
        # transformers marks a model read from GGUF as quantized and will not save it, but its weights are plain
        # float32 tensors once dequantized: the mark goes, and a reload gives the same state dict and logits.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = d.with_name(f"{d.name}.tmp{os.getpid()}")
        model.save_pretrained(tmp)
        _publish(tmp, d)
        return model.eval()
    return transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()


class GgufReference:
    """transformers' greedy decoding of a GGUF file, remembered.

    A test compares against the same prompts on the same file every session, and transformers' float32 decode
    of them costs most of the test (25 s of the default model's 30, ~70 ms a token: its GEMVs stream the
    weights at ~10 GB/s). The answer depends only on the file, the prompt, the decode length and the versions
    of transformers, torch and this module's decoding code, so it is kept under HF_REFERENCE_CACHE with all of
    those in its key, computed again whenever one changes; the model itself loads only on a miss."""

    def __init__(self, path: Path):
        self.path = path
        self._model = None
        self._digest = _digest(path)

    @property
    def model(self):
        if self._model is None:
            self._model = hf_from_gguf(self.path)
        return self._model

    def greedy(self, prompt_ids: list[int], max_new: int, topk: int = 5):
        """hf_greedy's (tokens, per-step top-k {id: logprob}) for this file."""
        import transformers

        key = hashlib.sha256(json.dumps([
            self.path.name, self._digest, transformers.__version__, torch.__version__,
            inspect.getsource(hf_greedy), list(prompt_ids), max_new, topk]).encode()).hexdigest()[:24]
        f = HF_REFERENCE_CACHE / "greedy" / f"{key}.json"
        if f.is_file():
            tokens, tops = json.loads(f.read_text())
            return tokens, [{int(t): lp for t, lp in d.items()} for d in tops]
        tokens, tops = hf_greedy(self.model, prompt_ids, max_new, topk)
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_name(f"{f.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps([tokens, tops]))  # floats round-trip exactly through JSON
        os.replace(tmp, f)
        return tokens, tops


def hf_tokenizer_dir(path: Path) -> Path:
    """A directory holding transformers' own tokenizer for a GGUF file (converted once per machine, as above):
    read it with from_pretrained or copy its files beside a model; do not write into it."""
    import transformers

    d = HF_REFERENCE_CACHE / f"{path.name}-{_digest(path)}-tokenizer-transformers{transformers.__version__}"
    if not (d / "tokenizer_config.json").is_file():
        tmp = d.with_name(f"{d.name}.tmp{os.getpid()}")
        transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(tmp)
        _publish(tmp, d)
    return d


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()[:16]


def _publish(tmp: Path, d: Path) -> None:
    try:
        os.replace(tmp, d)  # atomic: a concurrent session sees no half-written directory
    except OSError:  # another session wrote it first
        shutil.rmtree(tmp, ignore_errors=True)


@torch.no_grad()
def hf_greedy(model, prompt_ids: list[int], max_new: int, topk: int = 5):
    """Returns (tokens, per-step top-k {id: logprob}) decoding greedily with the KV cache."""
    ids = torch.tensor([prompt_ids])
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)  # the prompt's last logits only (a 262k vocab)
    past = out.cache if hasattr(out, "cache") and out.cache is not None else out.past_key_values
    logits = out.logits[0, -1].float()
    tokens, tops = [], []
    for _ in range(max_new):
        lp = torch.log_softmax(logits, -1)
        tok = int(torch.argmax(logits))
        v, i = lp.topk(topk)
        tokens.append(tok)
        tops.append({int(a): float(b) for a, b in zip(i, v, strict=True)} | {tok: float(lp[tok])})
        out = model(input_ids=torch.tensor([[tok]]), cache=past, use_cache=True)
        past = out.cache if hasattr(out, "cache") and out.cache is not None else out.past_key_values
        logits = out.logits[0, -1].float()
    return tokens, tops


def check_logprobs_close(ours_tokens, ours_tops, ref_tokens, ref_tops, atol: float, name: str) -> int:
    """As vLLM's check: exact until the first divergence, which must be a near-tie (each side's token in
    the other's top-k). Logprobs compared where the prefixes agree. Returns the number of tokens that agree."""
    agree = 0
    for i, (a, b) in enumerate(zip(ours_tokens, ref_tokens, strict=True)):
        if a != b:
            assert a in ref_tops[i] and b in ours_tops[i], f"{name}: token {i} differs ({a} vs {b}), not a near-tie"
            return agree
        for tok, ref_lp in ref_tops[i].items():
            if tok in ours_tops[i]:
                assert abs(ours_tops[i][tok] - ref_lp) <= atol, \
                    f"{name}: logprob of {tok} at step {i}: {ours_tops[i][tok]} vs {ref_lp}"
        agree += 1
    return agree
