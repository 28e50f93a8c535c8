"""The status screen rendered at fixed data, its plain-text fallback, and the live view in a real terminal
(tmux) on a sim cluster under load."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
import threading
import time

import httpx
import pytest
from rich.console import Console

from pdctl import dashboard, lifecycle
from pdctl.lifecycle import InstanceReport, StatusReport
from pdctl.router.stats import FaultStats
from tests.clusters import sim_profile, up
from tests.figures import FakeClock, fixed_cluster


def fixed_snapshot() -> dashboard.Snapshot:
    stats = fixed_cluster(FakeClock(2000.0))
    report = StatusReport(
        cluster="c", phase="ready", daemon_pid=4242, router="http://127.0.0.1:8000", engine="sim",
        instances=[
            InstanceReport(id="prefill-0", role="PREFILLING", pid=1, host="127.0.0.1", port=1, devices="CPU 0",
                           phase="healthy", uptime_s=61, restarts=0),
            InstanceReport(id="decode-0", role="DECODING", pid=2, host="127.0.0.1", port=2, devices="CPU 1",
                           phase="healthy", uptime_s=61, restarts=2),
        ],
    )  # fmt: skip
    return dashboard.Snapshot(status=report, stats=stats)


def rendered(snapshot: dashboard.Snapshot, **options) -> str:
    console = Console(width=80, height=24, record=True, file=io.StringIO(), force_terminal=True)
    console.print(dashboard.render(snapshot, **options))
    return console.export_text()


def test_the_status_screen_at_fixed_data_fits_80_by_24():
    text = rendered(fixed_snapshot(), trend=True)
    lines = text.rstrip("\n").splitlines()
    assert len(lines) <= 24 and max(len(line) for line in lines) <= 80
    assert lines[0].startswith("c ready  sim emulator, not vLLM  127.0.0.1:8000  up 60s")
    assert re.search(r"^60s\s+0\.50\s+10\.1\s+50\.4\s+100%\s+0\.50\s+0\s*$", text, re.M)  # 30 req, 20 tokens, 59.5 s
    assert re.search(r"^mean\s+300\s+20\.0\s", text, re.M)  # TTFT and TPOT means, ms
    assert "routed  prefill 16 (52%)  decode 15 (48%)  hybrid 0 (0%)" in text
    assert "KV-cache hit rate 25%" in text and "NIXL 60 transfers, 60 KB" in text
    assert "vs colocated: not measured" in text
    assert re.search(r"^prefill-0\s+prefill\s+healthy\s+1\s+0\s+0%\s+10%\s+100\s+100%\s+-\s+0\s*$", text, re.M)
    assert re.search(r"^decode-0\s+decode\s+healthy.*\s2\s*$", text, re.M)
    assert "! decision p99 24.1 ms > 10 ms: threshold policy + round_robin strategy" in text
    assert "! KV hit rate 25% < 30 %: kv_cache_memory_fraction 0.95, eviction lfu" in text
    assert "! prefill-0 busy 100% > 95 %: prefilling_max_instances up, dynamic scaling" in text


def test_the_router_s_recoveries_get_one_line_with_their_reasons():
    snapshot = fixed_snapshot()
    assert "faults" not in rendered(snapshot)  # nothing failed: no line
    assert snapshot.stats is not None
    snapshot.stats.faults = FaultStats(migrations={"failed": 2, "stalled": 1}, retries={"decode": 1})
    text = rendered(snapshot, trend=True)
    assert "faults  moved 3 streams (failed 2, stalled 1)  retried 1 (decode 1)" in text
    lines = text.rstrip("\n").splitlines()
    assert len(lines) <= 24 and max(len(line) for line in lines) <= 80


def test_without_router_figures_the_screen_says_why():
    snapshot = fixed_snapshot()
    snapshot.stats, snapshot.stats_error = None, "the daemon is not running"
    text = rendered(snapshot)
    assert "no figures: the daemon is not running" in text and "prefill-0" in text


def test_the_sparkline_scales_to_its_largest_value():
    assert dashboard.sparkline([0, 1, 2, 4, None]) == "▁▂▄█ "
    assert dashboard.sparkline([0, 4], ascii_only=True) == "_@"
    assert dashboard.sparkline([0, 0]) == "▁▁"


def test_watch_degrades_to_plain_text_where_the_terminal_cannot_redraw():
    sink = io.StringIO()
    console = Console(file=sink, width=80, force_terminal=False)
    dashboard.watch(None, console, refresh_s=0.01, iterations=2, collect_snapshot=lambda _: fixed_snapshot())
    text = sink.getvalue()
    assert "\x1b[" not in text  # no cursor movement or colour
    assert text.count("c ready  sim") == 2 and text.count("-" * 80) == 2
    assert "req/s" in text and "▁" not in text  # ASCII sparklines


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_the_live_view_in_a_real_terminal_moves_with_the_load(tmp_path):
    state = tmp_path / "state"
    cluster_dir, _, failures = up(sim_profile(tmp_path, port_start=24500), state)
    assert failures == []
    session = f"pdctl-watch-{time.monotonic_ns()}"
    router = cluster_dir.read_state().router
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=30, trust_env=False) as client:
            while not stop.is_set():
                client.post(f"{router}/v1/completions", json={"model": "sim-model", "prompt": "x " * 100,
                                                               "max_tokens": 8, "stream": True})  # fmt: skip

    command = f"{sys.executable} -m pdctl status --watch --refresh 0.5 --state-dir {state}; echo EXIT=$?; sleep 60"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "80", "-y", "24", command], check=True)
    loader = threading.Thread(target=load)
    try:
        first = _wait_for_pane(session, lambda pane: re.search(r"^total\s", pane, re.M))
        loader.start()
        moved = _wait_for_pane(session, lambda pane: _total_requests(pane) > _total_requests(first) + 5)
        assert "▁" in moved or "█" in moved or any(c in moved for c in dashboard.BLOCKS)
        assert max(len(line) for line in moved.splitlines()) <= 80
        subprocess.run(["tmux", "send-keys", "-t", session, "C-c"], check=True)
        _wait_for_pane(session, lambda pane: "EXIT=0" in pane)
    finally:
        stop.set()
        if loader.is_alive():
            loader.join()
        subprocess.run(["tmux", "kill-session", "-t", session], check=False)
        lifecycle.down(cluster_dir)


def _pane(session: str) -> str:
    return subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True).stdout


def _wait_for_pane(session: str, condition, timeout_s: float = 30.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pane = _pane(session)
        if condition(pane):
            return pane
        time.sleep(0.25)
    raise AssertionError(f"the pane never showed what was expected:\n{_pane(session)}")


def _total_requests(pane: str) -> float:
    """The requests of the 'total' window: its req/s times nothing is shown, so read the routed counts."""
    found = re.search(r"^routed\s+prefill (\d+).*decode (\d+).*hybrid (\d+)", pane, re.M)
    return sum(int(n) for n in found.groups()) if found else 0
