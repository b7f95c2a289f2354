"""`tokenmill serve --rag-index`: POST /v1/rag/chat/completions through the official openai client (base_url
.../v1/rag), answered from the passages it retrieves and cites; passages shared by two questions come from the
prefix cache; streaming carries the citations first; bad requests get 400s."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from server_helpers import parse_metrics, start_server

from tokenmill.rag.build import build_index
from tokenmill.rag.synthetic import answered, corpus

pytestmark = pytest.mark.slow

DOCS = corpus(seed=7, documents=12)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("rag")
    (root / "docs").mkdir()
    for d in DOCS:
        (root / "docs" / d.name).write_text(d.text)
    build_index([str(root / "docs")], root / "index", chunk_tokens=128, overlap=16, progress=False)
    s = start_server("--rag-index", str(root / "index"))
    yield s
    s.stop()
    s.assert_clean_log()
    s.remove_log()


def test_rag_chat_answers_from_cited_passages_and_reuses_their_kv(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1/rag", api_key="none")
    doc = DOCS[0]
    fact = next(f for f in doc.facts if "founded" in f.question)
    r = client.chat.completions.create(model="default", messages=[{"role": "user", "content": fact.question}],
                                       max_tokens=32, temperature=0, extra_body={"rag": {"top_k": 2}})
    cites = r.model_extra["citations"]
    assert 1 <= len(cites) <= 2 and doc.name in {c["source"] for c in cites}
    assert [c["chunk_id"] for c in cites] == sorted(c["chunk_id"] for c in cites)  # index order
    assert all(doc.text.find(c["text"]) >= 0 for c in cites if c["source"] == doc.name)
    assert r.model_extra["rag"]["mode"] == "hybrid" and r.model_extra["rag"]["context_tokens"] > 20
    assert r.usage.prompt_tokens > r.model_extra["rag"]["context_tokens"]
    assert answered(r.choices[0].message.content, fact.answer), r.choices[0].message.content
    # Another question about the same document retrieves the same passages: their KV is served from cache.
    other = next(f for f in doc.facts if f is not fact)
    r2 = client.chat.completions.create(model="default", messages=[{"role": "user", "content": other.question}],
                                        max_tokens=8, temperature=0, extra_body={"rag": {"top_k": 2}})
    assert [c["chunk_id"] for c in r2.model_extra["citations"]] == [c["chunk_id"] for c in cites]
    assert r2.usage.prompt_tokens_details.cached_tokens >= r.model_extra["rag"]["context_tokens"] - 16
    assert r.usage.prompt_tokens_details.cached_tokens < r2.usage.prompt_tokens_details.cached_tokens
    # Dense only, and a caller's own system message kept after the passages.
    r3 = client.chat.completions.create(
        model="default", max_tokens=4, temperature=0, extra_body={"rag": {"top_k": 1, "hybrid": False}},
        messages=[{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": fact.question}])
    assert r3.model_extra["rag"]["mode"] == "dense" and len(r3.model_extra["citations"]) == 1
    # Best first on request: the same passages, by score.
    r5 = client.chat.completions.create(model="default", messages=[{"role": "user", "content": fact.question}],
                                        max_tokens=1, extra_body={"rag": {"top_k": 2, "order": "score"}})
    scored = r5.model_extra["citations"]
    assert {c["chunk_id"] for c in scored} == {c["chunk_id"] for c in cites}
    assert [c["score"] for c in scored] == sorted((c["score"] for c in scored), reverse=True)
    # A budget too small for any passage: no passages, still an answer.
    r4 = client.chat.completions.create(model="default", messages=[{"role": "user", "content": fact.question}],
                                        max_tokens=4, temperature=0, extra_body={"rag": {"max_context_tokens": 5}})
    assert r4.model_extra["citations"] == [] and r4.model_extra["rag"]["context_tokens"] == 0
    m = parse_metrics(httpx.get(f"{server.url}/metrics").text)
    assert m["tokenmill:rag_retrieval_seconds_count"] == 5


def test_streaming_sends_the_citations_first(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1/rag", api_key="none")
    q = DOCS[1].facts[0].question
    chunks = list(client.chat.completions.create(model="default", messages=[{"role": "user", "content": q}],
                                                 max_tokens=8, temperature=0, stream=True,
                                                 extra_body={"rag": {"top_k": 1}}))
    assert chunks[0].choices == [] and chunks[0].model_extra["citations"][0]["source"] == DOCS[1].name
    text = "".join(c.choices[0].delta.content or "" for c in chunks[1:] if c.choices)
    plain = client.chat.completions.create(model="default", messages=[{"role": "user", "content": q}],
                                           max_tokens=8, temperature=0, extra_body={"rag": {"top_k": 1}})
    assert text == plain.choices[0].message.content


@pytest.mark.parametrize("body,match", [
    ({"messages": [{"role": "user", "content": "hi"}], "rag": {"top_k": 0}}, "rag.top_k"),
    ({"messages": [{"role": "user", "content": "hi"}], "rag": {"top_k": 1000}}, "rag.top_k"),
    ({"messages": [{"role": "user", "content": "hi"}], "rag": {"max_context_tokens": 0}}, "max_context_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "rag": {"fuzzy": True}}, "rag.fuzzy"),
    ({"messages": [{"role": "user", "content": "hi"}], "rag": {"order": "random"}}, "rag.order"),
    ({"messages": [{"role": "system", "content": "no question"}]}, "user message"),
    ({"messages": [{"role": "user", "content": "   "}]}, "user message"),
])
def test_bad_rag_requests_are_400s(server, body, match):
    r = httpx.post(f"{server.url}/v1/rag/chat/completions", content=json.dumps(body),
                   headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert match in r.json()["error"]["message"]


def test_a_server_without_an_index_says_so():
    s = start_server("--mock")
    try:
        r = httpx.post(f"{s.url}/v1/rag/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400 and "--rag-index" in r.json()["error"]["message"]
    finally:
        s.stop()
