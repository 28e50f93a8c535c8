"""The engines' own load figures, scraped from their /metrics: a pure parse and a polling loop."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

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
    """Sum each gauge over the engine's series (one per engine core under data parallelism)."""
    sample = EngineSample()
    for family in text_string_to_metric_families(text):
        field = GAUGES.get(family.name)
        if field is None:
            continue
        values = [s.value for s in family.samples if s.name == family.name]
        total = sum(values)
        setattr(sample, field, total / len(values) if field == "kv_usage" and values else total)
    return sample


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
