"""Dynamic scaling on sim clusters: real daemons, real sim processes, real sockets, load from client threads.

The sim engine stands in for vLLM here (it says so in every answer); the policy's own arithmetic is tested
without processes in test_scaling_policy.py.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from pdctl import lifecycle, procs
from pdctl.scaling import control
from pdctl.scaling.report import read_report
from tests.clusters import sim_profile, up
from tests.scaling_load import Load, Watch

FAST = (
    "scaling: {interval_s: 0.5, forecast_interval_s: 5, scale_out_after_s: 2, scale_in_after_s: 4, "
    "warmup_s: 2, window_s: 5, drain_timeout_s: 30}\n"
)


def scaling_profile(tmp_path: Path, name: str, pd: str, sections: str, port_start: int) -> Path:
    profile = sim_profile(tmp_path, name=name, port_start=port_start, extra="  sim: {decode_ms_per_token: 20}\n")
    text = re.sub(r"^pd: \{.*\}\n", pd, profile.read_text(), flags=re.MULTILINE)
    profile.write_text(text + sections)
    return profile


@pytest.fixture
def started(tmp_path):
    """Starts a cluster from a profile, and always stops it: no process may outlive a test."""
    clusters = []

    def start(profile: Path):
        cluster_dir, _, failures = up(profile, tmp_path / "state")
        clusters.append(cluster_dir)
        assert failures == []
        return cluster_dir, cluster_dir.read_state().router

    yield start
    for cluster_dir in clusters:
        token = cluster_dir.read_state().token if cluster_dir.read_state() else None
        lifecycle.down(cluster_dir, grace_s=2)
        if token:
            assert procs.marked_processes(token) == []


def pdctl(*args: str, state: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PDCTL_STATE_DIR": str(state)}
    return subprocess.run([sys.executable, "-m", "pdctl", *args], capture_output=True, text=True, env=env, timeout=60)


def running(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("vllm:num_requests_running")
    )


def generated_tokens(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("vllm:generation_tokens"))


def test_scale_by_hand_adds_then_drains_both_pools_under_load_losing_nothing(tmp_path, started):
    pd = (
        "pd: {prefilling_min_instances: 1, prefilling_max_instances: 2, decoding_min_instances: 1,\n"
        "     decoding_max_instances: 2, routing_policy: always}\n"
    )
    profile = scaling_profile(tmp_path, "manual", pd, "scaling: {mode: off, interval_s: 0.5}\n", 23000)
    cluster_dir, router = started(profile)
    load = Load(router, prompt="A long prompt that goes through a prefill instance first. " * 4)
    load.set_clients(4)
    watch = Watch(cluster_dir.path)
    try:
        done = pdctl("scale", "--prefill", "2", "--decode", "2", state=tmp_path / "state")
        assert done.returncode == 0, done.stderr
        assert "decode set to 2 by hand" in done.stdout
        watch.wait_for("decode", 2, timeout_s=30)
        watch.wait_for("prefill", 2, timeout_s=30)
        report = lifecycle.status(cluster_dir)
        added = {i.id: i for i in report.instances if i.id in ("prefill-1", "decode-1")}
        assert set(added) == {"prefill-1", "decode-1"}
        assert all(i.phase == "healthy" and i.pid for i in added.values())
        time.sleep(3)  # the router spreads new requests over the new instances too
        assert generated_tokens(f"http://127.0.0.1:{added['decode-1'].port}") > 0
        pids = {i.id: i.pid for i in report.instances}

        refused = pdctl("scale", "--decode", "5", state=tmp_path / "state")
        assert refused.returncode == 2 and "outside the pool's bounds 1..2" in refused.stderr

        control.send(cluster_dir, control.ScaleRequest(prefill=1, decode=1))
        watch.wait_for("decode", 1, timeout_s=45)
        watch.wait_for("prefill", 1, timeout_s=45)
        time.sleep(1)
    finally:
        load.stop()
        watch.close()
    assert load.failures == [] and load.ok > 20
    remaining = {i.id for i in lifecycle.status(cluster_dir).instances}
    assert len(remaining) == 2  # the least loaded of each pool was drained and stopped
    assert not any(_is_sim(pid) for id_, pid in pids.items() if id_ not in remaining)
    decisions = read_report(cluster_dir.path).decisions
    assert [d.outcome.split(":")[0] for d in decisions if d.delta < 0] == ["done", "done"]
    shown = pdctl("status", state=tmp_path / "state")
    assert "scaling (off)" in shown.stdout and "set to 1 by hand" in shown.stdout


def _is_sim(pid: int) -> bool:
    try:
        return "pdctl.engines.sim" in " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return False


def test_step_up_then_down_scales_out_and_back_to_min_within_bounds(tmp_path, started):
    pd = (
        "pd: {prefilling_min_instances: 1, prefilling_max_instances: 1, decoding_min_instances: 1,\n"
        "     decoding_max_instances: 3, routing_policy: never}\n"
    )
    profile = scaling_profile(tmp_path, "step", pd, FAST + "decode: {max_parallel_requests: 4}\n", 24000)
    cluster_dir, router = started(profile)
    load = Load(router)
    watch = Watch(cluster_dir.path)
    try:
        time.sleep(3)  # past the first instances' warm-up
        load.set_clients(10)
        out_s = watch.wait_for("decode", 3, timeout_s=40)
        grown = read_report(cluster_dir.path)
        load.set_clients(0)
        in_s = watch.wait_for("decode", 1, timeout_s=90)
    finally:
        load.stop()
        watch.close()
    print(f"step up: decode 1 -> 3 in {out_s:.1f} s; step down: 3 -> 1 in {in_s:.1f} s")
    assert load.failures == [] and load.ok > 50
    sizes = watch.sizes("decode")
    assert min(sizes) >= 1 and max(sizes) <= 3
    reasons = [d.reason for d in grown.decisions if d.pool == "decode" and d.delta > 0]
    assert any(re.search(r"decode \+\d: (slots busy \d+%|floor \d)", r) for r in reasons), reasons
    final = read_report(cluster_dir.path)
    downs = [d for d in final.decisions if d.pool == "decode" and d.delta < 0]
    assert len(downs) == 2 and all("on " in d.reason and d.outcome.startswith("done") for d in downs)
    metrics = httpx.get(f"{router}/metrics").text
    assert 'pdctl_scaler_instances{pool="decode"} 1' in metrics
    assert 'pdctl_scaler_pool_info{pool="decode",mode="auto"} 1' in metrics
    assert 'pdctl_scaler_decisions_total{pool="decode",direction="in",loop="reactive",outcome="done"} 2' in metrics


def test_constant_load_settles_without_flapping(tmp_path, started):
    pd = (
        "pd: {prefilling_min_instances: 1, prefilling_max_instances: 1, decoding_min_instances: 1,\n"
        "     decoding_max_instances: 4, routing_policy: never}\n"
    )
    profile = scaling_profile(tmp_path, "steady", pd, FAST + "decode: {max_parallel_requests: 4}\n", 25000)
    cluster_dir, router = started(profile)
    load = Load(router)
    watch = Watch(cluster_dir.path)
    try:
        time.sleep(3)
        load.set_clients(6)
        watch.wait_for("decode", 2, timeout_s=40)
        settled = _settle(watch, "decode", quiet_s=10, timeout_s=60)
        time.sleep(25)
    finally:
        load.stop()
        watch.close()
    after = [p.current for r in watch.seen[settled:] for p in r.pools if p.pool == "decode"]
    changes = sum(1 for a, b in itertools.pairwise(after) if a != b)
    print(f"constant load: decode sizes after settling {sorted(set(after))}, {changes} changes")
    assert changes <= 1 and max(after) <= 4
    assert load.failures == []


def test_advisory_mode_explains_but_never_acts(tmp_path, started):
    pd = (
        "pd: {prefilling_min_instances: 1, prefilling_max_instances: 1, decoding_min_instances: 1,\n"
        "     decoding_max_instances: 3, routing_policy: never}\n"
    )
    sections = FAST.replace("{", "{mode: advisory, ", 1) + "decode: {max_parallel_requests: 4}\n"
    profile = scaling_profile(tmp_path, "advice", pd, sections, 26000)
    cluster_dir, router = started(profile)
    load = Load(router)
    try:
        time.sleep(3)
        load.set_clients(10)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            report = read_report(cluster_dir.path)
            if report and any(d.outcome.startswith("advisory") for d in report.decisions):
                break
            time.sleep(0.3)
    finally:
        load.stop()
    decode = next(p for p in report.pools if p.pool == "decode")
    assert decode.current == 1 and decode.desired > 1
    assert len(lifecycle.status(cluster_dir).instances) == 2
    assert "advisory: " in cluster_dir.daemon_log.read_text()


def test_slow_sine_grows_and_shrinks_within_bounds_losing_nothing(tmp_path, started):
    pd = (
        "pd: {prefilling_min_instances: 1, prefilling_max_instances: 2, decoding_min_instances: 1,\n"
        "     decoding_max_instances: 3, routing_policy: always}\n"
    )
    profile = scaling_profile(tmp_path, "sine", pd, FAST + "decode: {max_parallel_requests: 4}\n", 27000)
    cluster_dir, router = started(profile)
    load = Load(router, prompt="A prompt long enough to be prefilled on its own instance first. " * 3)
    watch = Watch(cluster_dir.path)
    period_s, began = 60.0, time.monotonic()
    try:
        time.sleep(3)
        while (elapsed := time.monotonic() - began) < 2 * period_s:
            load.set_clients(round(6 - 5 * math.cos(2 * math.pi * elapsed / period_s)))  # 1 -> 11 -> 1, twice
            time.sleep(1)
    finally:
        load.stop()
        watch.close()
    decode, prefill = watch.sizes("decode"), watch.sizes("prefill")
    print(f"sine: decode sizes {sorted(set(decode))}, prefill sizes {sorted(set(prefill))}, {load.ok} answered")
    assert load.failures == [] and load.ok > 100
    assert min(decode) >= 1 and max(decode) <= 3 and min(prefill) >= 1 and max(prefill) <= 2
    decisions = read_report(cluster_dir.path).decisions
    assert any(d.pool == "decode" and d.delta > 0 for d in decisions)
    assert any(d.pool == "decode" and d.delta < 0 for d in decisions)


def test_a_drain_past_its_deadline_reports_what_it_cut(tmp_path, started):
    pd = (
        "pd: {prefilling_min_instances: 1, prefilling_max_instances: 1, decoding_min_instances: 1,\n"
        "     decoding_max_instances: 2, routing_policy: never}\n"
    )
    # Two slots per decode instance and four clients: whichever instance is drained holds requests.
    sections = "scaling: {mode: off, interval_s: 0.5, drain_timeout_s: 1}\ndecode: {max_parallel_requests: 2}\n"
    profile = scaling_profile(tmp_path, "cut", pd, sections, 28000)
    cluster_dir, router = started(profile)
    watch = Watch(cluster_dir.path)
    control.send(cluster_dir, control.ScaleRequest(decode=2))
    watch.wait_for("decode", 2, timeout_s=30)
    load = Load(router, max_tokens=400)  # 8 s per answer at 20 ms a token: longer than the 1 s drain deadline
    try:
        load.set_clients(4)
        decoders = [
            f"http://127.0.0.1:{i.port}" for i in lifecycle.status(cluster_dir).instances if i.role == "DECODING"
        ]
        deadline = time.monotonic() + 30
        while not all(running(url) for url in decoders) and time.monotonic() < deadline:
            time.sleep(0.2)
        control.send(cluster_dir, control.ScaleRequest(decode=1))
        watch.wait_for("decode", 1, timeout_s=30)
    finally:
        load.stop()
        watch.close()
    cut = [d.outcome for d in read_report(cluster_dir.path).decisions if d.delta < 0]
    assert len(cut) == 1 and re.match(r"drain deadline 1 s passed: cut [1-9]\d* in-flight requests", cut[0]), cut
    assert "drain deadline 1 s passed" in cluster_dir.daemon_log.read_text()


def _settle(watch: Watch, pool: str, quiet_s: float, timeout_s: float) -> int:
    """Where the pool has settled: the index in watch.seen after which its size held for quiet_s (a forecast
    may still add one instance after the first step; the no-flapping rule is about what follows)."""
    deadline = time.monotonic() + timeout_s
    count, size, since = len(watch.seen), watch.sizes(pool)[-1], time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < quiet_s:
        time.sleep(0.5)
        now_size = watch.sizes(pool)[-1]
        if now_size != size:
            count, size, since = len(watch.seen), now_size, time.monotonic()
    return count


def test_the_documents_remedy_raises_a_bound_on_the_running_cluster(tmp_path, started):
    """`pd_config.prefilling_max_instances = 6` in the design document: through the Python API (and
    `pdctl scale --set`), a pool's maximum and dynamic scaling change on the running cluster, no restart."""
    from pydantic import ValidationError

    from pdctl.control_plane.cluster import running_pd_config

    pd = (
        "pd: {prefilling_min_instances: 1, prefilling_max_instances: 1, decoding_min_instances: 1,\n"
        "     decoding_max_instances: 1, routing_policy: never, enable_dynamic_scaling: false}\n"
    )
    profile = scaling_profile(tmp_path, "remedy", pd, FAST + "decode: {max_parallel_requests: 4}\n", 27500)
    cluster_dir, router = started(profile)
    state = tmp_path / "state"
    refused = pdctl("scale", "remedy", "--decode", "2", state=state)
    assert refused.returncode == 2 and "outside the pool's bounds 1..1" in refused.stderr
    pd_config = running_pd_config("remedy", state)
    pd_config.decoding_max_instances = 3
    pd_config.enable_dynamic_scaling = True
    with pytest.raises(ValidationError, match=r"decoding_min_instances \(5\) is above decoding_max_instances \(3\)"):
        pd_config.decoding_min_instances = 5
    assert pd_config.decoding_min_instances == 1
    report = read_report(cluster_dir.path)
    decode = next(p for p in report.pools if p.pool == "decode")
    assert (decode.min, decode.max) == (1, 3) and report.mode != "off"
    assert any(d.pool == "pd" and "decoding_max_instances 1 -> 3" in d.reason for d in report.decisions)
    assert running_pd_config("remedy", state).decoding_max_instances == 3  # what a later reader sees
    raised = pdctl("scale", "remedy", "--set", "prefilling_max_instances=2", "--decode", "2", "--json", state=state)
    assert raised.returncode == 0, raised.stderr
    watch = Watch(cluster_dir.path)
    try:
        watch.wait_for("decode", 2, timeout_s=40)
    finally:
        watch.close()
    assert (
        httpx.post(f"{router}/v1/completions", json={"model": "sim-model", "prompt": "hi", "max_tokens": 2}).status_code
        == 200
    )
