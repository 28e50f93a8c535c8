"""Router throughput and added latency: direct to an engine, through pdctl's router, and through vllm-router
(Rust, `pip install vllm-router`, its --vllm-pd-disaggregation mode), side by side in one run on the same
fast sim backends (no model time: this measures the proxies).

Every request is PD-split (routing_policy: always) so both routers do the two hops; the engines' counters
are read after each round to show that they did (prefill requests and KV pulls per routed request). With
--keys, a second cluster whose router checks API keys (router.api_keys; the load sends one) runs beside the
first: the key check's cost, side by side. The engines of both have their cluster's key, as every launched
engine does: the direct path and vllm-router's clients send it (vllm-router passes it on to the engines if it
forwards the header; if not, its failures column says so). The load
generator is a closed loop of --concurrency keep-alive connections, each sending non-streamed completions
with max_tokens 4. It is a lean raw-socket HTTP/1.1 client, the same for every path: a heavy client (httpx
costs ~1 ms of CPU per request) takes its share of the machine's cores from the routers and the engines,
and hides their differences. Rounds are interleaved (direct, pdctl, vllm-router, in a rotating order), so
machine noise falls on all paths alike; the table gives medians and the spread (min-max) over the rounds.

    python benchmarks/router_throughput.py [--rounds R] [--requests N] [--concurrency C] [--keys]
                                           [--vllm-router PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pdctl import lifecycle  # noqa: E402
from pdctl.auth import bearer  # noqa: E402
from pdctl.cluster import plan_profile  # noqa: E402
from pdctl.plan import Plan  # noqa: E402
from pdctl.state import ClusterDir  # noqa: E402

PROMPT = "Benchmark prompt for the router. " * 8
_PREFILLS = re.compile(r'^vllm:request_success_total\{[^}]*finished_reason="length"[^}]*\} (\S+)', re.M)
_LENGTH = re.compile(rb"content-length:\s*(\d+)")
_PULLS = re.compile(r"^vllm:nixl_xfer_time_seconds_count\{[^}]*\} (\S+)", re.M)
KEY_VARIABLE = "ROUTERBENCH_API_KEY"


@dataclass
class Target:
    """One path under load: where requests go, the router process (none when direct), the engines behind it
    (prefill, decode), and the headers each request carries."""

    url: str
    router: psutil.Process | None
    engines: list[str]
    headers: dict[str, str]


class _Connection(asyncio.Protocol):
    """One keep-alive connection sending one request at a time; answers by Content-Length or chunked."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[int] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        status = _complete(self.buffer)
        if status and self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(status)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(0)

    async def send(self, request: bytes) -> int:
        assert self.transport is not None
        self.buffer.clear()
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return await self.waiter


def _complete(buffer: bytearray) -> int:
    """The status once the whole response is in the buffer, else 0."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return 0
    head = bytes(buffer[:end]).lower()
    length = _LENGTH.search(head)
    if length is None:  # chunked: the last chunk ends the body
        return int(head[9:12]) if buffer.endswith(b"0\r\n\r\n") else 0
    return int(head[9:12]) if len(buffer) >= end + 4 + int(length.group(1)) else 0


@dataclass
class Round:
    rps: float
    p50_ms: float
    p99_ms: float
    failures: int
    # CPU milliseconds per request: the router's process, the prefill and decode engines, the load generator.
    cpu_ms: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    per_request: tuple[float, float] = (0.0, 0.0)  # prefills and KV pulls the engines counted, per request


async def load(url: str, requests: int, concurrency: int, headers: dict[str, str]) -> Round:
    parts = urlsplit(url)
    body = json.dumps({"model": "sim-model", "prompt": PROMPT, "max_tokens": 4}).encode()
    extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    request = (
        f"POST /v1/completions HTTP/1.1\r\nhost: {parts.netloc}\r\ncontent-type: application/json\r\n"
        f"{extra}content-length: {len(body)}\r\n\r\n"
    ).encode() + body
    loop = asyncio.get_running_loop()
    connections = [
        (await loop.create_connection(_Connection, parts.hostname, parts.port))[1] for _ in range(concurrency)
    ]
    latencies: list[float] = []
    failures = 0
    queue = iter(range(requests))

    async def worker(connection: _Connection) -> None:
        nonlocal failures
        for _ in queue:
            started = time.perf_counter()
            status = await connection.send(request)
            latencies.append(time.perf_counter() - started)
            failures += status != 200

    began = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in connections))
    elapsed = time.perf_counter() - began
    for connection in connections:
        assert connection.transport is not None
        connection.transport.close()
    latencies.sort()
    return Round(
        len(latencies) / elapsed, latencies[len(latencies) // 2] * 1000, latencies[int(len(latencies) * 0.99)] * 1000,
        failures,
    )  # fmt: skip


def engine_counts(prefill: str, decode: str) -> tuple[float, float]:
    """Requests the prefill engine finished, and KV pulls the decode engine made."""
    prefilled = _PREFILLS.search(httpx.get(f"{prefill}/metrics", trust_env=False).text)
    pulled = _PULLS.search(httpx.get(f"{decode}/metrics", trust_env=False).text)
    return float(prefilled.group(1)) if prefilled else 0.0, float(pulled.group(1)) if pulled else 0.0


def listener(url: str) -> psutil.Process:
    port = urlsplit(url).port
    for connection in psutil.net_connections(kind="tcp"):
        if connection.laddr and connection.laddr.port == port and connection.status == psutil.CONN_LISTEN:
            return psutil.Process(connection.pid)
    raise SystemExit(f"nothing listens on {url}")


def cpu_seconds(processes: list[psutil.Process | None]) -> list[float]:
    """CPU seconds of the router's process (none when direct), each engine, and this one (the load generator)."""
    seconds = [0.0 if p is None else sum(p.cpu_times()[:4]) for p in processes]
    return [*seconds, time.process_time()]


def measured_round(target: Target, args: argparse.Namespace) -> Round:
    """One round on one path, with the CPU each process spent and what the engines counted."""
    processes = [target.router, *(listener(e) for e in target.engines)]
    counted, cpu = engine_counts(*target.engines), cpu_seconds(processes)
    result = asyncio.run(load(target.url, args.requests, args.concurrency, target.headers))
    spent = [1000 * (a - b) / args.requests for a, b in zip(cpu_seconds(processes), cpu, strict=True)]
    done = [(a - b) / args.requests for a, b in zip(engine_counts(*target.engines), counted, strict=True)]
    result.cpu_ms = (spent[0], spent[1], spent[2], spent[3])
    result.per_request = (done[0], done[1])
    return result


def start_vllm_router(binary: str, port: int, prefill: str, decode: str, log: Path) -> subprocess.Popen[bytes]:
    argv = [binary, "--host", "127.0.0.1", "--port", str(port), "--vllm-pd-disaggregation",
            "--prefill", prefill, "--decode", decode, "--kv-connector", "nixl",
            "--prometheus-port", str(port + 1)]  # fmt: skip
    process = subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    return wait_healthy(process, port, f"vllm-router did not start; see {log}")


def wait_healthy(process: subprocess.Popen[bytes], port: int, failure: str) -> subprocess.Popen[bytes]:
    """`process` once its /health on `port` answers 200 (30 s at most; else it is killed)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1, trust_env=False).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit(failure)


def free_ports(count: int, start: int = 39000) -> int:
    for base in range(start, 60000, 97):
        if all(lifecycle.port_owner("127.0.0.1", base + i) is None for i in range(count)):
            return base
    raise SystemExit("no free block of ports")


def spread(values: list[float], unit: str = "") -> str:
    return f"{statistics.median(values):.2f}{unit} ({min(values):.2f}-{max(values):.2f})"


def run_rounds(targets: dict[str, Target], args: argparse.Namespace) -> None:
    results: defaultdict[str, list[Round]] = defaultdict(list)
    names = list(targets)
    for name in names:
        asyncio.run(load(targets[name].url, 300, args.concurrency, targets[name].headers))  # warm-up
    print(f"{'round':<6} {'path':<14} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'failed':>6} {'prefills':>8} "
          f"{'pulls':>5}   CPU ms/request: router prefill decode client")  # fmt: skip
    for index in range(args.rounds):
        for name in names[index % len(names) :] + names[: index % len(names)]:
            result = measured_round(targets[name], args)
            results[name].append(result)
            cpu = " ".join(f"{ms:6.2f}" for ms in result.cpu_ms)
            prefills, pulls = result.per_request
            print(f"{index:<6} {name:<14} {result.rps:7.0f} {result.p50_ms:7.2f} {result.p99_ms:7.2f} "
                  f"{result.failures:6d} {prefills:8.2f} {pulls:5.2f}   {cpu}")  # fmt: skip
    print(f"\nmedian (min-max) over {args.rounds} interleaved rounds of {args.requests} requests, {args.concurrency} "
          "concurrent; ratios are per round, against the same round's other path")  # fmt: skip
    for name in names:
        rounds = results[name]
        print(f"{name:<14} req/s {spread([r.rps for r in rounds])}  p50 ms {spread([r.p50_ms for r in rounds])}  "
              f"router CPU ms/request {spread([r.cpu_ms[0] for r in rounds])}  "
              f"all CPU ms/request {spread([sum(r.cpu_ms) for r in rounds])}")  # fmt: skip
    pdctl = [r.rps for r in results["pdctl router"]]
    direct = [p / d.rps for p, d in zip(pdctl, results["direct decode"], strict=True)]
    print(f"pdctl / direct       {spread(direct, 'x')}")
    if "pdctl + keys" in results:
        keyed = [k.rps / p for k, p in zip(results["pdctl + keys"], pdctl, strict=True)]
        print(f"pdctl + keys / pdctl req/s {spread(keyed, 'x')}")
    if "vllm-router" in results:
        ratios = [p / v.rps for p, v in zip(pdctl, results["vllm-router"], strict=True)]
        print(f"pdctl / vllm-router  req/s {spread(ratios, 'x')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--vllm-router", default=shutil.which("vllm-router"), help="the vllm-router binary")
    parser.add_argument("--keys", action="store_true", help="also a router with API keys, over engines of its own")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so the clusters go down in `finally`
    base = free_ports(200)
    work = Path(tempfile.mkdtemp())
    clusters: list[ClusterDir] = []
    other = None
    try:
        plan = start_cluster(work, "routerbench", base, "", clusters)
        prefill, decode = (i.url for i in plan.instances)
        engines = [prefill, decode]
        engine_key = bearer(clusters[0].engine_key())
        pdctl = f"http://127.0.0.1:{base}"
        targets = {
            "direct decode": Target(decode, None, engines, engine_key),
            "pdctl router": Target(pdctl, listener(pdctl), engines, {}),
        }
        if args.keys:
            os.environ[KEY_VARIABLE] = key = "routerbench-" + os.urandom(8).hex()
            keyed = start_cluster(
                work, "routerbench-keys", base + 100, f"api_keys: ['${{{KEY_VARIABLE}}}'], ", clusters
            )
            url = f"http://127.0.0.1:{base + 100}"
            targets["pdctl + keys"] = Target(url, listener(url), [i.url for i in keyed.instances], bearer(key))
        if args.vllm_router:
            other = start_vllm_router(args.vllm_router, base + 98, prefill, decode, work / "vllm-router.log")
            url = f"http://127.0.0.1:{base + 98}"
            targets["vllm-router"] = Target(url, psutil.Process(other.pid), engines, engine_key)
        else:
            print("vllm-router: not found (pip install vllm-router into a venv and pass --vllm-router PATH)")
        print("sim backends (engine: sim) with no model time; prefills and pulls: per request, from the engines")
        run_rounds(targets, args)
    finally:
        if other is not None:
            other.kill()
        for cluster_dir in clusters:
            lifecycle.down(cluster_dir, grace_s=2)


def start_cluster(work: Path, name: str, base: int, router_extra: str, started: list[ClusterDir]) -> Plan:
    """A fast sim cluster (one prefill, one decode instance) up on ports from `base`; its state directory is
    added to `started` before it starts, so that it goes down whatever happens."""
    profile = work / f"{name}.yaml"
    profile.write_text(
        f"name: {name}\nmodel: {{path: sim-model}}\ndevice: cpu\n"
        "engine: {kind: sim, sim: {prefill_ms_per_token: 0, decode_ms_per_token: 0}}\n"
        f"router: {{{router_extra}port: {base}, scheduling_policy: fifo}}\n"
        f"ports: {{instances: {base + 1}, nixl_side_channel: {base + 50}}}\n"
        "pd: {routing_policy: always, prefilling_min_instances: 1, decoding_min_instances: 1}\n"
        "prefill: {tensor_parallel_size: 1, target_batch_size: 1024}\ndecode: {max_parallel_requests: 1024}\n"
    )
    planned = plan_profile(profile)
    cluster_dir = ClusterDir(work / "state", name)
    started.append(cluster_dir)
    launched = lifecycle.start(planned, cluster_dir)
    assert lifecycle.wait_ready(launched, lambda state: None) == []
    return planned.plan


if __name__ == "__main__":
    main()
