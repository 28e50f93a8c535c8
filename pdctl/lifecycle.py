"""`up`, `down`, `status`, `logs` as library calls: the CLI only renders what these return."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from pydantic import BaseModel

from pdctl import auth, procs
from pdctl.cluster import PlannedCluster
from pdctl.errors import ClusterError, UsageError
from pdctl.gpus import GpuSource, GpuUse, attribute, discover
from pdctl.launchers import make_launcher
from pdctl.plan import Plan, PlannedInstance
from pdctl.ports import port_owner
from pdctl.profile import LauncherSpec
from pdctl.scaling.report import ScalingReport, read_report
from pdctl.state import (
    ClusterDir,
    ClusterPhase,
    ClusterState,
    InstancePhase,
    InstanceStatus,
    open_log,
    tail,
)

DAEMON_STOP_WAIT_S = 10.0
WATCHDOG = "pdctl.watchdog"


# ---- pre-flight ----------------------------------------------------------------------------------------


def check_router_port(plan: Plan) -> None:
    owner = port_owner(plan.router.host, plan.router.port)
    if owner:
        raise ClusterError(f"cannot start: port {plan.router.port} (the router) is taken by {owner}")


def check_router_entry(plan: Plan) -> None:
    """The keys the profile names are set here (the daemon inherits this environment), the TLS files load."""
    auth.router_entry(plan.router, os.environ)


def check_model(planned: PlannedCluster) -> None:
    path = planned.profile.model.path
    # Hub ids ("org/name") look like relative paths; only what is clearly a path is checked here.
    if path.startswith(("/", "./", "../", "~")) and not Path(path).expanduser().exists():
        raise UsageError(f"model.path {path!r} does not exist")


def check_not_running(cluster_dir: ClusterDir) -> None:
    state = cluster_dir.read_state()
    if state is None:
        return
    daemon = procs.live_process(state.daemon)
    leftovers = procs.marked_processes(state.token) + procs.running_module(WATCHDOG, str(cluster_dir.path))
    if daemon or leftovers:
        who = f"daemon pid {daemon.pid}" if daemon else f"{len(leftovers)} processes, no daemon"
        raise ClusterError(
            f"cluster {cluster_dir.name!r} is already running ({who}); `pdctl down {cluster_dir.name}` stops it"
        )


# ---- up ------------------------------------------------------------------------------------------------


@dataclass
class StartedCluster:
    dir: ClusterDir
    plan: Plan
    watchdog: subprocess.Popen[bytes]  # runs the daemon, and starts it again if it dies
    started_at: float = field(default_factory=time.monotonic)


def start(planned: PlannedCluster, cluster_dir: ClusterDir) -> StartedCluster:
    """Check everything that can be checked, then start the daemon detached. Returns at once."""
    plan = planned.plan
    check_not_running(cluster_dir)
    check_model(planned)
    check_router_entry(plan)
    check_router_port(plan)
    launcher = make_launcher(plan.launcher, plan.cluster)
    try:
        launcher.preflight(planned.profile, plan)
    finally:
        launcher.close()
    cluster_dir.create()
    cluster_dir.new_engine_key()
    cluster_dir.write_json(cluster_dir.profile_file, planned.profile.model_dump(mode="json"))
    cluster_dir.write_plan(plan)
    state = ClusterState(
        cluster=plan.cluster,
        token=secrets.token_hex(16),
        instances={i.id: InstanceStatus(id=i.id) for i in plan.instances},
    )
    cluster_dir.write_state(state)
    return StartedCluster(cluster_dir, plan, _spawn_daemon(cluster_dir, planned))


def _spawn_daemon(cluster_dir: ClusterDir, planned: PlannedCluster) -> subprocess.Popen[bytes]:
    """The daemon, under its watchdog (`pdctl.watchdog`), which starts it again if it dies."""
    argv = [sys.executable, "-m", WATCHDOG, "--cluster-dir", str(cluster_dir.path)]
    with open_log(cluster_dir.daemon_log) as log_handle:
        daemon = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=log_handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives the terminal: no SIGHUP from the shell that ran `up`
            cwd=cluster_dir.path,
        )
    assert daemon.stdin is not None
    given = {"profile": planned.profile.model_dump(mode="json"), "plan": planned.plan.model_dump(mode="json")}
    daemon.stdin.write(json.dumps(given).encode())  # unmasked, through a pipe, never a file
    daemon.stdin.close()
    return daemon


class InstanceFailure(BaseModel):
    id: str
    exit_code: int | None
    message: str | None
    log_path: str
    last_lines: list[str]


def wait_ready(
    started: StartedCluster, on_update: Callable[[ClusterState], None], poll_s: float = 0.25
) -> list[InstanceFailure]:
    """Follow the daemon's state until every instance is healthy (returns []) or something failed."""
    while True:
        state = started.dir.read_state()
        if state is not None:
            on_update(state)
            if state.phase is ClusterPhase.READY:
                return []
            if state.phase is ClusterPhase.FAILED:
                return failures_of(started.dir, state) or [_daemon_failure(started, state.message)]
        if started.watchdog.poll() is not None:
            return [_daemon_failure(started, "the control-plane daemon exited")]
        time.sleep(poll_s)


def _daemon_failure(started: StartedCluster, message: str | None) -> InstanceFailure:
    return InstanceFailure(
        id="daemon",
        exit_code=started.watchdog.poll(),
        message=message,
        log_path=str(started.dir.daemon_log),
        last_lines=tail(started.dir.daemon_log),
    )


def failures_of(cluster_dir: ClusterDir, state: ClusterState) -> list[InstanceFailure]:
    return [
        InstanceFailure(
            id=status.id,
            exit_code=status.exit_code,
            message=status.message,
            log_path=str(cluster_dir.instance_log(status.id)),
            last_lines=tail(cluster_dir.instance_log(status.id)),
        )
        for status in state.instances.values()
        if status.phase is InstancePhase.FAILED
    ]


# ---- down ----------------------------------------------------------------------------------------------


class DownReport(BaseModel):
    cluster: str
    was_running: bool
    stopped_pids: list[int] = []
    killed_pids: list[int] = []
    remaining: list[str] = []


def down(cluster_dir: ClusterDir, grace_s: float = 15.0) -> DownReport:
    """Stop every process of the cluster and the daemon last. Idempotent; safe after a SIGKILLed daemon."""
    state = cluster_dir.read_state()
    if state is None:
        return DownReport(cluster=cluster_dir.name, was_running=False)
    _stop_watchdogs(cluster_dir)  # first: nothing may start the daemon again while it is being stopped
    daemon = procs.live_process(state.daemon)
    if daemon:
        _freeze(daemon)  # a frozen daemon cannot restart what is being stopped
    records = [status.process for status in state.instances.values() if status.process is not None]
    launcher = make_launcher(_launcher_spec(cluster_dir), state.cluster, state.token)
    try:
        swept = launcher.sweep(records, grace_s)
        if daemon:
            _stop_daemon(daemon)
        # Whatever the daemon started while it was being stopped, or left when it was killed mid-launch.
        late = launcher.sweep(records, 0.5)
        left = launcher.leftovers(records)
    finally:
        launcher.close()
    if not left:
        os.replace(cluster_dir.state_file, cluster_dir.path / "state.stopped.json")
        cluster_dir.engine_key_file.unlink(missing_ok=True)  # no engine wants it any more
    return DownReport(
        cluster=cluster_dir.name,
        was_running=bool(daemon or swept.stopped),
        stopped_pids=swept.stopped + late.stopped,
        killed_pids=swept.killed + late.killed,
        remaining=left,
    )


def _launcher_spec(cluster_dir: ClusterDir) -> LauncherSpec:
    """The launcher the cluster was started with (a plan written before launchers existed: local)."""
    try:
        return Plan.model_validate_json(cluster_dir.plan_file.read_bytes()).launcher
    except (OSError, ValueError):
        return LauncherSpec()


def _stop_watchdogs(cluster_dir: ClusterDir) -> None:
    watchdogs = procs.running_module(WATCHDOG, str(cluster_dir.path))
    for watchdog in watchdogs:
        with contextlib.suppress(psutil.NoSuchProcess):
            watchdog.terminate()
    _, alive = psutil.wait_procs(watchdogs, timeout=DAEMON_STOP_WAIT_S)
    for watchdog in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            watchdog.kill()


def _freeze(daemon: psutil.Process) -> None:
    with contextlib.suppress(psutil.NoSuchProcess):
        daemon.send_signal(signal.SIGSTOP)


def _stop_daemon(daemon: psutil.Process) -> None:
    try:
        daemon.send_signal(signal.SIGTERM)
        daemon.send_signal(signal.SIGCONT)
        daemon.wait(timeout=DAEMON_STOP_WAIT_S)
    except psutil.TimeoutExpired:
        daemon.kill()
    except psutil.NoSuchProcess:
        pass


# ---- status and logs -----------------------------------------------------------------------------------


class InstanceReport(BaseModel):
    id: str
    role: str
    pid: int | None
    host: str
    node: str | None = None
    port: int
    devices: str
    phase: str
    uptime_s: float | None
    restarts: int
    message: str | None = None
    gpu_use: list[GpuUse] = []


class StatusReport(BaseModel):
    cluster: str
    phase: str
    daemon_pid: int | None
    router: str
    engine: str
    instances: list[InstanceReport]
    scaling: ScalingReport | None = None


def status(cluster_dir: ClusterDir, gpu_source: GpuSource | None = None) -> StatusReport:
    state = cluster_dir.read_state()
    if state is None:
        raise ClusterError(f"cluster {cluster_dir.name!r} is not running")
    plan = Plan.model_validate_json(cluster_dir.plan_file.read_bytes())
    daemon = procs.live_process(state.daemon)
    gpu_use = _gpu_use(plan, state, gpu_source) if plan.device == "cuda" else {}
    phase = state.phase.value if daemon else "daemon not running: `pdctl down` cleans up"
    return StatusReport(
        cluster=state.cluster,
        phase=phase,
        daemon_pid=daemon.pid if daemon else None,
        router=f"{plan.router.scheme}://{plan.router.host}:{plan.router.port}",
        engine=plan.engine,
        instances=[_instance_report(p, state.instances.get(p.id), gpu_use.get(p.id, [])) for p in plan.instances],
        scaling=read_report(cluster_dir.path) if daemon else None,
    )


def _gpu_use(plan: Plan, state: ClusterState, gpu_source: GpuSource | None) -> dict[str, list[GpuUse]]:
    """NVML's process lists, each pid traced to its instance by the environment pdctl gave it."""
    grouped = procs.processes_by_instance(state.token)
    pids = {instance.id: {p.pid for p in grouped.get(instance.id, [])} for instance in plan.launched}
    return attribute(discover(gpu_source), pids)


def _instance_report(planned: PlannedInstance, status: InstanceStatus | None, gpus: list[GpuUse]) -> InstanceReport:
    status = status or InstanceStatus(id=planned.id)
    pid = _running_pid(status)
    phase = status.phase.value
    if status.process and pid is None and status.phase is InstancePhase.HEALTHY:
        phase = "dead"
    devices = ",".join(f"GPU {g.index}" for g in planned.gpus) or (
        f"CPU {','.join(map(str, planned.cpu_cores))}" if planned.cpu_cores else "-"
    )
    return InstanceReport(
        id=planned.id,
        role=planned.role.value,
        pid=pid,
        host=planned.host,
        node=planned.node,
        port=planned.port,
        devices=devices,
        phase=phase,
        uptime_s=time.time() - status.started_at if pid and status.started_at else None,
        restarts=status.restarts,
        message=status.message,
        gpu_use=gpus,
    )


def _running_pid(status: InstanceStatus) -> int | None:
    """The engine's pid while it runs. One on another node cannot be looked at from here: the daemon's
    last word on it stands."""
    record = status.process
    if record is not None and record.node is not None:
        return record.pid if status.phase not in (InstancePhase.STOPPED, InstancePhase.FAILED) else None
    process = procs.live_process(record)
    return process.pid if process else None


def router_of(cluster_dir: ClusterDir, api_key: str | None = None) -> tuple[auth.Access, str]:
    """How to reach the running router and the model name it serves."""
    state = cluster_dir.read_state()
    if state is None or not procs.live_process(state.daemon) or not state.router:
        raise ClusterError(f"cluster {cluster_dir.name!r} is not running: `pdctl up PROFILE` starts it")
    plan = Plan.model_validate_json(cluster_dir.plan_file.read_bytes())
    return auth.router_access(state.router, plan.router, api_key, os.environ), plan.served_model_name


def router_access(cluster_dir: ClusterDir, url: str, api_key: str | None = None) -> auth.Access:
    """The router at url as the cluster's profile has it: the key to send (api_key, else one from the
    environment) and the certificate to trust."""
    plan = Plan.model_validate_json(cluster_dir.plan_file.read_bytes())
    return auth.router_access(url, plan.router, api_key, os.environ)


def log_path(cluster_dir: ClusterDir, instance: str) -> Path:
    if instance == "daemon":
        return cluster_dir.daemon_log
    path = cluster_dir.instance_log(instance)
    if not path.exists():
        known = sorted(p.stem for p in cluster_dir.logs.glob("*.log")) if cluster_dir.logs.exists() else []
        raise UsageError(f"no log for {instance!r} in cluster {cluster_dir.name!r}; known: daemon, {', '.join(known)}")
    return path
