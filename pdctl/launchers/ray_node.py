"""What runs on a Ray node for pdctl: the actor that holds one engine, and the checks and sweeps of a node.

The standard library only: Ray ships this module to the nodes by value, so a node needs Ray and the
engine runtime, not pdctl. Linux only (/proc), as Ray's nodes are.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

TOKEN_ENV = "PDCTL_CLUSTER_TOKEN"
PR_SET_PDEATHSIG = 1
# Set by Ray for its own workers; an engine started from one must not take them for its own settings.
_RAY_WORKER_ENV = ("RAY_", "PYTHONPATH", "PYTHONBREAKPOINT", "OMP_NUM_THREADS")


# ---- processes, read from /proc ------------------------------------------------------------------------


def _boot_time() -> float:
    with open("/proc/stat") as stat:
        for line in stat:
            if line.startswith("btime "):
                return float(line.split()[1])
    return 0.0


def _stat(pid: int) -> tuple[int, float, str] | None:
    """(process group, start time in seconds since the epoch, state) of a live process."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[2]), _boot_time() + int(fields[19]) / ticks, fields[0]


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit() and int(name) != os.getpid()]


def _marked(pid: int, token: str) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            return f"{TOKEN_ENV}={token}".encode() in handle.read().split(b"\0")
    except OSError:
        return False


def cluster_processes(token: str, groups: list[tuple[int, float]]) -> list[int]:
    """This node's processes of one cluster: those carrying its token, and the members of the recorded
    process groups (pgid, leader's start) also after their leader died; a recycled id is not a member."""
    found = []
    for pid in _pids():
        stat = _stat(pid)
        if stat is None or stat[2] == "Z":
            continue
        pgid, started, _ = stat
        if any(pgid == g and started >= since - 0.05 for g, since in groups) or (token and _marked(pid, token)):
            found.append(pid)
    return found


def _signal_all(pids: list[int], groups: list[tuple[int, float]], sig: int) -> None:
    for pgid, _ in groups:
        with contextlib.suppress(OSError):
            os.killpg(pgid, sig)
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, sig)


def stop_processes(token: str, groups: list[tuple[int, float]], grace_s: float) -> list[int]:
    """SIGTERM to the cluster's processes on this node (their groups too), SIGKILL after the grace period.
    Returns every pid it found."""
    found = cluster_processes(token, groups)
    live = [g for g in groups if _group_alive(g)]
    _signal_all(found, live, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and cluster_processes(token, groups):
        time.sleep(0.1)
    left = cluster_processes(token, groups)
    if left:
        _signal_all(left, [g for g in groups if _group_alive(g)], signal.SIGKILL)
        time.sleep(0.2)
    return found


def _group_alive(group: tuple[int, float]) -> bool:
    return bool(cluster_processes("", [group]))


# ---- checks ----------------------------------------------------------------------------------------------


def port_holder(host: str, port: int) -> str | None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
            return None
        except OSError as error:
            return str(error.strerror or error)


def probe(node_address: str, programs: list[str], paths: list[str], ports: list[int]) -> dict[str, Any]:
    """What a node has: its cores, which programs and paths exist, which ports cannot be bound."""
    return {
        "address": node_address,
        "cores": sorted(os.sched_getaffinity(0)),
        "missing_programs": [p for p in programs if not os.access(p, os.X_OK)],
        "missing_paths": [p for p in paths if not os.path.exists(os.path.expanduser(p))],
        "taken_ports": [(port, why) for port in ports if (why := port_holder(node_address, port))],
    }


def write_files(directory: str, files: dict[str, bytes]) -> int:
    """Copy small files (the builtin model) onto the node; each appears whole or not at all."""
    target = Path(directory).expanduser()
    target.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        fd, temp = tempfile.mkstemp(dir=target, prefix=f".{name}.")
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(temp, 0o644)
        os.replace(temp, target / name)
    return len(files)


# ---- the actor -------------------------------------------------------------------------------------------


class EngineHost:
    """Holds one engine process on its node: starts it in a process group of its own, reports its exit,
    stops the whole group, serves its log. The engine dies with this actor (SIGTERM on the actor's death),
    so a node's orphan cannot hold the instance's ports or memory when the actor is gone."""

    def __init__(self, log_name: str):
        self.log_path = Path(tempfile.gettempdir()) / "pdctl" / log_name
        self.log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.popen: subprocess.Popen[bytes] | None = None
        self.group: tuple[int, float] | None = None
        # The parent-death signal fires when the thread that forked dies, not the process: fork from one
        # thread that lives as long as the actor does.
        self._jobs: queue.Queue[tuple[Any, queue.Queue[Any]]] = queue.Queue()
        threading.Thread(target=self._spawner, daemon=True, name="pdctl-spawner").start()

    def start(self, argv: list[str], env: dict[str, str], host: str, ports: list[int]) -> dict[str, Any]:
        taken = [f"port {port} on {host} is taken ({why})" for port in ports if (why := port_holder(host, port))]
        if taken:
            raise RuntimeError("; ".join(taken))
        environ = {k: v for k, v in os.environ.items() if not k.startswith(_RAY_WORKER_ENV)}
        result: queue.Queue[Any] = queue.Queue()
        self._jobs.put(((argv, {**environ, **env}), result))
        outcome = result.get()
        if isinstance(outcome, BaseException):
            raise outcome
        self.popen = outcome
        stat = _stat(outcome.pid)
        started = stat[1] if stat else time.time()
        self.group = (outcome.pid, started)
        return {"pid": outcome.pid, "pgid": outcome.pid, "create_time": started, "log": str(self.log_path)}

    def _spawner(self) -> None:
        while True:
            (argv, env), result = self._jobs.get()
            try:
                with open(self.log_path, "ab") as log:
                    result.put(
                        subprocess.Popen(
                            argv,
                            env=env,
                            stdin=subprocess.DEVNULL,
                            stdout=log,
                            stderr=subprocess.STDOUT,
                            start_new_session=True,
                            cwd=self.log_path.parent,
                            preexec_fn=_die_with_parent,
                        )
                    )
            except BaseException as error:  # handed to the caller, which raises it
                result.put(error)

    def wait(self) -> int:
        """Blocks until the engine exits; its exit code."""
        assert self.popen is not None
        return self.popen.wait()

    def stop(self, grace_s: float) -> list[int]:
        groups = [self.group] if self.group else []
        stopped = stop_processes("", groups, grace_s)
        if self.popen is not None:
            self.popen.poll()
        return stopped

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def read_log(self, offset: int, limit: int = 1 << 20) -> tuple[bytes, int]:
        try:
            with open(self.log_path, "rb") as handle:
                handle.seek(offset)
                data = handle.read(limit)
        except OSError:
            return b"", offset
        return data, offset + len(data)


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
