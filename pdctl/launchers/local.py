"""The local launcher: every instance a child process of the daemon, in a process group of its own, on this
host's GPUs (NVML) or a share of its cores."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import psutil

from pdctl import procs
from pdctl.engines import tinymodel
from pdctl.engines.adapter import engine_adapter
from pdctl.errors import ClusterError, PlacementError
from pdctl.gpus import GpuInventory
from pdctl.launchers.base import InstanceHandle, Launcher, PortTaken, SweepReport
from pdctl.placement import (
    Assignment,
    DeviceMode,
    PlacementRequest,
    available_cores,
    cores_for_added,
    place_added_on_gpus,
    place_on_cpus,
    place_on_gpus,
)
from pdctl.plan import Plan, PlannedInstance
from pdctl.ports import port_owner
from pdctl.profile import ClusterProfile
from pdctl.state import ProcessRecord, open_log

# The exit code of an adopted engine: it is not this daemon's child, so its real code went to another process.
UNKNOWN_EXIT = -1


class LocalHandle(InstanceHandle):
    """An engine this daemon started (`popen`), or one it adopted from a daemon that died (no `popen`)."""

    def __init__(self, record: ProcessRecord, token: str, instance_id: str, popen: subprocess.Popen[bytes] | None):
        self.popen = popen
        self.record = record
        self.token = token
        self.instance_id = instance_id

    def poll(self) -> int | None:
        if self.popen is not None:
            return self.popen.poll()
        return None if procs.live_process(self.record) else UNKNOWN_EXIT

    def exit_message(self, exit_code: int) -> str:
        if self.popen is None:
            return "exited (started by an earlier daemon: its exit code is not known here)"
        return super().exit_message(exit_code)

    def activity(self, window_s: float) -> procs.Activity:
        return procs.activity(procs.tree_of(self.record, self.token, self.instance_id), window_s)

    def stop(self, grace_s: float) -> None:
        procs.terminate(procs.tree_of(self.record, self.token, self.instance_id), grace_s)
        if self.popen is not None:
            self.popen.poll()  # reap it: no zombie stays behind


class LocalLauncher(Launcher, kind="local"):
    # ---- planning ----------------------------------------------------------------------------------------

    def place(
        self,
        profile: ClusterProfile,
        requests: list[PlacementRequest],
        device: DeviceMode,
        inventory: GpuInventory,
        *,
        force: bool = False,
        cores: list[int] | None = None,
    ) -> dict[str, Assignment]:
        if not engine_adapter(profile.engine.kind).uses_devices:
            return {}
        if device == "cuda":
            return {a.instance_id: a for a in place_on_gpus(requests, inventory, force=force)}
        cores = cores if cores is not None else available_cores()
        for request in requests:
            ranks = (request.instance.tensor_parallel_size or 1) * (request.instance.pipeline_parallel_size or 1)
            if ranks > len(cores):
                raise PlacementError(
                    f"instance {request.instance.instance_id} asks for tensor x pipeline parallel size {ranks} "
                    f"on the CPU, but only {len(cores)} cores are available: set tensor_parallel_size to 1"
                )
        return {a.instance_id: a for a in place_on_cpus(requests, cores)}

    def place_added(self, profile: ClusterProfile, request: PlacementRequest, plan: Plan) -> Assignment:
        if not engine_adapter(profile.engine.kind).uses_devices:
            return Assignment(instance_id=request.instance.instance_id)
        if plan.device == "cuda":
            taken = {gpu.index for i in plan.instances for gpu in i.gpus}
            return place_added_on_gpus(request, self.inventory(), taken)
        held = [i.cpu_cores for i in plan.instances if i.cpu_cores]
        return Assignment(instance_id=request.instance.instance_id, cpu_cores=cores_for_added(available_cores(), held))

    def free_port(self, where: Assignment, start: int, used: set[int]) -> int:
        for port in range(start, 65535):
            if port not in used and port_owner("127.0.0.1", port) is None:
                return port
        raise PlacementError(f"no free port from {start}")

    # ---- starting ----------------------------------------------------------------------------------------

    def preflight(self, profile: ClusterProfile, plan: Plan) -> None:
        taken = [f"port {port} ({who}) is taken by {owner}" for who, port, owner in _taken_ports(plan.launched)]
        if taken:
            raise ClusterError("cannot start: " + "; ".join(taken))
        prepare_engine(profile, plan)

    def start(self, planned: PlannedInstance, env: dict[str, str], log_path: Path, cwd: Path) -> InstanceHandle:
        taken = [f"port {port} ({who}) is taken by {owner}" for who, port, owner in _taken_ports([planned])]
        if taken:
            raise PortTaken("; ".join(taken))
        with open_log(log_path) as log_handle:
            popen = subprocess.Popen(
                planned.argv,
                env={**os.environ, **env},
                stdin=subprocess.DEVNULL,
                stdout=log_handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: the whole engine is signalled as one
                cwd=cwd,
            )
        if planned.affinity:
            # Before the engine has started a thread or a child: each inherits it. (vLLM's Worker then binds its
            # compute threads within it, VLLM_CPU_OMP_THREADS_BIND.)
            os.sched_setaffinity(popen.pid, planned.affinity)
        record = procs.record_of(popen.pid, planned.argv, leads_group=True)
        return LocalHandle(record, self.token, planned.id, popen)

    def adopt(self, planned: PlannedInstance, record: ProcessRecord, log_path: Path) -> InstanceHandle | None:
        return LocalHandle(record, self.token, planned.id, None) if procs.live_process(record) else None

    # ---- cleaning ----------------------------------------------------------------------------------------

    def sweep(self, records: list[ProcessRecord], grace_s: float) -> SweepReport:
        targets = self._running(records)
        stopped = [p.pid for p in targets]
        return SweepReport(stopped=stopped, killed=procs.terminate(targets, grace_s))

    def leftovers(self, records: list[ProcessRecord]) -> list[str]:
        return [f"pid {p.pid}" for p in self._running(records)]

    def _running(self, records: list[ProcessRecord]) -> list[psutil.Process]:
        found = {p.pid: p for p in procs.marked_processes(self.token)}
        for record in records:
            for process in [procs.live_process(record), *procs.group_members(record)]:
                if process is not None:
                    found.setdefault(process.pid, process)
        return list(found.values())


def _taken_ports(instances: list[PlannedInstance]) -> list[tuple[str, int, str]]:
    taken = []
    for instance in instances:
        needed = [(instance.id, instance.port)]
        if instance.nixl_side_channel_port:
            needed.append((f"{instance.id} (NIXL side channel)", instance.nixl_side_channel_port))
        for who, port in needed:
            owner = port_owner(instance.host, port)
            if owner:
                taken.append((who, port, owner))
    return taken


def prepare_engine(profile: ClusterProfile, plan: Plan) -> None:
    """The engine runtime and the builtin model on this host, or an error saying what to run."""
    engine_runtime = engine_adapter(profile.engine.kind).runtime
    if engine_runtime is None or profile.engine.command or not plan.launched:
        return
    python = Path(plan.engine_python) if plan.engine_python else None
    engine_runtime.check(python)
    if profile.model.is_builtin_tiny:
        tinymodel.write_tiny_model(Path(plan.model_path), python=python)
