"""vLLM's metric names, counted by the sim and written in Prometheus' text format as vLLM's /metrics writes
them."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

from pdctl.engines.sim.tokens import BLOCK_SIZE

# vLLM's NixlPromMetrics buckets.
XFER_TIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 5.0)
XFER_BYTES_BUCKETS = tuple(float(2 ** (10 + i)) for i in range(1, 25, 2))

Sample = tuple[str, str, float]  # (name suffix, labels, value)


class Histogram:
    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        index = bisect_left(self.bounds, value)
        if index < len(self.bounds):
            self.counts[index] += 1

    def samples(self, labels: str) -> Iterator[Sample]:
        cumulative = 0
        for bound, count in zip(self.bounds, self.counts, strict=True):
            cumulative += count
            yield "_bucket", f'{labels},le="{bound}"', cumulative
        yield "_bucket", f'{labels},le="+Inf"', self.count
        yield "_count", labels, self.count
        yield "_sum", labels, self.sum


class Load(NamedTuple):
    """The gauges: read from the engine when /metrics is rendered, not counted."""

    running: int
    waiting: int
    kv_cache_usage: float


# (name, help, Load attribute)
GAUGES = (
    ("vllm:num_requests_running", "Number of requests in model execution batches.", "running"),
    ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", "waiting"),
    ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", "kv_cache_usage"),
)
# (name, help, Metrics attribute, label of a labelled counter's keys)
COUNTERS = (
    ("vllm:prefix_cache_queries_total", "Prefix cache queries, in terms of number of queried tokens.",
     "prefix_cache_queries", None),
    ("vllm:prefix_cache_hits_total", "Prefix cache hits, in terms of number of cached tokens.",
     "prefix_cache_hits", None),
    ("vllm:prompt_tokens_total", "Number of prefill tokens processed.", "prompt_tokens", None),
    ("vllm:prompt_tokens_by_source_total", "Number of prompt tokens by source.", "prompt_tokens_by_source",
     "source"),
    ("vllm:prompt_tokens_cached_total", "Number of cached prompt tokens (local + external).",
     "prompt_tokens_cached", None),
    ("vllm:generation_tokens_total", "Number of generation tokens processed.", "generation_tokens", None),
    ("vllm:num_preemptions_total", "Cumulative number of preemption from the engine.", "preemptions", None),
    ("vllm:request_success_total", "Count of successfully processed requests.", "request_success",
     "finished_reason"),
    ("vllm:nixl_num_failed_transfers_total", "Number of failed NIXL KV Cache transfers.",
     "nixl_failed_transfers", None),
    ("vllm:nixl_num_kv_expired_reqs_total", "Number of requests that had their KV expire.",
     "nixl_expired_requests", None),
)  # fmt: skip
HISTOGRAMS = (
    ("vllm:nixl_xfer_time_seconds", "Histogram of transfer duration for NIXL KV Cache transfers.",
     "nixl_xfer_time"),
    ("vllm:nixl_bytes_transferred", "Histogram of bytes transferred per NIXL KV Cache transfers.", "nixl_bytes"),
)  # fmt: skip


@dataclass
class Metrics:
    """vLLM's counters and histograms."""

    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    prompt_tokens_by_source: dict[str, int] = field(
        default_factory=lambda: {"local_compute": 0, "local_cache_hit": 0, "external_kv_transfer": 0}
    )
    request_success: dict[str, int] = field(default_factory=lambda: {"stop": 0, "length": 0, "abort": 0})
    # The sim admits by --max-num-seqs alone and never runs out of blocks mid-request, so it never preempts.
    preemptions: int = 0
    nixl_xfer_time: Histogram = field(default_factory=lambda: Histogram(XFER_TIME_BUCKETS))
    nixl_bytes: Histogram = field(default_factory=lambda: Histogram(XFER_BYTES_BUCKETS))
    nixl_failed_transfers: int = 0
    nixl_expired_requests: int = 0

    @property
    def prompt_tokens_cached(self) -> int:
        return self.prompt_tokens_by_source["local_cache_hit"] + self.prompt_tokens_by_source["external_kv_transfer"]

    def count_prompt(self, tokens: int, cache_hit: int, external: int) -> None:
        self.prefix_cache_queries += tokens
        self.prefix_cache_hits += cache_hit
        self.prompt_tokens += tokens
        self.prompt_tokens_by_source["local_cache_hit"] += cache_hit
        self.prompt_tokens_by_source["external_kv_transfer"] += external
        self.prompt_tokens_by_source["local_compute"] += tokens - cache_hit - external

    def render(self, labels: str, load: Load, cache_blocks: int) -> str:
        """Prometheus text format, as vLLM's /metrics writes it (labels: model_name, engine)."""
        lines = ["# pdctl-sim: emulated by engine: sim, not measured on vLLM"]
        for name, doc, attribute in GAUGES:
            _family(lines, name, "gauge", doc, [("", labels, getattr(load, attribute))])
        cache_labels = f'block_size="{BLOCK_SIZE}",engine="0",num_gpu_blocks="{cache_blocks}"'
        _family(lines, "vllm:cache_config_info", "gauge", "Information of the LLMEngine CacheConfig",
                [("", cache_labels, 1)])  # fmt: skip
        for name, doc, attribute, key_label in COUNTERS:
            _family(lines, name, "counter", doc, self._counter_samples(labels, attribute, key_label))
        for name, doc, attribute in HISTOGRAMS:
            _family(lines, name, "histogram", doc, getattr(self, attribute).samples(labels))
        return "\n".join(lines) + "\n"

    def _counter_samples(self, labels: str, attribute: str, key_label: str | None) -> list[Sample]:
        value = getattr(self, attribute)
        if key_label:
            return [("", f'{labels},{key_label}="{key}"', count) for key, count in value.items()]
        return [("", labels, value)]


def engine_labels(model: str) -> str:
    """The labels of every sample, as vLLM's: the served model's name and the engine's index."""
    return f'model_name="{_label_value(model)}",engine="0"'


def _family(lines: list[str], name: str, kind: str, doc: str, samples: Iterable[Sample]) -> None:
    lines.append(f"# HELP {name} {doc}")
    lines.append(f"# TYPE {name} {kind}")
    lines.extend(f"{name}{suffix}{{{labels}}} {float(value)!r}" for suffix, labels, value in samples)


def _label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
