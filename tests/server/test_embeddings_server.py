"""/v1/embeddings through the real server and the official `openai` client (base64, its default, and float),
against sentence-transformers on the same weights: the same vectors whether inputs come alone, many to a
request, or from concurrent requests; our BERT encoder itself against sentence-transformers; clear 400s."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import openai
import pytest
from server_helpers import ServerProcess, start_server

pytestmark = pytest.mark.slow

TEXTS = ["The cat sat on the mat.", "A feline rested on a rug.", "Quarterly revenue grew by 12 percent.",
         "naïve café — 😀 emoji and accents", "short", "x " * 200,
         "Embeddings map text to vectors so similar meanings land close together."]


@pytest.fixture(scope="module")
def reference():
    st = pytest.importorskip("sentence_transformers")
    from tokenmill.models.sentence_model import resolve_embedding_model

    model = st.SentenceTransformer(str(resolve_embedding_model("default")), device="cpu")
    return model.encode(TEXTS, convert_to_numpy=True)


@pytest.fixture(scope="module")
def server(reference) -> ServerProcess:
    s = start_server("--embedding-model", "default")
    yield s
    assert s.stop() == 0, s.log_text()
    s.assert_clean_log()
    s.remove_log()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)


def test_encoder_matches_sentence_transformers(reference):
    from tokenmill.models.bert import BertEncoder
    from tokenmill.models.sentence_model import load_embedding_tokenizer, resolve_embedding_model

    path = resolve_embedding_model("default")
    tok = load_embedding_tokenizer(path)
    ours = BertEncoder(path).embed([e.ids for e in tok.encode_batch(TEXTS)]).numpy()
    assert np.abs(ours - reference).max() < 1e-5


def test_batched_and_alone_match_reference(client, reference):
    batched = client.embeddings.create(model="all-MiniLM-L6-v2", input=TEXTS)  # base64 on the wire
    assert [d.index for d in batched.data] == list(range(len(TEXTS)))
    got = np.array([d.embedding for d in batched.data])
    assert got.shape == (len(TEXTS), 384) and np.abs(got - reference).max() < 1e-5
    for i in (0, 5):
        alone = client.embeddings.create(model="all-MiniLM-L6-v2", input=TEXTS[i], encoding_format="float")
        assert np.abs(np.array(alone.data[0].embedding) - reference[i]).max() < 1e-5
    assert batched.usage.prompt_tokens > len(TEXTS)


def test_concurrent_requests(server, reference):
    async def run():
        c = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)
        return await asyncio.gather(*[c.embeddings.create(model="all-MiniLM-L6-v2", input=[t]) for t in TEXTS])

    for res, ref in zip(asyncio.run(run()), reference, strict=True):
        assert np.abs(np.array(res.data[0].embedding) - ref).max() < 1e-5


def test_chat_still_served_beside(client):
    done = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert done.choices[0].message.content is not None
    names = {m.id for m in client.models.list().data}
    assert "all-MiniLM-L6-v2" in names and len(names) == 2


@pytest.mark.parametrize("body,param", [
    ({"input": "word " * 400}, "input"),
    ({"input": []}, "input"),
    ({"input": [""]}, "input"),
    ({"input": [[10**9]]}, "input"),
    ({"input": "hi", "model": "text-embedding-3-small"}, "model"),
    ({"input": "hi", "dimensions": 128}, "dimensions"),
    ({"input": "hi", "encoding_format": "int8"}, "encoding_format"),
])
def test_bad_inputs_are_400(server, body, param):
    r = httpx.post(f"{server.url}/v1/embeddings", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_engine_loop_batches_in_order_and_survives_a_failing_embedder():
    import torch

    from tokenmill.server.engine_loop import EngineLoop
    from tokenmill.server.protocol import Embedded, EmbedRequest

    class Echo:  # the vector is the input's length and first id: order is checkable
        def embed(self, batch):
            return torch.tensor([[float(len(ids)), float(ids[0])] for ids in batch])

    class Boom:
        def embed(self, batch):
            raise RuntimeError("boom")

    sent: list = []
    loop = EngineLoop(None, sent.append, Echo())
    loop.handle(EmbedRequest("a", [[5, 1, 1, 1], [6]]))
    loop.handle(EmbedRequest("b", [[7, 1]]))
    loop._embed()
    assert sent == [Embedded("a", [[4.0, 5.0], [1.0, 6.0]]), Embedded("b", [[2.0, 7.0]])]
    sent.clear()
    loop.embedder = Boom()
    loop.handle(EmbedRequest("c", [[1]]))
    loop._embed()  # the engine loop goes on; the request gets an error
    assert sent == [Embedded("c", [], "embedding failed: RuntimeError: boom")]
