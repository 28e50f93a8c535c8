"""`pdctl simulate` against a real-time run of sim-engine processes on the same small scenario.

    python benchmarks/simulate_vs_sim.py [--requests N] [--concurrency C ...]

Brings up a sim cluster (one prefill and one decode instance, Llama-3.1-70B at TP 4 on h100-sxm, the router in
front), sends a workload through the router with streamed requests at each concurrency, then simulates the same
requests in virtual time, and prints both side by side with their ratio. Prompt and output lengths vary
(seeded, +-50 % around 1024 and 48 tokens, as `pdctl simulate --range-ratio 0.5` draws them): requests of one
length would march in lockstep, in both, and a median would land on whichever lockstep group it happened to.

The processes spend real time outside the model: HTTP, the router, the KV read between instances. A run of
the same cluster with zero model time (`engine.sim` with 0 ms per token) measures it first, one request at a
time; half its median TTFT is the simulation's hop latency (`pdctl simulate --hop-ms`), one per hop to an
engine. The sim processes sleep each modelled step on a shared machine, so their figures carry that machine's
scheduling noise."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from router_throughput import free_ports

from pdctl.bench.report import percentile
from pdctl.profile import load_profile
from pdctl.simulate.run import simulate
from pdctl.simulate.workload import SimRequest, WorkloadSpec, generate

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
MODEL = "meta-llama/Llama-3.1-70B-Instruct"
ZERO_TIME = "sim: {{hardware: h100-sxm}}", "sim: {{prefill_ms_per_token: 0, decode_ms_per_token: 0}}"


def pdctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pdctl", *args], capture_output=True, text=True, timeout=300)


async def one(client: httpx.AsyncClient, url: str, request: SimRequest, salt: str) -> dict[str, Any]:
    # The sim engine's tokenizer takes a token per byte; the leading index keeps prompts apart in the caches.
    prompt = f"{salt}{request.id:06d}".ljust(request.input_tokens, "x")
    body = {"model": MODEL, "prompt": prompt, "max_tokens": request.output_tokens, "stream": True}
    start = time.perf_counter()
    stamps = []
    async with client.stream("POST", url, json=body) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                stamps.append(time.perf_counter())
    return {"ttft": stamps[0] - start, "itls": [b - a for a, b in itertools.pairwise(stamps)],
            "e2e": stamps[-1] - start, "tokens": len(stamps)}  # fmt: skip


async def drive(
    url: str, requests: list[SimRequest], concurrency: int, salt: str
) -> tuple[list[dict[str, Any]], float]:
    queue = list(requests)
    records: list[dict[str, Any]] = []
    async with httpx.AsyncClient(timeout=120) as client:

        async def worker() -> None:
            while queue:
                records.append(await one(client, url, queue.pop(0), salt))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return records, time.perf_counter() - started


def figures(records: list[dict[str, Any]], duration: float) -> dict[str, float]:
    return {
        "median TTFT ms": percentile([r["ttft"] for r in records], 50) * 1000,
        "median ITL ms": percentile([x for r in records for x in r["itls"]], 50) * 1000,
        "median E2E ms": percentile([r["e2e"] for r in records], 50) * 1000,
        "output tok/s": sum(r["tokens"] for r in records) / duration,
    }


def measure(text: str, tmp: Path, runs: list[tuple[list[SimRequest], int]]) -> list[tuple[list[dict[str, Any]], float]]:
    """Bring the profile up, warm it with other prompts (the measured ones would then sit in the prefix
    caches, where the simulation starts cold), drive each run, bring it down."""
    base = free_ports(4, 24000)
    path = tmp / "simvsim.yaml"
    path.write_text(text.format(port=base, instances=base + 1, nixl=base + 50))
    state = tmp / "state"
    started = pdctl("up", str(path), "--state-dir", str(state))
    if started.returncode != 0:
        raise SystemExit(started.stdout + started.stderr)
    url = f"http://127.0.0.1:{base}/v1/completions"
    try:
        asyncio.run(drive(url, runs[0][0][:16], 4, salt="warm"))
        return [
            asyncio.run(drive(url, requests, concurrency, salt=f"c{concurrency}")) for requests, concurrency in runs
        ]
    finally:
        pdctl("down", "simvsim", "--state-dir", str(state))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=96, help="per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    spec = WorkloadSpec(num_requests=args.requests, input_tokens=1024, output_tokens=48, range_ratio=0.5,
                        seed=args.seed)  # fmt: skip
    requests = generate(spec)
    with tempfile.TemporaryDirectory() as tmp:
        ((transport, _),) = measure(PROFILE.replace(*ZERO_TIME), Path(tmp), [(requests[:24], 1)])
        hop_s = percentile([r["ttft"] for r in transport], 50) / 2
        real = measure(PROFILE, Path(tmp), [(requests, c) for c in args.concurrency])
        profile = load_profile(Path(tmp) / "simvsim.yaml")
    print(
        f"hop latency from the zero-model-time run: {hop_s * 1000:.1f} ms (half its median TTFT, one request at a time)"
    )
    for concurrency, (records, duration) in zip(args.concurrency, real, strict=True):
        result = simulate(profile, requests, concurrency, hop_s=hop_s)
        simulated = figures([{"ttft": r.ttft, "itls": r.itls, "e2e": r.e2e, "tokens": len(r.itls) + 1}
                             for r in result.records], result.metrics["duration"])  # fmt: skip
        measured = figures(records, duration)
        print(f"concurrency {concurrency}, {len(requests)} requests")
        for key, value in measured.items():
            print(f"  {key:<16} sim processes {value:8.1f}   simulate {simulated[key]:8.1f}   "
                  f"ratio {simulated[key] / value:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
