"""Processes as the kernel sees them: what real ones do (compute, sleep, stopped) and the cores they run on."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psutil

from pdctl import procs

SPIN = "while True: pass"
SLEEP = "import time; time.sleep(60)"


@contextmanager
def running(code: str) -> Iterator[psutil.Process]:
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        yield psutil.Process(child.pid)
    finally:
        child.kill()
        child.wait()


def test_a_process_that_computes_is_working():
    with running(SPIN) as process:
        seen = procs.activity([process], 0.5)
    # It may share the core with anything else on the machine: a share, not a whole core.
    assert seen.cores >= procs.WORKING_CORES and seen.stopped == []
    assert seen.working


def test_a_stopped_process_is_not_working_and_is_named():
    with running(SPIN) as process:
        process.send_signal(signal.SIGSTOP)
        seen = procs.activity([process], 0.3)
    assert not seen.working
    assert len(seen.stopped) == 1 and seen.stopped[0].startswith(f"{process.pid} (")


def test_a_process_asleep_is_not_working():
    with running(SLEEP) as process:
        procs.activity([process], 0.2)  # past its start, which computes
        seen = procs.activity([process], 0.5)
    assert seen.cores < procs.WORKING_CORES and not seen.working


def test_a_process_that_is_gone_counts_nothing():
    with running(SLEEP) as process:
        pass
    seen = procs.activity([process], 0.1)
    assert seen.cores == 0.0 and not seen.working


def test_a_local_instance_runs_every_process_on_its_cores(tmp_path):
    """The API server and what it starts (vLLM's EngineCore) inherit the instance's cores, set before they run."""
    from pdctl.launchers.local import LocalLauncher
    from pdctl.plan import PlannedInstance
    from pdctl.profile import LauncherSpec
    from pdctl.types import ExecutionInstanceType

    spawns_a_child = (
        f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {SLEEP!r}]); time.sleep(60)"
    )
    planned = PlannedInstance(
        id="prefill-0", role=ExecutionInstanceType.PREFILLING, host="127.0.0.1", port=1, launch=True,
        cpu_cores=[0], affinity=[0], argv=[sys.executable, "-c", spawns_a_child],
    )  # fmt: skip
    handle = LocalLauncher(LauncherSpec(), "c", "token").start(planned, {}, tmp_path / "log", tmp_path)
    try:
        leader = psutil.Process(handle.record.pid)
        deadline = time.monotonic() + 20
        while not leader.children() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [p.cpu_affinity() for p in [leader, *leader.children()]] == [[0], [0]]
    finally:
        handle.stop(grace_s=2)
