"""What the servers counted during a run: /metrics of the router and of each engine, before and after,
read only by their Prometheus names (parsed with prometheus_client's parser), and the differences."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from pdctl.auth import Access

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

ROUTER_REQUESTS = "pdctl_router_requests_total"
ROUTER_QUEUE = "pdctl_router_queue_seconds"
PREFIX_HITS = "vllm:prefix_cache_hits_total"
PREFIX_QUERIES = "vllm:prefix_cache_queries_total"
NIXL_TIME = "vllm:nixl_xfer_time_seconds"
NIXL_BYTES = "vllm:nixl_bytes_transferred"
ENGINE_QUEUE = "vllm:request_queue_time_seconds"


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def scrape(server: Access, timeout_s: float = 5.0) -> Samples | None:
    """None when the server has no /metrics (or does not answer): its figures are left out, not zero."""
    try:
        response = httpx.get(
            f"{server.url}/metrics", headers=server.headers, timeout=timeout_s, verify=server.verify, trust_env=False
        )
        return parse(response.text) if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


@dataclass
class Snapshot:
    router: Samples | None
    engines: dict[str, Samples | None] = field(default_factory=dict)


def snapshot(router: Access | None, engine_urls: dict[str, str]) -> Snapshot:
    """Engines answer /metrics without their key (vLLM guards /v1 only)."""
    return Snapshot(
        scrape(router) if router else None, {name: scrape(Access(url)) for name, url in engine_urls.items()}
    )


def _total(samples: Samples | None, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name) if samples else 0.0


def _delta(before: Samples | None, after: Samples | None, name: str) -> float:
    return _total(after, name) - _total(before, name)


def _engines_delta(before: Snapshot, after: Snapshot, name: str) -> float:
    return sum(_delta(before.engines.get(e), after.engines.get(e), name) for e in after.engines)


def _has(snapshot: Snapshot, name: str) -> bool:
    return any(s and any(n == name for n, _ in s) for s in snapshot.engines.values())


def differences(before: Snapshot, after: Snapshot) -> dict[str, Any]:
    """The run's server-side figures; a figure no server exposes is absent rather than 0."""
    figures: dict[str, Any] = {}
    if after.router is not None and any(n == ROUTER_REQUESTS for n, _ in after.router):
        figures["phase_split"] = _phase_split(before.router, after.router)
        count = _delta(before.router, after.router, f"{ROUTER_QUEUE}_count")
        if count:
            figures["router_queue_mean_ms"] = _delta(before.router, after.router, f"{ROUTER_QUEUE}_sum") / count * 1e3
    queries = _engines_delta(before, after, PREFIX_QUERIES)
    if _has(after, PREFIX_QUERIES):
        figures["prefix_cache_queries"] = queries
        figures["prefix_cache_hit_rate"] = _engines_delta(before, after, PREFIX_HITS) / queries if queries else None
    if _has(after, f"{NIXL_TIME}_count"):
        transfers = _engines_delta(before, after, f"{NIXL_TIME}_count")
        figures["nixl_transfers"] = transfers
        figures["nixl_transfer_time_s"] = _engines_delta(before, after, f"{NIXL_TIME}_sum")
        figures["nixl_bytes_transferred"] = _engines_delta(before, after, f"{NIXL_BYTES}_sum")
    if _has(after, f"{ENGINE_QUEUE}_count"):
        count = _engines_delta(before, after, f"{ENGINE_QUEUE}_count")
        if count:
            figures["engine_queue_mean_ms"] = _engines_delta(before, after, f"{ENGINE_QUEUE}_sum") / count * 1e3
    return figures


def _phase_split(before: Samples | None, after: Samples) -> dict[str, dict[str, float]]:
    """Requests the router answered during the run, by phase then outcome."""
    split: dict[str, dict[str, float]] = defaultdict(dict)
    for (name, labels), value in after.items():
        if name != ROUTER_REQUESTS:
            continue
        earlier = (before or {}).get((name, labels), 0.0)
        if value - earlier:
            label = dict(labels)
            split[label.get("phase", "?")][label.get("outcome", "?")] = value - earlier
    return dict(split)
