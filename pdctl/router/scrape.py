"""The engines' own load figures, scraped from their /metrics: a pure parse and a polling loop."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import httpx

from pdctl.router.pool import Instance, Pool

log = logging.getLogger("pdctl.router.scrape")

GAUGES = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:kv_cache_usage_perc": "kv_usage",
}


@dataclass(slots=True)
class EngineSample:
    running: float = 0.0
    waiting: float = 0.0
    kv_usage: float = 0.0


def parse_engine_metrics(text: str) -> EngineSample:
    """Sum each gauge over the engine's series (one per engine core under data parallelism).

    Reads only the three gauges' sample lines (`name{labels} value`): a full Prometheus parse of the whole
    page cost the daemon more CPU, every second and per engine, than routing a request."""
    values: dict[str, list[float]] = {field: [] for field in GAUGES.values()}
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        name, _, rest = line.partition("{")
        if not rest:
            name, _, rest = line.partition(" ")
        field = GAUGES.get(name.strip())
        if field is not None:
            values[field].append(float(rest.rpartition("}")[2].split()[0] if "}" in rest else rest.split()[0]))
    running, waiting, kv_usage = values["running"], values["waiting"], values["kv_usage"]
    return EngineSample(sum(running), sum(waiting), sum(kv_usage) / len(kv_usage) if kv_usage else 0.0)


async def scrape_once(client: httpx.AsyncClient, instance: Instance) -> None:
    try:
        response = await client.get(f"{instance.url}/metrics")
        if response.status_code != 200:
            return
        sample = parse_engine_metrics(response.text)
    except (httpx.HTTPError, ValueError) as error:
        log.debug("scrape of %s failed: %s", instance.id, error)
        return
    instance.running, instance.waiting, instance.kv_usage = sample.running, sample.waiting, sample.kv_usage


async def scrape_forever(pool: Pool, interval_s: float = 1.0) -> None:
    async with httpx.AsyncClient(timeout=httpx.Timeout(2.0), trust_env=False) as client:
        while True:
            await asyncio.gather(*(scrape_once(client, i) for i in pool.all() if i.healthy))
            await asyncio.sleep(interval_s)
