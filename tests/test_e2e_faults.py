"""Engine faults on the real CPU build of vLLM, one prefill and two decode instances, under streamed load: no
request is lost, streams move mid-stream token for token, every fault is recovered from, nothing is left behind.

The faults share recovery windows (an engine restart takes a minute on two cores): each test injects its
fault and the next one that needs the whole cluster waits for it. The pieces are benchmarks/faults.py's, whose
suite prints the same faults as a table.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from benchmarks import faults
from pdctl import lifecycle, procs
from pdctl.state import ClusterDir, InstancePhase

pytestmark = pytest.mark.e2e

RECOVERY_S = 300  # two engines restarting at once on two cores, with the load on


class FaultCluster:
    def __init__(self, cluster_dir: ClusterDir, model: str):
        self.dir, self.model = cluster_dir, model
        self.seen_groups: set[int] = set()
        self.lives: dict[str, tuple[int | None, int]] = {}  # instances' incarnations before the last fault
        self.note_groups()

    @property
    def router(self) -> str:
        return faults.router_url(self.dir)

    def note_groups(self) -> dict[str, int | None]:
        now = faults.groups(self.dir)
        self.seen_groups |= {g for g in now.values() if g}
        return now

    def wait_replaced(self, before: dict[str, tuple[int | None, int]], *instances: str) -> None:
        """Until each of `instances` runs as a new process and the cluster is whole."""
        recovered = faults.wait_recovered(self.dir, before, time.monotonic(), RECOVERY_S, replaced=instances)
        assert recovered is not None, self.dir.read_state()
        self.note_groups()

    def migrations(self) -> float:
        text = httpx.get(f"{self.router}/metrics", timeout=10).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("pdctl_router_mig"))

    def load(self) -> faults.StreamLoad:
        return faults.StreamLoad(self.router, self.model, streams=8, max_tokens=64, hang_s=60)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, engine_runtime):
    tmp = tmp_path_factory.mktemp("faults")
    cluster_dir, started = faults.up(faults.fault_profile(tmp, decode=2), tmp / "state")
    token = cluster_dir.read_state().token
    fault_cluster = FaultCluster(cluster_dir, started.plan.served_model_name)
    try:
        yield fault_cluster
    finally:
        fault_cluster.note_groups()
        report = lifecycle.down(cluster_dir)
        assert report.remaining == []
        assert faults.left_behind(token, fault_cluster.seen_groups) == [], "down left processes behind"
        assert procs.marked_processes(token) == []


def stream_text(url: str, body: dict, parts: list[str] | None = None) -> str:
    """A stream's whole text; `parts` gets each piece as it comes (for a test that waits for a stream to be
    under way)."""
    chat = "messages" in body
    parts = [] if parts is None else parts
    with httpx.stream("POST", url + ("/v1/chat/completions" if chat else "/v1/completions"),
                      json={**body, "stream": True}, timeout=120) as response:  # fmt: skip
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                assert "error" not in event, event
                for choice in event["choices"]:
                    parts.append(choice["delta"].get("content") or "" if chat else choice["text"])
    return "".join(parts)


def test_streams_on_stalled_decode_engines_move_token_for_token(cluster: FaultCluster):
    """Both decode engines SIGSTOPped mid-stream: a completions and a chat stream at temperature 0 move (to the
    prefill instance, the only one left) and are, character for character, the streams without the fault."""
    common = {"model": cluster.model, "max_tokens": 1500, "temperature": 0}
    bodies = [
        {**common, "prompt": "Write a story about a lighthouse"},
        {**common, "messages": [{"role": "user", "content": "Write a poem about rivers"}]},
    ]
    baselines = [stream_text(cluster.router, body) for body in bodies]
    cluster.lives = faults.incarnations(cluster.dir)
    before = cluster.migrations()
    results: list[str | BaseException] = [RuntimeError("not run")] * 2
    parts: list[list[str]] = [[], []]

    def run(index: int) -> None:
        try:
            results[index] = stream_text(cluster.router, bodies[index], parts[index])
        except BaseException as error:  # reported by the assertion below
            results[index] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while min(len(p) for p in parts) < 100:  # both streams under way, far from their end
        assert time.monotonic() < deadline, [len(p) for p in parts]
        time.sleep(0.05)
    for decode in ("decode-0", "decode-1"):
        faults.stop_engine_core(cluster.dir, decode, 30)
    for thread in threads:
        thread.join(180)
    assert results == baselines
    assert cluster.migrations() - before == 2
    state = cluster.dir.read_state()
    assert all(state.instances[d].restarts >= 1 or state.instances[d].phase is not InstancePhase.HEALTHY
               for d in ("decode-0", "decode-1"))  # fmt: skip


def test_a_killed_decode_api_server_under_load_loses_no_request(cluster: FaultCluster):
    cluster.wait_replaced(cluster.lives, "decode-0", "decode-1")  # the first test's stalled engines
    before, lives = cluster.note_groups(), faults.incarnations(cluster.dir)
    with cluster.load() as load:
        time.sleep(3)
        faults.kill_api_server(cluster.dir, "decode-0")
        time.sleep(8)
    counts = load.counts()
    assert counts[faults.ANSWERED] > 0 and load.failures() == [], counts
    # The prefill killed after it answered and before the decode instance read its KV cache: recomputed there.
    outcome = faults.kill_prefill_between_hops(cluster.dir, cluster.model)
    assert outcome.kind == faults.ANSWERED, outcome
    cluster.wait_replaced(lives, "decode-0", "prefill-0")
    assert faults.strays(cluster.dir, before) == 0  # decode-0's EngineCore went with its API server


def test_a_killed_engine_core_and_a_prefill_restart_on_a_taken_port_lose_no_request(cluster: FaultCluster):
    before, lives = cluster.note_groups(), faults.incarnations(cluster.dir)
    prefill = faults.planned(cluster.dir, "prefill-0")
    with cluster.load() as load:
        time.sleep(3)
        faults.kill_engine_core(cluster.dir, "decode-1")
        faults.kill_api_server(cluster.dir, "prefill-0")
        holder = faults.take_port(prefill.host, prefill.port, 10)

        def blocked_naming_the_holder() -> bool:
            message = cluster.dir.read_state().instances["prefill-0"].message or ""
            return f"port {prefill.port}" in message and "taken by pid" in message

        deadline = time.monotonic() + 10
        while not blocked_naming_the_holder():
            assert time.monotonic() < deadline, cluster.dir.read_state().instances["prefill-0"]
            time.sleep(0.2)
        time.sleep(3)
    holder.join()
    counts = load.counts()
    assert counts[faults.ANSWERED] > 0 and load.failures() == [], counts
    cluster.wait_replaced(lives, "decode-1", "prefill-0")
    assert faults.strays(cluster.dir, before) == 0
