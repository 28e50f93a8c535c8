"""The router as the daemon runs it: instances from the plan, settings from the profile, health from the
supervisor, load from the engines' /metrics, served on the profile's router host and port."""

from __future__ import annotations

import asyncio
import contextlib

from pdctl.control_plane.types import ExecutionInstanceType
from pdctl.httpserver import HttpServer
from pdctl.plan import Plan
from pdctl.profile import ClusterProfile
from pdctl.router.pool import Instance, Pool
from pdctl.router.proxy import Router, RouterSettings
from pdctl.router.scrape import scrape_forever
from pdctl.router.tokens import TokenCounter


def use_fast_event_loop() -> bool:
    """Run the daemon on uvloop when it is installed (`pip install 'pdctl[fast]'`), else on asyncio's own loop.

    The router's hot path is event-loop work (socket callbacks, futures, timers); libuv's loop does it in C.
    Measured side by side on sim backends: about 1.5-2x the requests/s of the same router on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def max_num_seqs(profile: ClusterProfile, role: ExecutionInstanceType) -> int:
    if role is ExecutionInstanceType.PREFILLING:
        return profile.prefill.target_batch_size
    return profile.decode.max_parallel_requests


def build_router(profile: ClusterProfile, plan: Plan) -> Router:
    pool = Pool([Instance(i.id, i.role, i.url, max_num_seqs=max_num_seqs(profile, i.role)) for i in plan.instances])
    settings = RouterSettings(
        served_model_name=plan.served_model_name,
        pd=profile.pd,
        routing_strategy=profile.router.routing_strategy,
        scheduling_policy=profile.router.scheduling_policy,
        ttft_slo_ms=profile.router.slo.ttft_ms,
        tpot_target_ms=profile.slo_tpot_ms,
        default_prefill_tokens_per_s=profile.prefill.target_throughput_tokens_per_sec,
        # A prefill hop far beyond the TTFT SLO is hung, not slow: fall back to decode instead of waiting.
        prefill_timeout_s=max(10.0, 10 * profile.router.slo.ttft_ms / 1000),
    )
    return Router(settings, pool, TokenCounter.for_model(plan.model_path))


class RouterService:
    """Starts and stops the router's listener and its metrics scrape."""

    def __init__(self, router: Router, host: str, port: int):
        self.router = router
        self.server = HttpServer(router.handle, host=host, port=port)
        self._scrape: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.server.start()
        self._scrape = asyncio.create_task(scrape_forever(self.router.pool))

    async def stop(self) -> None:
        if self._scrape is not None:
            self._scrape.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._scrape
        await self.server.stop()
        await self.router.aclose()

    def set_health(self, instance_id: str, healthy: bool) -> None:
        instance = self.router.pool.by_id.get(instance_id)
        if instance is not None:
            instance.healthy = healthy
