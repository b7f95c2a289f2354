"""Documents for `tokenmill rag index`: files found under the paths given, read as plain text by their
kind (text and Markdown as they are, HTML through BeautifulSoup with scripts and styles dropped, PDF through
pypdf page by page). No torch."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from tokenmill.errors import TokenmillError

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".rst", ".text"}
HTML_SUFFIXES = {".html", ".htm"}
PDF_SUFFIXES = {".pdf"}
SUFFIXES = TEXT_SUFFIXES | HTML_SUFFIXES | PDF_SUFFIXES


@dataclass(frozen=True)
class SourceFile:
    path: Path  # resolved
    name: str  # as the index records it: relative to the directory it was found under, or the file's name
    sha256: str


def find_files(paths: list[str]) -> list[SourceFile]:
    """Every readable document under `paths` (files as given; directories walked, hidden entries skipped),
    each once, in a stable order."""
    found: dict[Path, str] = {}
    for p in paths:
        path = Path(p)
        if path.is_file():
            found.setdefault(path.resolve(), path.name)
        elif path.is_dir():
            for f in sorted(path.rglob("*")):
                rel = f.relative_to(path)
                if f.is_file() and f.suffix.lower() in SUFFIXES and not any(s.startswith(".") for s in rel.parts):
                    found.setdefault(f.resolve(), rel.as_posix())
        else:
            raise TokenmillError(f"no such file or directory: {p}")
    out = []
    for path, name in found.items():
        if path.suffix.lower() not in SUFFIXES:
            raise TokenmillError(f"{path}: cannot index {path.suffix or 'extension-less'} files "
                                 f"(known: {', '.join(sorted(SUFFIXES))})")
        out.append(SourceFile(path, name, hashlib.sha256(path.read_bytes()).hexdigest()))
    names = [f.name for f in out]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise TokenmillError(f"two files would be indexed under one name: {sorted(dup)[0]} (index them from one "
                             f"directory, or rename one)")
    return sorted(out, key=lambda f: f.name)


def read_document(path: Path) -> tuple[str, str]:
    """-> (title, text). The title (a Markdown file's first heading, an HTML page's <title> or first <h1>,
    else the file's name) heads every chunk of the document where retrieval sees it: a chunk that says
    "its headquarters are in ..." is found by the name of what it is about."""
    text = read_text(path)
    title = None
    if path.suffix.lower() in HTML_SUFFIXES:
        from bs4 import BeautifulSoup

        soup = BeautifulSoup(path.read_bytes(), "html.parser")
        tag = soup.title or soup.find("h1")
        title = tag.get_text(" ", strip=True) if tag is not None else None
    elif path.suffix.lower() in TEXT_SUFFIXES:
        for line in text.splitlines():
            if line.strip():
                title = line.strip().lstrip("#").strip() if line.lstrip().startswith("#") else None
                break
    return (title or path.stem), text


def read_text(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in HTML_SUFFIXES:
        from bs4 import BeautifulSoup

        soup = BeautifulSoup(path.read_bytes(), "html.parser")
        for tag in soup(["script", "style", "noscript", "template"]):
            tag.decompose()
        lines = (line.strip() for line in soup.get_text("\n").splitlines())
        return "\n".join(line for line in lines if line)
    if suffix in PDF_SUFFIXES:
        from pypdf import PdfReader
        from pypdf.errors import PdfReadError

        try:
            reader = PdfReader(str(path))
            return "\n\n".join((page.extract_text() or "").strip() for page in reader.pages)
        except (PdfReadError, ValueError, OSError) as e:
            raise TokenmillError(f"{path}: not a readable PDF: {e}") from None
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise TokenmillError(f"{path}: not UTF-8 text") from None
