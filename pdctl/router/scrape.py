"""The engines' own figures, scraped from their /metrics every second: load gauges for routing, and counters
kept for a minute so that rates (prefix-cache hits over queries, tokens/s, NIXL transfers) come from their
deltas over a window.

Only the lines of the families pdctl reads reach prometheus_client's parser: a vLLM /metrics page has hundreds
of histogram buckets pdctl never uses, and parsing them all would cost most of the scrape.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from urllib.parse import urlsplit

from prometheus_client.parser import text_string_to_metric_families

from pdctl.router.pool import Instance, Pool

log = logging.getLogger("pdctl.router.scrape")

HISTORY = 62  # one sample a second: a 60 s window and its base

# sample name -> EngineSample field (vLLM's names; the sim engine exposes the same)
SAMPLES = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:kv_cache_usage_perc": "kv_usage",
    "vllm:prefix_cache_hits_total": "prefix_hits",
    "vllm:prefix_cache_queries_total": "prefix_queries",
    "vllm:prompt_tokens_total": "prompt_tokens",
    "vllm:generation_tokens_total": "generation_tokens",
    "vllm:num_preemptions_total": "preemptions",
    "vllm:nixl_xfer_time_seconds_count": "nixl_transfers",
    "vllm:nixl_xfer_time_seconds_sum": "nixl_seconds",
    "vllm:nixl_bytes_transferred_sum": "nixl_bytes",
    "vllm:nixl_num_failed_transfers_total": "nixl_failed",
}
BY_SOURCE = {
    "local_compute": "prompt_computed",
    "local_cache_hit": "prompt_cache_hit",
    "external_kv_transfer": "prompt_transferred",
}
_WANTED = (*SAMPLES, "vllm:prompt_tokens_by_source_total")
GAUGES = ("running", "waiting", "kv_usage")


@dataclass(slots=True)
class EngineSample:
    """One scrape of one instance: gauges now, counters since the engine started."""

    at: float = 0.0
    running: float = 0.0
    waiting: float = 0.0
    kv_usage: float = 0.0
    prefix_hits: float = 0.0
    prefix_queries: float = 0.0
    prompt_tokens: float = 0.0
    generation_tokens: float = 0.0
    preemptions: float = 0.0
    prompt_computed: float = 0.0
    prompt_cache_hit: float = 0.0
    prompt_transferred: float = 0.0
    nixl_transfers: float = 0.0
    nixl_seconds: float = 0.0
    nixl_bytes: float = 0.0
    nixl_failed: float = 0.0


COUNTERS = tuple(f.name for f in fields(EngineSample) if f.name not in ("at", *GAUGES))


_SOURCE = re.compile(r'source="([^"]*)"')


def _wanted_lines(text: str) -> str:
    """The series pdctl reads, with the labels it sums over (engine, model_name) dropped: the parser's label
    scanner costs tens of microseconds a series, most of a scrape, for labels that are summed away anyway."""
    kept = []
    for line in text.splitlines():
        if not line.startswith(_WANTED):
            continue
        name, brace, rest = line.partition("{")
        if brace:
            labels, _, value = rest.rpartition("}")
            source = _SOURCE.search(labels)
            line = f'{name}{{source="{source.group(1)}"}}{value}' if source else name + value
        kept.append(line)
    return "\n".join(kept) + "\n"


def parse_engine_metrics(text: str, at: float = 0.0) -> EngineSample:
    """Sum each series over the engine's label sets (one per engine core under data parallelism); the KV
    cache usage is their mean."""
    sums: dict[str, float] = {}
    kv_series = 0
    for family in text_string_to_metric_families(_wanted_lines(text)):
        for sample in family.samples:
            field = SAMPLES.get(sample.name)
            if sample.name == "vllm:prompt_tokens_by_source_total":
                field = BY_SOURCE.get(sample.labels.get("source", ""))
            if field is None:
                continue
            sums[field] = sums.get(field, 0.0) + sample.value
            kv_series += field == "kv_usage"
    if kv_series:
        sums["kv_usage"] /= kv_series
    return EngineSample(at=at, **sums)


def delta(new: EngineSample, old: EngineSample) -> EngineSample:
    """Counter increases from old to new; a counter that went down was reset by a restart, so all of its
    new value is increase (as Prometheus's increase() reads it). Gauges are new's."""
    increases = {}
    for name in COUNTERS:
        now, before = getattr(new, name), getattr(old, name)
        increases[name] = now - before if now >= before else now
    return replace(new, **increases)


class EngineHistory:
    """The last minute of one instance's samples."""

    def __init__(self) -> None:
        self.samples: deque[EngineSample] = deque(maxlen=HISTORY)

    def add(self, sample: EngineSample) -> None:
        self.samples.append(sample)

    @property
    def latest(self) -> EngineSample | None:
        return self.samples[-1] if self.samples else None

    def over(self, seconds: float) -> tuple[EngineSample, float] | None:
        """Increases over the last `seconds` (from the newest sample at least that old, else the oldest) and
        the time they span; None before two samples exist."""
        if len(self.samples) < 2:
            return None
        latest = self.samples[-1]
        base = self.samples[0]
        for sample in self.samples:
            if latest.at - sample.at >= seconds:
                base = sample
            else:
                break
        if base is latest:
            return None
        return delta(latest, base), latest.at - base.at

    def busy_share(self, seconds: float) -> float | None:
        """Share of the samples of the window in which the engine had requests running."""
        window = [s for s in self.samples if self.samples[-1].at - s.at < seconds]
        return sum(1 for s in window if s.running > 0) / len(window) if window else None


class EngineTelemetry:
    """Every instance's history, filled by the scrape loop; the router's stats read it."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.histories: dict[str, EngineHistory] = {}

    def record(self, instance: Instance, sample: EngineSample) -> None:
        self.histories.setdefault(instance.id, EngineHistory()).add(sample)
        instance.running, instance.waiting, instance.kv_usage = sample.running, sample.waiting, sample.kv_usage

    def history(self, instance_id: str) -> EngineHistory:
        return self.histories.get(instance_id) or EngineHistory()


async def fetch_text(url: str, timeout_s: float = 2.0) -> str:
    """GET a small page over a fresh loopback connection: cheaper per scrape than a general HTTP client."""
    parts = urlsplit(url)
    reader, writer = await asyncio.wait_for(asyncio.open_connection(parts.hostname, parts.port or 80), timeout_s)
    try:
        writer.write(f"GET {parts.path or '/'} HTTP/1.0\r\nHost: {parts.netloc}\r\n\r\n".encode())
        raw = await asyncio.wait_for(reader.read(-1), timeout_s)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status = head.split(b" ", 2)[1] if head.startswith(b"HTTP/") else b""
    if status != b"200":
        raise ValueError(f"{url} answered {status.decode(errors='replace') or 'no HTTP'}")
    return body.decode()


async def scrape_once(telemetry: EngineTelemetry, instance: Instance) -> None:
    try:
        text = await fetch_text(f"{instance.url}/metrics")
        sample = parse_engine_metrics(text, telemetry.clock())
    except (OSError, TimeoutError, ValueError, IndexError) as error:
        log.debug("scrape of %s failed: %s", instance.id, error)
        return
    telemetry.record(instance, sample)


async def scrape_forever(pool: Pool, telemetry: EngineTelemetry, interval_s: float = 1.0) -> None:
    while True:
        await asyncio.gather(*(scrape_once(telemetry, i) for i in pool.all() if i.healthy))
        await asyncio.sleep(interval_s)
