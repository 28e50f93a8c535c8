"""The control-plane daemon of one cluster: `pdctl up` starts it detached; it outlives the shell.

It reads the (unmasked) plan on stdin, so secrets never touch the state directory, launches and
supervises the instances, and stops them all on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from pdctl import procs
from pdctl.plan import Plan
from pdctl.state import ClusterDir, ClusterPhase
from pdctl.supervisor import Supervisor, SupervisorPolicy

log = logging.getLogger("pdctl.daemon")


async def run(cluster_dir: ClusterDir, plan: Plan, policy: SupervisorPolicy) -> int:
    state = cluster_dir.read_state()
    if state is None:
        log.error("no state file in %s", cluster_dir.path)
        return 2
    state.daemon = procs.record_of(os.getpid())
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, stopping.set)
    supervisor = Supervisor(plan, cluster_dir, state, policy)
    log.info("cluster %s: starting %d instances", plan.cluster, len(plan.launched))
    try:
        if await supervisor.start_all(stopping):
            log.info("cluster %s is ready", plan.cluster)
            await supervisor.supervise(stopping)
        elif state.phase is ClusterPhase.FAILED:
            log.error("cluster %s failed to start; waiting for `pdctl down`", plan.cluster)
            await stopping.wait()
    finally:
        log.info("stopping cluster %s", plan.cluster)
        await supervisor.stop()
    log.info("cluster %s stopped", plan.cluster)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pdctl-daemon")
    parser.add_argument("--cluster-dir", type=Path, required=True)
    parser.add_argument("--start-timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    plan = Plan.model_validate_json(sys.stdin.buffer.read())
    cluster_dir = ClusterDir(args.cluster_dir.parent, args.cluster_dir.name)
    return asyncio.run(run(cluster_dir, plan, SupervisorPolicy(start_timeout_s=args.start_timeout)))


if __name__ == "__main__":
    sys.exit(main())
