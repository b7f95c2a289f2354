"""The difficulty cascade: the router in front of two replicas, a small model and a large one
(`tokenmill serve --cascade SMALL,LARGE`).

A completion or chat request goes to the small replica first, with logprobs asked for (the confidence signals),
or is scored before anything runs (the learned prompt router: the prompt's tail embedded by the small replica's
/v1/embeddings). When the difficulty score is above the threshold (`cascade_policy.escalate`) the client's request
goes to the large replica unchanged, streamed if asked; otherwise the small answer is returned, without the
logprobs the client did not ask for (as one SSE chunk when it asked to stream). Every answer says who answered:
`model`, a `cascade` field in a JSON body and the x-tokenmill-cascade* headers. Compute is counted as
2 x N_active x tokens per model (N_active from each replica's /v1/usage) against what large-only would have spent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from typing import Any

from prometheus_client import Counter, Gauge
from starlette.requests import Request
from starlette.responses import Response

from tokenmill.cluster.cascade_config import CascadeConfig
from tokenmill.cluster.cascade_policy import CascadeFit, confidence_score, embed_text, escalate
from tokenmill.cluster.config import RouterConfig
from tokenmill.cluster.proxy import SSE_HEADERS, Retry, error_response
from tokenmill.cluster.replicas import Load, Replica
from tokenmill.cluster.router import Router
from tokenmill.config import EngineConfig
from tokenmill.server.config import ExposureConfig, ServerConfig

logger = logging.getLogger(__name__)

_GENERATE = ("/v1/completions", "/v1/chat/completions")


class CascadeMetrics:
    def __init__(self, registry, signal: str, threshold: float):
        p = "tokenmill:cascade_"
        self.requests = Counter(p + "requests", "Cascade requests by the model that answered", ["answered_by"],
                                registry=registry)
        self.escalations = Counter(p + "escalations", "Requests escalated to the large model", registry=registry)
        self.flops = Counter(p + "flops", "FLOPs spent by the cascade (2 x N_active x tokens) per model", ["model"],
                             registry=registry)
        self.large_only = Counter(p + "large_only_flops", "FLOPs the large model alone would have spent on the same "
                                  "requests (the small model's token counts where it answered)", registry=registry)
        self.saved = Gauge(p + "flops_saved", "large_only_flops - flops (negative: the cascade cost more)",
                           registry=registry)
        self.saved_ratio = Gauge(p + "flops_saved_ratio", "flops_saved / large_only_flops", registry=registry)
        Gauge(p + "threshold", "Escalation threshold on the difficulty signal", ["signal"],
              registry=registry).labels(signal).set(threshold)
        self._spent = 0.0
        self._base = 0.0

    def count(self, spent: dict[str, float], large_only: float) -> None:
        for model, f in spent.items():
            if f:
                self.flops.labels(model).inc(f)
        self.large_only.inc(large_only)
        self._spent += sum(spent.values())
        self._base += large_only
        self.saved.set(self._base - self._spent)
        self.saved_ratio.set((self._base - self._spent) / self._base if self._base else 0.0)


def router_config_for(server: ServerConfig, cascade: CascadeConfig) -> RouterConfig:
    """The router options of a cascade: the server's exposure options, the two replicas (URLs or spawned)."""
    exposure = {name: getattr(server, name) for name in ExposureConfig.__dataclass_fields__}
    if cascade.urls:
        return RouterConfig(**exposure, replicas=",".join(cascade.models), routing="round-robin")
    return RouterConfig(**exposure, spawn=2, routing="round-robin")


class CascadeRouter(Router):
    def __init__(self, config: RouterConfig, engine_config: EngineConfig, cascade: CascadeConfig,
                 fit: CascadeFit | None = None):
        if not cascade.urls and engine_config.model != cascade.models[0]:
            from dataclasses import replace

            engine_config = replace(engine_config, model=cascade.models[0])  # the small model's tokenizer
        super().__init__(config, engine_config)
        self.cascade = cascade
        self.min_ready = 2
        self.fit = fit if fit is not None else (CascadeFit.load(cascade.cascade_fit) if cascade.cascade_fit else None)
        self.signal = cascade.cascade_signal
        if self.signal == "router" and (self.fit is None or self.fit.router is None):
            from tokenmill.errors import ConfigError

            raise ConfigError(f"{cascade.cascade_fit} holds no prompt router (fit it with embeddings)")
        self.first_tokens = self.fit.first_tokens if self.fit else cascade.cascade_first_tokens
        self.top_n = self.fit.top_logprobs if self.fit else 5
        if cascade.escalate_threshold is not None:
            self.threshold = float(cascade.escalate_threshold)
        elif self.fit is not None:
            self.threshold = self.fit.threshold(self.signal, cascade.escalate_rate)
        else:
            self.threshold = math.inf if cascade.escalate_rate == 0.0 else -math.inf
        self.cascade_metrics = CascadeMetrics(self.metrics.registry, self.signal, self.threshold)
        self.active_params: dict[str, int] = {}
        self.model_names: dict[str, str] = {}
        logger.info("cascade %s -> %s: %s signal, escalating above %.4g", *cascade.models, self.signal,
                    self.threshold)

    # -- lifecycle ---------------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._tokenizer_task = asyncio.get_running_loop().create_task(self._load_tokenizer())
        small, large = self.cascade.models
        if self.cascade.urls:
            self.replicas.add(small, name="small")
            self.replicas.add(large, name="large")
        else:
            from tokenmill.cluster.supervisor import Supervisor

            self.supervisor = Supervisor(self.replicas, self.engine_config, self.config, self.metrics)
            embed = ("--embedding-model", self.fit.embedding_model) if self.signal == "router" else ()
            await self.supervisor.add_replica("small", ("--model", small, *embed))
            await self.supervisor.add_replica("large", ("--model", large))
        await self.replicas.start()

    async def _model_info(self, r: Replica) -> tuple[str, int]:
        """The replica's served model name and active weights per token (its /v1/usage), fetched once."""
        if r.name not in self.active_params:
            try:
                usage = (await r.client.get("/v1/usage")).json()
                self.active_params[r.name] = int((usage.get("model") or {}).get("active_params") or 0)
                models = (await r.client.get("/v1/models")).json()
                self.model_names[r.name] = models["data"][0]["id"]
            except Exception as e:  # noqa: BLE001 - the answer matters more than its accounting
                logger.warning("cannot read %s's model (%s): its compute is not counted", r.name, e)
                return r.name, 0
        return self.model_names.get(r.name, r.name), self.active_params[r.name]

    # -- requests ------------------------------------------------------------------------------------------------
    def _replica(self, name: str) -> Replica | None:
        r = self.replicas.get(name)
        return r if r.routable else None

    async def _send(self, r: Replica, http: Request, path: str, body: bytes, stream: bool, prompt_tokens: int,
                    max_tokens: int, arrival: float) -> Response:
        self.metrics.requests.labels(r.name).inc()
        out = await self.forwarder.attempt(r, Load(r, prompt_tokens, max_tokens), http, "POST", path, body, stream,
                                           arrival)
        return out.response if isinstance(out, Retry) else out

    async def forward(self, http: Request, method: str, path: str, body: bytes | None, parsed: Any,
                      stream: bool, arrival: float | None = None) -> Response:
        arrival = time.monotonic() if arrival is None else arrival
        small, large = self._replica("small"), self._replica("large")
        if small is None or large is None:
            self.metrics.unrouted.labels("no_replica").inc()
            return error_response(503, "the cascade's small and large replicas are not both ready",
                                  "service_unavailable", headers={"Retry-After": "2"})
        if method != "POST" or path not in _GENERATE or not isinstance(parsed, dict):
            # /v1/models, /tokenize, ... and bodies the replica will refuse with its own exact 400.
            if method == "GET":
                out = await self.forwarder.attempt(small, Load(small, 0, 0), http, method, path, None, False, arrival)
                return out.response if isinstance(out, Retry) else out
            return await self._send(small, http, path, body or b"", False, 0, 0, arrival)
        f = await self.features(parsed)
        chat = path == "/v1/chat/completions"
        client_body = dict(parsed)
        client_body.pop("model", None)  # each replica serves its own model name; the cascade answers for both
        if self.signal == "router":
            score = await self._router_score(small, parsed, chat)
            if isinstance(score, Response):
                return score
            up = escalate(score, self.threshold)
            r = large if up else small
            out = await self._send(r, http, path, json.dumps(client_body).encode(), stream, f.prompt_tokens,
                                   f.max_tokens, arrival)
            return await self._answered(out, r, up, score, None, stream)
        # Confidence: the small model answers first, with logprobs.
        probe = dict(client_body, stream=False)
        probe.pop("stream_options", None)
        if chat:
            probe["logprobs"] = True
            probe["top_logprobs"] = max(int(parsed.get("top_logprobs") or 0), self.top_n if
                                        self.signal == "entropy" else 0)
        else:
            probe["logprobs"] = max(int(parsed.get("logprobs") or 0), self.top_n if self.signal == "entropy" else 1)
        out = await self._send(small, http, path, json.dumps(probe).encode(), False, f.prompt_tokens, f.max_tokens,
                               arrival)
        if out.status_code != 200:
            return out  # the request's own error (4xx, OpenAI-style), or the small replica's failure
        answer = json.loads(out.body)
        score = self._confidence(answer, chat)
        up = escalate(score, self.threshold)
        if up:
            resp = await self._send(large, http, path, json.dumps(client_body).encode(), stream, f.prompt_tokens,
                                    f.max_tokens, arrival)
            return await self._answered(resp, large, True, score, answer, stream)
        if not parsed.get("logprobs"):
            for c in answer.get("choices") or ():
                c["logprobs"] = None
        elif chat and not parsed.get("top_logprobs"):
            for c in answer.get("choices") or ():
                for t in ((c.get("logprobs") or {}).get("content") or ()):
                    t["top_logprobs"] = []
        return await self._answered(answer, small, False, score, None, stream, parsed)

    async def _router_score(self, small: Replica, parsed: dict, chat: bool) -> float | Response:
        if chat:  # the last user message's text
            msgs = [m for m in parsed.get("messages") or () if isinstance(m, dict) and m.get("role") == "user"]
            content = msgs[-1].get("content") if msgs else ""
            text = content if isinstance(content, str) else " ".join(
                p.get("text", "") for p in content or () if isinstance(p, dict))
        else:
            p = parsed.get("prompt")
            text = p if isinstance(p, str) else (p[0] if isinstance(p, list) and p and isinstance(p[0], str) else "")
        text = embed_text(text, self.fit.embed_chars) if text else " "
        try:
            resp = await small.client.post("/v1/embeddings", json={"input": text})
        except Exception as e:  # noqa: BLE001
            return error_response(502, f"the cascade's router could not embed the prompt: {type(e).__name__}",
                                  "upstream_error")
        if resp.status_code != 200:
            return Response(resp.content, status_code=resp.status_code, media_type="application/json")
        return self.fit.router.score(resp.json()["data"][0]["embedding"])

    def _confidence(self, answer: dict, chat: bool) -> float:
        choices = answer.get("choices") or [{}]
        lp = choices[0].get("logprobs") or {}
        if chat:
            content = lp.get("content") or []
            toks = [t["logprob"] for t in content]
            tops = [[x["logprob"] for x in t.get("top_logprobs") or ()] for t in content]
        else:
            toks = [x for x in lp.get("token_logprobs") or () if x is not None]
            tops = [list((d or {}).values()) for d in lp.get("top_logprobs") or ()]
        return confidence_score(self.signal, toks, tops, self.first_tokens)

    async def _answered(self, out: Response | dict, r: Replica, escalated: bool, score: float,
                        small_answer: dict | None, stream: bool, parsed: dict | None = None) -> Response:
        """Count the request and say who answered it (headers; a `cascade` field in JSON bodies)."""
        name, n_active = await self._model_info(r)
        info = {"answered_by": r.name, "model": name, "escalated": escalated, "signal": self.signal,
                "score": score, "threshold": self.threshold}
        body = out if isinstance(out, dict) else None
        if body is None and isinstance(out, Response) and not stream and out.status_code == 200:
            body = json.loads(out.body)
        if isinstance(out, Response) and out.status_code != 200:
            return out
        self.cascade_metrics.requests.labels(r.name).inc()
        if escalated:
            self.cascade_metrics.escalations.inc()
        await self._count(r, body, small_answer, escalated)
        headers = {"x-tokenmill-cascade": r.name, "x-tokenmill-cascade-model": name,
                   "x-tokenmill-cascade-score": f"{score:.6g}"}
        if body is None:  # a stream relayed from the replica
            out.headers.update(headers)
            return out
        body["model"] = name
        body["cascade"] = info
        if stream:
            return Response(_as_sse(body, parsed or {}), media_type="text/event-stream",
                            headers={**SSE_HEADERS, **headers})
        return Response(json.dumps(body), media_type="application/json", headers=headers)

    async def _count(self, r: Replica, body: dict | None, small_answer: dict | None, escalated: bool) -> None:
        _, n_large = await self._model_info(self.replicas.get("large"))
        _, n_small = await self._model_info(self.replicas.get("small"))
        ref = body if body is not None else small_answer  # a relayed stream: the small answer's counts stand in
        usage = (ref or {}).get("usage") or {}
        tokens = int(usage.get("prompt_tokens") or 0) + int(usage.get("completion_tokens") or 0)
        spent = {"small": 0.0, "large": 0.0}
        if small_answer is not None:  # the small model answered first (confidence signal), then escalated
            su = small_answer.get("usage") or {}
            spent["small"] = 2.0 * n_small * (int(su.get("prompt_tokens") or 0) + int(su.get("completion_tokens") or 0))
        spent[r.name] += 2.0 * (n_large if r.name == "large" else n_small) * tokens
        self.cascade_metrics.count(spent, 2.0 * n_large * tokens)


def _as_sse(body: dict, parsed: dict) -> bytes:
    """A finished completion as the stream the client asked for: one chunk per choice, usage if asked, [DONE]."""
    chat = body.get("object") == "chat.completion"
    events = []
    for c in body.get("choices") or ():
        if chat:
            msg = c.get("message") or {}
            delta = {"role": "assistant", "content": msg.get("content")}
            if msg.get("tool_calls"):
                delta["tool_calls"] = [dict(t, index=i) for i, t in enumerate(msg["tool_calls"])]
            choice = {"index": c.get("index", 0), "delta": delta, "logprobs": c.get("logprobs"),
                      "finish_reason": c.get("finish_reason")}
        else:
            choice = {"index": c.get("index", 0), "text": c.get("text", ""), "logprobs": c.get("logprobs"),
                      "finish_reason": c.get("finish_reason")}
        events.append({"id": body.get("id"), "object": "chat.completion.chunk" if chat else "text_completion",
                       "created": body.get("created"), "model": body.get("model"), "choices": [choice],
                       "cascade": body.get("cascade")})
    if (parsed.get("stream_options") or {}).get("include_usage"):
        events.append({"id": body.get("id"), "object": "chat.completion.chunk" if chat else "text_completion",
                       "created": body.get("created"), "model": body.get("model"), "choices": [],
                       "usage": body.get("usage")})
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"


def run_cascade(engine_config: EngineConfig, server: ServerConfig, cascade: CascadeConfig) -> int:
    from tokenmill.cluster.router import run_router

    return run_router(CascadeRouter(router_config_for(server, cascade), engine_config, cascade))
