"""The router as the daemon runs it: instances from the plan, settings from the profile, health from the
supervisor, load from the engines' /metrics (and NVML), served on the profile's router host and port. The
design document's ControlPlaneManager builds and serves its router with the same assemble_router and
RouterService."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from pathlib import Path

from pdctl.auth import RouterEntry
from pdctl.gpus import GpuSource, NvmlGpuSource
from pdctl.httpserver import HttpServer
from pdctl.plan import Plan
from pdctl.profile import ClusterProfile
from pdctl.router.proxy import Router, RouterSettings
from pdctl.router.scrape import scrape_forever
from pdctl.router.stats import GpuFigures, StatsContext
from pdctl.router.tokens import TokenCounter
from pdctl.routing.pieces import Composition
from pdctl.routing.pool import Instance, Pool
from pdctl.types import ExecutionInstanceType, PDSeparationConfig

log = logging.getLogger("pdctl.router.server")

# How long `up` waits for the KV-path warm-ups before it calls the cluster ready: a pair's takes about 1 s on the
# CPU (its NIXL handshake), and a warm-up that hangs must not keep a healthy cluster from serving.
WARM_WAIT_S = 60.0


def use_fast_event_loop() -> bool:
    """Run the daemon on uvloop (a dependency wherever libuv builds), else on asyncio's own loop.

    The router's hot path is event-loop work (socket callbacks, futures, timers); libuv's loop does it in C.
    Measured side by side on sim backends: about 1.5-2x the requests/s of the same router on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def freeze_startup_heap() -> None:
    """Collect, then move every object alive after start-up (modules, pydantic models, the plan, the pool) out
    of the collector's reach. A full collection walks every tracked object: in the daemon, about 54,000 after
    start-up, 52 ms on this 2-core machine, and it stalls every request in flight. Frozen, they are never
    walked again: the same collection then takes under a millisecond (Instagram's gc.freeze recipe)."""
    gc.collect()
    gc.freeze()


def max_num_seqs(profile: ClusterProfile, role: ExecutionInstanceType) -> int:
    if role is ExecutionInstanceType.PREFILLING:
        return profile.prefill.target_batch_size
    return profile.decode.max_parallel_requests


def assemble_router(
    instances: list[Instance],
    served_model_name: str,
    pd: PDSeparationConfig,
    *,
    routing_strategy: str | Composition,
    scheduling_policy: str,
    ttft_slo_ms: float,
    tpot_slo_ms: float,
    prefill_tokens_per_s: float,
    tokens: TokenCounter,
    engine_key: str | None = None,
    record_metrics: bool = RouterSettings.record_metrics,
    stall_timeout_s: float | None = None,
    max_migrations: int = RouterSettings.max_migrations,
    engine: str = RouterSettings.engine,
    warm_kv_paths: bool = RouterSettings.warm_kv_paths,
) -> Router:
    """A router over these instances, for every owner of one (the daemon, the design document's
    ControlPlaneManager), so both decide, time out and give up alike. `pd` is kept, not copied: assignments to
    it apply to the next request. stall_timeout_s: None for 50 x the TPOT SLO, at least 10 s."""
    settings = RouterSettings(
        served_model_name=served_model_name,
        pd=pd,
        routing_strategy=routing_strategy,
        scheduling_policy=scheduling_policy,
        ttft_slo_ms=ttft_slo_ms,
        tpot_target_ms=tpot_slo_ms,
        default_prefill_tokens_per_s=prefill_tokens_per_s,
        # A prefill hop far beyond the TTFT SLO is hung, not slow: fall back to decode instead of waiting.
        prefill_timeout_s=max(10.0, 10 * ttft_slo_ms / 1000),
        record_metrics=record_metrics,
        stall_timeout_s=stall_timeout_s or max(10.0, 50 * tpot_slo_ms / 1000),
        max_migrations=max_migrations,
        engine_api_key=engine_key,
        engine=engine,
        warm_kv_paths=warm_kv_paths,
    )
    return Router(settings, Pool(instances), tokens)


def build_router(
    profile: ClusterProfile, plan: Plan, state_root: Path | None = None, engine_key: str | None = None
) -> Router:
    """The daemon's router over the plan's instances (unhealthy until the supervisor says otherwise).
    engine_key: the cluster's engines' own key, sent with every request to them."""
    router = assemble_router(
        [Instance(i.id, i.role, i.url, max_num_seqs=max_num_seqs(profile, i.role)) for i in plan.instances],
        plan.served_model_name,
        profile.pd.model_copy(deep=True),  # the router's own: changes reach it through RouterService.apply_pd
        routing_strategy=profile.router.routing_strategy,
        scheduling_policy=profile.router.scheduling_policy,
        ttft_slo_ms=profile.router.slo.ttft_ms,
        tpot_slo_ms=profile.slo_tpot_ms,
        prefill_tokens_per_s=profile.prefill.target_throughput_tokens_per_sec,
        tokens=TokenCounter.for_model(plan.model_path),
        engine_key=engine_key,
        record_metrics=profile.router.metrics,
        stall_timeout_s=profile.router.stall_timeout_s,
        max_migrations=profile.router.max_migrations,
        engine=plan.engine,
        warm_kv_paths=profile.router.warm_kv_paths,
    )
    router.context = StatsContext(
        cluster=plan.cluster,
        engine=plan.engine,
        # A CPU host has no GPU-hours: each instance counts as one device at the profile's price.
        devices={i.id: len(i.gpus) or 1 for i in plan.instances},
        gpu_hour_usd=profile.cost.gpu_hour_usd,
        state_root=state_root,
    )
    return router


async def sample_gpus(router: Router, plan: Plan, source: GpuSource, interval_s: float = 2.0) -> None:
    """Utilization and memory of each instance's own GPUs, read through NVML off the event loop."""
    owners = {gpu.uuid: i.id for i in plan.instances for gpu in i.gpus}
    while True:
        try:
            inventory = await asyncio.to_thread(source.inventory)
        except Exception as error:  # a driver hiccup must not stop the router's figures
            log.warning("NVML read failed: %s", error)
        else:
            figures: dict[str, GpuFigures] = {}
            for gpu in inventory.gpus:
                owner = owners.get(gpu.uuid)
                if owner is None:
                    continue
                known = figures.setdefault(owner, GpuFigures(utilization_percent=0.0, memory_used_mib=0.0))
                known.utilization_percent = max(known.utilization_percent or 0.0, gpu.utilization_percent or 0.0)
                known.memory_used_mib = (known.memory_used_mib or 0.0) + gpu.memory_used_mib
            router.context.gpus = figures
        await asyncio.sleep(interval_s)


class RouterService:
    """Starts and stops the router's listener, its metrics scrape and, on a GPU host, its NVML sampler. The
    entry's key check comes first, before the router reads the request."""

    def __init__(
        self, router: Router, host: str, port: int, plan: Plan | None = None, entry: RouterEntry | None = None
    ):
        self.router = router
        self.plan = plan
        entry = entry or RouterEntry()
        self.server = HttpServer(entry.guard(router.handle), host=host, port=port, tls=entry.tls)
        self._tasks: list[asyncio.Task[None]] = []
        self._warming: set[asyncio.Task[None]] = set()  # held until done: the loop keeps only weak references

    async def start(self) -> None:
        await self.server.start()
        self._tasks.append(asyncio.create_task(scrape_forever(self.router.pool, self.router.telemetry)))
        self._tasks.append(asyncio.create_task(self.router.watch_stalls()))
        if self.plan is not None and self.plan.device == "cuda":
            self._tasks.append(asyncio.create_task(sample_gpus(self.router, self.plan, NvmlGpuSource())))

    async def stop(self) -> None:
        for task in [*self._tasks, *self._warming]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.server.stop()
        await self.router.aclose()

    def move(self, instance_id: str, url: str) -> None:
        """The instance runs elsewhere now (its node was lost): the next request and scrape go there."""
        instance = self.router.pool.by_id.get(instance_id)
        if instance is not None:
            instance.url = url

    async def kv_paths_warmed(self) -> None:
        """Until the warm-ups under way are done, or WARM_WAIT_S have passed (each of their hops has its own
        timeout; this bounds a cluster of many pairs)."""
        if self._warming:
            _, pending = await asyncio.wait(self._warming, timeout=WARM_WAIT_S)
            if pending:
                log.warning("%d KV-path warm-ups still under way after %g s: ready without them", len(pending),
                            WARM_WAIT_S)  # fmt: skip

    def set_health(self, instance_id: str, healthy: bool) -> None:
        instance = self.router.pool.by_id.get(instance_id)
        if instance is None:
            return
        if healthy and not instance.healthy:
            task = asyncio.get_running_loop().create_task(self.router.warm_kv_path(instance_id))
            self._warming.add(task)
            task.add_done_callback(self._warming.discard)
        elif not healthy:
            self.router.forget_kv_paths(instance_id)
        instance.healthy = healthy

    def apply_pd(self, pd: PDSeparationConfig) -> None:
        """The cluster's PD config changed at run time (`pdctl scale --set`, the design document's remedy):
        requests from the next one on are routed by it. The router keeps a copy of its own, so no one else's
        object changes under it."""
        self.router.apply_pd(pd.model_copy(deep=True))
