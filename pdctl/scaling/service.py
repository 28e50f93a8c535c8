"""The scaler as the daemon runs it: its loop, its control socket, its lines on the router's /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from pdctl.plan import Plan
from pdctl.profile import ClusterProfile
from pdctl.router.server import RouterService
from pdctl.scaling.control import ControlServer, socket_path
from pdctl.scaling.scaler import Scaler
from pdctl.state import ClusterDir
from pdctl.supervisor import Supervisor

log = logging.getLogger("pdctl.scaler")


@contextlib.asynccontextmanager
async def scaling(
    profile: ClusterProfile,
    plan: Plan,
    supervisor: Supervisor,
    router: RouterService,
    cluster_dir: ClusterDir,
    stopping: asyncio.Event,
) -> AsyncIterator[Scaler]:
    scaler = Scaler(profile, plan, supervisor, router, cluster_dir)
    router.router.metrics.register(scaler.decisions.metrics)
    control = ControlServer(scaler, socket_path(cluster_dir))
    try:
        await control.start()
    except OSError as error:  # a state path too long for a unix socket: the scaler still runs, `scale` cannot
        log.error("no control socket at %s (%s): `pdctl scale` will not reach this daemon", control.path, error)
    bounds = ", ".join(f"{p.role} {p.bounds.min}..{p.bounds.max}" for p in scaler.decider.pools.values())
    log.info(
        "scaler %s: %s; profile scaling: %s", scaler.decider.mode, bounds or "no pools", profile.scaling.model_dump()
    )
    task = asyncio.create_task(scaler.run(stopping))
    try:
        yield scaler
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await control.stop()
