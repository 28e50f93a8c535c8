"""What collecting metrics costs: (1) the CPU the router's recorder spends on one request, on against off, in
a tight loop, and (live) timed around each call inside a router under load; (2) the router's requests/s with
its per-request metrics on against off, router processes started alike in front of the same instances, in
interleaved rounds, with an A/A control (a second router with metrics on) in the same rounds; (3) the CPU one
scraper spends reading /metrics of 50 sim instances every second.

    python benchmarks/metrics_overhead.py [--rounds N] [--requests N] [--concurrency C] [--engines N]
        [--backend responder|sim] [--only record|live|throughput|scrape]

Behind the routers in (2), by default, is benchmarks/responder.py: it answers each hop in a few tens of
microseconds, so the router is the bottleneck and requests/s is its own. Sim engines (--backend sim) are heavy
enough that the router waits on them at times, and requests/s then carries their jitter. The A/A control's
ratio is what the harness itself cannot resolve on the machine at the time.

Targets (issue "Observability"): requests/s with metrics on within 3 % of off; scraping 50 instances every
second under 5 % of one core.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from router_throughput import free_ports, load, wait_healthy  # noqa: E402

from pdctl import lifecycle  # noqa: E402
from pdctl.cluster import plan_profile  # noqa: E402
from pdctl.daemon import DaemonInput  # noqa: E402
from pdctl.router.recorder import DisabledRecorder, RouterMetrics  # noqa: E402
from pdctl.router.scrape import EngineTelemetry, scrape_forever  # noqa: E402
from pdctl.router.server import RouterService, build_router, freeze_startup_heap, use_fast_event_loop  # noqa: E402
from pdctl.routing.pool import Instance, Pool  # noqa: E402
from pdctl.state import ClusterDir  # noqa: E402

PROFILE = """\
name: {name}
model: {{path: sim-model}}
device: cpu
engine: {{kind: sim, sim: {{prefill_ms_per_token: 0, decode_ms_per_token: 0}}}}
router: {{port: {port}, scheduling_policy: fifo}}
ports: {{instances: {first}, nixl_side_channel: {side}}}
pd: {{routing_policy: always, prefilling_min_instances: {prefill}, prefilling_max_instances: {prefill},
     decoding_min_instances: {decode}, decoding_max_instances: {decode}, enable_dynamic_scaling: false}}
prefill: {{tensor_parallel_size: 1, target_batch_size: 1024}}
decode: {{max_parallel_requests: 1024}}
"""


def plan_cluster(work: Path, name: str, port: int, prefill: int, decode: int):
    # Ports below Linux's ephemeral range (32768+): the rounds' connections leave ports there in TIME_WAIT,
    # and a later block of 500 free ones was not to be found.
    port = free_ports(prefill + decode + 501, port)
    profile = work / f"{name}.yaml"
    text = PROFILE.format(name=name, port=port, first=port + 1, side=port + 500, prefill=prefill, decode=decode)
    profile.write_text(text)
    return plan_profile(profile)


def start_responders(planned, processes: int) -> list[subprocess.Popen[bytes]]:
    """benchmarks/responder.py on the plan's instance ports, spread over `processes` processes."""
    ports = [instance.port for instance in planned.plan.instances]
    started = [
        subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "responder.py"), *map(str, ports[i::processes])])
        for i in range(processes)
    ]
    try:
        for process, first in zip(started, ports, strict=False):
            wait_healthy(process, first, "a responder did not start")
    except SystemExit:
        for process in started:
            process.kill()
        raise
    return started


def start_cluster(work: Path, name: str, port: int, prefill: int, decode: int):
    planned = plan_cluster(work, name, port, prefill, decode)
    cluster_dir = ClusterDir(work / "state", name)
    started = lifecycle.start(planned, cluster_dir)
    failures = lifecycle.wait_ready(started, lambda state: None)
    if failures:
        lifecycle.down(cluster_dir, grace_s=2)
        raise SystemExit(f"the sim cluster did not start: {failures}")
    return planned, cluster_dir


async def start_service(profile, plan, port: int) -> RouterService:
    """A router over the plan's instances, all taken as healthy, started as the daemon starts it."""
    service = RouterService(build_router(profile, plan), "127.0.0.1", port)
    for instance in service.router.pool.all():
        instance.healthy = True
    await service.start()
    freeze_startup_heap()
    return service


def serve_router(given_file: Path, port: int, metrics: bool) -> None:
    """One router over the cluster's instances, in a process of its own, on the daemon's event loop: the two
    routers compared differ only in the profile's `router.metrics`."""
    given = DaemonInput.model_validate_json(given_file.read_bytes())
    given.profile.router.metrics = metrics

    async def run() -> None:
        await start_service(given.profile, given.plan, port)
        await asyncio.Event().wait()

    use_fast_event_loop()
    asyncio.run(run())


def start_router(work: Path, planned, port: int, metrics: bool, core: int | None) -> subprocess.Popen[bytes]:
    given = work / "given.json"
    given.write_text(DaemonInput(profile=planned.profile, plan=planned.plan).model_dump_json())
    argv = [sys.executable, __file__, "--serve-router", str(given), str(port), "on" if metrics else "off"]
    # One hash seed for every router: dicts laid out alike, one source of process-to-process bias fewer.
    process = subprocess.Popen(argv, start_new_session=True, env={**os.environ, "PYTHONHASHSEED": "0"})
    if core is not None:
        psutil.Process(process.pid).cpu_affinity([core])
    return wait_healthy(process, port, f"the router with metrics {'on' if metrics else 'off'} did not start")


def reserve_router_core() -> int | None:
    """With 8 cores or more, the routers get one core to themselves (they run one at a time), its hyperthread
    siblings left idle, and everything else (engines, load generator) the other cores: the scheduler moving a
    router between busy cores, an engine landing on its core or on its sibling, was most of the round-to-round
    spread in requests/s."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cores) < 8:
        return None
    router = cores[-1]
    reserved = {router} | siblings(router)
    os.sched_setaffinity(0, [core for core in cores if core not in reserved])  # inherited by the engines
    return router


def siblings(core: int) -> set[int]:
    """The hyperthreads sharing `core`'s physical core (Linux's topology, e.g. "15,31" or "14-15")."""
    path = Path(f"/sys/devices/system/cpu/cpu{core}/topology/thread_siblings_list")
    if not path.is_file():
        return set()
    found: set[int] = set()
    for part in path.read_text().strip().split(","):
        low, _, high = part.partition("-")
        found.update(range(int(low), int(high or low) + 1))
    return found


def throughput(args: argparse.Namespace, work: Path, recording_us: float | None) -> None:
    # Requests/s shows the router's own cost only where the router is the bottleneck: behind sim engines
    # (--backend sim) that takes --engines N per role and the cores for them; behind the responder (default)
    # a few tens of microseconds a hop leave the router alone on the critical path.
    core = reserve_router_core()
    if args.backend == "responder":
        planned = plan_cluster(work, "metricson", 14200, args.engines, args.engines)
        responders = start_responders(planned, args.responders)

        def stop_backends() -> None:
            for responder in responders:
                responder.kill()
    else:
        planned, cluster_dir = start_cluster(work, "metricson", 14200, args.engines, args.engines)

        def stop_backends() -> None:
            lifecycle.down(cluster_dir, grace_s=2)

    # Several routers per arm: one process can run a few per cent faster or slower than its twin (where its
    # objects landed in memory), a bias no number of rounds removes. The hash seed is fixed for all of them.
    routers = {f"{arm} #{n + 1}": metrics for n in range(args.routers_per_arm)
               for arm, metrics in (("on", True), ("off", False))}  # fmt: skip
    first = free_ports(len(routers), planned.plan.router.port + 300)
    urls = {name: f"http://127.0.0.1:{first + index}" for index, name in enumerate(routers)}
    processes: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for index, (name, metrics) in enumerate(routers.items()):
            processes[name] = start_router(work, planned, first + index, metrics, core)
        for url in urls.values():
            asyncio.run(load(url, 300, args.concurrency))  # warm them
        rps: dict[str, list[float]] = {name: [] for name in urls}
        # The router process's own CPU per request: what collecting adds, without the noise that the engines
        # and the load generator sharing the cores put into requests/s.
        cpu_us: dict[str, list[float]] = {name: [] for name in urls}
        # How busy the router's core was: near 100 % the router bounds requests/s, and the ratio is its cost.
        busy: dict[str, list[float]] = {name: [] for name in urls}
        names = list(urls)
        for round_index in range(args.rounds):
            # Each router takes each place in the order in turn: a machine slowing down within a round hits all
            # alike over the rounds.
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                before, began = cpu_seconds(processes[name].pid), time.monotonic()
                measured = asyncio.run(load(urls[name], args.requests, args.concurrency))
                assert measured.failures == 0, f"{name}: {measured.failures} failed requests"
                used = cpu_seconds(processes[name].pid) - before
                rps[name].append(measured.rps)
                cpu_us[name].append(used / args.requests * 1e6)
                busy[name].append(used / (time.monotonic() - began))
        print(f"router requests/s, {args.rounds} interleaved rounds of {args.requests} requests, "
              f"{args.concurrency} concurrent, PD two hops on {args.engines}+{args.engines} "
              f"{'responder instances' if args.backend == 'responder' else 'sim engines with no model time'}, "
              f"event loop {'uvloop' if use_fast_event_loop() else 'asyncio'}, {args.routers_per_arm} routers "
              f"with metrics on and as many off, "
              f"{f'all on core {core} alone' if core is not None else 'no core reserved (< 8 cores)'}")  # fmt: skip
        for name, values in rps.items():
            print(f"  metrics {name:<6} median {statistics.median(values):7.0f}  core busy, median "
                  f"{statistics.median(busy[name]):.0%}")  # fmt: skip
        print_ratios("requests/s", rps, "(target >= 0.97)")
        for name, values in cpu_us.items():
            print(f"  metrics {name:<6} router CPU per request, median {statistics.median(values):6.0f} us")
        print_ratios("router CPU per request", cpu_us, "")
        if recording_us is not None:
            # A lower bound: timed around each call inside a loaded router, the same calls cost about 4 times the
            # tight loop's figure (their objects are out of the CPU's caches between the request's own work).
            share = recording_us / statistics.median(cpu_us["metrics off"])
            print(f"  the tight loop's recording cost against the router's CPU per request: {share:.1%} "
                  "(a lower bound: inside a loaded router the calls cost about 4 times more)")  # fmt: skip
    finally:
        for process in processes.values():
            process.kill()
        stop_backends()


def cpu_seconds(pid: int) -> float:
    """The process's CPU time: from the scheduler's nanosecond count where Linux has one (user and system
    times come in 10 ms ticks, 5 % of a round of 1000 requests), else psutil's."""
    try:
        return sum(int(Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()[0])
                   for task in os.listdir(f"/proc/{pid}/task")) / 1e9  # fmt: skip
    except OSError:
        return sum(psutil.Process(pid).cpu_times()[:2])


def print_ratios(what: str, figures: dict[str, list[float]], target: str) -> None:
    """Round by round, the routers with metrics on against those off (each arm's mean in the round); and, as
    the A/A control that shows what the harness cannot resolve, the first router of each arm against the
    others of the same arm. Medians of the rounds, with a bootstrap 95 % interval of the median."""

    def arm(prefix: str, which: slice = slice(None)) -> list[float]:
        columns = [values for name, values in figures.items() if name.startswith(prefix)][which]
        return [statistics.fmean(round_values) for round_values in zip(*columns, strict=True)]

    print(f"  {what} on/off: {summary(arm('on'), arm('off'))}  {target}".rstrip())
    if len(figures) > 2:
        for prefix in ("on", "off"):
            print(f"  {what} A/A, {prefix} #1 against the other {prefix}: "
                  f"{summary(arm(prefix, slice(0, 1)), arm(prefix, slice(1, None)))}")  # fmt: skip


def summary(numerators: list[float], denominators: list[float]) -> str:
    ratios = [a / b for a, b in zip(numerators, denominators, strict=True)]
    draws = random.Random(0)
    medians = sorted(statistics.median(draws.choices(ratios, k=len(ratios))) for _ in range(2000))
    return (f"median {statistics.median(ratios):.3f} (95 % interval {medians[50]:.3f} to {medians[1949]:.3f}), "
            f"rounds {min(ratios):.3f} to {max(ratios):.3f}")  # fmt: skip


def one_request(recorder: RouterMetrics, chunks: int) -> None:
    """The recorder's calls for one PD request as the proxy makes them: streamed with `chunks` chunks, or
    not streamed (0), as the throughput part sends them."""
    hops = {"decision_s": 4e-5, "queue_s": 0.0, "prefill_instance": "prefill-0", "prefill_s": 0.02}
    if not chunks:
        recorder.finished("prefilling", "ok", "decode-0", e2e_s=0.2, input_tokens=200, output_tokens=4, **hops)
        return
    gaps = []
    for _ in range(chunks):
        gaps.append(0.01)  # what the proxy does per chunk
    recorder.streamed("prefilling", gaps)
    recorder.finished("prefilling", "ok", "decode-0", e2e_s=0.2, ttft_s=0.03, tpot_s=0.01, input_tokens=200,
                      output_tokens=chunks, **hops)  # fmt: skip


def record_cost(args: argparse.Namespace) -> dict[int, float]:
    """Recording alone, in-process: the CPU per request that the throughput ratio is made of, measured without
    the noise of sockets and other processes. Returns the cost added per request, by chunks streamed."""
    recorders = {"metrics on": RouterMetrics(), "metrics off": DisabledRecorder()}
    added: dict[int, float] = {}
    for chunks in (0, 16):
        per_request: dict[str, list[float]] = {name: [] for name in recorders}
        for _ in range(args.rounds):
            for name, recorder in recorders.items():
                started = time.process_time()
                for _ in range(args.record_requests):
                    one_request(recorder, chunks)
                per_request[name].append((time.process_time() - started) / args.record_requests * 1e6)
        on, off = (statistics.median(per_request[name]) for name in recorders)
        added[chunks] = on - off
        shape = f"streamed in {chunks} chunks" if chunks else "not streamed"
        print(f"recording one PD request, {shape}, {args.rounds} rounds of {args.record_requests}: "
              f"metrics on {on:.1f} us, off {off:.1f} us of CPU: {on - off:.1f} us a request")  # fmt: skip
    return added


_EVENTS = ("streamed", "finished")


def live_record_cost(args: argparse.Namespace, work: Path) -> None:
    """The recorder's calls timed where they run: in a router under load (this process, metrics on, in front
    of responders), the load generator in a process of its own. Against the tight loop of record_cost, this is
    what recording costs once the request's own work has pushed the recorder's objects out of the caches."""
    planned = plan_cluster(work, "metricslive", 14600, args.engines, args.engines)
    responders = start_responders(planned, args.responders)
    port = free_ports(1, planned.plan.router.port + 300)
    spent: dict[str, float] = dict.fromkeys(_EVENTS, 0.0)
    originals = {name: getattr(RouterMetrics, name) for name in _EVENTS}

    def timed(name: str) -> Any:
        original = originals[name]

        def call(self: RouterMetrics, *event: Any, **fields: Any) -> None:
            # The thread's CPU clock: on a busy machine the wall clock would count the time others held the CPU.
            started = time.thread_time()
            original(self, *event, **fields)
            spent[name] += time.thread_time() - started - clock_cost

        return call

    async def run() -> tuple[float, str]:
        service = await start_service(planned.profile, planned.plan, port)
        code = (f"import asyncio, sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); from router_throughput "
                f"import load; r = asyncio.run(load('http://127.0.0.1:{port}', {args.requests}, {args.concurrency}));"
                " print(f'{r.rps:.0f} requests/s, {r.failures} failed')")  # fmt: skip
        cpu = time.process_time()
        loader = await asyncio.create_subprocess_exec(sys.executable, "-c", code, stdout=subprocess.PIPE)
        out, _ = await loader.communicate()
        used = time.process_time() - cpu
        await service.stop()
        return used, out.decode().strip()

    clock_cost = min(-time.thread_time() + time.thread_time() for _ in range(1000))  # one reading's own cost
    for name in _EVENTS:
        setattr(RouterMetrics, name, timed(name))
    try:
        use_fast_event_loop()
        used, summary = asyncio.run(run())
    finally:
        for name, original in originals.items():
            setattr(RouterMetrics, name, original)
        for responder in responders:
            responder.kill()
    per_request = {name: seconds / args.requests * 1e6 for name, seconds in spent.items() if seconds}
    recording, router = sum(per_request.values()), used / args.requests * 1e6
    print(f"recording inside a loaded router ({summary}): {recording:.1f} us a request of the router's "
          f"{router:.0f} us of CPU ({recording / router:.1%}); by call: "
          + ", ".join(f"{name} {us:.1f} us" for name, us in per_request.items()))  # fmt: skip


LOADER = """\
import asyncio, sys
sys.path.insert(0, {benchmarks!r})
from router_throughput import load
for line in sys.stdin:
    measured = asyncio.run(load({url!r}, int(line), {concurrency}))
    print(-1 if measured.failures else measured.rps, flush=True)
"""


def swapped_recorder(args: argparse.Namespace, work: Path) -> None:
    """One router process whose recorder is swapped between metrics on and off from round to round. The two
    arms share the process, its memory layout and its caches' history: the ratio holds the recorder alone,
    where routers in processes of their own also differ by where their objects landed in memory."""
    core = reserve_router_core()
    planned = plan_cluster(work, "metricsswap", 14800, args.engines, args.engines)
    responders = start_responders(planned, args.responders)
    port = free_ports(1, planned.plan.router.port + 300)
    code = LOADER.format(benchmarks=str(ROOT / "benchmarks"), url=f"http://127.0.0.1:{port}",
                         concurrency=args.concurrency)  # fmt: skip
    rps: dict[str, list[float]] = {"metrics on": [], "metrics off": []}
    cpu_us: dict[str, list[float]] = {"metrics on": [], "metrics off": []}

    async def run() -> None:
        service = await start_service(planned.profile, planned.plan, port)
        recorders = {"metrics on": RouterMetrics(), "metrics off": DisabledRecorder()}
        loader = await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert loader.stdin is not None and loader.stdout is not None
        if core is not None:
            os.sched_setaffinity(0, [core])  # this thread, the router's event loop; the loader keeps the others

        async def load_round(requests: int) -> float:
            loader.stdin.write(f"{requests}\n".encode())  # type: ignore[union-attr]
            await loader.stdin.drain()  # type: ignore[union-attr]
            return float(await loader.stdout.readline())  # type: ignore[union-attr]

        for recorder in recorders.values():
            service.router.metrics = recorder
            await load_round(300)  # warm both
        for round_index in range(args.rounds):
            for name in list(recorders)[:: 1 if round_index % 2 == 0 else -1]:
                service.router.metrics = recorders[name]
                cpu = time.thread_time()
                measured = await load_round(args.requests)
                assert measured > 0, f"{name}: failed requests"
                cpu_us[name].append((time.thread_time() - cpu) / args.requests * 1e6)
                rps[name].append(measured)
        loader.stdin.close()
        await loader.wait()
        await service.stop()

    try:
        use_fast_event_loop()
        asyncio.run(run())
    finally:
        for responder in responders:
            responder.kill()
    where = f"router on core {core} alone" if core is not None else "no core reserved (< 8 cores)"
    print(f"one router, its recorder swapped on and off between {args.rounds} interleaved rounds of "
          f"{args.requests} requests, {args.concurrency} concurrent, PD two hops on {args.engines}+{args.engines} "
          f"responder instances, {where}")  # fmt: skip
    for name in rps:
        print(f"  {name:<12} requests/s median {statistics.median(rps[name]):7.0f}, router CPU per request median "
              f"{statistics.median(cpu_us[name]):6.1f} us")  # fmt: skip
    print(f"  requests/s on/off: {summary(rps['metrics on'], rps['metrics off'])}  (target >= 0.97)")
    print(f"  router CPU per request on/off: {summary(cpu_us['metrics on'], cpu_us['metrics off'])}")


def scrape_cost(args: argparse.Namespace, work: Path) -> None:
    prefill = args.instances // 5
    planned, cluster_dir = start_cluster(work, "scrape50", 15200, prefill, args.instances - prefill)
    pool = Pool([Instance(i.id, i.role, i.url, healthy=True)
                 for i in planned.plan.instances])  # fmt: skip
    telemetry = EngineTelemetry()

    async def measure() -> tuple[float, float, int]:
        task = asyncio.create_task(scrape_forever(pool, telemetry, interval_s=1.0))
        await asyncio.sleep(2.0)  # connections and parser warm
        cpu, wall = time.process_time(), time.monotonic()
        await asyncio.sleep(args.scrape_seconds)
        used, elapsed = time.process_time() - cpu, time.monotonic() - wall
        task.cancel()
        samples = sum(len(h.samples) for h in telemetry.histories.values())
        return used, elapsed, samples

    try:
        used, elapsed, samples = asyncio.run(measure())
        print(f"scraping {len(pool.all())} sim instances every second for {elapsed:.0f} s: "
              f"{used:.2f} s of CPU = {used / elapsed:.1%} of one core (target < 5 %), {samples} samples")  # fmt: skip
    finally:
        lifecycle.down(cluster_dir, grace_s=2)


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--serve-router":
        serve_router(Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "on")
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=120, help="a few per cent is resolved in 100 or more")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--instances", type=int, default=50)
    parser.add_argument("--scrape-seconds", type=float, default=20.0)
    parser.add_argument("--record-requests", type=int, default=20000)
    parser.add_argument("--only", choices=("record", "live", "swap", "throughput", "scrape"))
    parser.add_argument("--routers-per-arm", type=int, default=2, help="router processes with metrics on, and off")
    parser.add_argument("--engines", type=int, default=2, help="instances per role behind the routers")
    parser.add_argument(
        "--backend",
        choices=("responder", "sim"),
        default="responder",
        help="behind the routers: benchmarks/responder.py, or sim engines with no model time",
    )
    parser.add_argument("--responders", type=int, default=2, help="responder processes")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    recording = record_cost(args) if args.only in (None, "record") else {}
    if args.only in (None, "live"):
        live_record_cost(args, work)
    if args.only in (None, "swap"):
        swapped_recorder(args, work)
    if args.only in (None, "throughput"):
        throughput(args, work, recording.get(0))
    if args.only in (None, "scrape"):
        scrape_cost(args, work)


if __name__ == "__main__":
    main()
