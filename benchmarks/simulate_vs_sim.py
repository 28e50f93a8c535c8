"""`pdctl simulate` against a real-time run of sim-engine processes on the same small scenario.

    python benchmarks/simulate_vs_sim.py

Brings up a sim cluster (one prefill and one decode instance, Llama-3.1-70B at TP 4 on h100-sxm, the router in
front), sends the workload through the router with streamed requests at a fixed concurrency, then simulates the
same requests in virtual time, and prints both side by side with their ratio. The sim processes sleep each
modelled step on a shared machine, so their figures carry that machine's scheduling noise."""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from pdctl.bench.report import percentile
from pdctl.lifecycle import port_owner
from pdctl.profile import load_profile
from pdctl.simulate.run import simulate
from pdctl.simulate.workload import SimRequest

PROFILE = """name: simvsim
model: {{path: meta-llama/Llama-3.1-70B-Instruct}}
device: cpu
engine: {{kind: sim, start_timeout_s: 30, sim: {{hardware: h100-sxm}}}}
router: {{port: {port}, scheduling_policy: fifo}}
ports: {{instances: {instances}, nixl_side_channel: {nixl}}}
pd: {{enabled: true, routing_policy: always, prefilling_min_instances: 1, decoding_min_instances: 1,
      enable_dynamic_scaling: false}}
prefill: {{tensor_parallel_size: 4}}
decode: {{tensor_parallel_size: 4, max_parallel_requests: 64}}
"""
REQUESTS, CONCURRENCY, PROMPT_BYTES, OUTPUT = 48, 8, 1024, 48


def pdctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pdctl", *args], capture_output=True, text=True, timeout=300)


async def one(client: httpx.AsyncClient, url: str, index: int) -> dict[str, Any]:
    prompt = f"{index:06d}" + "x" * (PROMPT_BYTES - 6)
    body = {"model": "meta-llama/Llama-3.1-70B-Instruct", "prompt": prompt, "max_tokens": OUTPUT, "stream": True}
    start = time.perf_counter()
    stamps = []
    async with client.stream("POST", url, json=body) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                stamps.append(time.perf_counter())
    return {"ttft": stamps[0] - start, "itls": [b - a for a, b in itertools.pairwise(stamps)],
            "e2e": stamps[-1] - start}  # fmt: skip


async def drive(url: str, first: int = 0) -> tuple[list[dict[str, Any]], float]:
    queue = list(range(first, first + REQUESTS))
    records: list[dict[str, Any]] = []
    async with httpx.AsyncClient(timeout=120) as client:

        async def worker() -> None:
            while queue:
                records.append(await one(client, url, queue.pop(0)))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        return records, time.perf_counter() - started


def figures(records: list[dict[str, Any]], duration: float) -> dict[str, float]:
    return {
        "median TTFT ms": percentile([r["ttft"] for r in records], 50) * 1000,
        "median ITL ms": percentile([x for r in records for x in r["itls"]], 50) * 1000,
        "median E2E ms": percentile([r["e2e"] for r in records], 50) * 1000,
        "output tok/s": REQUESTS * OUTPUT / duration,
    }


def main() -> None:
    base = next(b for b in range(24000, 60000, 97) if all(port_owner("127.0.0.1", b + i) is None for i in range(4)))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "simvsim.yaml"
        path.write_text(PROFILE.format(port=base, instances=base + 1, nixl=base + 50))
        state = Path(tmp) / "state"
        started = pdctl("up", str(path), "--state-dir", str(state))
        if started.returncode != 0:
            raise SystemExit(started.stdout + started.stderr)
        try:
            # Warm-up with other prompts: the same ones would sit in both engines' prefix caches, and the
            # measured pass would skip the prefills the simulation (cold caches) computes.
            asyncio.run(drive(f"http://127.0.0.1:{base}/v1/completions", first=REQUESTS))
            real, duration = asyncio.run(drive(f"http://127.0.0.1:{base}/v1/completions"))
        finally:
            pdctl("down", "simvsim", "--state-dir", str(state))
        requests = [SimRequest(i, 0.0, PROMPT_BYTES, OUTPUT) for i in range(REQUESTS)]
        result = simulate(load_profile(path), requests, CONCURRENCY)
    simulated = figures([{"ttft": r.ttft, "itls": r.itls, "e2e": r.e2e} for r in result.records],
                        result.metrics["duration"])  # fmt: skip
    measured = figures(real, duration)
    rows = {key: {"sim processes": measured[key], "simulate": simulated[key],
                  "ratio": simulated[key] / measured[key]} for key in measured}  # fmt: skip
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
