"""tokenmill rag's pieces: documents read by kind, chunks as exact spans within the size, the store's three
searches, the prompt's budget and canonical order, and incremental re-indexing with the real embedding model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tokenmill.errors import TokenmillError
from tokenmill.models.sentence_model import load_embedding_tokenizer, resolve_embedding_model
from tokenmill.rag.build import build_index
from tokenmill.rag.chunking import Chunk, split_text
from tokenmill.rag.documents import find_files, read_document
from tokenmill.rag.prompt import INSTRUCTION, build_context, query_of, with_context
from tokenmill.rag.store import Manifest, RagStore
from tokenmill.rag.synthetic import answered, corpus, questions


@pytest.fixture(scope="module")
def tokenizer():
    return load_embedding_tokenizer(resolve_embedding_model("default"))


def _pdf(text: str) -> bytes:
    """A one-page PDF showing `text` in Helvetica, with a correct cross-reference table."""
    stream = f"BT /F1 12 Tf 20 100 Td ({text}) Tj ET".encode()
    objs = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 400 144] /Contents 4 0 R "
            b"/Resources << /Font << /F1 5 0 R >> >> >>",
            b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
            b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for i, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref)
    return bytes(out)


def test_documents_are_read_by_kind_with_their_titles(tmp_path):
    (tmp_path / "a.md").write_text("# Alpha Works\n\nAlpha makes kettles.\n")
    (tmp_path / "b.html").write_text("<html><head><title>Beta Page</title><style>p{}</style>"
                                     "<script>var x = 1;</script></head><body><h1>Beta</h1><p>Beta makes harps.</p>"
                                     "</body></html>")
    (tmp_path / "c.pdf").write_bytes(_pdf("Gamma makes sleds."))
    (tmp_path / "notes.txt").write_text("plain words\n")
    (tmp_path / ".hidden.md").write_text("# secret\n")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    files = find_files([str(tmp_path)])
    assert [f.name for f in files] == ["a.md", "b.html", "c.pdf", "notes.txt"]
    docs = {f.name: read_document(f.path) for f in files}
    assert docs["a.md"] == ("Alpha Works", "# Alpha Works\n\nAlpha makes kettles.\n")
    assert docs["b.html"][0] == "Beta Page"
    assert "Beta makes harps." in docs["b.html"][1] and "var x" not in docs["b.html"][1]
    assert docs["c.pdf"] == ("c", "Gamma makes sleds.")
    assert docs["notes.txt"] == ("notes", "plain words\n")
    with pytest.raises(TokenmillError, match="cannot index .png"):
        find_files([str(tmp_path / "image.png")])
    with pytest.raises(TokenmillError, match="no such file"):
        find_files([str(tmp_path / "missing")])


def test_chunks_are_exact_spans_within_size_overlapping_and_whole_words(tokenizer):
    text = corpus(seed=3, documents=3, filler=(10, 12))[0].text * 3
    chunks = split_text(text, "x.md", tokenizer, 64, 16, "Title")
    assert len(chunks) > 3
    for c in chunks:
        assert c.text == text[c.start:c.end]
        assert len(tokenizer.encode(c.text, add_special_tokens=False).ids) <= 64
        assert c.start == 0 or not (text[c.start - 1].isalnum() and text[c.start].isalnum())  # no word split
        assert c.end == len(text) or not (text[c.end - 1].isalnum() and text[c.end].isalnum())
        assert c.searchable().startswith("Title\n")
    for a, b in zip(chunks, chunks[1:], strict=False):
        assert b.start < a.end  # overlap
        assert b.start > a.start
    assert chunks[0].start == 0 and chunks[-1].end == len(text.rstrip())
    assert [c.ordinal for c in chunks] == list(range(len(chunks)))
    with pytest.raises(TokenmillError, match="overlap"):
        split_text(text, "x.md", tokenizer, 64, 40)


def _store(texts: list[str], vectors: np.ndarray) -> RagStore:
    chunks = [Chunk(f"d{i}.md", 0, 0, len(t), t, f"D{i}") for i, t in enumerate(texts)]
    return RagStore.build(Manifest("default", vectors.shape[1], 64, 8, {}), chunks, vectors)


def test_dense_bm25_and_hybrid_search_and_a_round_trip_to_disk(tmp_path):
    texts = ["the kettle factory in Varn", "harps and lutes", "a river town called Osk", "kettle repairs"]
    vectors = np.eye(4, dtype=np.float32)
    store = _store(texts, vectors)
    q = np.array([0.1, 0.0, 0.9, 0.2], dtype=np.float32)
    assert [h.chunk_id for h in store.dense(q, 2)] == [2, 3]
    assert [h.chunk_id for h in store.lexical("kettle", 4)] in ([0, 3], [3, 0])  # no word shared: no hit
    assert store.lexical("the of and", 4) == []  # stopwords only
    hybrid = store.search("kettle", q, 3, "hybrid")
    assert hybrid[0].chunk_id == 3  # in both rankings
    assert {h.chunk_id for h in hybrid} == {0, 2, 3}
    with pytest.raises(TokenmillError, match="mode"):
        store.search("x", q, 1, "fuzzy")
    store.save(tmp_path / "ix")
    loaded = RagStore.load(tmp_path / "ix")
    assert loaded.chunks == store.chunks
    assert [h.chunk_id for h in loaded.search("kettle", q, 3, "hybrid")] == [h.chunk_id for h in hybrid]
    with pytest.raises(TokenmillError, match="not a tokenmill RAG index"):
        RagStore.load(tmp_path)


def test_context_keeps_the_budget_best_first_and_places_passages_in_index_order():
    texts = [f"passage number {i} " * (i + 1) for i in range(6)]
    store = _store(texts, np.eye(6, dtype=np.float32))
    hits = [store.dense(np.eye(6, dtype=np.float32)[i], 1)[0] for i in (4, 1, 5, 0)]  # best first
    count = lambda _, text: len(text.split())  # noqa: E731
    ctx = build_context(hits, count, 40)
    # 4 (17 words with its label) and 1 (8) fit; 5 (20) would pass 40; 0 (5) still fits.
    assert [h.chunk_id for h in ctx.hits] == [0, 1, 4]
    assert ctx.tokens == sum(count(None, f"[9999] D{i}\n{texts[i].strip()}") for i in (0, 1, 4))
    assert ctx.text.startswith(INSTRUCTION)
    assert ctx.text.index("[1] D0") < ctx.text.index("[2] D1") < ctx.text.index("[3] D4")
    msgs = with_context([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q?"}], ctx)
    assert len(msgs) == 2 and msgs[0]["content"].endswith("\n\nBe brief.") and msgs[0]["content"].startswith(INSTRUCTION)
    assert with_context([{"role": "user", "content": "q?"}], ctx)[0] == {"role": "system", "content": ctx.text}
    assert query_of([{"role": "user", "content": "first"}, {"role": "assistant", "content": "a"},
                     {"role": "user", "content": [{"type": "text", "text": "second"}]}]) == "second"
    assert query_of([{"role": "system", "content": "s"}]) is None


def test_reindexing_embeds_only_changed_files_and_drops_removed_ones(tmp_path):
    docs = corpus(seed=1, documents=6)
    src = tmp_path / "docs"
    src.mkdir()
    for d in docs:
        (src / d.name).write_text(d.text)
    out = tmp_path / "index"
    first = build_index([str(src)], out, chunk_tokens=96, overlap=16, progress=False)
    assert (first.files, first.embedded_files, first.reused_files) == (6, 6, 0)
    before = RagStore.load(out)
    (src / docs[2].name).write_text(docs[2].text.replace("# ", "# Renamed ", 1))
    (src / docs[5].name).unlink()
    second = build_index([str(src)], out, chunk_tokens=96, overlap=16, progress=False)
    assert (second.files, second.embedded_files, second.reused_files, second.dropped_files) == (5, 1, 4, 1)
    after = RagStore.load(out)
    assert {c.source for c in after.chunks} == {d.name for d in docs[:5]}
    for name in (docs[0].name, docs[4].name):  # unchanged: the very same vectors
        old = [i for i, c in enumerate(before.chunks) if c.source == name]
        new = [i for i, c in enumerate(after.chunks) if c.source == name]
        assert np.array_equal(before.vectors[old], after.vectors[new])
    assert [c.source for c in after.chunks] == sorted(c.source for c in after.chunks)  # canonical order
    assert json.loads((out / "manifest.json").read_text())["files"][docs[2].name]["chunks"] >= 1
    # A question about a document is answered by retrieving it: the real embedding model, hybrid and dense.
    from tokenmill.models.bert import BertEncoder

    enc = BertEncoder(resolve_embedding_model("default"))
    tok = load_embedding_tokenizer(resolve_embedding_model("default"))
    for q in questions(docs[:5]):
        vec = enc.embed([tok.encode(q.text).ids])[0].numpy()
        assert after.search(q.text, vec, 1, "hybrid")[0].chunk.source == q.source, q
    # A different chunk size rebuilds everything.
    third = build_index([str(src)], out, chunk_tokens=64, overlap=16, progress=False)
    assert third.reused_files == 0


def test_exact_match_is_whole_words():
    assert answered("It was founded in 1846 by Quinn.", "1846")
    assert answered("The mayor is Vera Kalo.", "vera kalo")
    assert not answered("in 18460", "1846")
    assert not answered("Vera Kalovin", "Vera Kalo")
