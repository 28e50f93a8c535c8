"""Sim clusters for tests: real processes on real sockets, the emulator standing in for vLLM."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from pdctl import lifecycle
from pdctl.cluster import plan_profile
from pdctl.state import ClusterDir

# Linux hands out outgoing connections' ports from 32768 up: a port there, free when checked, can be taken
# by any client socket before the engine binds it. Test clusters stay below.
EPHEMERAL_START = 32768


def free_port_block(count: int, start: int = 21000) -> int:
    """A base port with `count` free ports after it, below the ephemeral range."""
    for base in range(start, EPHEMERAL_START - count - 50, 97):
        if all(lifecycle.port_owner("127.0.0.1", base + i) is None for i in range(count)):
            return base
    raise RuntimeError("no free port block")


def sim_profile(
    tmp_path: Path,
    *,
    prefill: int = 1,
    decode: int = 1,
    extra: str = "",
    name: str = "simc",
    sections: str = "",
    port_start: int = 21000,
) -> Path:
    base = free_port_block(prefill + decode + 1, port_start)
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"name: {name}\nmodel: {{path: sim-model}}\ndevice: cpu\n"
        f"engine:\n  kind: sim\n  start_timeout_s: 20\n{extra}"
        f"router: {{port: {base}}}\nports: {{instances: {base + 1}, nixl_side_channel: {base + 50}}}\n"
        f"pd: {{prefilling_min_instances: {prefill}, decoding_min_instances: {decode}, "
        "enable_dynamic_scaling: false}\n"
        "prefill: {tensor_parallel_size: 1}\n" + sections
    )
    return path


def up(profile: Path, state_root: Path) -> tuple[ClusterDir, lifecycle.StartedCluster, list]:
    planned = plan_profile(profile)
    cluster_dir = ClusterDir(state_root, planned.profile.name)
    started = lifecycle.start(planned, cluster_dir)
    failures = lifecycle.wait_ready(started, lambda state: None)
    return cluster_dir, started, failures


def wait_for(condition, timeout: float = 20.0, what: str = "condition"):
    """The condition's first true value, polled; an AssertionError naming what did not happen in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def metric(url: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples on an engine's /metrics, those with the given labels."""
    total = 0.0
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            head = line.split(" ")[0]
            if head == name or head.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
    return total
