"""Supervision, state and teardown against real processes on real sockets (the sim engine)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from pdctl import lifecycle, procs
from pdctl.cluster import plan_profile
from pdctl.errors import ClusterError
from pdctl.plan import Plan
from pdctl.state import ClusterDir, InstancePhase
from tests.clusters import free_port_block, metric, sim_profile, up, wait_for

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def state_root(tmp_path):
    root = tmp_path / "state"
    yield root
    for cluster in root.glob("*"):
        if (cluster / "state.json").exists():
            lifecycle.down(ClusterDir(root, cluster.name), grace_s=2)


def test_up_status_down_leaves_nothing(tmp_path, state_root):
    cluster_dir, started, failures = up(sim_profile(tmp_path, decode=2), state_root)
    assert failures == []
    report = lifecycle.status(cluster_dir)
    assert [i.phase for i in report.instances] == ["healthy"] * 3
    assert all(i.pid for i in report.instances) and report.daemon_pid == cluster_dir.read_state().daemon.pid
    state = cluster_dir.read_state()
    assert len(procs.marked_processes(state.token)) == 3
    # owner-only state, plan without secrets
    assert oct(cluster_dir.path.stat().st_mode & 0o777) == "0o700"
    assert oct(cluster_dir.state_file.stat().st_mode & 0o777) == "0o600"
    down = lifecycle.down(cluster_dir, grace_s=5)
    assert down.was_running and down.remaining == []
    assert procs.marked_processes(state.token) == []
    assert started.watchdog.wait(timeout=10) == 0 and not psutil.pid_exists(report.daemon_pid)
    assert lifecycle.down(cluster_dir).was_running is False  # idempotent


def test_a_killed_instance_is_restarted(tmp_path, state_root):
    cluster_dir, _, failures = up(sim_profile(tmp_path), state_root)
    assert failures == []
    before = cluster_dir.read_state().instances["decode-0"]
    os.killpg(before.process.pid, signal.SIGKILL)

    def restarted():
        status = cluster_dir.read_state().instances["decode-0"]
        return status.phase is InstancePhase.HEALTHY and status.restarts == 1 and status

    after = wait_for(restarted, what="decode-0 restarted and healthy")
    assert after.process.pid != before.process.pid
    assert lifecycle.status(cluster_dir).instances[1].restarts == 1
    assert "exited with code" in cluster_dir.daemon_log.read_text()


def kill_daemon_and_watchdog(cluster_dir, started) -> None:
    os.kill(started.watchdog.pid, signal.SIGKILL)
    started.watchdog.wait()
    os.kill(cluster_dir.read_state().daemon.pid, signal.SIGKILL)


def test_down_after_the_daemon_and_its_watchdog_were_sigkilled(tmp_path, state_root):
    cluster_dir, started, failures = up(sim_profile(tmp_path), state_root)
    assert failures == []
    token = cluster_dir.read_state().token
    kill_daemon_and_watchdog(cluster_dir, started)
    assert len(procs.marked_processes(token)) == 2  # the instances outlive their daemon...
    report = lifecycle.down(cluster_dir, grace_s=5)
    assert report.remaining == [] and len(report.stopped_pids) == 2
    assert procs.marked_processes(token) == []  # ...until down


def standin_pd_profile(tmp_path: Path) -> Path:
    """The stand-in engine as vLLM's launch prefix: each instance's child holds its NIXL port, as EngineCore does."""
    profile = sim_profile(tmp_path, name="orphans")
    text = profile.read_text().replace(
        "engine:\n  kind: sim\n",
        f"engine:\n  kind: vllm\n  command: [{sys.executable}, {ROOT / 'tests' / 'standin_engine.py'}]\n"
        "  env: {STANDIN_CORE_CHILD: '1', STANDIN_GPU_MIB: '0'}\n",
    )
    profile.write_text(text.replace("model: {path: sim-model}", "model: {path: standin-model}"))
    return profile


def _children_in_group(pgid: int) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid and process.pid != pgid and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (psutil.Error, OSError):
            continue
    return found


def test_a_killed_engine_s_orphaned_child_is_stopped_before_the_restart_and_by_down(tmp_path, state_root):
    cluster_dir, started, failures = up(standin_pd_profile(tmp_path), state_root)
    assert failures == []
    decode = cluster_dir.read_state().instances["decode-0"]
    orphan = wait_for(lambda: _children_in_group(decode.process.pgid), what="decode-0's core child")[0]
    assert procs.TOKEN_ENV not in orphan.environ()  # as vLLM's EngineCore: the token search cannot find it
    os.kill(decode.process.pid, signal.SIGKILL)  # the API server alone, as a crash or an OOM kill takes it

    def restarted():
        status = cluster_dir.read_state().instances["decode-0"]
        return status.phase is InstancePhase.HEALTHY and status.restarts == 1 and status

    wait_for(restarted, timeout=30, what="decode-0 restarted on its own ports")
    assert not orphan.is_running() or orphan.status() == psutil.STATUS_ZOMBIE

    # The daemon and then an API server killed: down still ends the server's orphaned child, by its group.
    prefill = cluster_dir.read_state().instances["prefill-0"]
    prefill_orphan = wait_for(lambda: _children_in_group(prefill.process.pgid), what="prefill-0's core child")[0]
    kill_daemon_and_watchdog(cluster_dir, started)
    os.kill(prefill.process.pid, signal.SIGKILL)
    report = lifecycle.down(cluster_dir, grace_s=5)
    assert report.remaining == []
    assert not prefill_orphan.is_running() or prefill_orphan.status() == psutil.STATUS_ZOMBIE


def test_an_engine_that_died_inside_while_its_api_server_lives_fails_at_once_naming_its_log_line(tmp_path, state_root):
    profile = standin_pd_profile(tmp_path)
    text = profile.read_text().replace("STANDIN_CORE_CHILD: '1'", "STANDIN_FATAL_PORT: 'DECODE_PORT'")
    cluster_dir = ClusterDir(state_root, "orphans")
    decode_port = next(i.port for i in plan_profile(profile).plan.instances if i.id == "decode-0")
    profile.write_text(text.replace("DECODE_PORT", str(decode_port)))
    _, _, failures = up(profile, state_root)
    try:
        # Not "not healthy within its start timeout" (300 s): its log said the engine core died.
        assert [f.id for f in failures] == ["decode-0"]
        assert re.fullmatch(
            r"its engine failed inside while its API server runs: \(EngineCore_DP0 pid=\d+\) ERROR EngineCore "
            r"failed to start\.",
            failures[0].message,
        )
    finally:
        lifecycle.down(cluster_dir, grace_s=5)


def test_a_killed_daemon_is_back_within_seconds_with_its_engines_adopted_not_restarted(tmp_path, state_root):
    cluster_dir, started, failures = up(sim_profile(tmp_path, decode=2), state_root)
    assert failures == []
    before = cluster_dir.read_state()
    router = before.router
    os.kill(before.daemon.pid, signal.SIGKILL)
    killed_at = time.monotonic()

    def taken_over():
        state = cluster_dir.read_state()
        return state.daemon.pid != before.daemon.pid and state.phase.value == "ready" and state

    after = wait_for(taken_over, timeout=10, what="a new daemon, ready")
    answer = httpx.post(f"{router}/v1/completions", json={"model": "sim-model", "prompt": "hi", "max_tokens": 2})
    assert answer.status_code == 200 and time.monotonic() - killed_at < 10
    # The same engine processes, adopted: none restarted, none orphaned.
    assert {i: s.process.pid for i, s in after.instances.items()} == {
        i: s.process.pid for i, s in before.instances.items()
    }
    assert all(s.restarts == 0 for s in after.instances.values())
    assert "adopted: pid" in cluster_dir.daemon_log.read_text()
    assert started.watchdog.poll() is None  # still watching
    report = lifecycle.down(cluster_dir, grace_s=5)
    assert report.remaining == [] and procs.marked_processes(before.token) == []
    assert started.watchdog.wait(timeout=10) == 0


def test_two_ups_of_one_name(tmp_path, state_root):
    profile = sim_profile(tmp_path)
    cluster_dir, _, failures = up(profile, state_root)
    assert failures == []
    daemon = cluster_dir.read_state().daemon.pid
    with pytest.raises(ClusterError, match=f"cluster 'simc' is already running \\(daemon pid {daemon}\\)"):
        lifecycle.start(plan_profile(profile), ClusterDir(state_root, "simc"))


def test_a_taken_port_names_its_holder(tmp_path, state_root):
    profile = sim_profile(tmp_path)
    port = plan_profile(profile).plan.instances[1].port
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", port))
        holder.listen()
        with pytest.raises(ClusterError) as caught:
            lifecycle.start(plan_profile(profile), ClusterDir(state_root, "simc"))
    assert f"port {port} (decode-0) is taken by pid {os.getpid()}" in str(caught.value)
    assert not (state_root / "simc" / "state.json").exists()  # nothing started


def test_start_timeout_fails_up_with_the_log(tmp_path, state_root):
    # 6 s: long enough for a loaded machine to start Python and log the banner, far short of the 30 s delay.
    profile = sim_profile(tmp_path, extra='  extra_args: ["--startup-delay-s", "30"]\n')
    profile.write_text(profile.read_text().replace("start_timeout_s: 20", "start_timeout_s: 6"))
    _, _, failures = up(profile, state_root)
    # The first instance past its timeout fails `up`; the other may be a tick behind.
    assert failures and {f.id for f in failures} <= {"prefill-0", "decode-0"}
    assert all("start timeout of 6 s" in (f.message or "") for f in failures)
    assert any("pdctl sim engine" in line for line in failures[0].last_lines)


def test_an_instance_that_exits_at_start_fails_up_with_its_exit_code(tmp_path, state_root):
    profile = sim_profile(tmp_path, extra='  extra_args: ["--no-such-flag"]\n')
    _, _, failures = up(profile, state_root)
    assert failures and failures[0].exit_code == 2
    assert any("--no-such-flag" in line for line in failures[0].last_lines)


def test_cli_up_failure_prints_the_log_stops_everything_and_exits_non_zero(tmp_path):
    profile = sim_profile(tmp_path, extra='  extra_args: ["--no-such-flag"]\n')
    state = tmp_path / "cli-state"
    result = subprocess.run(
        [sys.executable, "-m", "pdctl", "up", str(profile), "--state-dir", str(state)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 1
    # Both instances refuse the flag; whichever exits first fails `up`.
    assert re.search(r"(prefill|decode)-0 failed: exited with code 2", result.stderr)
    assert "--no-such-flag" in result.stderr and "Traceback" not in result.stderr
    stopped = json.loads((state / "simc" / "state.stopped.json").read_text())
    assert procs.marked_processes(stopped["token"]) == []


def test_sim_instances_answer_through_their_ports_with_the_clusters_key(tmp_path, state_root):
    cluster_dir, started, failures = up(sim_profile(tmp_path), state_root)
    assert failures == []
    decode = started.plan.instances[1]
    assert httpx.get(f"{decode.url}/v1/models").status_code == 401  # only the router holds the engines' key
    models = httpx.get(f"{decode.url}/v1/models", headers={"authorization": f"Bearer {cluster_dir.engine_key()}"})
    assert models.json()["data"][0]["id"] == "sim-model"
    lifecycle.down(cluster_dir, grace_s=2)
    assert not cluster_dir.engine_key_file.exists()


def test_an_instance_that_keeps_crashing_is_marked_failed_and_the_rest_keeps_serving(tmp_path, state_root):
    extra = "  restart: {backoff_initial_s: 0.2, max_failures: 3, window_s: 60}\n"
    cluster_dir, _, failures = up(sim_profile(tmp_path, decode=2, extra=extra), state_root)
    assert failures == []
    for crash in range(3):

        def relaunched(crash=crash):
            status = cluster_dir.read_state().instances["decode-1"]
            return status.phase is InstancePhase.HEALTHY and status.restarts == crash and status

        victim = wait_for(relaunched, what=f"decode-1 healthy after {crash} restarts")
        os.killpg(victim.process.pid, signal.SIGKILL)

    def given_up():
        state = cluster_dir.read_state()
        return state.instances["decode-1"].phase is InstancePhase.FAILED and state

    state = wait_for(given_up, what="decode-1 marked failed")
    assert "failed 3 times in 60 s: given up" in state.instances["decode-1"].message
    assert state.phase.value == "degraded"
    report = lifecycle.status(cluster_dir)
    assert [(i.id, i.phase) for i in report.instances] == [
        ("prefill-0", "healthy"),
        ("decode-0", "healthy"),
        ("decode-1", "failed"),
    ]
    router = state.router
    answer = httpx.post(
        f"{router}/v1/completions", json={"model": "sim-model", "prompt": "still here", "max_tokens": 2}
    )
    assert answer.status_code == 200 and answer.headers["x-pdctl-decode"] == "decode-0"
    assert "given up" in cluster_dir.daemon_log.read_text()


def test_without_a_decode_instance_prefill_serves_whole_requests_then_503_with_retry_after(tmp_path, state_root):
    # One failure marks an instance failed: what is killed stays down.
    profile = sim_profile(tmp_path, name="degraded", extra="  restart: {max_failures: 1}\n")
    cluster_dir, _, failures = up(profile, state_root)
    assert failures == []
    state = cluster_dir.read_state()
    body = {"model": "sim-model", "prompt": "a prompt long enough to be split " * 40, "max_tokens": 4}

    def down_for_good(instance_id: str) -> None:
        os.killpg(state.instances[instance_id].process.pid, signal.SIGKILL)
        phase = lambda: cluster_dir.read_state().instances[instance_id].phase  # noqa: E731
        wait_for(lambda: phase() is InstancePhase.FAILED, what=f"{instance_id} marked failed")

    down_for_good("decode-0")
    answers = [httpx.post(f"{state.router}/v1/completions", json=body, timeout=10) for _ in range(10)]
    assert [a.status_code for a in answers] == [200] * 10
    assert {(a.headers["x-pdctl-phase"], a.headers["x-pdctl-decode"]) for a in answers} == {("HYBRID", "prefill-0")}
    health = httpx.get(f"{state.router}/health")
    assert health.status_code == 200 and health.json()["paths"] == ["prefill (whole requests: no decode instance)"]

    down_for_good("prefill-0")
    refused = httpx.post(f"{state.router}/v1/completions", json=body, timeout=10)
    assert refused.status_code == 503 and refused.headers["retry-after"] == "2"
    assert refused.json()["error"]["type"] == "ServiceUnavailableError"


def test_a_stalled_engine_s_streams_end_with_an_error_and_it_is_restarted(tmp_path, state_root):
    """SIGSTOP: the engine's process lives and its /health would answer once continued, but no token comes.
    The stream ends with an error instead of hanging, and the instance is restarted."""
    profile = sim_profile(tmp_path, name="stall", extra="  sim: {decode_ms_per_token: 20}\n")
    profile.write_text(profile.read_text().replace("router: {port:", "router: {stall_timeout_s: 1.5, port:"))
    cluster_dir, _, failures = up(profile, state_root)
    assert failures == []
    state = cluster_dir.read_state()
    body = {"model": "sim-model", "prompt": "short", "max_tokens": 400, "stream": True}
    started = time.monotonic()
    events: list[str] = []
    with httpx.stream("POST", f"{state.router}/v1/completions", json=body, timeout=30) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line)
            if len(events) == 5:
                os.killpg(state.instances["decode-0"].process.pgid, signal.SIGSTOP)
    took = time.monotonic() - started
    assert events[-1] == "data: [DONE]" and "stalled mid-stream: no token for 1.5 s" in events[-2]
    assert took < 6, f"the stalled stream took {took:.1f} s to end"

    def restarted():
        status = cluster_dir.read_state().instances["decode-0"]
        return status.phase is InstancePhase.HEALTHY and status.restarts == 1 and status

    wait_for(restarted, timeout=30, what="decode-0 restarted after its stall")
    assert "stalled" in cluster_dir.daemon_log.read_text()
    again = httpx.post(f"{state.router}/v1/completions", json={**body, "stream": False, "max_tokens": 4}, timeout=30)
    assert again.status_code == 200


def test_an_attach_only_profile_needs_no_engine_runtime(tmp_path, state_root):
    """Engines someone else runs: pdctl starts the router and its monitoring only, on a host without vLLM."""
    base = free_port_block(3, 22500)
    engine = subprocess.Popen(
        [sys.executable, "-m", "pdctl.engines.sim", "--port", str(base + 1), "--served-model-name", "theirs"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        profile = tmp_path / "attached.yaml"
        profile.write_text(
            "name: attached\nmodel: {path: org/theirs, served_name: theirs}\ndevice: cpu\n"
            "engine: {python: /opt/no-vllm/bin/python}\n"
            f"router: {{port: {base}}}\npd: {{enabled: false}}\n"
            f"instances:\n  - {{id: theirs-0, type: HYBRID, port: {base + 1}, launch: false}}\n"
        )
        planned = plan_profile(profile)
        assert any("needs no engine runtime" in note for note in planned.plan.notes)
        cluster_dir, _, failures = up(profile, state_root)
        assert failures == []
        answer = httpx.post(
            f"{cluster_dir.read_state().router}/v1/completions",
            json={"model": "theirs", "prompt": "hello", "max_tokens": 2},
            timeout=10,
        )
        assert answer.status_code == 200 and answer.headers["x-pdctl-decode"] == "theirs-0"
        assert lifecycle.down(cluster_dir, grace_s=2).remaining == []
        assert engine.poll() is None  # not pdctl's to stop
    finally:
        engine.kill()
        engine.wait()


def test_each_decode_instance_reads_one_kv_cache_from_each_prefill_instance_before_any_request(tmp_path, state_root):
    """The first KV transfer between two engines makes their NIXL handshake: the daemon pays it at start, and
    `up` returns once it has, so that no first request races it."""
    cluster_dir, _, failures = up(sim_profile(tmp_path, decode=2), state_root)
    assert failures == []
    plan = Plan.model_validate_json(cluster_dir.plan_file.read_bytes())
    decode = [i for i in plan.instances if i.id.startswith("decode")]
    assert [metric(i.url, "vllm:nixl_xfer_time_seconds_count") for i in decode] == [1.0, 1.0]
    time.sleep(0.5)  # nothing more comes: one per pair
    assert [metric(i.url, "vllm:nixl_xfer_time_seconds_count") for i in decode] == [1.0, 1.0]


def test_an_instance_whose_port_another_process_holds_waits_blocked_then_starts_without_spending_restarts(
    tmp_path, state_root
):
    """A held port is no fault of the engine's: however often it is found taken, the instance is not given up."""
    extra = "  restart: {backoff_initial_s: 2, backoff_max_s: 2, max_failures: 2, window_s: 60}\n"
    cluster_dir, _, failures = up(sim_profile(tmp_path, extra=extra), state_root)
    assert failures == []
    before = cluster_dir.read_state().instances["decode-0"]
    plan = Plan.model_validate_json(cluster_dir.plan_file.read_bytes())
    port = next(i.port for i in plan.instances if i.id == "decode-0")
    os.killpg(before.process.pid, signal.SIGKILL)
    wait_for(lambda: lifecycle.port_owner("127.0.0.1", port) is None, what="decode-0's port free")
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", port))
        holder.listen()

        def blocked_naming_us():
            status = cluster_dir.read_state().instances["decode-0"]
            return status.phase is InstancePhase.BLOCKED and f"taken by pid {os.getpid()}" in (status.message or "")

        wait_for(blocked_naming_us, what="decode-0 blocked, naming the port's holder")
        time.sleep(5)  # tried again every 2 s: more often than max_failures allows
        assert cluster_dir.read_state().instances["decode-0"].phase is InstancePhase.BLOCKED
    wait_for(
        lambda: cluster_dir.read_state().instances["decode-0"].phase is InstancePhase.HEALTHY,
        what="decode-0 healthy once the port is free",
    )
