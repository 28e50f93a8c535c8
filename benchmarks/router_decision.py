"""The routing decision's cost on the router's hot path: p50 and p99 of Router.plan (target p99 < 100 us).

Decides for prompts of several lengths over a pool of prefill and decode instances, for each phase policy
and routing strategy, in-process (no sockets: this measures the decision alone).

    python benchmarks/router_decision.py [--decisions N]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from pdctl.control_plane.types import ExecutionInstanceType, PDSeparationConfig
from pdctl.router import requests
from pdctl.router.pool import Instance, Pool
from pdctl.router.proxy import Router, RouterSettings
from pdctl.router.tokens import TokenCounter


def pool(prefill: int, decode: int) -> Pool:
    instances = [
        Instance(f"p{i}", ExecutionInstanceType.PREFILLING, f"http://p{i}", 64, healthy=True) for i in range(prefill)
    ]
    instances += [
        Instance(f"d{i}", ExecutionInstanceType.DECODING, f"http://d{i}", 256, healthy=True, in_flight=i % 7)
        for i in range(decode)
    ]
    return Pool(instances)


def measure(policy: str, strategy: str, decisions: int) -> tuple[float, float]:
    settings = RouterSettings("m", PDSeparationConfig(routing_policy=policy), routing_strategy=strategy)
    router = Router(settings, pool(2, 6), TokenCounter())
    rng = random.Random(0)
    system = "You are a helpful assistant that answers questions about documents. " * 8
    prompts = [system + "question " * rng.randint(10, 2000) for _ in range(64)]
    parsed = [requests.parse({"model": "m", "prompt": p, "max_tokens": 128}, {}, False, "m") for p in prompts]
    samples = []
    for index in range(decisions):
        started = time.perf_counter_ns()
        router.plan(parsed[index % len(parsed)])
        samples.append((time.perf_counter_ns() - started) / 1000)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decisions", type=int, default=20000)
    args = parser.parse_args()
    print(f"{'policy':<10} {'strategy':<14} {'p50 us':>8} {'p99 us':>8}   (2 prefill + 6 decode instances)")
    for policy in ("threshold", "adaptive"):
        for strategy in ("load_balanced", "round_robin", "cache_aware"):
            p50, p99 = measure(policy, strategy, args.decisions)
            print(f"{policy:<10} {strategy:<14} {p50:8.1f} {p99:8.1f}")


if __name__ == "__main__":
    main()
