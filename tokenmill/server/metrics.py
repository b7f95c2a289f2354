"""Prometheus metrics, `tokenmill:` prefix, vLLM's names where vLLM has one.

Engine-side numbers (running, waiting, KV usage, prefix cache, preemptions, token counters) arrive as a stats
snapshot with every engine step and are exported as they are by a custom collector, so the counters are
the engine's own totals. Latency histograms are derived in the frontend from engine timestamps.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tokenmill.engine.core import EngineStats
from tokenmill.server.admission import LabelLimiter

# `*_created` series double the exposition and nothing reads them (vLLM turns them off too).
disable_created_metrics()

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0,
                    20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 240.0, 480.0)
_ITL_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


class _EngineStatsCollector(Collector):
    def __init__(self, model_name: str):
        self.model_name = model_name
        self.stats: EngineStats | None = None

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        if s is None:
            return
        labels, values = ["model_name"], [self.model_name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(f"tokenmill:{name}", doc, labels=labels)
            g.add_metric(values, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(f"tokenmill:{name}", doc, labels=labels)
            c.add_metric(values, value)
            return c

        yield gauge("num_requests_running", "Requests in the engine's running set.", s.num_running)
        yield gauge("num_requests_waiting", "Requests waiting in the engine (new or preempted).", s.num_waiting)
        yield gauge("kv_cache_usage_perc", "Share of KV blocks held by live requests (1 = full).", s.kv_cache_usage)
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.prefix_cache_queries)
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_cache_hits)
        yield counter("num_preemptions", "Requests preempted to free KV blocks.", s.num_preemptions)
        yield counter("prompt_tokens", "Prompt tokens prefilled.", s.prompt_tokens)
        yield counter("generation_tokens", "Tokens generated.", s.generation_tokens)
        yield counter("engine_steps", "Engine steps (forward passes) run.", s.num_steps)
        yield counter("engine_steps_interrupted", "Steps abandoned part-way for a request that outranked them "
                      "(--interruptible-steps); each was redone.", s.num_interrupted_steps)
        # Speculative decoding, vLLM's names: acceptance rate = accepted / draft tokens.
        yield counter("spec_decode_num_drafts", "Requests' proposal runs verified by the target.", s.spec_num_drafts)
        yield counter("spec_decode_num_draft_tokens", "Speculative tokens proposed and verified.",
                      s.spec_num_draft_tokens)
        yield counter("spec_decode_num_accepted_tokens", "Speculative tokens accepted.", s.spec_num_accepted_tokens)
        per_pos = CounterMetricFamily("tokenmill:spec_decode_num_accepted_tokens_per_pos",
                                      "Speculative tokens accepted, by position in the proposal (0 = first).",
                                      labels=[*labels, "position"])
        for i, n in enumerate(s.spec_accepted_per_pos):
            per_pos.add_metric([*values, str(i)], n)
        yield per_pos
        if s.moe_expert_tokens:  # one series per (MoE layer, expert): bounded by the model's shape
            experts = CounterMetricFamily("tokenmill:moe_expert_tokens", "Tokens routed to each expert, by MoE layer.",
                                          labels=[*labels, "layer", "expert"])
            for layer, counts in s.moe_expert_tokens.items():
                for e, n in enumerate(counts):
                    experts.add_metric([*values, str(layer), str(e)], n)
            yield experts


class ServerMetrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry(auto_describe=True)
        self.engine = _EngineStatsCollector(model_name)
        self.registry.register(self.engine)
        # The standard process_* (CPU seconds, resident memory, open fds), python_info and python_gc_* series.
        ProcessCollector(registry=self.registry)
        for c in (PLATFORM_COLLECTOR, GC_COLLECTOR):
            self.registry.register(c)
        r, labels = self.registry, ["model_name"]
        self.model_name = model_name

        def hist(name: str, doc: str, buckets: tuple) -> Histogram:
            return Histogram(f"tokenmill:{name}", doc, labels, registry=r, buckets=buckets).labels(model_name)

        self.ttft = hist("time_to_first_token_seconds", "Arrival to first token, seconds.", _LATENCY_BUCKETS)
        self.itl = hist("inter_token_latency_seconds", "Time between consecutive tokens of a request, seconds.",
                        _ITL_BUCKETS)
        self.e2e = hist("e2e_request_latency_seconds", "Arrival to finish, seconds.", _LATENCY_BUCKETS)
        self.queue_time = hist("request_queue_time_seconds", "Arrival to first scheduled, seconds.", _LATENCY_BUCKETS)
        self.prefill_time = hist("request_prefill_time_seconds", "First scheduled to first token, seconds.",
                                 _LATENCY_BUCKETS)
        self.decode_time = hist("request_decode_time_seconds", "First token to finish, seconds.", _LATENCY_BUCKETS)
        self.step_time = hist("engine_step_duration_seconds", "Duration of one engine step (forward pass and "
                              "scheduling), seconds.", _ITL_BUCKETS)
        self.prompt_tokens = hist("request_prompt_tokens", "Prompt length of finished requests, tokens.",
                                  _TOKEN_BUCKETS)
        self.generation_tokens = hist("request_generation_tokens", "Output length of finished requests, tokens.",
                                      _TOKEN_BUCKETS)
        self.time_per_output_token = hist("request_time_per_output_token_seconds", "A finished request's decode "
                                          "time over its output tokens after the first, seconds.", _ITL_BUCKETS)
        self.rag_retrieval = hist("rag_retrieval_seconds", "/v1/rag: embedding the question and searching the "
                                  "index, seconds.", _ITL_BUCKETS)
        self.rag_context_tokens = hist("rag_context_tokens", "/v1/rag: the model's tokens of retrieved passages "
                                       "placed in a prompt.", _TOKEN_BUCKETS)
        self.iteration_tokens = hist("iteration_tokens_total", "Tokens (prompt and output) one engine step "
                                     "processed.", _TOKEN_BUCKETS)
        self._last_step_tokens: int | None = None
        self._success = Counter("tokenmill:request_success", "Finished requests by finish reason.",
                                [*labels, "finished_reason"], registry=r)
        self._rejected = Counter("tokenmill:request_rejected", "Requests turned away, by reason.",
                                 [*labels, "reason"], registry=r)
        self.flops = Counter("tokenmill:inference_flops", "Floating-point operations computed for finished "
                             "requests: 2 per active weight per token, plus attention; cached prompt tokens cost "
                             "none (GET /v1/usage has them per tenant).", labels, registry=r)
        for reason in ("stop", "length", "abort", "timeout"):
            self._success.labels(model_name, reason)
        for reason in REJECTION_REASONS:
            self._rejected.labels(model_name, reason)

        # Per priority class and per tenant. Label values are bounded (LabelLimiter): the first
        # MAX_LABEL_VALUES distinct ones keep their name, later ones share "other".
        self.class_label = LabelLimiter(MAX_LABEL_VALUES)
        self.tenant_label = LabelLimiter(MAX_LABEL_VALUES)
        self._by: dict[str, dict[str, Histogram | Counter]] = {}
        for dim in ("class", "tenant"):
            lab = [*labels, "priority_class" if dim == "class" else "tenant"]
            self._by[dim] = {
                "ttft": Histogram(f"tokenmill:{dim}_time_to_first_token_seconds",
                                  f"Arrival to first token, seconds, by {dim}.", lab, registry=r,
                                  buckets=_LATENCY_BUCKETS),
                "queue": Histogram(f"tokenmill:{dim}_request_queue_time_seconds",
                                   f"Arrival to first scheduled, seconds, by {dim}.", lab, registry=r,
                                   buckets=_LATENCY_BUCKETS),
                "rejected": Counter(f"tokenmill:{dim}_request_rejected",
                                    f"Requests turned away by admission control or the queue limits, by {dim} "
                                    "and reason.", [*lab, "reason"], registry=r),
                "preemptions": Counter(f"tokenmill:{dim}_num_preemptions",
                                       f"Preemptions of finished requests, by {dim}.", lab, registry=r),
                "timeouts": Counter(f"tokenmill:{dim}_request_timeouts",
                                    f"Requests aborted past their timeout, by {dim}.", lab, registry=r),
                "generation": Counter(f"tokenmill:{dim}_generation_tokens",
                                      f"Tokens generated, by {dim} (the service each one received).", lab,
                                      registry=r),
            }

    def step(self, stats: EngineStats) -> None:
        """One engine step's stats snapshot: the tokens it processed (prompt + output) into the histogram."""
        total = stats.prompt_tokens + stats.generation_tokens
        if self._last_step_tokens is not None and total > self._last_step_tokens:
            self.iteration_tokens.observe(total - self._last_step_tokens)
        self._last_step_tokens = total

    def exposition(self, prefix: str) -> bytes:
        """The Prometheus text, with series named tokenmill:..., vllm:... or both (vLLM's names, our values)."""
        text = generate_latest(self.registry)
        if prefix == "tokenmill":
            return text
        vllm = text.replace(b"tokenmill:", b"vllm:")
        if prefix == "vllm":
            return vllm
        # both: every prefixed series twice; the unprefixed ones (process_*, python_*) once.
        extra = b"\n".join(line for line in vllm.split(b"\n") if b"vllm:" in line)
        return text + extra + b"\n"

    def success(self, finish_reason: str) -> None:
        self._success.labels(self.model_name, finish_reason).inc()

    def rejected(self, reason: str) -> None:
        self._rejected.labels(self.model_name, reason).inc()

    def labels_for(self, priority: int, tenant: str) -> tuple[str, str]:
        return self.class_label(str(priority)), self.tenant_label(tenant)

    def by(self, what: str, labels: tuple[str, str], value: float = 1.0, reason: str | None = None) -> None:
        """Record one observation (histograms) or increment (counters) for both the class and the tenant."""
        for dim, label in zip(("class", "tenant"), labels, strict=True):
            m = self._by[dim][what]
            child = m.labels(self.model_name, label) if reason is None else m.labels(self.model_name, label, reason)
            if isinstance(m, Histogram):
                child.observe(value)
            elif value:
                child.inc(value)


# Every reason a request can be turned away with (pre-created so dashboards see zeros, not gaps).
# ttft_target / queue_delay: admission control predicted a wait beyond the request's TTFT target or
# --max-queue-delay.
REJECTION_REASONS = ("invalid_request", "unauthorized", "body_too_large", "queue_requests", "queue_tokens",
                     "ttft_target", "queue_delay", "starting", "draining", "engine_dead")
MAX_LABEL_VALUES = 16
