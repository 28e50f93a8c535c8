"""Per-request records of a simulation, reported by `pdctl bench`'s own code (pdctl/bench/report.py), so a
simulated run and a measured one print the same metrics, computed the same way."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pdctl.bench import report as bench_report
from pdctl.bench.client import RequestResult


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
    error_kind: str | None = None  # why it was never answered (ClusterSim.run); None: answered


@dataclass(frozen=True, slots=True)
class SLO:
    ttft_ms: float
    tpot_ms: float


def as_measured(record: RequestRecord) -> RequestResult:
    """A simulated request as `pdctl bench` records a measured one."""
    return RequestResult(
        index=record.id,
        start=record.arrival_s,
        success=record.error_kind is None,
        ttft=record.ttft,
        itl=record.itls,
        latency=record.e2e,
        prompt_tokens=record.input_tokens,
        output_tokens=record.output_tokens,
        token_events=record.output_tokens,  # the modelled engine streams each token as it is made
        first_event_tokens=min(1, record.output_tokens),
        error_kind=record.error_kind,
        phase=record.phase or None,
    )


def summarize(records: list[RequestRecord], duration_s: float, slo: SLO | None = None) -> dict[str, Any]:
    """`pdctl bench`'s metrics (vllm bench serve's names and definitions, the same code), goodput under the
    profile's TTFT and TPOT targets, and the share of requests meeting them (goodput_ratio)."""
    slos_ms = {"ttft": slo.ttft_ms, "tpot": slo.tpot_ms} if slo is not None else {}
    result = bench_report.summarize([as_measured(r) for r in records], duration_s, slos_ms)
    if slo is not None:
        good = result["request_goodput"] * result["duration"]
        result["goodput_ratio"] = good / len(records) if records else 0.0
    return result
