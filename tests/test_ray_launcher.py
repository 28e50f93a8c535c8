"""The Ray launcher on a real Ray cluster of four nodes on this machine (127.0.0.2 to 127.0.0.5), with sim
engines: placement by node resource, scale-out and scale-in across nodes, lost nodes, and `down` after the
daemon was SIGKILLed. The sim engine stands in for vLLM here (it says so in every answer); the real engine
on two Ray nodes is tested in test_e2e_ray.py."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
import pytest

from pdctl import lifecycle, procs
from pdctl.cluster import plan_profile
from pdctl.engines.commands import LaunchPrefix
from pdctl.errors import ClusterError, PlacementError, UsageError
from pdctl.gpus import GpuInventory
from pdctl.launchers import launcher_class
from pdctl.launchers.ray_cluster import RayLauncher, RayNode
from pdctl.plan import make_plan
from pdctl.profile import load_profile
from pdctl.scaling import control
from pdctl.state import ClusterDir
from tests.clusters import free_port_block, up, wait_for
from tests.raynodes import RayNodes, named_actors
from tests.scaling_load import Load, Watch

pytest.importorskip("ray")

NODES = {"127.0.0.2": {"prefill_node": 1}, "127.0.0.3": {"decode_node": 1}, "127.0.0.4": {"decode_node": 1}}
SPARE_DECODE_NODE = "127.0.0.5"


@pytest.fixture(scope="module")
def ray_nodes():
    nodes = RayNodes()
    try:
        for address, resources in NODES.items():
            nodes.add(address, cpus=1, resources=resources)
        nodes.add(SPARE_DECODE_NODE, cpus=1, resources={"decode_node": 1})
        nodes.wait_alive(4)
        yield nodes
    finally:
        nodes.stop()


def ray_profile(tmp_path: Path, head: str, name: str, pd: str = "", launcher: str = "") -> Path:
    base = free_port_block(12, 25000)
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"name: {name}\nmodel: {{path: sim-model}}\ndevice: cpu\n"
        "engine: {kind: sim, start_timeout_s: 30, restart: {backoff_max_s: 2}}\n"
        f"launcher: {{kind: ray, address: '{head}', prefill: {{resources: {{prefill_node: 1}}}}, "
        f"decode: {{resources: {{decode_node: 1}}}}{launcher}}}\n"
        f"router: {{port: {base}}}\nports: {{instances: {base + 1}, nixl_side_channel: {base + 50}}}\n"
        + (pd or "pd: {prefilling_min_instances: 1, decoding_min_instances: 1, enable_dynamic_scaling: false}\n")
        + "scaling: {mode: off, interval_s: 0.5}\n"
    )
    return path


def nodes_of(cluster_dir) -> dict[str, str | None]:
    return {i.id: i.node for i in lifecycle.status(cluster_dir).instances}


def test_plan_places_each_role_on_the_nodes_with_its_resource(tmp_path, ray_nodes):
    plan = plan_profile(ray_profile(tmp_path, ray_nodes.head, "placed")).plan
    placed = {i.id: i for i in plan.instances}
    assert placed["prefill-0"].node == "127.0.0.2" and placed["prefill-0"].host == "127.0.0.2"
    assert placed["decode-0"].node in ("127.0.0.3", "127.0.0.4", SPARE_DECODE_NODE)
    assert placed["decode-0"].needs == {"CPU": 1.0, "decode_node": 1.0}
    assert f"--host {placed['decode-0'].node}" in " ".join(placed["decode-0"].argv)


def test_bad_input_is_named_before_anything_starts(tmp_path, ray_nodes):
    silent = ray_profile(tmp_path, "127.0.0.9:1", "silent")
    with pytest.raises(UsageError, match=r"the Ray cluster at 127.0.0.9:1 \(launcher.address\) does not answer"):
        plan_profile(silent)
    too_big = ray_profile(tmp_path, ray_nodes.head, "big", launcher=", cpus_per_instance: 4")
    with pytest.raises(PlacementError, match="no Ray node with 4 free CPUs and prefill_node for prefill-0"):
        plan_profile(too_big)
    unknown = ray_profile(tmp_path, ray_nodes.head, "odd", launcher=", instances: {decode-0: {resources: {tpu: 1}}}")
    with pytest.raises(PlacementError, match="asks for node resource tpu, which no Ray node has"):
        plan_profile(unknown)


def test_a_node_without_the_engine_runtime_is_named_before_anything_starts(tmp_path, ray_nodes):
    profile = ray_profile(tmp_path, ray_nodes.head, "bare")
    text = profile.read_text().replace("engine: {kind: sim,", "engine: {kind: vllm, python: /opt/none/bin/python,")
    profile.write_text(text.replace("model: {path: sim-model}", "model: {path: org/some-model}"))
    with pytest.raises(ClusterError, match=r"Ray node 127.0.0.\d has no engine runtime: /opt/none/bin/python"):
        lifecycle.start(plan_profile(profile), ClusterDir(tmp_path / "state", "bare"))
    assert not (tmp_path / "state" / "bare" / "state.json").exists()  # nothing started


def test_plan_of_a_silent_ray_cluster_says_what_each_instance_needs(tmp_path):
    plan = plan_profile(ray_profile(tmp_path, "127.0.0.9:1", "offline"), dry_run=True).plan
    assert [(i.node, i.needs) for i in plan.launched] == [
        (None, {"CPU": 1.0, "prefill_node": 1.0}),
        (None, {"CPU": 1.0, "decode_node": 1.0}),
    ]
    assert launcher_class("ray").where(plan) == (
        "on the Ray cluster at 127.0.0.9:1 (it did not answer: each instance says what it needs)"
    )


def gpu_nodes(monkeypatch, launcher: RayLauncher, gpus_per_node: list[int]) -> None:
    """Ray nodes with GPUs, which this machine has none of: the one seam, the launcher's node list."""
    nodes = [
        RayNode({"NodeID": f"n{i}", "NodeManagerAddress": f"10.0.0.{i + 1}", "Resources": {"GPU": g, "CPU": 32}})
        for i, g in enumerate(gpus_per_node)
    ]
    monkeypatch.setattr(launcher, "nodes", lambda: nodes)


def plan_on_gpus(tmp_path, monkeypatch, gpus_per_node: list[int], decode_tp: int, decode: int = 1):
    path = tmp_path / "gpus.yaml"
    path.write_text(
        "name: gpus\nmodel: {path: org/model}\nlauncher: {kind: ray, address: '10.0.0.1:6379'}\n"
        f"pd: {{prefilling_min_instances: 1, decoding_min_instances: {decode}}}\n"
        f"prefill: {{tensor_parallel_size: 2}}\ndecode: {{tensor_parallel_size: {decode_tp}}}\n"
    )
    profile = load_profile(path)
    launcher = RayLauncher(profile.launcher, profile.name)
    gpu_nodes(monkeypatch, launcher, gpus_per_node)
    prefix = LaunchPrefix(argv=("/bin/true",))
    return make_plan(profile, GpuInventory(), placer=launcher, model_path="org/model", launch_prefix=prefix)


def test_gpu_instances_get_their_gpus_on_one_node(tmp_path, monkeypatch):
    plan = plan_on_gpus(tmp_path, monkeypatch, [2, 4], decode_tp=4)
    placed = {i.id: (i.node, i.needs) for i in plan.launched}
    assert placed == {"decode-0": ("10.0.0.2", {"GPU": 4.0}), "prefill-0": ("10.0.0.1", {"GPU": 2.0})}
    assert plan.device == "cuda"
    assert all("CUDA_VISIBLE_DEVICES" not in i.env for i in plan.launched)  # Ray hands out the node's GPUs
    with pytest.raises(PlacementError, match="instance decode-0 needs 4 GPUs on one node; the largest Ray node has 2"):
        plan_on_gpus(tmp_path, monkeypatch, [2, 2], decode_tp=4)
    with pytest.raises(PlacementError, match="no Ray node with 2 free GPUs for decode-1"):
        plan_on_gpus(tmp_path, monkeypatch, [2, 2], decode_tp=2, decode=2)


def test_scale_and_lose_nodes_then_down_after_the_daemon_was_killed(tmp_path, ray_nodes):
    pd = (
        "pd: {prefilling_min_instances: 1, prefilling_max_instances: 1, decoding_min_instances: 1,\n"
        "     decoding_max_instances: 3, routing_policy: never, enable_dynamic_scaling: false}\n"
    )
    cluster_dir, started, failures = up(ray_profile(tmp_path, ray_nodes.head, "spread", pd), tmp_path / "state")
    token = cluster_dir.read_state().token
    try:
        assert failures == []
        router = cluster_dir.read_state().router
        load = Load(router)
        load.set_clients(2)
        watch = Watch(cluster_dir.path)
        try:
            # Scale-out: each new decode instance on another node with decode_node.
            control.send(cluster_dir, control.ScaleRequest(decode=3))
            watch.wait_for("decode", 3, timeout_s=30)
            decode_nodes = {i: n for i, n in nodes_of(cluster_dir).items() if i.startswith("decode")}
            assert sorted(decode_nodes.values()) == ["127.0.0.3", "127.0.0.4", SPARE_DECODE_NODE]
            # Scale-in: one drained and stopped, its node free again.
            control.send(cluster_dir, control.ScaleRequest(decode=2))
            watch.wait_for("decode", 2, timeout_s=30)
            kept = {i: n for i, n in nodes_of(cluster_dir).items() if i.startswith("decode")}
            free_node = (set(decode_nodes.values()) - set(kept.values())).pop()

            # A node lost: its instance starts again on the node with room, and the router follows it.
            moved_id, lost_node = sorted(kept.items())[0]
            ray_nodes.lose(lost_node)
            wait_for(lambda: nodes_of(cluster_dir)[moved_id] == free_node, 60, f"{moved_id} moved to {free_node}")
            wait_for(lambda: _phase(cluster_dir, moved_id) == "healthy", 30, f"{moved_id} healthy again")
            moved_url = f"http://{free_node}:{_port(cluster_dir, moved_id)}"
            wait_for(lambda: _generated(moved_url) > 0, 30, f"the router sends to {moved_id} at {moved_url}")

            # Another node lost, and no node with decode_node has room: blocked, with the reason.
            other_id, other_node = next((i, n) for i, n in kept.items() if i != moved_id)
            ray_nodes.lose(other_node)
            reason = wait_for(lambda: _blocked(cluster_dir, other_id), 60, f"{other_id} blocked")
            assert "no Ray node with 1 free CPU and decode_node" in reason
            assert httpx.post(f"{router}/v1/completions", json=_body(), timeout=30).status_code == 200
        finally:
            load.stop()
            watch.close()
        assert load.ok > 10

        # The daemon SIGKILLed: its watchdog starts another, which adopts the engines through their actors.
        first = cluster_dir.read_state()
        os.kill(first.daemon.pid, signal.SIGKILL)
        renewed = lambda: cluster_dir.read_state().daemon.pid != first.daemon.pid and _answers(router)  # noqa: E731
        wait_for(renewed, 10, "the router back under a new daemon")
        assert cluster_dir.read_state().instances[moved_id].process.pid == first.instances[moved_id].process.pid
        assert "adopted: pid" in cluster_dir.daemon_log.read_text()
        # Daemon and watchdog SIGKILLed: down still finds every actor and engine process on every node.
        os.kill(started.watchdog.pid, signal.SIGKILL)
        started.watchdog.wait(timeout=10)
        os.kill(cluster_dir.read_state().daemon.pid, signal.SIGKILL)
    finally:
        report = lifecycle.down(cluster_dir, grace_s=2)
    assert report.remaining == [] and procs.marked_processes(token) == []
    assert [a for a in named_actors(ray_nodes.head) if a["namespace"].startswith("pdctl-spread")] == []
    assert lifecycle.down(cluster_dir).was_running is False  # twice is safe


def _phase(cluster_dir, instance_id: str) -> str:
    return next(i.phase for i in lifecycle.status(cluster_dir).instances if i.id == instance_id)


def _port(cluster_dir, instance_id: str) -> int:
    return next(i.port for i in lifecycle.status(cluster_dir).instances if i.id == instance_id)


def _blocked(cluster_dir, instance_id: str) -> str | None:
    found = next(i for i in lifecycle.status(cluster_dir).instances if i.id == instance_id)
    return found.message if found.phase == "blocked" else None


def _answers(router: str) -> bool:
    try:
        return httpx.post(f"{router}/v1/completions", json=_body(), timeout=30).status_code == 200
    except httpx.HTTPError:
        return False


def _generated(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("vllm:generation_tokens"))


def _body() -> dict:
    return {"model": "sim-model", "prompt": "hello " * 10, "max_tokens": 4}
