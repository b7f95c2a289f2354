"""A BERT encoder for sentence embeddings (sentence-transformers' layout: Transformer -> Pooling ->
optional Normalize), our own code, batched with padding. Float32; checked against sentence-transformers.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

from tokenmill.errors import ModelLoadError
from tokenmill.models.sentence_model import BertConfig


class BertEncoder:
    def __init__(self, path: Path):
        self.path = path
        self.config = c = BertConfig.from_dir(path)
        self.dim = c.hidden_size
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(path, "no .safetensors weights")
        w: dict[str, torch.Tensor] = {}
        for f in files:
            with safe_open(str(f), "pt") as st:
                for k in st.keys():
                    w[k.removeprefix("bert.")] = st.get_tensor(k).float()

        def get(name: str) -> torch.Tensor:
            if name not in w:
                raise ModelLoadError(path, f"missing tensor {name}")
            return w[name]

        self.word = get("embeddings.word_embeddings.weight")
        self.pos = get("embeddings.position_embeddings.weight")
        self.type0 = get("embeddings.token_type_embeddings.weight")[0]
        self.emb_norm = (get("embeddings.LayerNorm.weight"), get("embeddings.LayerNorm.bias"))
        self.layers = []
        for i in range(c.num_layers):
            p = f"encoder.layer.{i}."
            qkv_w = torch.cat([get(p + f"attention.self.{n}.weight") for n in ("query", "key", "value")])
            qkv_b = torch.cat([get(p + f"attention.self.{n}.bias") for n in ("query", "key", "value")])
            self.layers.append((
                qkv_w, qkv_b, get(p + "attention.output.dense.weight"), get(p + "attention.output.dense.bias"),
                (get(p + "attention.output.LayerNorm.weight"), get(p + "attention.output.LayerNorm.bias")),
                get(p + "intermediate.dense.weight"), get(p + "intermediate.dense.bias"),
                get(p + "output.dense.weight"), get(p + "output.dense.bias"),
                (get(p + "output.LayerNorm.weight"), get(p + "output.LayerNorm.bias"))))

    @torch.no_grad()
    def embed(self, batch: list[list[int]]) -> torch.Tensor:
        """Token ids (with [CLS]/[SEP], at most max_seq_length each) -> [B, dim] sentence embeddings."""
        c = self.config
        n = max(len(ids) for ids in batch)
        ids = torch.zeros(len(batch), n, dtype=torch.long)
        valid = torch.zeros(len(batch), n, dtype=torch.bool)
        for i, seq in enumerate(batch):
            ids[i, :len(seq)] = torch.tensor(seq)
            valid[i, :len(seq)] = True
        eps = c.layer_norm_eps
        x = self.word[ids] + self.pos[:n] + self.type0
        x = F.layer_norm(x, (self.dim,), *self.emb_norm, eps)
        heads, hd = c.num_heads, self.dim // c.num_heads
        bias = torch.zeros(len(batch), 1, 1, n).masked_fill_(~valid[:, None, None, :], -math.inf)
        for qkv_w, qkv_b, o_w, o_b, norm1, i_w, i_b, d_w, d_b, norm2 in self.layers:
            q, k, v = F.linear(x, qkv_w, qkv_b).view(len(batch), n, 3, heads, hd).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            a = a.transpose(1, 2).reshape(len(batch), n, self.dim)
            x = F.layer_norm(F.linear(a, o_w, o_b) + x, (self.dim,), *norm1, eps)
            h = F.gelu(F.linear(x, i_w, i_b))
            x = F.layer_norm(F.linear(h, d_w, d_b) + x, (self.dim,), *norm2, eps)
        if c.pooling == "cls":
            out = x[:, 0]
        elif c.pooling == "max":
            out = x.masked_fill(~valid[..., None], -math.inf).amax(dim=1)
        else:
            m = valid[..., None].float()
            out = (x * m).sum(dim=1) / m.sum(dim=1).clamp_min(1e-9)
        return F.normalize(out, dim=-1) if c.normalize else out
