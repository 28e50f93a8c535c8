"""The ceiling of `pdctl bench`'s load generator, next to wrk and an httpx client, on one instant backend.

The backend (started here in its own process) answers every POST with a canned chunked SSE stream of
--tokens token events, a usage event and [DONE], optionally --gap-ms apart, so the clients are what is
measured. wrk reads the same responses without parsing SSE (the cheapest possible client: C, no timing per
event); pdctl and httpx parse every event and time it. Each client runs closed-loop at --concurrency for
--requests requests; a second pdctl run holds --streams streams open at once (with --hold-gap-ms between
tokens) to show it keeps that many concurrent streams. (httpx slows down sharply with many connections in
its pool, so it is also run at concurrency 8.)

    python benchmarks/bench_client.py [--requests N] [--concurrency C] [--tokens T] [--streams S]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pdctl.auth import Access  # noqa: E402
from pdctl.bench.client import Progress, StreamClient, run_workload  # noqa: E402
from pdctl.bench.workload import BenchRequest  # noqa: E402
from tests.clusters import free_port_block  # noqa: E402

MODEL = "instant"
HELD_TOKENS = 4  # few, slow tokens: the backend stays cheap while every stream stays open about a second


# ---- the instant backend -------------------------------------------------------------------------------------


def _stream(tokens: int) -> list[bytes]:
    events = [
        json.dumps(
            {
                "id": "x",
                "object": "text_completion",
                "model": MODEL,
                "choices": [{"index": 0, "text": " tok", "finish_reason": None}],
            }
        ).encode()
        for _ in range(tokens)
    ]
    usage = {"prompt_tokens": 8, "completion_tokens": tokens, "total_tokens": 8 + tokens}
    events.append(json.dumps({"id": "x", "choices": [], "usage": usage}).encode())
    events.append(b"[DONE]")
    return [b"data: " + e + b"\n\n" for e in events]


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


class _Backend(asyncio.Protocol):
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    models = json.dumps({"object": "list", "data": [{"id": MODEL, "object": "model", "root": MODEL}]}).encode()

    def __init__(self, events: list[bytes], gap_s: float):
        self.whole = self.head + b"".join(_chunk(e) for e in events) + b"0\r\n\r\n"
        self.events, self.gap_s = events, gap_s
        self.buffer = b""

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].decode("latin-1")
            match = re.search(r"content-length:\s*(\d+)", head, re.IGNORECASE)
            length = int(match.group(1)) if match else 0
            if len(self.buffer) < end + 4 + length:
                return
            self.buffer = self.buffer[end + 4 + length :]
            if head.startswith("GET /v1/models"):
                self.transport.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                    + str(len(self.models)).encode()
                    + b"\r\n\r\n"
                    + self.models
                )
            elif self.gap_s:
                asyncio.get_running_loop().create_task(self._paced())
            else:
                self.transport.write(self.whole)

    async def _paced(self) -> None:
        self.transport.write(self.head)
        for event in self.events:
            await asyncio.sleep(self.gap_s)
            self.transport.write(_chunk(event))
        self.transport.write(b"0\r\n\r\n")


def serve(port: int, tokens: int, gap_ms: float) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        events = _stream(tokens)
        server = await loop.create_server(lambda: _Backend(events, gap_ms / 1000), "127.0.0.1", port, backlog=4096)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def start_backend(port: int, tokens: int, gap_ms: float) -> subprocess.Popen[bytes]:
    argv = [sys.executable, __file__, "--serve", str(port), "--tokens", str(tokens), "--gap-ms", str(gap_ms)]
    process = subprocess.Popen(argv)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            asyncio.run(asyncio.open_connection("127.0.0.1", port))
            return process
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise SystemExit("the instant backend did not start")


# ---- the clients ---------------------------------------------------------------------------------------------


def pdctl_client(url: str, requests: int, concurrency: int) -> tuple[float, int, int]:
    """(requests/s, failures, most streams in flight at once)."""
    work = [BenchRequest(i, "hello", 1, 16) for i in range(requests)]
    peak = 0

    def tick(progress: Progress) -> None:
        nonlocal peak
        peak = max(peak, progress.running)

    async def go():
        client = StreamClient(Access(url))
        try:
            return await run_workload(client, MODEL, work, concurrency, timed=False, on_tick=tick)
        finally:
            client.close()

    results, duration = asyncio.run(go())
    return len(results) / duration, sum(not r.success for r in results), peak


def httpx_client(url: str, requests: int, concurrency: int) -> tuple[float, int, int]:
    import httpx

    body = {"model": MODEL, "prompt": "hello", "max_tokens": 16, "stream": True}
    failures = 0
    queue = iter(range(requests))

    async def go() -> float:
        nonlocal failures
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(timeout=60, limits=limits, trust_env=False) as client:

            async def worker() -> None:
                nonlocal failures
                for _ in queue:
                    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
                        events = 0
                        async for line in response.aiter_lines():
                            if line.startswith("data: ") and line != "data: [DONE]":
                                json.loads(line[6:])
                                events += 1
                        failures += response.status_code != 200 or not events

            began = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return time.perf_counter() - began

    duration = asyncio.run(go())
    return requests / duration, failures, concurrency


def wrk_client(url: str, seconds: float, concurrency: int) -> float | None:
    binary = shutil.which("wrk")
    if binary is None:
        return None
    body = json.dumps({"model": MODEL, "prompt": "hello", "max_tokens": 16, "stream": True})
    script = f'wrk.method = "POST"\nwrk.body = {json.dumps(body)}\nwrk.headers["Content-Type"] = "application/json"\n'
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as handle:
        handle.write(script)
    argv = [
        binary,
        "-t1",
        f"-c{concurrency}",
        f"-d{max(1, round(seconds))}s",
        "-s",
        handle.name,
        f"{url}/v1/completions",
    ]
    output = subprocess.run(argv, capture_output=True, text=True, check=False).stdout
    Path(handle.name).unlink()
    match = re.search(r"Requests/sec:\s*([\d.]+)", output)
    return float(match.group(1)) if match else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--gap-ms", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=16, help="token events per stream")
    parser.add_argument("--streams", type=int, default=1000, help="concurrent streams for the held-open run")
    parser.add_argument("--hold-gap-ms", type=float, default=250.0, help="gap between tokens in the held-open run")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.tokens, args.gap_ms)
        return
    port = free_port_block(2, 24000)
    url = f"http://127.0.0.1:{port}"
    backend = start_backend(port, args.tokens, 0.0)
    try:
        print(
            f"instant backend: {args.tokens} token events per stream; {args.requests} requests, "
            f"concurrency {args.concurrency}, one process each (2-core machine shared with others)"
        )
        print(f"{'client':<28} {'req/s':>9} {'vs wrk':>8} {'events/s':>10} {'failed':>7}")
        pd_rps, pd_failed, _ = pdctl_client(url, args.requests, args.concurrency)
        wrk_rps = wrk_client(url, max(3.0, args.requests / pd_rps), args.concurrency)
        hx_rps, hx_failed, _ = httpx_client(url, 1000, args.concurrency)
        hx8_rps, hx8_failed, _ = httpx_client(url, 1000, 8)
        rows = [
            ("wrk (C, no SSE parsing)", wrk_rps, 0),
            ("pdctl bench client", pd_rps, pd_failed),
            ("httpx AsyncClient stream", hx_rps, hx_failed),
            ("httpx, concurrency 8", hx8_rps, hx8_failed),
        ]
        for name, rps, failed in rows:
            if rps is None:
                print(f"{name:<28} {'(wrk is not installed)':>28}")
                continue
            ratio = f"{rps / wrk_rps:.2f}" if wrk_rps else "-"
            print(f"{name:<28} {rps:9.0f} {ratio:>8} {rps * (args.tokens + 2):10.0f} {failed:7d}")
    finally:
        backend.terminate()
        backend.wait()
    held = start_backend(port + 1, HELD_TOKENS, args.hold_gap_ms)
    try:
        rps, failed, peak = pdctl_client(f"http://127.0.0.1:{port + 1}", args.streams * 4, args.streams)
        print(
            f"held-open streams ({args.hold_gap_ms:g} ms between tokens): pdctl bench kept {peak} streams in "
            f"flight at once (asked {args.streams}); {rps:.0f} req/s, {failed} failed"
        )
    finally:
        held.terminate()
        held.wait()


if __name__ == "__main__":
    main()
