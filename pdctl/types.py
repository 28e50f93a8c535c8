"""The design document's types, with its names and meanings: the one set pdctl is built on.

The profile (``pdctl.profile``) is made of these, the planner reads them and later the router and the
manager do. They validate on assignment because the document's troubleshooting remedies change them on a
running system (``pd_config.prefilling_max_instances = 6``), and a bad value must fail there, not later.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

KVCacheStorage = Literal["gpu", "cpu"]
KVCacheEvictionPolicy = Literal["lru", "lfu"]
_UNSET = object()


class _ConfigModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def __setattr__(self, name: str, value: Any) -> None:
        # pydantic runs a model's "after" validators once the new value is in place and leaves it there when
        # they fail; a remedy applied to a running system must leave the config as it was instead.
        before = self.__dict__.get(name, _UNSET)
        try:
            super().__setattr__(name, value)
        except ValidationError:
            if before is not _UNSET:
                self.__dict__[name] = before
            raise


class PrefillingConfig(_ConfigModel):
    """How prefill instances are run: large batches of prompt tokens, chunked."""

    target_batch_size: int = Field(64, ge=1, description="vLLM --max-num-seqs of a prefill instance")
    target_throughput_tokens_per_sec: float = Field(
        1000.0, gt=0, description="prompt tokens/s one prefill instance should sustain (router and scaler goal)"
    )
    tensor_parallel_size: int = Field(4, ge=1)
    pipeline_parallel_size: int = Field(1, ge=1)
    enable_chunked_prefill: bool = True
    max_chunk_size_tokens: int = Field(4096, ge=16, description="vLLM --max-num-batched-tokens")


# The design document spells it this way in its imports; users copy that code, so both names work.
PreffillingConfig = PrefillingConfig


class DecodingConfig(_ConfigModel):
    """How decode instances are run: many concurrent sequences at a per-token latency target."""

    target_latency_ms: float = Field(50.0, gt=0, description="per output token (TPOT) goal")
    target_tokens_per_sec_per_gpu: float = Field(100.0, gt=0)
    tensor_parallel_size: int = Field(1, ge=1)
    pipeline_parallel_size: int = Field(1, ge=1)
    enable_prefix_caching: bool = True
    max_parallel_requests: int = Field(200, ge=1, description="vLLM --max-num-seqs of a decode instance")
    kv_cache_memory_fraction: float = Field(0.85, gt=0, le=1.0, description="vLLM --gpu-memory-utilization")


class PDSeparationConfig(_ConfigModel):
    """Whether and how requests are split between prefill and decode pools."""

    enabled: bool = True
    enable_dynamic_scaling: bool = True
    prefilling_min_instances: int = Field(1, ge=0)
    prefilling_max_instances: int = Field(3, ge=0)
    decoding_min_instances: int = Field(2, ge=0)
    decoding_max_instances: int = Field(6, ge=0)
    # A registered phase policy's name (pdctl.routing.phase). Checked where the registry is known: by the profile
    # and the public API's config (their PDSpec), and by the router when it builds the policy.
    routing_policy: str = "adaptive"
    prefilling_threshold_input_tokens: int = Field(800, ge=0)
    prefilling_threshold_ratio: float = Field(4.0, ge=0)
    kv_cache_storage: KVCacheStorage = "gpu"
    kv_cache_eviction_policy: KVCacheEvictionPolicy = "lru"
    kv_cache_memory_fraction: float = Field(0.85, gt=0, le=1.0)
    # Views of the profile's `prefill` and `decode` sections (the document reaches them through here, as in
    # `pd_config.decoding_config.kv_cache_memory_fraction = 0.95`); the profile links them, so they are never
    # written twice. A config made on its own gets defaults, so that code works on it too.
    prefilling_config: PrefillingConfig = Field(default_factory=PrefillingConfig, exclude=True)
    decoding_config: DecodingConfig = Field(default_factory=DecodingConfig, exclude=True)

    @model_validator(mode="after")
    def _bounds_are_ordered(self) -> Self:
        for pool in ("prefilling", "decoding"):
            low = getattr(self, f"{pool}_min_instances")
            high = getattr(self, f"{pool}_max_instances")
            if low > high:
                raise ValueError(f"{pool}_min_instances ({low}) is above {pool}_max_instances ({high})")
        return self


class ExecutionInstanceType(StrEnum):
    PREFILLING = "PREFILLING"
    DECODING = "DECODING"
    HYBRID = "HYBRID"


class ExecutionInstance(_ConfigModel):
    """One engine instance: launched by pdctl on this host, or attached to (``launch: false``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    instance_id: str = Field(alias="id", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
    instance_type: ExecutionInstanceType = Field(alias="type")
    host: str = "127.0.0.1"
    port: int | None = Field(None, ge=1, le=65535, description="assigned from ports.instances when unset")
    model_name: str | None = Field(None, description="the profile's model when unset")
    gpu_count: int | None = Field(
        None, ge=1, description="GPUs owned; a multiple of tp x pp (the rest is data parallel)"
    )
    tensor_parallel_size: int | None = Field(None, ge=1, description="the role's config when unset")
    pipeline_parallel_size: int | None = Field(None, ge=1, description="the role's config when unset")
    launch: bool = Field(True, description="false: attach to an engine already running at host:port")
    prefilling_config: PrefillingConfig | None = None
    decoding_config: DecodingConfig | None = None

    @model_validator(mode="after")
    def _gpu_count_fits_parallelism(self) -> Self:
        if self.gpu_count is not None and self.tensor_parallel_size and self.pipeline_parallel_size:
            per_replica = self.tensor_parallel_size * self.pipeline_parallel_size
            if self.gpu_count % per_replica:
                raise ValueError(
                    f"gpu_count {self.gpu_count} is not a multiple of tensor_parallel_size x "
                    f"pipeline_parallel_size = {per_replica}"
                )
        return self


class RequestPriority(IntEnum):
    """Lower value is served first, as vLLM's priority scheduling orders requests."""

    CRITICAL = 0
    HIGH = 1
    NORMAL = 2
    LOW = 3


class RequestMetadata(BaseModel):
    """What the control plane knows of a request; the document adds ``prompt`` after construction."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    request_id: str
    priority: RequestPriority = RequestPriority.NORMAL
    slo_deadline_ms: float | None = Field(None, gt=0)
    max_tokens: int | None = Field(None, ge=1)
    input_tokens: int | None = Field(None, ge=0)


class PDMetrics(BaseModel):
    """The figures the document's monitoring loop prints; the observability layer fills them."""

    model_config = ConfigDict(validate_assignment=True)

    prefilling_throughput_tokens_per_sec: float = 0.0
    prefilling_latency_p99_ms: float = 0.0
    decoding_latency_avg_ms: float = 0.0
    decoding_latency_p99_ms: float = 0.0
    kv_cache_hit_rate: float = 0.0
    total_cost_optimization_percent: float = 0.0
    requests_routed_to_prefilling: int = 0
    requests_routed_to_decoding: int = 0
    requests_routed_to_hybrid: int = 0
