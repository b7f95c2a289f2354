"""`tokenmill rag index` and `rag query` from the command line, their errors, and `serve --rag-index`'s
embedding model taken from the index."""

from __future__ import annotations

import json

import pytest

from tokenmill.config import EngineConfig
from tokenmill.entrypoints.cli import main
from tokenmill.errors import ConfigError
from tokenmill.rag.synthetic import answered, corpus
from tokenmill.server.config import ServerConfig
from tokenmill.server.launcher import with_rag_embedding

DOCS = corpus(seed=11, documents=5)


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    root = tmp_path_factory.mktemp("ragcli")
    for d in DOCS:
        (root / d.name).write_text(d.text)
    assert main(["rag", "index", str(root), "--out", str(root / "ix"), "--chunk-tokens", "128", "--no-progress"]) == 0
    return root / "ix"


def test_query_retrieves_and_answers_from_the_passages(index, capsys):
    capsys.readouterr()
    fact = DOCS[2].facts[0]
    assert main(["rag", "query", str(index), fact.question, "--top-k", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [p["source"] for p in out["passages"]] == [DOCS[2].name] and "answer" not in out
    assert main(["rag", "query", str(index), fact.question, "--top-k", "2", "--answer", "--max-tokens", "24",
                 "--json", "--kv-cache-memory", "128MiB"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert DOCS[2].name in {p["source"] for p in out["passages"]}
    assert answered(out["answer"], fact.answer), out["answer"]


def test_cli_errors_are_one_line(tmp_path, index, capsys):
    assert main(["rag", "query", str(tmp_path), "anything"]) == 2
    assert "not a tokenmill RAG index" in capsys.readouterr().err
    assert main(["rag", "query", str(index), "anything", "--top-k", "0"]) == 2
    assert "--top-k" in capsys.readouterr().err
    assert main(["rag", "index", str(tmp_path / "none"), "--out", str(tmp_path / "ix")]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["rag", "index", str(tmp_path / "empty"), "--out", str(tmp_path / "ix")]) == 2
    assert "no documents" in capsys.readouterr().err
    assert main(["rag", "index", str(index.parent), "--out", str(tmp_path / "ix2"), "--chunk-tokens", "1000"]) == 2
    assert "past the embedding model's limit" in capsys.readouterr().err


def test_serve_takes_the_index_embedding_model(index):
    cfg = with_rag_embedding(EngineConfig(), ServerConfig(rag_index=str(index)))
    assert cfg.embedding_model == "default"
    assert with_rag_embedding(EngineConfig(), ServerConfig()).embedding_model is None
    with pytest.raises(ConfigError, match="built with the embedding model 'default'"):
        with_rag_embedding(EngineConfig(embedding_model="/some/other"), ServerConfig(rag_index=str(index)))
