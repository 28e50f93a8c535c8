"""The routing decision's cost on the router's hot path: p50 and p99 of Router.plan (target p99 < 100 us) for
every phase policy and routing strategy, in-process (no sockets: this measures the decision alone).

The pool is 2 prefill and 6 decode instances. Prompts share a system prefix and vary in length (up to ~18K
characters); each decision's prefix blocks are recorded on the instances it chose, as the proxy does after a
successful hop, so cache_aware and adaptive match against populated prefix tables. Rounds are interleaved over
all combinations; each decision is timed by the wall clock and by the thread's CPU clock. On a shared machine
the wall-clock p99 counts the time other processes held the CPU; the CPU-clock p99 is the code's own (garbage
collection included). The table also gives, per decision, the function calls made (Python and C, counted by a
profiler in a separate pass), the memory blocks still allocated after it (a leak would show here), its peak of
temporary memory, and the awaits (none: the decision never waits).

    python benchmarks/router_decision.py [--decisions N] [--rounds R]
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
import tracemalloc
from collections import defaultdict
from collections.abc import Callable

from pdctl.router import requests
from pdctl.router.proxy import Route, Router, RouterSettings
from pdctl.router.tokens import TokenCounter
from pdctl.routing.phase import PhasePolicy
from pdctl.routing.pieces import Strategy
from pdctl.routing.pool import Instance, Pool
from pdctl.types import ExecutionInstanceType, PDSeparationConfig

POLICIES = tuple(PhasePolicy.registry)
STRATEGIES = tuple(Strategy.registry)


def pool(prefill: int, decode: int) -> Pool:
    instances = [
        Instance(f"p{i}", ExecutionInstanceType.PREFILLING, f"http://p{i}", 64, healthy=True) for i in range(prefill)
    ]
    instances += [
        Instance(f"d{i}", ExecutionInstanceType.DECODING, f"http://d{i}", 256, healthy=True, in_flight=i % 7)
        for i in range(decode)
    ]
    return Pool(instances)


def workload() -> list[requests.ParsedRequest]:
    rng = random.Random(0)
    system = "You are a helpful assistant that answers questions about documents. " * 8
    prompts = [system + f"question {n}: " + "word " * rng.randint(10, 3600) for n in range(64)]
    return [requests.parse({"model": "m", "prompt": p, "max_tokens": 128}, {}, False, "m") for p in prompts]


def make_router(policy: str, strategy: str) -> Router:
    settings = RouterSettings("m", PDSeparationConfig(routing_policy=policy), routing_strategy=strategy)
    return Router(settings, pool(2, 6), TokenCounter())


def served(router: Router, route: Route) -> None:
    """What the proxy does after the hops succeed: the instances now hold the prompt's prefix."""
    for selection in (route.prefill, route.decode):
        if selection is not None:
            router.tables[selection.instance.id].record(route.routing.prefix_blocks)


def timed(router: Router, parsed: list[requests.ParsedRequest], decisions: int) -> tuple[list[float], list[float]]:
    wall, cpu = [], []
    plan, wall_clock, cpu_clock = router.plan, time.perf_counter_ns, time.thread_time_ns
    for index in range(decisions):
        request = parsed[index % len(parsed)]
        started_cpu, started = cpu_clock(), wall_clock()
        route = plan(request)
        ended = wall_clock()
        cpu.append((cpu_clock() - started_cpu) / 1000)
        wall.append((ended - started) / 1000)
        served(router, route)
    return wall, cpu


def per_decision(router: Router, parsed: list[requests.ParsedRequest], count: int) -> tuple[float, float, float]:
    """Function calls, memory blocks left allocated, and peak temporary KiB, per decision."""
    calls = 0

    def profiler(frame: object, event: str, arg: object) -> None:
        nonlocal calls
        calls += event in ("call", "c_call")

    routes = []
    sys.setprofile(profiler)
    for index in range(count):
        routes.append(router.plan(parsed[index % len(parsed)]))
    sys.setprofile(None)
    del routes
    gc.collect()
    blocks = sys.getallocatedblocks()
    tracemalloc.start()
    for index in range(count):
        router.plan(parsed[index % len(parsed)])  # the route is dropped at once, as the proxy drops it after use
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    gc.collect()
    return calls / count, (sys.getallocatedblocks() - blocks) / count, peak / 1024


def p99(samples: list[float]) -> float:
    return sorted(samples)[int(len(samples) * 0.99)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decisions", type=int, default=4000, help="per combination and round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    parsed = workload()
    combos: list[tuple[str, str]] = [(p, s) for p in POLICIES for s in STRATEGIES]
    routers: dict[tuple[str, str], Router] = {combo: make_router(*combo) for combo in combos}
    for router in routers.values():
        timed(router, parsed, 500)  # warm-up: fills the prefix tables
    wall: defaultdict[tuple[str, str], list[float]] = defaultdict(list)
    cpu: defaultdict[tuple[str, str], list[float]] = defaultdict(list)
    round_p99: defaultdict[tuple[str, str], list[float]] = defaultdict(list)
    for index in range(args.rounds):
        order = combos[index % len(combos) :] + combos[: index % len(combos)]
        for combo in order:
            w, c = timed(routers[combo], parsed, args.decisions)
            wall[combo] += w
            cpu[combo] += c
            round_p99[combo].append(p99(c))
    print(f"{args.rounds} interleaved rounds of {args.decisions} decisions each; 2 prefill + 6 decode instances")
    columns = "wall p50  wall p99   CPU p50   CPU p99  CPU p99 of rounds      calls  blocks  temp KiB  awaits"
    print(f"{'policy':<10} {'strategy':<14} {columns}")
    show: Callable[[float], str] = lambda us: f"{us:7.1f}us"  # noqa: E731
    for combo in combos:
        calls, blocks, temp = per_decision(routers[combo], parsed, 300)
        rounds = round_p99[combo]
        spread = f"{statistics.median(rounds):5.1f} ({min(rounds):.0f}-{max(rounds):.0f})"
        print(
            f"{combo[0]:<10} {combo[1]:<14} {show(statistics.median(wall[combo]))} {show(p99(wall[combo]))} "
            f"{show(statistics.median(cpu[combo]))} {show(p99(cpu[combo]))}  {spread:<17} {calls:9.0f} "
            f"{blocks:7.1f} {temp:9.1f} {0:7d}"
        )


if __name__ == "__main__":
    main()
