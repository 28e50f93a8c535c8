"""A real Ray cluster of several nodes on one machine, each node on its own loopback address and cores.

The test starts it and stops exactly the processes it started, by their pids (`ray stop` would end every
Ray process on the machine). Losing a node is its Ray processes SIGKILLed, as when its machine goes away.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from pdctl.ports import port_owner

RAY = str(Path(sys.executable).parent / "ray")
# Ray's own settings through its environment: a lost node is noticed in about 3 s instead of about 30 s.
RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
    "RAY_health_check_initial_delay_ms": "1000",
}


def _free_port(start: int) -> int:
    return next(port for port in range(start, 32000) if port_owner("127.0.0.2", port) is None)


class RayNodes:
    def __init__(self) -> None:
        # A short path: Ray's sockets live under it, and a Unix socket path is at most 107 bytes.
        self.temp = Path(tempfile.mkdtemp(prefix="rayt-", dir="/tmp"))
        self.head: str | None = None
        self.nodes: dict[str, set[int]] = {}

    def add(self, address: str, cpus: float = 1, resources: dict[str, float] | None = None, cores: str = "") -> str:
        """Start a node (the first is the head); returns the head's HOST:PORT."""
        argv = [RAY, "start", "--node-ip-address", address, "--num-cpus", str(cpus), "--disable-usage-stats"]
        argv += ["--temp-dir", str(self.temp)]
        if resources:
            argv += ["--resources", json.dumps(resources)]
        if self.head is None:
            port = _free_port(26379)
            argv += ["--head", "--port", str(port), "--include-dashboard", "false"]
        else:
            argv += ["--address", self.head]
        if cores:
            argv = ["taskset", "-c", cores, *argv]
        before = set(psutil.pids())
        done = subprocess.run(argv, env={**os.environ, **RAY_ENV}, capture_output=True, text=True, timeout=120)
        self.nodes[address] = {p for p in set(psutil.pids()) - before if _is_ray(p)}
        if done.returncode != 0:
            raise RuntimeError(f"ray start on {address} failed:\n{done.stdout}\n{done.stderr}")
        if self.head is None:
            self.head = f"{address}:{port}"
        return self.head

    def wait_alive(self, count: int, timeout_s: float = 60) -> None:
        import ray

        deadline = time.monotonic() + timeout_s
        with _driver(self.head):
            while sum(1 for n in ray.nodes() if n["Alive"]) < count:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{count} Ray nodes not alive within {timeout_s} s")
                time.sleep(0.2)

    def processes(self, address: str) -> list[psutil.Process]:
        """The node's Ray processes, the workers its raylet started included; not the engines they run."""
        found: dict[int, psutil.Process] = {}
        for pid in self.nodes.get(address, set()):
            with contextlib.suppress(psutil.Error):
                process = psutil.Process(pid)
                for one in [process, *process.children(recursive=True)]:
                    found[one.pid] = one
        return [p for p in found.values() if not _engine(p)]

    def lose(self, address: str) -> None:
        for process in self.processes(address):
            with contextlib.suppress(psutil.Error):
                process.kill()
        self.nodes.pop(address, None)

    def stop(self) -> None:
        processes = [p for address in list(self.nodes) for p in self.processes(address)]
        for process in processes:
            with contextlib.suppress(psutil.Error):
                process.terminate()
        _, alive = psutil.wait_procs(processes, timeout=5)
        for process in alive:
            with contextlib.suppress(psutil.Error):
                process.kill()
        psutil.wait_procs(alive, timeout=5)
        self.nodes.clear()
        shutil.rmtree(self.temp, ignore_errors=True)


@contextlib.contextmanager
def _driver(address: str | None):
    import ray

    ray.init(address=address, log_to_driver=False, logging_level="ERROR", configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


def named_actors(address: str) -> list[dict[str, str]]:
    import ray

    with _driver(address):
        return ray.util.list_named_actors(all_namespaces=True)


def _is_ray(pid: int) -> bool:
    try:
        line = " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return False
    return "ray" in line


def _engine(process: psutil.Process) -> bool:
    try:
        return "PDCTL_CLUSTER_TOKEN" in process.environ()
    except psutil.Error:
        return False
