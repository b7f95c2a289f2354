"""Documents split into overlapping chunks, counted in the embedding model's tokens (what it reads, at most its
length limit). A chunk is an exact span of its document's text: it ends at a sentence end where one falls in
its second half, and never splits a word. No torch."""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer

from tokenmill.errors import TokenmillError


@dataclass(frozen=True)
class Chunk:
    source: str  # the document's name in the index
    ordinal: int  # its place in the document
    start: int  # character offsets in the document's text
    end: int
    text: str
    title: str = ""  # the document's

    def searchable(self) -> str:
        """What the embedding and BM25 see: the text under its document's title (unless it starts with it)."""
        head = self.text.lstrip().lstrip("#").lstrip()
        return self.text if not self.title or head.startswith(self.title) else f"{self.title}\n{self.text}"


def split_text(text: str, source: str, tokenizer: Tokenizer, chunk_tokens: int, overlap: int,
               title: str = "") -> list[Chunk]:
    if chunk_tokens < 8:
        raise TokenmillError(f"chunk size must be at least 8 tokens, got {chunk_tokens}")
    if not 0 <= overlap <= chunk_tokens // 2:
        raise TokenmillError(f"overlap must be in [0, chunk size / 2 = {chunk_tokens // 2}], got {overlap}")
    enc = tokenizer.encode(text, add_special_tokens=False)
    offsets = [o for o in enc.offsets]
    n = len(offsets)
    if n == 0:
        return []

    def word_start(i: int) -> bool:  # token i begins a word: whitespace or punctuation before it
        return i == 0 or i >= n or offsets[i][0] > offsets[i - 1][1] or not text[offsets[i][0]].isalnum() \
            or not text[offsets[i - 1][1] - 1].isalnum()

    def sentence_end(i: int) -> bool:  # token i-1 ends a sentence
        return text[offsets[i - 1][1] - 1] in ".!?\n" or "\n" in text[offsets[i - 1][1]:offsets[i][0]]

    chunks: list[Chunk] = []
    start = 0
    while start < n:
        end = min(start + chunk_tokens, n)
        if end < n:
            cut = next((i for i in range(end, start + chunk_tokens // 2, -1) if sentence_end(i)), None)
            if cut is None:
                cut = next((i for i in range(end, start, -1) if word_start(i)), end)
            end = cut
        s, e = offsets[start][0], offsets[end - 1][1]
        chunks.append(Chunk(source, len(chunks), s, e, text[s:e], title))
        if end >= n:
            break
        nxt = max(end - overlap, start + 1)
        while nxt < end and not word_start(nxt):
            nxt += 1
        start = nxt
    return chunks
