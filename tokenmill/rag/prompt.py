"""Retrieved chunks into a chat prompt, within a token budget, laid out for the prefix cache. No torch.

The context goes first, in the system message, after a fixed instruction: requests that retrieve the same
leading chunks share a prompt prefix, and the engine's prefix cache serves its KV. For that the chunks are
placed in canonical order (their order in the index, i.e. by document and place in it), not by score: two
questions about the same document then retrieve overlapping chunks that line up from the start. The budget
decides which chunks go in (best score first); the order they appear in is the index's."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tokenmill.rag.store import Hit

INSTRUCTION = ("Answer the question from the numbered passages below. Cite the passages you used by their "
               "number in brackets, like [1]. If the passages do not contain the answer, say you do not know.")


@dataclass(frozen=True)
class Context:
    text: str  # the system message
    hits: list[Hit]  # the chunks placed, in the order they appear ([1], [2], ...)
    tokens: int  # the model's tokens spent on passages


def passage(label: int, hit: Hit) -> str:
    return f"[{label}] {hit.chunk.searchable().strip()}"


def build_context(hits: list[Hit], count_tokens: Callable[[int, str], int], max_context_tokens: int,
                  instruction: str = INSTRUCTION, order: str = "index") -> Context:
    """hits best first. count_tokens(chunk_id, text) -> the generating model's tokens for a passage (the label's
    few tokens are counted with it: labels are at most 4 digits). order: 'index' (the prefix cache's) or
    'score' (best first, as most RAG frameworks place them)."""
    chosen: list[Hit] = []
    used = 0
    for hit in hits:
        n = count_tokens(hit.chunk_id, passage(9999, hit))
        if used + n <= max_context_tokens:
            chosen.append(hit)
            used += n
    if order == "index":
        chosen.sort(key=lambda h: h.chunk_id)
    body = "\n\n".join(passage(i + 1, h) for i, h in enumerate(chosen))
    return Context(f"{instruction}\n\n{body}" if chosen else instruction, chosen, used)


def with_context(messages: list[dict], context: Context) -> list[dict]:
    """The context's system message first; a system message the caller sent is kept after the passages in
    the same message (one system turn suits every chat template)."""
    if messages and messages[0].get("role") in ("system", "developer") and isinstance(messages[0].get("content"), str):
        own = messages[0]["content"]
        return [{"role": "system", "content": f"{context.text}\n\n{own}"}, *messages[1:]]
    return [{"role": "system", "content": context.text}, *messages]


def query_of(messages: list[dict]) -> str | None:
    """The text retrieval searches for: the last user message's text."""
    for m in reversed(messages):
        if m.get("role") == "user":
            content = m.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return None
