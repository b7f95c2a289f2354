"""Typed messages between the HTTP frontend and the engine core, msgpack-encoded over ZMQ.

The frontend sends AddRequest / AbortRequests / EmbedRequest / Shutdown; the engine answers Ready (or Failed)
once, then an Updates batch after every step (new tokens of every request that moved, plus fresh engine
stats), AddRejected when a request fails the engine's own checks, and Embedded for each EmbedRequest. In --inproc mode the same objects travel through
a queue without being encoded.
"""

from __future__ import annotations

import msgspec

from tokenmill.engine.core import EngineStats, RequestUpdate
from tokenmill.sampling_params import SamplingParams

# -- frontend -> engine ------------------------------------------------------------------------------------


class AddRequest(msgspec.Struct, tag="add", array_like=True):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    arrival_time: float = 0.0  # time.monotonic() at HTTP arrival; the engine's queue time starts here
    cache_salt: str | None = None
    tenant: str | None = None  # the fair policy's unit of sharing
    ttft_target: float | None = None  # the request's own target, seconds (the deadline policy)
    expires_at: float | None = None  # time.monotonic() past which the engine aborts it ("timeout")


class EmbedRequest(msgspec.Struct, tag="embed", array_like=True):
    request_id: str
    token_ids: list[list[int]]  # the embedding model's own ids, [CLS]/[SEP] included, within its length limit


class AbortRequests(msgspec.Struct, tag="abort", array_like=True):
    request_ids: list[str]


class Shutdown(msgspec.Struct, tag="shutdown", array_like=True):
    pass


# -- engine -> frontend ------------------------------------------------------------------------------------


class Ready(msgspec.Struct, tag="ready", array_like=True):
    max_model_len: int
    vocab_size: int
    num_blocks: int
    block_size: int
    pid: int
    embedding_dim: int = 0  # 0: no embedding model


class Failed(msgspec.Struct, tag="failed", array_like=True):
    message: str


class AddRejected(msgspec.Struct, tag="rejected", array_like=True):
    request_id: str
    message: str
    param: str | None = None


class Embedded(msgspec.Struct, tag="embedded", array_like=True):
    request_id: str
    embeddings: list[list[float]]
    error: str | None = None


class Updates(msgspec.Struct, tag="updates", array_like=True):
    time: float  # time.monotonic() right after the step
    updates: list[RequestUpdate]
    stats: EngineStats
    step_s: float = 0.0  # how long EngineCore.step() took; 0 for an idle heartbeat


ToEngine = AddRequest | AbortRequests | EmbedRequest | Shutdown
FromEngine = Ready | Failed | AddRejected | Updates | Embedded


def _enc_hook(obj: object) -> object:
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


def to_engine_codec() -> tuple[msgspec.msgpack.Encoder, msgspec.msgpack.Decoder]:
    return msgspec.msgpack.Encoder(enc_hook=_enc_hook), msgspec.msgpack.Decoder(ToEngine)


def from_engine_codec() -> tuple[msgspec.msgpack.Encoder, msgspec.msgpack.Decoder]:
    return msgspec.msgpack.Encoder(enc_hook=_enc_hook), msgspec.msgpack.Decoder(FromEngine)
