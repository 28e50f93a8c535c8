"""What a sim is started with, and a request as its engine sees it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pdctl.engines.sim.schemas import KVTransferParams
from pdctl.httpserver import DEFAULT_MAX_BODY_BYTES

Role = Literal["prefill", "decode", "hybrid"]


@dataclass(frozen=True)
class SimConfig:
    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    role: Role = "hybrid"
    prefill_ms_per_token: float = 0.05
    decode_ms_per_token: float = 10.0
    startup_delay_s: float = 0.0
    max_num_seqs: int = 256
    kv_cache_blocks: int = 4096
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # Set: pdctl's engine model times every step (vLLM's scheduler, the batch's shape on this hardware).
    hardware: str | None = None
    architecture: str | None = None
    tensor_parallel_size: int = 1
    max_num_batched_tokens: int | None = None  # the hardware profile's vLLM default when unset
    scheduling_policy: Literal["fcfs", "priority"] = "fcfs"
    speed: float | None = None  # steps take this many times the model's time; drawn from its noise when unset
    api_keys: tuple[str, ...] = ()  # none: no key asked
    stream_interval: int = 1  # vLLM's --stream-interval: tokens a stream event carries after the first


@dataclass
class Job:
    """One generation request, as the engine sees it."""

    id: str
    tokens: bytes
    max_tokens: int
    priority: int
    kv: KVTransferParams | None
