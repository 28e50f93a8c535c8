"""Per-request records and vllm bench serve's metrics over them. The seam for `pdctl bench`'s report: it
needs only ttft, itls and e2e per request (plus token counts)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

PERCENTILES = (50, 90, 99)


@dataclass(slots=True)
class RequestRecord:
    id: int
    input_tokens: int
    output_tokens: int
    arrival_s: float
    ttft: float = 0.0
    itls: list[float] = field(default_factory=list)
    e2e: float = 0.0
    phase: str = ""
    cached_tokens: int = 0
    preemptions: int = 0

    @property
    def tpot(self) -> float:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0


@dataclass(frozen=True, slots=True)
class SLO:
    ttft_ms: float
    tpot_ms: float


def percentile(values: list[float], p: float) -> float:
    """numpy's default (linear) percentile, as vllm bench serve computes it."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _stats(name: str, values_s: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values_s]
    out = {f"mean_{name}_ms": statistics.fmean(ms) if ms else 0.0, f"median_{name}_ms": percentile(ms, 50)}
    for p in PERCENTILES[1:]:
        out[f"p{p}_{name}_ms"] = percentile(ms, p)
    return out


def summarize(records: list[RequestRecord], duration_s: float, slo: SLO | None = None) -> dict[str, Any]:
    """vllm bench serve's result keys (its --save-result JSON names), goodput by --goodput ttft and tpot."""
    output_tokens = sum(r.output_tokens for r in records)
    input_tokens = sum(r.input_tokens for r in records)
    result: dict[str, Any] = {
        "completed": len(records),
        "duration": duration_s,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(records) / duration_s if duration_s else 0.0,
        "output_throughput": output_tokens / duration_s if duration_s else 0.0,
        "total_token_throughput": (input_tokens + output_tokens) / duration_s if duration_s else 0.0,
    }
    if slo is not None:
        good = sum(1 for r in records if r.ttft * 1000 <= slo.ttft_ms and r.tpot * 1000 <= slo.tpot_ms)
        result["request_goodput"] = good / duration_s if duration_s else 0.0
        result["goodput_ratio"] = good / len(records) if records else 0.0
    result |= _stats("ttft", [r.ttft for r in records])
    result |= _stats("tpot", [r.tpot for r in records if r.output_tokens > 1])
    result |= _stats("itl", [itl for r in records for itl in r.itls])
    result |= _stats("e2el", [r.e2e for r in records])
    return result
