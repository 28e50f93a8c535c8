"""Process identity and termination: stop exactly the processes pdctl started, and all of them.

vLLM's API server starts an EngineCore child in its process group; killed alone, the server leaves that
child behind holding ports and memory, and that child does not carry the environment pdctl gave the server.
So pdctl records the process group each engine leads and signals the whole group, also after its leader has
died, and finds other stragglers by a random token it put into every launched process's environment.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass

import psutil

from pdctl.state import ProcessRecord

TOKEN_ENV = "PDCTL_CLUSTER_TOKEN"
INSTANCE_ENV = "PDCTL_INSTANCE"


def record_of(pid: int, argv: list[str] | None = None, *, leads_group: bool = False) -> ProcessRecord:
    """The identity of a process; for one just spawned, pass the argv it was given: read back at once, its
    command line may still be its parent's (between fork and exec)."""
    process = psutil.Process(pid)
    return ProcessRecord(
        pid=pid,
        create_time=process.create_time(),
        cmdline=argv or process.cmdline(),
        pgid=pid if leads_group else None,
    )


def live_process(record: ProcessRecord | None) -> psutil.Process | None:
    """The process of the record if it still runs: same pid, start time and command line."""
    if record is None:
        return None
    try:
        process = psutil.Process(record.pid)
        if abs(process.create_time() - record.create_time) > 0.01 or process.cmdline() != record.cmdline:
            return None
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return process
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def running_module(module: str, argument: str) -> list[psutil.Process]:
    """Processes running `python -m module` with this argument (a cluster's state directory)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info.get("cmdline") or []
        if module in cmdline and argument in cmdline and process.pid != os.getpid():
            found.append(process)
    return found


def environ_of(process: psutil.Process) -> dict[str, str]:
    try:
        return process.environ()
    except (psutil.Error, OSError):
        return {}


def marked_processes(token: str) -> list[psutil.Process]:
    """Every process carrying this cluster's token, orphans reparented to init included."""
    found: list[psutil.Process] = []
    for process in psutil.process_iter(["pid"]):
        if process.pid == os.getpid():
            continue
        try:
            if process.environ().get(TOKEN_ENV) == token and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return found


def group_members(record: ProcessRecord | None) -> list[psutil.Process]:
    """Every live process in the group the record's process leads, also after that leader has died.

    A group id is the pid of its leader; Linux does not hand that pid to a new process while the group has
    members, and members started before the leader are not of this group: both keep a recycled id out."""
    if record is None or record.pgid is None:
        return []
    found: list[psutil.Process] = []
    for process in psutil.process_iter(["pid"]):
        try:
            member = os.getpgid(process.pid) == record.pgid and process.create_time() >= record.create_time - 0.01
            if member and process.status() != psutil.STATUS_ZOMBIE and process.pid != os.getpid():
                found.append(process)
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    return found


def tree_of(record: ProcessRecord | None, token: str, instance_id: str) -> list[psutil.Process]:
    """What one launched instance runs here: its group (leader or not), and anything carrying its mark."""
    found = {p.pid: p for p in group_members(record)}
    for process in processes_by_instance(token).get(instance_id, []):
        found.setdefault(process.pid, process)
    return list(found.values())


def processes_by_instance(token: str) -> dict[str, list[psutil.Process]]:
    """This cluster's processes grouped by the instance id each was launched for (children included)."""
    grouped: dict[str, list[psutil.Process]] = {}
    for process in marked_processes(token):
        grouped.setdefault(environ_of(process).get(INSTANCE_ENV, ""), []).append(process)
    return grouped


def _signal_group_or_process(process: psutil.Process, sig: signal.Signals) -> None:
    # A stopped process (SIGSTOP: a stalled engine, a frozen one) acts on SIGTERM only once continued.
    signals = (sig, signal.SIGCONT) if sig == signal.SIGTERM else (sig,)
    try:
        pgid = os.getpgid(process.pid)
        for one in signals:
            if pgid == process.pid:  # a group leader pdctl made with start_new_session: the group is ours
                os.killpg(pgid, one)
            else:
                process.send_signal(one)
    except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
        pass


def _gone(process: psutil.Process) -> bool:
    # A zombie has exited; its parent (perhaps a frozen daemon) just has not reaped it yet.
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def wait_exit(processes: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Wait until every process has exited (zombies count as exited); returns those still running."""
    deadline = time.monotonic() + timeout_s
    alive = [p for p in processes if not _gone(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if not _gone(p)]
    return alive


def terminate(processes: Iterable[psutil.Process], grace_s: float) -> list[int]:
    """SIGTERM (to their groups), wait up to grace_s, SIGKILL what remains. Returns the pids it had to kill."""
    targets = [p for p in processes if not _gone(p)]
    for process in targets:
        _signal_group_or_process(process, signal.SIGTERM)
    alive = wait_exit(targets, grace_s)
    for process in alive:
        _signal_group_or_process(process, signal.SIGKILL)
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    wait_exit(alive, 5)
    return [p.pid for p in alive]


@dataclass(frozen=True)
class Activity:
    """What a set of processes did over a short window: the CPU they used (in cores) and which are stopped."""

    cores: float
    stopped: list[str]

    @property
    def working(self) -> bool:
        """Running, and using the CPU: slow (starved, or a long step), not stopped or hung asleep."""
        return not self.stopped and self.cores >= WORKING_CORES


# An engine that computes uses a good share of a core even when others crowd it; one stopped or hung asleep
# uses almost none (NIXL's progress thread with pdctl's delay: about 3 % of a core).
WORKING_CORES = 0.2


def activity(processes: list[psutil.Process], window_s: float) -> Activity:
    """Sample the processes' CPU time across window_s (blocks that long); a process gone meanwhile counts 0."""
    before = {p.pid: _cpu_seconds(p) for p in processes}
    time.sleep(window_s)
    after = {p.pid: _cpu_seconds(p) for p in processes}
    used = sum(after[pid] - start for pid, start in before.items() if start is not None and after[pid] is not None)
    stopped = [f"{p.pid} ({_name(p)})" for p in processes if _status(p) == psutil.STATUS_STOPPED]
    return Activity(cores=max(used, 0.0) / window_s, stopped=stopped)


def _cpu_seconds(process: psutil.Process) -> float | None:
    try:
        times = process.cpu_times()
    except psutil.Error:
        return None
    return times.user + times.system


def _status(process: psutil.Process) -> str:
    try:
        return process.status()
    except psutil.Error:
        return psutil.STATUS_DEAD


def _name(process: psutil.Process) -> str:
    try:
        return process.name()
    except psutil.Error:
        return "gone"
