"""The engines' own figures, scraped from their /metrics every second: load gauges for routing, and counters
kept for a minute so that rates (prefix-cache hits over queries, tokens/s, NIXL transfers) come from their
deltas over a window.

Which samples are read, and under which names, is the engine adapter's (`EngineAdapter.metrics`). Only the lines
of the families pdctl reads reach prometheus_client's parser: a vLLM /metrics page has hundreds of histogram
buckets pdctl never uses, and parsing them all would cost most of the scrape.
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

from pdctl.engines.adapter import DEFAULT_ENGINE, EngineMetrics, engine_adapter
from pdctl.routing.pool import Instance, Pool

log = logging.getLogger("pdctl.router.scrape")

HISTORY = 62  # one sample a second: a 60 s window and its base
SCRAPE_INTERVAL_S = 1.0

GAUGES = ("running", "waiting", "kv_usage")


@dataclass(slots=True)
class EngineSample:
    """One scrape of one instance: gauges now, counters since the engine started. An engine adapter's
    `metrics` names the sample that fills each field."""

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


def _wanted_lines(text: str, wanted: tuple[str, ...]) -> str:
    """The series pdctl reads, with the labels it sums over (engine, model_name) dropped: the parser's label
    scanner costs tens of microseconds a series, most of a scrape, for labels that are summed away anyway."""
    kept = []
    for line in text.splitlines():
        if not line.startswith(wanted):
            continue
        name, brace, rest = line.partition("{")
        if brace:
            labels, _, value = rest.rpartition("}")
            source = _SOURCE.search(labels)
            line = f'{name}{{source="{source.group(1)}"}}{value}' if source else name + value
        kept.append(line)
    return "\n".join(kept) + "\n"


def parse_engine_metrics(text: str, at: float = 0.0, metrics: EngineMetrics | None = None) -> EngineSample:
    """Sum each series over the engine's label sets (one per engine core under data parallelism); the KV
    cache usage is their mean. `metrics`: the engine's names, the default engine's when None."""
    metrics = metrics or engine_adapter(DEFAULT_ENGINE).metrics
    sums: dict[str, float] = {}
    kv_series = 0
    for family in text_string_to_metric_families(_wanted_lines(text, metrics.names)):
        for sample in family.samples:
            field = metrics.samples.get(sample.name)
            if sample.name == metrics.by_source:
                field = metrics.sources.get(sample.labels.get("source", ""))
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

    def no_progress(self, seconds: float, now: float) -> bool:
        """No new prompt or output token for `seconds`, in samples up to a scrape ago: the engine answers, and
        does nothing. (Its running and waiting gauges cannot tell: an engine core stopped before a request
        reached it never counts that request.)"""
        latest = self.latest
        if latest is None or now - latest.at > 2 * SCRAPE_INTERVAL_S:
            return False
        for sample in reversed(self.samples):
            if sample.prompt_tokens != latest.prompt_tokens or sample.generation_tokens != latest.generation_tokens:
                return False
            if latest.at - sample.at >= seconds:
                return True
        return False

    def busy_share(self, seconds: float) -> float | None:
        """Share of the samples of the window in which the engine had requests running."""
        window = [s for s in self.samples if self.samples[-1].at - s.at < seconds]
        return sum(1 for s in window if s.running > 0) / len(window) if window else None


class EngineTelemetry:
    """Every instance's history, filled by the scrape loop; the router's stats read it."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, metrics: EngineMetrics | None = None):
        self.clock = clock
        self.metrics = metrics or engine_adapter(DEFAULT_ENGINE).metrics
        self.histories: dict[str, EngineHistory] = {}
        self._connections: dict[str, MetricsConnection] = {}

    def record(self, instance: Instance, sample: EngineSample) -> None:
        self.histories.setdefault(instance.id, EngineHistory()).add(sample)
        instance.running, instance.waiting, instance.kv_usage = sample.running, sample.waiting, sample.kv_usage

    def history(self, instance_id: str) -> EngineHistory:
        return self.histories.get(instance_id) or EngineHistory()

    def no_progress(self, instance_id: str, seconds: float) -> bool:
        history = self.histories.get(instance_id)
        return history is not None and history.no_progress(seconds, self.clock())

    def connection(self, instance: Instance) -> MetricsConnection:
        known = self._connections.get(instance.url)
        if known is None:
            # No key: an engine's /metrics answers without its --api-key (vLLM guards /v1, /v2, /inference only).
            known = self._connections[instance.url] = MetricsConnection(f"{instance.url}/metrics")
        return known

    def close(self) -> None:
        for connection in self._connections.values():
            connection.close()
        self._connections.clear()


class EngineRefused(ValueError):
    """The engine answered, with another status than 200."""


class MetricsConnection:
    """One keep-alive HTTP/1.1 connection to an engine's /metrics. A new connection a second per engine costs
    ten times the CPU of the request itself (connect, transport, teardown on both sides)."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        self.host, self.port, self.path = parts.hostname or "127.0.0.1", parts.port or 80, parts.path or "/"
        self.request = f"GET {self.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n".encode()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def get(self, timeout_s: float = 2.0) -> str:
        while True:
            reused = self._writer is not None
            try:
                return await asyncio.wait_for(self._exchange(), timeout_s)
            except EngineRefused:
                raise
            except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
                self.close()  # a half-read answer leaves the connection unusable
                if not reused:
                    raise
                # A kept connection the engine has closed since: once more on a new one.

    async def _exchange(self) -> str:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        reader, writer = self._reader, self._writer
        assert reader is not None
        writer.write(self.request)
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = head[0].split(" ", 2)
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:] if line)}
        body = await self._body(reader, headers)
        if headers.get("connection", "").lower() == "close":
            self.close()
        if len(status) < 2 or status[1] != "200":
            raise EngineRefused(f"{self.path} answered {' '.join(status[1:]) or 'no HTTP'}")
        return body.decode()

    async def _body(self, reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
        if headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                chunks.append((await reader.readexactly(size + 2))[:-2])
            await reader.readuntil(b"\r\n")  # the empty trailer
            return b"".join(chunks)
        if "content-length" in headers:
            return await reader.readexactly(int(headers["content-length"]))
        body = await reader.read(-1)  # neither: the answer ends with the connection
        self.close()
        return body

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


async def scrape_once(telemetry: EngineTelemetry, instance: Instance) -> None:
    try:
        text = await telemetry.connection(instance).get()
        sample = parse_engine_metrics(text, telemetry.clock(), telemetry.metrics)
    except (OSError, TimeoutError, ValueError, IndexError, asyncio.IncompleteReadError) as error:
        log.debug("scrape of %s failed: %s", instance.id, error)
        return
    telemetry.record(instance, sample)


async def scrape_forever(pool: Pool, telemetry: EngineTelemetry, interval_s: float = SCRAPE_INTERVAL_S) -> None:
    try:
        while True:
            await asyncio.gather(*(scrape_once(telemetry, i) for i in pool.all() if i.healthy))
            await asyncio.sleep(interval_s)
    finally:
        telemetry.close()
