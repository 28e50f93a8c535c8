"""Engine faults on the real CPU build of vLLM, one prefill and two decode instances, under streamed load: no
request is lost, streams move mid-stream token for token, every fault is recovered from, nothing is left behind.

The faults share recovery windows (an engine restart takes a minute on two cores): each test injects its
fault and the next one that needs the whole cluster waits for it. The pieces are benchmarks/faults.py's, whose
suite prints the same faults as a table.
"""

from __future__ import annotations

import json
import re
import threading
import time

import httpx
import pytest

from benchmarks import faults
from pdctl import lifecycle, procs
from pdctl.state import ClusterDir

pytestmark = pytest.mark.e2e

RECOVERY_S = 300  # two engines restarting at once on two cores, with the load on


class FaultCluster:
    def __init__(self, cluster_dir: ClusterDir, model: str):
        self.dir, self.model = cluster_dir, model
        self.seen_groups: set[int] = set()
        self.lives: dict[str, tuple[int | None, int]] = {}  # instances' incarnations before the last fault
        self.faulted: list[str] = []  # the instances the last fault hit
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
    # A long stall timeout: on two cores an engine starved by another's restart can go 10 s without a token,
    # and a false stall restarts it, which starves the others further.
    cluster_dir, started = faults.up(faults.fault_profile(tmp, decode=2, stall_timeout_s=20), tmp / "state")
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


def stream_text(url: str, body: dict, parts: list[str] | None = None, headers: dict | None = None) -> str:
    """A stream's whole text; `parts` gets each piece as it comes and `headers` the response's (for a test that
    waits for a stream to be under way, and needs its instance)."""
    chat = "messages" in body
    parts = [] if parts is None else parts
    with httpx.stream("POST", url + ("/v1/chat/completions" if chat else "/v1/completions"),
                      json={**body, "stream": True}, timeout=120) as response:  # fmt: skip
        assert response.status_code == 200
        if headers is not None:
            headers.update(response.headers)
        for line in response.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                assert "error" not in event, event
                for choice in event["choices"]:
                    parts.append(choice["delta"].get("content") or "" if chat else choice["text"])
    return "".join(parts)


def test_streams_on_stalled_decode_engines_move_token_for_token(cluster: FaultCluster):
    """A completions stream, then a chat stream, at temperature 0, each with its decode engine SIGSTOPped
    mid-stream: the first moves to the other decode instance, the second to the prefill instance while the first
    decode instance is still being replaced, or to that instance once it is back (a restart on two cores takes
    20 to 60 s); each is, character for character, the stream without the fault."""
    # ignore_eos: the random-weight model may end a stream early, before the fault; each must be under way.
    common = {"model": cluster.model, "max_tokens": 1500, "temperature": 0, "ignore_eos": True}
    bodies = [
        {**common, "prompt": "Write a story about a lighthouse"},
        {**common, "messages": [{"role": "user", "content": "Write a poem about rivers"}]},
    ]
    baselines = [stream_text(cluster.router, body) for body in bodies]
    cluster.lives = faults.incarnations(cluster.dir)
    before = cluster.migrations()
    for body, baseline in zip(bodies, baselines, strict=True):
        text, stopped = stream_with_its_engine_stopped(cluster, body)
        assert text == baseline
        cluster.faulted.append(stopped)
    assert sorted(cluster.faulted) == ["decode-0", "decode-1"]
    log = (cluster.dir.path / "daemon.log").read_text()
    assert cluster.migrations() - before == 2, [line for line in log.splitlines() if "WARNING" in line][-20:]
    for stopped in cluster.faulted:
        moved_to = re.findall(rf"moved from {stopped} to (\S+)", log)
        assert moved_to and stopped not in moved_to, moved_to


def stream_with_its_engine_stopped(cluster: FaultCluster, body: dict) -> tuple[str | BaseException, str]:
    """Stream `body`; once 100 events are in, SIGSTOP the EngineCore of the instance serving it: what the
    client got, and that instance."""
    result: list[str | BaseException] = [RuntimeError("not run")]
    parts: list[str] = []
    headers: dict[str, str] = {}

    def run() -> None:
        try:
            result[0] = stream_text(cluster.router, body, parts, headers)
        except BaseException as error:  # reported by the caller's assertion
            result[0] = error

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 60
    while len(parts) < 100:  # under way, far from its end (1500 tokens)
        assert time.monotonic() < deadline and thread.is_alive(), len(parts)
        time.sleep(0.02)
    serving = headers["x-pdctl-decode"]
    faults.stop_engine_core(cluster.dir, serving, 90)  # longer than the stall timeout: pdctl acts first
    thread.join(180)
    return result[0], serving


def test_a_killed_decode_api_server_under_load_loses_no_request(cluster: FaultCluster):
    cluster.wait_replaced(cluster.lives, *cluster.faulted)  # the first test's stalled engines
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
        time.sleep(8)  # decode-1's streams moved; the prefill instance next, while decode-1 restarts
        faults.kill_api_server(cluster.dir, "prefill-0")
        holder = faults.take_port(prefill.host, prefill.port, 20)  # past its restart: the group is cleared first

        def blocked_naming_the_holder() -> bool:
            message = cluster.dir.read_state().instances["prefill-0"].message or ""
            return f"port {prefill.port}" in message and "taken by pid" in message

        deadline = time.monotonic() + 20
        while not blocked_naming_the_holder():
            assert time.monotonic() < deadline, cluster.dir.read_state().instances["prefill-0"]
            time.sleep(0.2)
        time.sleep(3)
    holder.join()
    counts = load.counts()
    assert counts[faults.ANSWERED] > 0 and load.failures() == [], counts
    cluster.wait_replaced(lives, "decode-1", "prefill-0")
    assert faults.strays(cluster.dir, before) == 0
