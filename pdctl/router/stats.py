"""The cluster's figures at one moment, built by the daemon from what the router measured of its requests
and what it scraped from the engines (and NVML): what `pdctl status` shows, `/pdctl/stats` serves as JSON,
`/metrics` exposes to Prometheus and the design document's PDMetrics summarises.

Windows are the last 10 s, the last 60 s and the time since the router started ("total"). Every rate is
computed from counter increases over its window, never from a running average.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, Field

from pdctl.cost import CostComparison, load_comparison, usd_per_million_tokens
from pdctl.metrics import Counter, Key, LedgerHistogram, Row, summarize, window_span
from pdctl.router.recorder import RouterMetrics
from pdctl.router.scrape import EngineHistory, EngineTelemetry
from pdctl.routing.pool import Instance, Pool
from pdctl.types import ExecutionInstanceType, PDMetrics, PDSeparationConfig

WINDOWS = {"10s": 10, "60s": 60}
RATE_WINDOW_S = 60  # the window of the instance rates, the hit rate, PDMetrics and the hints

# The design document's troubleshooting cases: (symptom threshold, remedy).
SLOW_DECISION_S = 0.010
LOW_HIT_RATE = 0.30
BUSY_PREFILL = 0.95
MIN_QUERIES_FOR_HIT_RATE = 1000  # tokens: below this a hit rate says nothing yet


class Latency(BaseModel):
    count: float = 0
    mean_ms: float | None = None
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None


class WindowStats(BaseModel):
    span_s: float
    requests: int
    failed: int
    requests_per_s: float
    input_tokens_per_s: float
    output_tokens_per_s: float
    split: dict[str, int]
    slo_attainment: float | None
    goodput_per_s: float
    ttft: Latency
    tpot: Latency
    itl: Latency
    e2e: Latency
    queue: Latency
    prefill_hop: Latency
    decision: Latency


class GpuFigures(BaseModel):
    utilization_percent: float | None = None
    memory_used_mib: float | None = None


class InstanceStats(BaseModel):
    id: str
    role: str
    url: str
    healthy: bool
    draining: bool
    in_flight: int
    running: float
    waiting: float
    kv_usage: float
    prefix_hit_rate: float | None
    prompt_tokens_per_s: float
    generation_tokens_per_s: float
    busy_share: float | None
    preemptions: float
    prefix_hits: float
    prefix_queries: float
    nixl_transfers: float
    nixl_seconds: float
    nixl_bytes: float
    prompt_tokens_by_source: dict[str, float]
    gpu: GpuFigures | None = None


class CostStats(BaseModel):
    devices: int
    gpu_hour_usd: float
    usd_per_million_output_tokens: float | None
    comparison: CostComparison | None
    optimization_percent: float | None


class Trend(BaseModel):
    """One value per second of the last minute, oldest first."""

    requests_per_s: list[float]
    output_tokens_per_s: list[float]
    ttft_p50_ms: list[float | None]


class Hint(BaseModel):
    symptom: str
    measured: str
    remedy: str
    brief: str  # one line of at most 80 characters, for the dashboard


class FaultStats(BaseModel):
    """What the router did about failing instances since it started, by reason or hop."""

    migrations: dict[str, float] = Field(default_factory=dict)  # streams moved mid-stream
    retries: dict[str, float] = Field(default_factory=dict)  # attempts sent again before any byte reached the client
    fallbacks: dict[str, float] = Field(default_factory=dict)  # requests served in another phase than decided

    @property
    def any(self) -> bool:
        return bool(self.migrations or self.retries or self.fallbacks)


class ClusterStats(BaseModel):
    cluster: str
    engine: str
    uptime_s: float
    routing_policy: str
    routing_strategy: str
    ttft_slo_ms: float
    tpot_slo_ms: float
    windows: dict[str, WindowStats]
    instances: list[InstanceStats]
    kv_cache_hit_rate: float | None
    nixl: dict[str, float]
    pd_metrics: PDMetrics
    cost: CostStats
    trend: Trend
    hints: list[Hint]
    faults: FaultStats = Field(default_factory=FaultStats)


@dataclass
class StatsContext:
    """What the router alone does not know: set by the daemon from the profile and plan."""

    cluster: str = "cluster"
    engine: str = "vllm"
    devices: dict[str, int] = field(default_factory=dict)  # instance id -> GPUs (on a CPU host: 1)
    gpu_hour_usd: float = 0.0
    state_root: Path | None = None
    gpus: dict[str, GpuFigures] = field(default_factory=dict)  # filled by the daemon's NVML sampler


def _latency(histogram: LedgerHistogram, series: list[float]) -> Latency:
    figures = summarize(histogram.buckets, series)
    ms = {k: None if v is None else v * 1000 for k, v in figures.items() if k != "count"}
    return Latency(count=figures["count"] or 0, **{f"{k}_ms": v for k, v in ms.items()})


def _histograms(metrics: RouterMetrics, rows: dict[Key, Row]) -> dict[str, Latency]:
    pairs = {
        "ttft": metrics.ttft,
        "tpot": metrics.tpot,
        "itl": metrics.itl,
        "e2e": metrics.e2e,
        "queue": metrics.queue,
        "prefill_hop": metrics.prefill,
        "decision": metrics.decision,
    }
    return {name: _latency(h, h.merged_of(rows)) for name, h in pairs.items()}


def window_stats(metrics: RouterMetrics, seconds: int | None) -> WindowStats:
    """One window's figures; seconds None is the whole time since the router started."""
    if seconds is None:
        span = max(1e-9, metrics.clock() - metrics.started)
        rows = metrics.ledger.totals()
    else:
        span = window_span(metrics.clock, metrics.started, seconds)
        rows = metrics.ledger.window(seconds)
    requests, inputs = metrics.requests.values_of(rows), metrics.input_tokens.values_of(rows)
    outputs, slo = metrics.output_tokens.values_of(rows), metrics.slo.values_of(rows)
    split: dict[str, int] = {phase.value: 0 for phase in ExecutionInstanceType}
    for (phase, _outcome), count in requests.items():
        split[phase] = split.get(phase, 0) + int(count)
    met, missed = slo.get(("met",), 0.0), slo.get(("missed",), 0.0)
    return WindowStats(
        span_s=span,
        requests=int(sum(requests.values())),
        failed=int(sum(count for (_phase, outcome), count in requests.items() if outcome != "ok")),
        requests_per_s=sum(requests.values()) / span,
        input_tokens_per_s=sum(inputs.values()) / span,
        output_tokens_per_s=sum(outputs.values()) / span,
        split=split,
        slo_attainment=met / (met + missed) if met + missed else None,
        goodput_per_s=met / span,
        **_histograms(metrics, rows),
    )


def _rate(history: EngineHistory, name: str) -> float:
    window = history.over(RATE_WINDOW_S)
    return getattr(window[0], name) / window[1] if window else 0.0


def _hit_rate(histories: Iterable[EngineHistory]) -> float | None:
    hits = queries = 0.0
    for history in histories:
        window = history.over(RATE_WINDOW_S)
        if window:
            hits, queries = hits + window[0].prefix_hits, queries + window[0].prefix_queries
    return hits / queries if queries else None


def instance_stats(instance: Instance, history: EngineHistory, gpu: GpuFigures | None) -> InstanceStats:
    latest = history.latest
    window = history.over(RATE_WINDOW_S)
    return InstanceStats(
        id=instance.id,
        role=instance.role.value,
        url=instance.url,
        healthy=instance.healthy,
        draining=instance.draining,
        in_flight=instance.in_flight,
        running=instance.running,
        waiting=instance.waiting,
        kv_usage=instance.kv_usage,
        prefix_hit_rate=_hit_rate([history]),
        prompt_tokens_per_s=_rate(history, "prompt_tokens"),
        generation_tokens_per_s=_rate(history, "generation_tokens"),
        busy_share=history.busy_share(RATE_WINDOW_S),
        preemptions=window[0].preemptions if window else 0.0,
        prefix_hits=latest.prefix_hits if latest else 0.0,
        prefix_queries=latest.prefix_queries if latest else 0.0,
        nixl_transfers=latest.nixl_transfers if latest else 0.0,
        nixl_seconds=latest.nixl_seconds if latest else 0.0,
        nixl_bytes=latest.nixl_bytes if latest else 0.0,
        prompt_tokens_by_source={
            "local_compute": latest.prompt_computed if latest else 0.0,
            "local_cache_hit": latest.prompt_cache_hit if latest else 0.0,
            "external_kv_transfer": latest.prompt_transferred if latest else 0.0,
        },
        gpu=gpu,
    )


def pd_metrics(last_minute: WindowStats, total: WindowStats, instances: list[InstanceStats], hit_rate: float | None,
               optimization: float | None) -> PDMetrics:  # fmt: skip
    """The design document's summary; docs/observability.md, "PDMetrics", defines each field."""
    prefill = [i for i in instances if i.role == ExecutionInstanceType.PREFILLING.value]
    return PDMetrics(
        prefilling_throughput_tokens_per_sec=sum(i.prompt_tokens_per_s for i in prefill),
        prefilling_latency_p99_ms=last_minute.prefill_hop.p99_ms or 0.0,
        decoding_latency_avg_ms=last_minute.tpot.mean_ms or 0.0,
        decoding_latency_p99_ms=last_minute.tpot.p99_ms or 0.0,
        kv_cache_hit_rate=hit_rate or 0.0,
        total_cost_optimization_percent=optimization or 0.0,
        requests_routed_to_prefilling=total.split.get(ExecutionInstanceType.PREFILLING.value, 0),
        requests_routed_to_decoding=total.split.get(ExecutionInstanceType.DECODING.value, 0),
        requests_routed_to_hybrid=total.split.get(ExecutionInstanceType.HYBRID.value, 0),
    )


def hints(last_minute: WindowStats, instances: list[InstanceStats], hit_rate: float | None,
          queries: float) -> list[Hint]:  # fmt: skip
    """The design document's troubleshooting cases, raised only when their symptom is measured."""
    found = []
    slowest = last_minute.decision.p99_ms
    if slowest is not None and slowest > SLOW_DECISION_S * 1000:
        found.append(
            Hint(
                symptom="routing decisions slower than 10 ms",
                measured=f"decision p99 {slowest:.1f} ms over the last minute",
                remedy="cache routing decisions by prompt length, or use the threshold policy with round_robin "
                "(no prefix hashing on the hot path)",
                brief=f"! decision p99 {slowest:.1f} ms > 10 ms: threshold policy + round_robin strategy",
            )
        )
    if hit_rate is not None and queries >= MIN_QUERIES_FOR_HIT_RATE and hit_rate < LOW_HIT_RATE:
        found.append(
            Hint(
                symptom="KV-cache hit rate under 30 %",
                measured=f"prefix-cache hit rate {hit_rate:.0%} over the last minute",
                remedy="raise pd.kv_cache_memory_fraction (0.85 to 0.95) and decode.kv_cache_memory_fraction, "
                "and set pd.kv_cache_eviction_policy: lfu",
                brief=f"! KV hit rate {hit_rate:.0%} < 30 %: kv_cache_memory_fraction 0.95, eviction lfu",
            )
        )
    for instance in instances:
        busy = _busy(instance)
        if instance.role == ExecutionInstanceType.PREFILLING.value and busy is not None and busy > BUSY_PREFILL:
            found.append(
                Hint(
                    symptom=f"prefill instance {instance.id} over 95 % busy",
                    measured=f"{instance.id} busy {busy:.0%} over the last minute",
                    remedy="raise pd.prefilling_max_instances (3 to 6) with pd.enable_dynamic_scaling: true, "
                    "or lower prefill.target_throughput_tokens_per_sec (1000 to 800)",
                    brief=f"! {instance.id} busy {busy:.0%} > 95 %: prefilling_max_instances up, dynamic scaling",
                )
            )
    return found


def _busy(instance: InstanceStats) -> float | None:
    """GPU utilization where NVML reads one, else the share of the last minute the engine had work."""
    if instance.gpu is not None and instance.gpu.utilization_percent is not None:
        return instance.gpu.utilization_percent / 100
    return instance.busy_share


def build(metrics: RouterMetrics, pool: Pool, telemetry: EngineTelemetry, context: StatsContext,
          pd: PDSeparationConfig, strategy: str) -> ClusterStats:  # fmt: skip
    windows = {name: window_stats(metrics, seconds) for name, seconds in WINDOWS.items()}
    total = window_stats(metrics, None)
    windows["total"] = total
    instances = [instance_stats(i, telemetry.history(i.id), context.gpus.get(i.id)) for i in pool.all()]
    histories = [telemetry.history(i.id) for i in pool.all()]
    hit_rate = _hit_rate(histories)
    queries = sum(w[0].prefix_queries for h in histories if (w := h.over(RATE_WINDOW_S)))
    comparison = load_comparison(context.state_root, context.cluster) if context.state_root else None
    optimization = comparison.optimization_percent if comparison else None
    devices = sum(context.devices.values()) or len(instances)
    last_minute = windows["60s"]
    return ClusterStats(
        cluster=context.cluster,
        engine=context.engine,
        uptime_s=metrics.clock() - metrics.started,
        routing_policy=pd.routing_policy if pd.enabled else "disabled",
        routing_strategy=strategy,
        ttft_slo_ms=metrics.ttft_slo_s * 1000,
        tpot_slo_ms=metrics.tpot_slo_s * 1000,
        windows=windows,
        instances=instances,
        kv_cache_hit_rate=hit_rate,
        nixl={
            "transfers": sum(i.nixl_transfers for i in instances),
            "seconds": sum(i.nixl_seconds for i in instances),
            "bytes": sum(i.nixl_bytes for i in instances),
        },
        pd_metrics=pd_metrics(last_minute, total, instances, hit_rate, optimization),
        cost=CostStats(
            devices=devices,
            gpu_hour_usd=context.gpu_hour_usd,
            usd_per_million_output_tokens=usd_per_million_tokens(
                devices, context.gpu_hour_usd, last_minute.output_tokens_per_s
            ),
            comparison=comparison,
            optimization_percent=optimization,
        ),
        trend=Trend(
            requests_per_s=metrics.requests.per_second(),
            output_tokens_per_s=metrics.output_tokens.per_second(),
            ttft_p50_ms=[None if v is None else v * 1000 for v in metrics.ttft.per_second_quantile(0.5)],
        ),
        hints=hints(last_minute, instances, hit_rate, queries),
        faults=FaultStats(
            migrations=_by_label(metrics.migrations),
            retries=_by_label(metrics.retries),
            fallbacks=_by_label(metrics.fallbacks),
        ),
    )


def _by_label(counter: Counter) -> dict[str, float]:
    return {",".join(labels): value for labels, value in counter.values.items()}


# ---- Prometheus exposition of the figures above (the router's /metrics appends it) ----------------------------

INSTANCE_GAUGES = {
    "in_flight": "Requests the router has in flight on the instance.",
    "running": "Requests the engine runs (its own gauge).",
    "waiting": "Requests the engine queues (its own gauge).",
    "kv_usage": "KV-cache usage of the engine, 0 to 1.",
    "prefix_hit_rate": "Prefix-cache hits over queries over the last minute.",
    "prompt_tokens_per_s": "Prompt tokens the engine processed per second over the last minute.",
    "generation_tokens_per_s": "Tokens the engine generated per second over the last minute.",
    "busy_share": "Share of the last minute the engine had requests running.",
    "preemptions": "Preemptions over the last minute.",
    "healthy": "1 while the instance passes its health check.",
}
INSTANCE_COUNTERS = {
    "nixl_transfers": "NIXL KV-cache transfers the engine made.",
    "nixl_seconds": "Seconds the engine's NIXL KV-cache transfers took.",
    "nixl_bytes": "Bytes the engine's NIXL KV-cache transfers moved.",
}
WINDOW_GAUGES = {
    "requests_per_s": "Requests answered per second.",
    "output_tokens_per_s": "Output tokens per second.",
    "input_tokens_per_s": "Prompt tokens of answered requests per second.",
    "goodput_per_s": "Requests per second that met the TTFT and TPOT targets.",
    "slo_attainment": "Share of successful requests that met the TTFT and TPOT targets.",
}
LATENCIES = ("ttft", "tpot", "itl", "e2e", "queue", "prefill_hop", "decision")


Rows = Iterable[tuple[dict[str, str], float | None]]


def _family(name: str, kind: str, help_text: str, rows: Rows) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for labels, value in rows:
        if value is not None:
            text = ",".join(f'{k}="{v}"' for k, v in labels.items())
            lines.append(f"{name}{{{text}}} {float(value)}" if text else f"{name} {float(value)}")
    return lines


def _instance_families(instances: list[InstanceStats]) -> list[str]:
    out: list[str] = []
    for field_name, help_text in INSTANCE_GAUGES.items():
        rows = (({"instance": i.id, "role": i.role}, getattr(i, field_name)) for i in instances)
        out += _family(f"pdctl_instance_{field_name}", "gauge", help_text, rows)
    for field_name, help_text in INSTANCE_COUNTERS.items():
        rows = (({"instance": i.id}, getattr(i, field_name)) for i in instances)
        out += _family(f"pdctl_instance_{field_name}_total", "counter", help_text, rows)
    by_source = (({"instance": i.id, "source": source}, value) for i in instances
                 for source, value in i.prompt_tokens_by_source.items())  # fmt: skip
    out += _family("pdctl_instance_prompt_tokens_total", "counter", "Prompt tokens by source (the engine's counter).",
                   by_source)  # fmt: skip
    gpu = (({"instance": i.id}, i.gpu.utilization_percent) for i in instances if i.gpu)
    return out + _family("pdctl_instance_gpu_utilization_percent", "gauge", "NVML utilization of its GPUs.", gpu)


def _window_families(windows: dict[str, WindowStats]) -> list[str]:
    out: list[str] = []
    for field_name, help_text in WINDOW_GAUGES.items():
        rows = (({"window": name}, getattr(window, field_name)) for name, window in windows.items())
        out += _family(f"pdctl_window_{field_name}", "gauge", help_text, rows)
    latencies = (
        ({"window": name, "metric": metric, "stat": stat}, _seconds(getattr(getattr(window, metric), f"{stat}_ms")))
        for name, window in windows.items()
        for metric in LATENCIES
        for stat in ("mean", "p50", "p90", "p99")
    )
    return out + _family("pdctl_window_latency_seconds", "gauge", "Latency mean and percentiles by window.", latencies)


def _seconds(ms: float | None) -> float | None:
    return None if ms is None else ms / 1000


def exposition(stats: ClusterStats) -> str:
    out = _instance_families(stats.instances) + _window_families(stats.windows)
    for field_name, value in stats.pd_metrics.model_dump().items():
        help_text = f"PDMetrics.{field_name} (docs/observability.md: PDMetrics)."
        out += _family(f"pdctl_pd_{field_name}", "gauge", help_text, [({}, value)])
    cluster = {
        "pdctl_kv_cache_hit_rate": ("Prefix-cache hits over queries, every instance, last minute.",
                                    stats.kv_cache_hit_rate),
        "pdctl_cost_usd_per_million_output_tokens": ("Devices' price over the last minute's output tokens.",
                                                     stats.cost.usd_per_million_output_tokens),
        "pdctl_hints": ("Troubleshooting cases whose symptom is measured now.", len(stats.hints)),
    }  # fmt: skip
    for name, (help_text, value) in cluster.items():
        out += _family(name, "gauge", help_text, [({}, value)])
    return "\n".join(out) + "\n"
