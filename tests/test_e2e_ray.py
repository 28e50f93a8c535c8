"""Real vLLM (CPU build, NIXL) on a Ray cluster of two nodes on this machine: the head on 127.0.0.2 (core 0)
runs the decode instance, a worker node on 127.0.0.3 (core 1) the prefill instance. A request through the
router moves its KV cache by NIXL from one node to the other; the worker node lost, its instance is blocked
with the reason while the router keeps answering; `down` leaves nothing on either node."""

from __future__ import annotations

import os
import time

import httpx
import psutil
import pytest
import yaml

from pdctl import lifecycle, procs
from tests.clusters import free_port_block, up, wait_for
from tests.e2e import LOCAL_PROFILE
from tests.raynodes import RayNodes, named_actors

pytest.importorskip("ray")
pytestmark = pytest.mark.e2e

HEAD, WORKER = "127.0.0.2", "127.0.0.3"


def two_node_profile(tmp_path, head: str):
    base = free_port_block(60, 27000)
    profile = yaml.safe_load(LOCAL_PROFILE.read_text())
    profile.update(
        name="raypd",
        launcher={"kind": "ray", "address": head, "decode": {"resources": {"decode_node": 1}}},
        router={**profile["router"], "port": base},
        ports={"instances": base + 1, "nixl_side_channel": base + 50},
    )
    path = tmp_path / "raypd.yaml"
    path.write_text(yaml.safe_dump(profile))
    return path


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def test_pd_across_two_ray_nodes_moves_kv_by_nixl_and_survives_a_lost_node(tmp_path, engine_runtime):
    nodes = RayNodes()
    cluster_dir = None
    try:
        head = nodes.add(HEAD, cpus=1, resources={"decode_node": 1}, cores="0")
        nodes.add(WORKER, cpus=1, cores="1")
        nodes.wait_alive(2)
        cluster_dir, _, failures = up(two_node_profile(tmp_path, head), tmp_path / "state")
        assert failures == [], [(f.id, f.message, f.last_lines[-5:]) for f in failures]
        state = cluster_dir.read_state()
        token, router = state.token, state.router
        where = {i.id: i for i in lifecycle.status(cluster_dir).instances}
        assert (where["prefill-0"].node, where["decode-0"].node) == (WORKER, HEAD)
        decode_url = f"http://{HEAD}:{where['decode-0'].port}"

        # Prefill on 127.0.0.3, decode on 127.0.0.2: the KV cache crosses nodes through NIXL.
        body = {"model": "pdctl-tiny-llama", "prompt": "a prompt long enough for the prefill pool " * 4}
        answer = httpx.post(f"{router}/v1/completions", json={**body, "max_tokens": 8}, timeout=300)
        assert answer.status_code == 200, answer.text
        # vLLM publishes the connector's figures with its engine stats, a moment after the request.
        wait_for(lambda: metric(decode_url, "vllm:nixl_xfer_time_seconds_count") >= 1, 15, "a NIXL transfer counted")
        # The engine's log on its node is copied to the cluster's state directory (once a second): `pdctl logs`
        # reads it.
        log = lifecycle.log_path(cluster_dir, "prefill-0")
        wait_for(lambda: "Application startup complete" in log.read_text(), 10, "prefill-0's log copied here")

        # The worker node lost: its prefill instance has no node with room (blocked, with the reason);
        # the router keeps answering on the decode instance alone, and the engine died with its actor.
        prefill_group = cluster_dir.read_state().instances["prefill-0"].process.pgid
        nodes.lose(WORKER)
        blocked = wait_for(lambda: _instance(cluster_dir, "prefill-0").phase == "blocked", 90, "prefill-0 blocked")
        assert blocked and "no Ray node with 1 free CPU" in (_instance(cluster_dir, "prefill-0").message or "")
        for _ in range(3):
            again = httpx.post(f"{router}/v1/completions", json={**body, "max_tokens": 4}, timeout=120)
            assert again.status_code == 200, again.text
        _wait_group_gone(prefill_group, 60)
    finally:
        if cluster_dir is not None:
            report = lifecycle.down(cluster_dir, grace_s=5)
        actors = named_actors(nodes.head) if nodes.head and HEAD in nodes.nodes else []
        nodes.stop()
    assert report.remaining == [] and procs.marked_processes(token) == []
    assert [a for a in actors if a["namespace"].startswith("pdctl-raypd")] == []


def _instance(cluster_dir, instance_id: str):
    return next(i for i in lifecycle.status(cluster_dir).instances if i.id == instance_id)


def _wait_group_gone(pgid: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while members := [p for p in psutil.pids() if _pgid(p) == pgid]:
        if time.monotonic() > deadline:
            raise AssertionError(f"the lost node's engine (process group {pgid}) still runs: {members}")
        time.sleep(0.5)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None
