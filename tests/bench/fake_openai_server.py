"""A scripted OpenAI-compatible completions server with known delays, for testing the load generator.

Run: python fake_openai_server.py PORT. Streaming /v1/completions only. The prompt's first two token ids
script the timing: first token after prompt[0] % 1000 ms, each later chunk prompt[1] % 100 ms after the
previous one.
The path prefix picks a behaviour:
  /v1/...         max_tokens tokens, one per chunk, usage in the last chunk when asked (stream_options)
  /short/v1/...   two tokens fewer than asked (a peer that stops early), usage says so
  /nousage/v1/... never sends usage (the client must count chunks)
  /pairs/v1/...   two tokens per chunk, usage in the last chunk
"""

from __future__ import annotations

import asyncio
import json
import sys

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def completions(mode: str):
    async def handler(request: Request):
        body = await request.json()
        prompt = body["prompt"]
        if not (isinstance(prompt, list) and len(prompt) >= 2 and body.get("stream")):
            return JSONResponse({"error": {"message": "the fake wants a streamed token-id prompt"}}, 400)
        if not body.get("ignore_eos"):
            return JSONResponse({"error": {"message": "ignore_eos missing"}}, 400)
        ttft, gap = prompt[0] % 1000 / 1000, prompt[1] % 100 / 1000
        n = body["max_tokens"] - (2 if mode == "short" else 0)
        per_chunk = 2 if mode == "pairs" else 1
        usage = mode != "nousage" and bool((body.get("stream_options") or {}).get("include_usage"))

        async def events():
            await asyncio.sleep(ttft)
            sent = 0
            while sent < n:
                k = min(per_chunk, n - sent)
                if sent:
                    await asyncio.sleep(gap)
                sent += k
                yield _sse({"object": "text_completion", "choices": [
                    {"index": 0, "text": " tok" * k, "finish_reason": "length" if sent == n else None}]})
            if usage:
                yield _sse({"object": "text_completion", "choices": [],
                            "usage": {"prompt_tokens": len(prompt), "completion_tokens": n,
                                      "total_tokens": len(prompt) + n}})
            yield b"data: [DONE]\n\n"

        # As `tokenmill router` names the replica that answered.
        return StreamingResponse(events(), media_type="text/event-stream", headers={"x-tokenmill-replica": "fake-0"})

    return handler


async def models(request: Request):
    return JSONResponse({"object": "list", "data": [{"id": "fake", "object": "model"}]})


routes = [Route("/v1/models", models)]
for prefix, mode in (("", "normal"), ("/short", "short"), ("/nousage", "nousage"), ("/pairs", "pairs")):
    routes.append(Route(f"{prefix}/v1/completions", completions(mode), methods=["POST"]))
app = Starlette(routes=routes)

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
