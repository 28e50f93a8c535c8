"""One request's TTFT on the PD path, cut into its parts, beside the colocated path on the same cores.

    python benchmarks/pd_path.py [--profile profiles/local.yaml] [--requests 12] [--input-len 800]
        [--shm-spin-us N]

Brings up the profile's PD layout, then its colocated layout (every instance HYBRID, same cores), one after
the other, on the real engine. Requests go one at a time (fresh random prompts, so no prefix cache hit), and
each engine's /metrics is read before and after each one, so every histogram's change belongs to that request:
- prefill alone: straight to the prefill instance, before any decode instance has read a KV cache;
- PD through the router: the first request (its NIXL handshake included), then the median of the rest;
- colocated through the router.
Parts: the router and its HTTP hops (the client's TTFT less what the engines report), the prefill instance's
queue and compute, the decode instance's wait for the KV cache (its queue time: the handshake and the pull),
the transfer itself (vllm:nixl_xfer_time_seconds) and its first step.
`--shm-spin-us 0` runs vLLM's own 1 s spin on its shared-memory queues (pdctl's hook off), to show what the
hook changes.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import string
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdctl.bench.compare import LAYOUTS, each_variant
from pdctl.bench.run import Target
from pdctl.engines.vllm_adapter import REMOTE_DECODE
from pdctl.state import state_root

# Histogram sums (seconds) whose change over one request is one of its parts.
SUMS = {
    "queue": "vllm:request_queue_time_seconds_sum",
    "prefill": "vllm:request_prefill_time_seconds_sum",
    "engine_ttft": "vllm:time_to_first_token_seconds_sum",
    "nixl": "vllm:nixl_xfer_time_seconds_sum",
}
Parts = dict[str, float]  # part -> ms


def prompt(length: int) -> str:
    return "".join(random.choice(string.ascii_letters + " ") for _ in range(length))


class Probe:
    """Sends one request at a time and reads the engines' histograms around it."""

    def __init__(self, target: Target, input_len: int):
        self.target, self.input_len = target, input_len
        engine_headers = {"Authorization": f"Bearer {target.engine_key}"} if target.engine_key else {}
        self.engines = httpx.Client(timeout=120, headers=engine_headers)
        self.router = httpx.Client(timeout=120)

    def sums(self) -> dict[str, dict[str, float]]:
        found = {}
        for instance, url in self.target.engines.items():
            text = self.engines.get(f"{url}/metrics").text
            totals = dict.fromkeys(SUMS, 0.0)
            for line in text.splitlines():
                name = line.split("{", 1)[0].split(" ", 1)[0]
                for part, wanted in SUMS.items():
                    if name == wanted:
                        totals[part] += float(line.rsplit(" ", 1)[1])
            found[instance] = totals
        return found

    def measured(self, send: Callable[[], float]) -> Parts:
        """The client's TTFT of one request and each engine's share of it, in ms."""
        before = self.sums()
        ttft_s = send()
        time.sleep(0.3)  # vLLM records a request's histograms as it finishes
        after = self.sums()
        parts = {"client TTFT": 1e3 * ttft_s}
        for instance, totals in after.items():
            role = instance.rsplit("-", 1)[0]  # whichever hybrid instance served it: its role's row
            for part, value in totals.items():
                delta = 1e3 * (value - before[instance][part])
                if delta > 0:
                    parts[f"{role} {part}"] = parts.get(f"{role} {part}", 0.0) + delta
        # The hops run one after the other: what the engines do not account for is the router's and HTTP's.
        engines = sum(v for k, v in parts.items() if k.endswith("engine_ttft"))
        parts["router and HTTP"] = parts["client TTFT"] - engines
        return parts

    def through_router(self) -> float:
        body = {"model": self.target.model, "prompt": prompt(self.input_len), "max_tokens": 8, "stream": True}
        began = time.perf_counter()
        ttft = None
        with self.router.stream("POST", f"{self.target.url}/v1/completions", json=body) as response:
            for line in response.iter_lines():  # read to the end: the request is whole before its figures
                if ttft is None and line.startswith("data: ") and '"text"' in line:
                    ttft = time.perf_counter() - began
        if ttft is not None:
            return ttft
        raise RuntimeError(f"no token from {self.target.url}: {response.status_code}")

    def prefill_alone(self, instance: str) -> float:
        body = {
            "model": self.target.model,
            "prompt": prompt(self.input_len),
            "max_tokens": 1,
            "kv_transfer_params": dict(REMOTE_DECODE),
        }
        began = time.perf_counter()
        self.engines.post(f"{self.target.engines[instance]}/v1/completions", json=body).raise_for_status()
        return time.perf_counter() - began


def median_parts(runs: list[Parts]) -> Parts:
    keys = {k for run in runs for k in run}
    return {k: statistics.median(run.get(k, 0.0) for run in runs) for k in keys}


def pd_runs(probe: Probe, requests: int) -> dict[str, Parts]:
    prefill = next(i for i in probe.target.engines if i.startswith("prefill"))
    alone = [probe.measured(lambda: probe.prefill_alone(prefill)) for _ in range(requests)]
    first = probe.measured(probe.through_router)
    rest = [probe.measured(probe.through_router) for _ in range(requests)]
    return {"prefill alone, before": median_parts(alone), "PD, first": first, "PD, after": median_parts(rest)}


def colocated_runs(probe: Probe, requests: int) -> dict[str, Parts]:
    return {"colocated": median_parts([probe.measured(probe.through_router) for _ in range(requests)])}


ROWS = [
    ("client TTFT", "client TTFT"),
    ("router and HTTP hops", "router and HTTP"),
    ("prefill: queue", "prefill queue"),
    ("prefill: compute", "prefill prefill"),
    ("prefill: engine TTFT", "prefill engine_ttft"),
    ("decode: wait for KV (queue)", "decode queue"),
    ("decode: NIXL transfer", "decode nixl"),
    ("decode: engine TTFT", "decode engine_ttft"),
    ("hybrid: queue", "hybrid queue"),
    ("hybrid: compute", "hybrid prefill"),
    ("hybrid: engine TTFT", "hybrid engine_ttft"),
]


def print_table(columns: dict[str, Parts]) -> None:
    names = list(columns)
    print(f"{'ms (one request at a time)':30}" + "".join(f"{n:>24}" for n in names))
    for label, key in ROWS:
        cells = [columns[n].get(key) for n in names]
        if any(c is not None for c in cells):
            print(f"{label:30}" + "".join(f"{c:>24.1f}" if c is not None else f"{'':>24}" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", type=Path, default=Path("profiles/local.yaml"))
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--input-len", type=int, default=800)
    parser.add_argument("--shm-spin-us", type=int, default=None, help="cpu.shm_spin_us (default: the profile's)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()

    columns: dict[str, Parts] = {}

    def measure(target: Target) -> dict[str, Parts]:
        probe = Probe(target, args.input_len)
        if any(i.startswith("prefill") for i in target.engines):
            return pd_runs(probe, args.requests)
        return colocated_runs(probe, args.requests)

    def with_spin(transform: Callable[[dict[str, Any], Any], dict[str, Any]]):
        def variant(data: dict[str, Any], plan: Any) -> dict[str, Any]:
            data = transform(data, plan)
            if args.shm_spin_us is not None:
                data.setdefault("cpu", {})["shm_spin_us"] = args.shm_spin_us
            return data

        return variant

    variants = [(name, with_spin(transform)) for name, transform in LAYOUTS]
    for _, _, found in each_variant(args.profile, variants, state_root(), measure, _Quiet()):
        columns.update(found)
    spin = "the profile's" if args.shm_spin_us is None else f"{args.shm_spin_us} us"
    print(f"\n{args.profile}: {args.input_len}-character prompts, shm spin {spin}; medians of {args.requests}")
    print_table(columns)
    if args.json:
        args.json.write_text(json.dumps(columns, indent=2))


class _Quiet:
    def print(self, *parts: object) -> None:
        print(*parts, file=sys.stderr)


if __name__ == "__main__":
    main()
