"""`up`, `down`, `status`, `logs` as library calls: the CLI only renders what these return."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from pydantic import BaseModel

from pdctl import procs
from pdctl.cluster import PlannedCluster
from pdctl.engines import runtime, tinymodel
from pdctl.errors import ClusterError, UsageError
from pdctl.gpus import GpuSource, GpuUse, attribute, discover
from pdctl.plan import Plan, PlannedInstance
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


# ---- pre-flight ----------------------------------------------------------------------------------------


def port_owner(host: str, port: int) -> str | None:
    """None when the port can be bound, else who holds it ("pid 123 (python)")."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
            return None
        except OSError as error:
            if error.errno not in (errno.EADDRINUSE, errno.EACCES):
                raise
    for connection in psutil.net_connections(kind="inet"):
        listening = connection.laddr and connection.laddr.port == port and connection.status == psutil.CONN_LISTEN
        if listening and connection.pid:
            try:
                return f"pid {connection.pid} ({psutil.Process(connection.pid).name()})"
            except psutil.Error:
                return f"pid {connection.pid}"
    return "another process"


def _ports_needed(plan: Plan) -> list[tuple[str, str, int]]:
    needed = [("the router", plan.router.host, plan.router.port)]
    for instance in plan.launched:
        needed.append((instance.id, instance.host, instance.port))
        if instance.nixl_side_channel_port:
            needed.append((f"{instance.id} (NIXL side channel)", instance.host, instance.nixl_side_channel_port))
    return needed


def check_ports(plan: Plan) -> None:
    taken = []
    for who, host, port in _ports_needed(plan):
        owner = port_owner(host, port)
        if owner:
            taken.append(f"port {port} ({who}) is taken by {owner}")
    if taken:
        raise ClusterError("cannot start: " + "; ".join(taken))


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
    leftovers = procs.marked_processes(state.token)
    if daemon or leftovers:
        who = f"daemon pid {daemon.pid}" if daemon else f"{len(leftovers)} processes, no daemon"
        raise ClusterError(
            f"cluster {cluster_dir.name!r} is already running ({who}); `pdctl down {cluster_dir.name}` stops it"
        )


def prepare_engine(planned: PlannedCluster) -> None:
    """The engine runtime and the builtin model, or an error saying what to run."""
    profile, plan = planned.profile, planned.plan
    if profile.engine.kind != "vllm" or profile.engine.command:
        return
    python = Path(plan.engine_python) if plan.engine_python else None
    info = runtime.check_runtime(python)
    if runtime.read_marker(info.dir) is not None:  # a runtime pdctl made; never edit another environment
        runtime.install_hooks(info.dir)
    if profile.model.is_builtin_tiny:
        tinymodel.write_tiny_model(Path(plan.model_path), python=python)


# ---- up ------------------------------------------------------------------------------------------------


@dataclass
class StartedCluster:
    dir: ClusterDir
    plan: Plan
    daemon: subprocess.Popen[bytes]
    started_at: float = field(default_factory=time.monotonic)


def start(planned: PlannedCluster, cluster_dir: ClusterDir) -> StartedCluster:
    """Check everything that can be checked, then start the daemon detached. Returns at once."""
    plan = planned.plan
    check_not_running(cluster_dir)
    check_model(planned)
    check_ports(plan)
    prepare_engine(planned)
    cluster_dir.create()
    cluster_dir.write_json(cluster_dir.profile_file, planned.profile.model_dump(mode="json"))
    masked = plan.masked()
    cluster_dir.write_json(cluster_dir.plan_file, masked.model_dump(mode="json"))
    state = ClusterState(
        cluster=plan.cluster,
        token=secrets.token_hex(16),
        instances={i.id: InstanceStatus(id=i.id) for i in plan.instances},
    )
    cluster_dir.write_state(state)
    daemon = _spawn_daemon(cluster_dir, planned)
    return StartedCluster(cluster_dir, plan, daemon)


def _spawn_daemon(cluster_dir: ClusterDir, planned: PlannedCluster) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "pdctl.daemon", "--cluster-dir", str(cluster_dir.path)]
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
        if started.daemon.poll() is not None:
            return [_daemon_failure(started, "the control-plane daemon exited")]
        time.sleep(poll_s)


def _daemon_failure(started: StartedCluster, message: str | None) -> InstanceFailure:
    return InstanceFailure(
        id="daemon",
        exit_code=started.daemon.poll(),
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
    remaining_pids: list[int] = []


def down(cluster_dir: ClusterDir, grace_s: float = 15.0) -> DownReport:
    """Stop every process of the cluster and the daemon last. Idempotent; safe after a SIGKILLed daemon."""
    state = cluster_dir.read_state()
    if state is None:
        return DownReport(cluster=cluster_dir.name, was_running=False)
    daemon = procs.live_process(state.daemon)
    if daemon:
        _freeze(daemon)  # a frozen daemon cannot restart what is being stopped
    targets = _instance_processes(state)
    stopped = [p.pid for p in targets]
    killed = procs.terminate(targets, grace_s)
    if daemon:
        _stop_daemon(daemon)
    remaining = procs.marked_processes(state.token)
    killed += procs.terminate(remaining, 0.5)
    left = [p.pid for p in procs.marked_processes(state.token)]
    if not left:
        os.replace(cluster_dir.state_file, cluster_dir.path / "state.stopped.json")
    return DownReport(
        cluster=cluster_dir.name,
        was_running=bool(daemon or stopped),
        stopped_pids=stopped,
        killed_pids=killed,
        remaining_pids=left,
    )


def _instance_processes(state: ClusterState) -> list[psutil.Process]:
    found = {p.pid: p for p in procs.marked_processes(state.token)}
    for status in state.instances.values():
        process = procs.live_process(status.process)
        if process is not None:
            found.setdefault(process.pid, process)
    return list(found.values())


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
        router=f"http://{plan.router.host}:{plan.router.port}",
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
    process = procs.live_process(status.process)
    phase = status.phase.value
    if status.process and process is None and status.phase is InstancePhase.HEALTHY:
        phase = "dead"
    devices = ",".join(f"GPU {g.index}" for g in planned.gpus) or (
        f"CPU {','.join(map(str, planned.cpu_cores))}" if planned.cpu_cores else "-"
    )
    return InstanceReport(
        id=planned.id,
        role=planned.role.value,
        pid=process.pid if process else None,
        host=planned.host,
        port=planned.port,
        devices=devices,
        phase=phase,
        uptime_s=time.time() - status.started_at if process and status.started_at else None,
        restarts=status.restarts,
        message=status.message,
        gpu_use=gpus,
    )


def router_of(cluster_dir: ClusterDir) -> tuple[str, str]:
    """The running router's URL and the model name it serves."""
    state = cluster_dir.read_state()
    if state is None or not procs.live_process(state.daemon) or not state.router:
        raise ClusterError(f"cluster {cluster_dir.name!r} is not running: `pdctl up PROFILE` starts it")
    plan = Plan.model_validate_json(cluster_dir.plan_file.read_bytes())
    return state.router, plan.served_model_name


def log_path(cluster_dir: ClusterDir, instance: str) -> Path:
    if instance == "daemon":
        return cluster_dir.daemon_log
    path = cluster_dir.instance_log(instance)
    if not path.exists():
        known = sorted(p.stem for p in cluster_dir.logs.glob("*.log")) if cluster_dir.logs.exists() else []
        raise UsageError(f"no log for {instance!r} in cluster {cluster_dir.name!r}; known: daemon, {', '.join(known)}")
    return path
