"""Router throughput and added latency: direct to an engine, through pdctl's router, and through
vllm-router (Rust, `pip install vllm-router`, its --vllm-pd-disaggregation mode), side by side in one run
on the same fast sim backends (no model time: this measures the proxies).

Every request is PD-split (routing_policy: always) so both routers do the two hops. The load generator is
a closed loop of --concurrency clients, each sending non-streamed completions with max_tokens 4.

    python benchmarks/router_throughput.py [--requests N] [--concurrency C] [--vllm-router PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pdctl import lifecycle  # noqa: E402
from pdctl.cluster import plan_profile  # noqa: E402
from pdctl.state import ClusterDir  # noqa: E402

PROMPT = "Benchmark prompt for the router. " * 8


async def load(url: str, requests: int, concurrency: int) -> tuple[float, list[float], int]:
    latencies: list[float] = []
    failures = 0
    queue = iter(range(requests))
    body = {"model": "sim-model", "prompt": PROMPT, "max_tokens": 4}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=30, limits=limits, trust_env=False) as client:

        async def worker() -> None:
            nonlocal failures
            for _ in queue:
                started = time.perf_counter()
                response = await client.post(f"{url}/v1/completions", json=body)
                latencies.append(time.perf_counter() - started)
                failures += response.status_code != 200

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - began, latencies, failures


def report(name: str, elapsed: float, latencies: list[float], failures: int, baseline: float | None) -> float:
    rps = len(latencies) / elapsed
    p50 = statistics.median(latencies) * 1000
    p99 = sorted(latencies)[int(len(latencies) * 0.99)] * 1000
    ratio = f"{rps / baseline:.2f}x" if baseline else "-"
    print(f"{name:<14} {rps:9.0f} {ratio:>9} {p50:9.2f} {p99:9.2f} {failures:7d}")
    return rps


def start_vllm_router(binary: str, port: int, prefill: str, decode: str, log: Path) -> subprocess.Popen[bytes]:
    argv = [binary, "--host", "127.0.0.1", "--port", str(port), "--vllm-pd-disaggregation",
            "--prefill", prefill, "--decode", decode, "--kv-connector", "nixl"]  # fmt: skip
    process = subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit(f"vllm-router did not start; see {log}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--vllm-router", default=shutil.which("vllm-router"), help="the vllm-router binary")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    profile = work / "bench.yaml"
    profile.write_text(
        "name: routerbench\nmodel: {path: sim-model}\ndevice: cpu\n"
        "engine: {kind: sim, sim: {prefill_ms_per_token: 0, decode_ms_per_token: 0}}\n"
        "router: {port: 39000, scheduling_policy: fifo}\nports: {instances: 39001, nixl_side_channel: 39050}\n"
        "pd: {routing_policy: always, prefilling_min_instances: 1, decoding_min_instances: 1}\n"
        "prefill: {tensor_parallel_size: 1, target_batch_size: 1024}\ndecode: {max_parallel_requests: 1024}\n"
    )
    planned = plan_profile(profile)
    cluster_dir = ClusterDir(work / "state", "routerbench")
    started = lifecycle.start(planned, cluster_dir)
    assert lifecycle.wait_ready(started, lambda state: None) == []
    prefill, decode = (i.url for i in planned.plan.instances)
    other = None
    try:
        print(f"{args.requests} requests, {args.concurrency} concurrent, sim backends with no model time")
        print(f"{'path':<14} {'req/s':>9} {'vs direct':>9} {'p50 ms':>9} {'p99 ms':>9} {'failed':>7}")
        asyncio.run(load(decode, 200, args.concurrency))  # warm-up
        direct = report("direct decode", *asyncio.run(load(decode, args.requests, args.concurrency)), None)
        report("pdctl router", *asyncio.run(load("http://127.0.0.1:39000", args.requests, args.concurrency)), direct)
        if args.vllm_router:
            other = start_vllm_router(args.vllm_router, 39100, prefill, decode, work / "vllm-router.log")
            asyncio.run(load("http://127.0.0.1:39100", 200, args.concurrency))
            report("vllm-router", *asyncio.run(load("http://127.0.0.1:39100", args.requests, args.concurrency)), direct)
        else:
            print("vllm-router: not found (pip install vllm-router into a venv and pass --vllm-router PATH)")
    finally:
        if other is not None:
            other.kill()
        lifecycle.down(cluster_dir, grace_s=2)


if __name__ == "__main__":
    main()
