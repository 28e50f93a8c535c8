"""The control-plane daemon of one cluster: `pdctl up` starts it detached; it outlives the shell.

It reads the profile and the unmasked plan on stdin, so secrets never touch the state directory, serves
the router, launches and supervises the instances, and stops them all on SIGTERM. The router's clients' keys
come from its environment; the engines' key from the state directory's engine.key.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path

from pydantic import BaseModel

from pdctl import procs
from pdctl.auth import ENGINE_KEY_ENV, bearer, router_entry
from pdctl.errors import UsageError
from pdctl.launchers import Launcher, make_launcher
from pdctl.plan import Plan, PlannedInstance
from pdctl.profile import ClusterProfile
from pdctl.replan import InstancePlanner
from pdctl.router.server import RouterService, build_router, freeze_startup_heap, use_fast_event_loop
from pdctl.scaling.service import scaling
from pdctl.state import ClusterDir, ClusterPhase, ClusterState
from pdctl.supervisor import Supervisor, SupervisorPolicy

log = logging.getLogger("pdctl.daemon")


class DaemonInput(BaseModel):
    """What `up` hands the daemon through its stdin pipe."""

    profile: ClusterProfile
    plan: Plan


async def run(cluster_dir: ClusterDir, given: DaemonInput, adopt: bool = False) -> int:
    profile = given.profile
    state = cluster_dir.read_state()
    if state is None:
        log.error("no state file in %s", cluster_dir.path)
        return 2
    state.daemon = procs.record_of(os.getpid())
    launcher = make_launcher(given.plan.launcher, given.plan.cluster, state.token)
    plan = taken_over(cluster_dir, given, launcher) if adopt else given.plan
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, stopping.set)
    engine_key = cluster_dir.engine_key()
    if engine_key:
        os.environ[ENGINE_KEY_ENV] = engine_key  # each launched engine's VLLM_API_KEY refers to it
    try:
        entry = router_entry(plan.router, os.environ)
    except UsageError as error:
        return _failed(cluster_dir, state, str(error))
    router = RouterService(
        build_router(profile, plan, cluster_dir.root, engine_key), plan.router.host, plan.router.port, plan, entry
    )
    try:
        await router.start()
    except OSError as error:
        return _failed(cluster_dir, state, f"the router cannot listen on {plan.router.port}: {error}")
    state.router = f"{plan.router.scheme}://{plan.router.host}:{router.server.port}"
    freeze_startup_heap()
    restart = profile.engine.restart
    policy = SupervisorPolicy(
        start_timeout_s=profile.engine.start_timeout_s,
        backoff_initial_s=restart.backoff_initial_s,
        backoff_max_s=restart.backoff_max_s,
        max_failures=restart.max_failures,
        failure_window_s=restart.window_s,
    )

    def moved(planned: PlannedInstance) -> None:
        router.move(planned.id, planned.url)
        cluster_dir.write_plan(plan)

    supervisor = Supervisor(
        plan,
        cluster_dir,
        state,
        policy,
        launcher,
        on_health=router.set_health,
        relocate=InstancePlanner(profile, plan, launcher).moved,
        on_moved=moved,
        engine_headers=bearer(engine_key),
        before_ready=router.kv_paths_warmed,
    )
    router.router.on_stall = supervisor.stalled
    router.router.engine_activity = supervisor.activity
    log.info(
        "cluster %s: router on %s, %s %d instances (%s launcher)",
        plan.cluster,
        state.router,
        "taking over" if adopt else "starting",
        len(plan.launched),
        launcher.kind,
    )
    try:
        if await supervisor.start_all(stopping, adopt=adopt):
            log.info("cluster %s is ready", plan.cluster)
            async with scaling(profile, plan, supervisor, router, cluster_dir, stopping):
                await supervisor.supervise(stopping)
        elif state.phase is ClusterPhase.FAILED:
            log.error("cluster %s failed to start; waiting for `pdctl down`", plan.cluster)
            await stopping.wait()
    finally:
        log.info("stopping cluster %s", plan.cluster)
        await router.stop()
        await supervisor.stop()
        launcher.close()
    log.info("cluster %s stopped", plan.cluster)
    return 0


def _failed(cluster_dir: ClusterDir, state: ClusterState, message: str) -> int:
    state.phase, state.message = ClusterPhase.FAILED, message
    cluster_dir.write_state(state)
    log.error("%s", message)
    return 1


def taken_over(cluster_dir: ClusterDir, given: DaemonInput, launcher: Launcher) -> Plan:
    """The plan as the daemon that died left it (instances the scaler added or removed, moved off lost nodes),
    each launched instance's command built again from the profile: the state directory's copy is masked."""
    left = Plan.model_validate_json(cluster_dir.plan_file.read_bytes())
    planner = InstancePlanner(given.profile, given.plan, launcher)
    instances = [planner.rebuilt(i) if i.launch else i for i in left.instances]
    return given.plan.model_copy(update={"instances": instances})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pdctl-daemon")
    parser.add_argument("--cluster-dir", type=Path, required=True)
    parser.add_argument("--adopt", action="store_true", help="take over the engines of a daemon that died")
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would drown the log
    given = DaemonInput.model_validate(json.loads(sys.stdin.buffer.read()))
    cluster_dir = ClusterDir(args.cluster_dir.parent, args.cluster_dir.name)
    log.info("event loop: %s", "uvloop" if use_fast_event_loop() else "asyncio")
    return asyncio.run(run(cluster_dir, given, adopt=args.adopt))


if __name__ == "__main__":
    sys.exit(main())
