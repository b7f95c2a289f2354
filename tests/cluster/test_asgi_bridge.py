"""The HTTP-request-as-data bridge the Ray deployments use: pure asyncio, no Ray, milliseconds."""

import asyncio
import json

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from tokenmill.cluster.asgi_bridge import HttpCall, ResponseHead, call_asgi


def _app(events: list[str]) -> Starlette:
    async def echo(request: Request):
        body = await request.json()
        return JSONResponse({"got": body, "q": request.query_params.get("x"),
                             "auth": request.headers.get("authorization")}, status_code=201)

    async def stream(request: Request):
        async def gen():
            try:
                for i in range(1000):
                    yield f"data: {i}\n\n".encode()
                    await asyncio.sleep(0.001)
                events.append("finished")
            except asyncio.CancelledError:
                events.append("cancelled")  # starlette cancels the body when it sees http.disconnect
                raise

        return StreamingResponse(gen(), media_type="text/event-stream")

    async def boom(request: Request):
        raise RuntimeError("app bug")

    return Starlette(routes=[Route("/echo", echo, methods=["POST"]), Route("/stream", stream),
                             Route("/boom", boom)])


async def _collect(app, call: HttpCall) -> tuple[ResponseHead, bytes]:
    parts = [p async for p in call_asgi(app, call, [(b"x-extra", b"1")])]
    head, chunks = parts[0], parts[1:]
    assert isinstance(head, ResponseHead) and all(isinstance(c, bytes) for c in chunks)
    return head, b"".join(chunks)


def test_request_and_response_cross_the_bridge_intact():
    call = HttpCall("POST", "/echo", b"x=7", [(b"authorization", b"Bearer k"),
                                            (b"content-type", b"application/json")], b'{"a": [1, 2]}')
    head, body = asyncio.run(_collect(_app([]), call))
    assert head.status == 201
    headers = dict(head.headers)
    assert headers[b"x-extra"] == b"1" and headers[b"content-type"] == b"application/json"
    assert json.loads(body) == {"got": {"a": [1, 2]}, "q": "7", "auth": "Bearer k"}


def test_full_stream_arrives_in_order():
    events: list[str] = []
    head, body = asyncio.run(_collect(_app(events), HttpCall("GET", "/stream")))
    assert head.status == 200
    assert body == b"".join(f"data: {i}\n\n".encode() for i in range(1000))
    assert events == ["finished"]


def test_closing_early_tells_the_app_the_client_left():
    events: list[str] = []

    async def main():
        gen = call_asgi(_app(events), HttpCall("GET", "/stream"))
        assert isinstance(await gen.__anext__(), ResponseHead)
        assert await gen.__anext__() == b"data: 0\n\n"
        await gen.aclose()  # what Ray does to the replica's generator when the client disconnects

    asyncio.run(main())
    assert events == ["cancelled"]


def test_an_app_exception_is_raised_not_swallowed():
    async def main():
        return [p async for p in call_asgi(_app([]), HttpCall("GET", "/boom"))]

    with pytest.raises(RuntimeError, match="app bug"):
        asyncio.run(main())
