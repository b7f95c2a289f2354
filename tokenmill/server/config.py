"""Server options: everything `tokenmill serve` adds on top of the engine's EngineConfig."""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.config import parse_size
from tokenmill.errors import ConfigError
from tokenmill.server.auth import load_api_keys, parse_priority_range


def _opt(default, help: str, **extra):  # noqa: A002 - 'help' mirrors argparse
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class ExposureConfig:
    """Where a client-facing HTTP app (the server, the router) listens and how it holds against careless and
    hostile clients: who may call it (keys, Host names, browser origins) and how long and how much a client may
    take (headers, body, a stream it does not read, connections)."""

    host: str = _opt("127.0.0.1", "Address to listen on.")
    port: int = _opt(8000, "TCP port to listen on.")
    allowed_hosts: str | None = _opt(
        None, "Comma-separated Host header names accepted (a port may follow each). Default: bound to a loopback "
        "address, only localhost, 127.0.0.1 and [::1], so a web page cannot reach the server by DNS rebinding; "
        "bound elsewhere, any.")
    allowed_origins: str | None = _opt(
        None, "Comma-separated browser origins (e.g. https://app.example.com) whose pages may call this API "
        "(CORS). Default: none, so no web page can read an answer from it.")
    api_key: str | None = _opt(None, "Require 'Authorization: Bearer KEY' on /v1/*, /tokenize and /detokenize "
                                     "(several keys: comma-separated). Prefer --api-key-file or $TOKENMILL_API_KEY: "
                                     "the command line is visible to every user of the machine.")
    api_key_file: str | None = _opt(
        None, "File of API keys, one per line (# comments), each optionally binding its requests' fair-share "
        "tenant and priority range: 'KEY tenant=acme priority=0..5'.")
    protect_all_paths: bool = _opt(
        False, "With API keys: require one on every path but /health (also /metrics, /dashboard, /docs and the "
        "router's /router/* pages).")
    max_body_bytes: int | str = _opt("4MiB", "Largest request body accepted; larger ones get 413.")
    header_timeout: float = _opt(
        10.0, "Seconds a client has to send a request's headers, from connecting or from a request's first byte; "
        "then the connection is closed (a slowloris client holds no connection longer).")
    body_timeout: float = _opt(30.0, "Seconds a client has to send a request's body after its headers (else 408).")
    write_timeout: float = _opt(
        30.0, "Seconds one response write may wait for a client that does not read: then its request is aborted "
        "and its KV blocks freed (a stream's unread output is bounded by the socket buffer meanwhile).")
    max_connections: int = _opt(
        1024, "Most open client connections; requests over it get 503 (keeps file descriptors for the rest).")

    def __post_init__(self) -> None:
        load_api_keys(self.api_key, self.api_key_file)  # an unreadable or malformed key file fails at start-up
        self.max_body_bytes = parse_size(self.max_body_bytes)
        if not 0 <= self.port < 65536:
            raise ConfigError(f"port must be in [0, 65535], got {self.port}")
        if self.max_body_bytes is None or self.max_body_bytes < 1024:
            raise ConfigError("max_body_bytes must be at least 1KiB")
        for name in ("header_timeout", "body_timeout", "write_timeout"):
            if not 0 < getattr(self, name) < float("inf"):
                raise ConfigError(f"{name} must be a positive number of seconds, got {getattr(self, name)}")
        if self.max_connections < 1:
            raise ConfigError("max_connections must be >= 1")


@dataclass
class ServerConfig(ExposureConfig):
    """How the OpenAI-compatible HTTP frontend listens, admits and sheds load."""

    served_model_name: str | None = _opt(None, "Model name clients send and /v1/models lists (default: --model).")
    # Measured on 2 cores: the split ties --inproc at 1 and 64 streams and leads at 16 (BENCHMARKS.md); it
    # also keeps the event loop free of the engine's GIL time and lets an engine crash be seen and restarted.
    inproc: bool = _opt(
        False, "Run the engine loop in a thread of the server process instead of its own process (for comparison).")
    max_queued_requests: int = _opt(
        256, "Most sequences admitted but not yet producing tokens; beyond it requests get 429 with Retry-After.")
    max_queued_tokens: int = _opt(
        262144, "Most prompt tokens admitted but not yet prefilled; beyond it requests get 429 with Retry-After.")
    metrics_prefix: str = _opt(
        "tokenmill", "Prefix of /metrics series: tokenmill (tokenmill:...), vllm (vllm:..., so dashboards and "
        "autoscaling rules written for vLLM find them) or both.", choices=["tokenmill", "vllm", "both"])
    drain_timeout: float = _opt(30.0, "Seconds SIGTERM waits for in-flight requests before aborting them.")
    max_n: int = _opt(64, "Largest `n` (completions per prompt) one request may ask for.")
    max_request_cost: int = _opt(
        1 << 20, "Most work one request may ask for, counted as prompts x n x max_tokens x (1 + logprobs); "
        "past it the request gets 400 before it is admitted, so one request cannot occupy the server for hours.")
    log_requests: bool = _opt(True, "Log one line per finished request.")
    lenient_fields: bool = _opt(
        False, "Accept request fields this server does not know (another vendor's extensions), ignoring them with a "
        "warning, as vLLM does; by default they are a 400 naming the field, so nothing asked for is silently ignored.")
    max_queue_delay: float | None = _opt(
        None, "Admission control: answer 429 (with an honest Retry-After) to a request whose predicted wait "
        "for its first token exceeds this many seconds; requests with a TTFT target (their own `ttft_target` "
        "or their --slo-classes class) are held to the tighter of the two.")
    request_timeout: float | None = _opt(
        None, "Default deadline in seconds for requests that set no `timeout`: past it a request is aborted, "
        "its KV blocks freed, and it is answered with a 408 timeout error (an error event, if streaming).")
    engine_watchdog: float = _opt(
        30.0, "Seconds without a word from the engine (it reports after every step, and once a second when idle) "
        "after which it is taken as wedged: /health answers 503, new requests get 503 and in-flight ones fail "
        "with 503, until it speaks again. Requests' own deadlines are enforced here too, so a wedged engine's "
        "requests still end 408 on time. 0 turns the silence check off.")
    rag_index: str | None = _opt(
        None, "A retrieval index built by `tokenmill rag index`: adds POST /v1/rag/chat/completions, which answers "
        "from the passages it retrieves and cites them. Loads the index's embedding model (as --embedding-model).")
    mock: bool = _opt(False, "Serve a mock engine: the real API, scheduler, prefix cache and metrics, but no model "
                             "(steps sleep for a modelled time and emit ordinary tokens; no torch; of the engine flags "
                             "that shape the model only --dtype matters, for sizing the KV cache). For testing "
                             "routers and autoscalers at scale.")
    mock_base_ms: float = _opt(5.0, "--mock: fixed milliseconds per engine step.")
    mock_prefill_ms_per_token: float = _opt(0.1, "--mock: milliseconds per prefilled prompt token in a step.")
    mock_decode_ms_per_seq: float = _opt(0.5, "--mock: milliseconds per decoding sequence in a step.")
    mock_profile: str | None = _opt(
        None, "--mock: take each step's time from a `tokenmill profile` JSON (this machine's measured step time "
        "for the real model) instead of the three numbers above, so mock replicas stand in for real ones.")
    priority_range: str | None = _opt(
        None, "Range a request's `priority` is clamped into, e.g. '0..10', unless its API key grants its own range "
        "(--api-key-file); default: any 32-bit value.")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.priority_bounds = parse_priority_range(self.priority_range, "priority_range")
        if self.max_queued_requests < 1:
            raise ConfigError("max_queued_requests must be >= 1")
        if self.max_queued_tokens < 1:
            raise ConfigError("max_queued_tokens must be >= 1")
        if self.drain_timeout < 0:
            raise ConfigError("drain_timeout must be >= 0")
        if min(self.mock_base_ms, self.mock_prefill_ms_per_token, self.mock_decode_ms_per_seq) < 0:
            raise ConfigError("mock step times must be >= 0")
        if self.max_n < 1:
            raise ConfigError("max_n must be >= 1")
        if not 0 <= self.engine_watchdog < float("inf"):
            raise ConfigError(f"engine_watchdog must be >= 0 seconds, got {self.engine_watchdog}")
        if self.max_request_cost < 1:
            raise ConfigError("max_request_cost must be >= 1")
        for name in ("max_queue_delay", "request_timeout"):
            v = getattr(self, name)
            if v is not None and not 0 < v < float("inf"):
                raise ConfigError(f"{name} must be a positive number of seconds, got {v}")
