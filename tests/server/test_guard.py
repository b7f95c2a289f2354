"""The guard in front of the server and the router, on a bare app: CORS only for --allowed-origins (and the key
still asked for), every path behind the key with --protect-all-paths, a body that does not arrive in time 408."""

from __future__ import annotations

import asyncio

from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from tokenmill.server.config import ServerConfig
from tokenmill.server.guard import Guard, install_guard

ORIGIN = "https://app.example.com"


def _app(**config) -> tuple[TestClient, list[str]]:
    async def echo(request):
        return JSONResponse({"grant": repr(request.scope.get("state", {}).get("key_grant"))})

    app = Starlette(routes=[Route("/v1/x", echo, methods=["POST", "GET"]), Route("/metrics", echo),
                            Route("/health", echo)])
    rejected: list[str] = []
    install_guard(app, ServerConfig(**config), rejected.append, hosts=None)
    return TestClient(app), rejected


def _preflight(client: TestClient, origin: str):
    return client.options("/v1/x", headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                            "Access-Control-Request-Headers": "authorization,content-type"})


def test_no_cors_unless_origins_are_given():
    client, _ = _app()
    assert "access-control-allow-origin" not in _preflight(client, ORIGIN).headers
    r = client.post("/v1/x", json={}, headers={"Origin": ORIGIN})
    assert "access-control-allow-origin" not in r.headers  # the page cannot read the answer


def test_allowed_origins_get_cors_and_still_need_the_key():
    client, rejected = _app(allowed_origins=ORIGIN + "/", api_key="k")
    pre = _preflight(client, ORIGIN)
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == ORIGIN
    assert "access-control-allow-origin" not in _preflight(client, "https://evil.example").headers
    assert client.post("/v1/x", json={}, headers={"Origin": ORIGIN}).status_code == 401
    ok = client.post("/v1/x", json={}, headers={"Origin": ORIGIN, "Authorization": "Bearer k"})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ORIGIN
    assert rejected == ["unauthorized"]


def test_protect_all_paths_leaves_only_health_open():
    client, _ = _app(api_key="k", protect_all_paths=True)
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer k"}).status_code == 200
    assert client.get("/health").status_code == 200
    open_client, _ = _app(api_key="k")
    assert open_client.get("/metrics").status_code == 200 and open_client.get("/v1/x").status_code == 401


def test_a_body_that_stalls_gets_408():
    sent: list[dict] = []

    async def app(scope, receive, send):  # never reached
        raise AssertionError

    async def receive():
        if not sent:
            sent.append({})
            return {"type": "http.request", "body": b'{"a":', "more_body": True}
        await asyncio.sleep(10)  # the rest never comes

    out: list[dict] = []

    async def send(message):
        out.append(message)

    guard = Guard(app, api_keys={}, max_body=1 << 20, hosts=None, on_reject=lambda r: out.append({"r": r}),
                  body_timeout=0.2)
    scope = {"type": "http", "method": "POST", "path": "/v1/x", "headers": [(b"content-type", b"application/json")]}
    asyncio.run(guard(scope, receive, send))
    assert {"r": "body_timeout"} in out and out[1]["status"] == 408
