"""End to end on the real CPU build of vLLM: one cluster for the whole session (start-up takes a minute).

The engine runtime is installed on first use (`pdctl engine install`, about four minutes), the tiny model
is written by pdctl, and the prefill -> decode flow moves the KV cache through NIXL for real.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest

from pdctl import procs
from pdctl.engines.vllm_adapter import REMOTE_DECODE
from tests.e2e import LocalCluster

pytestmark = pytest.mark.e2e

PROMPT = "The quick brown fox jumps over the lazy dog. " * 4  # 180 byte tokens: above the split threshold


def nixl_transfers(metrics_text: str) -> float:
    total = 0.0
    for line in metrics_text.splitlines():
        if re.match(r"^vllm:nixl_xfer_time_seconds_count(\{.*\})? ", line):
            total += float(line.rsplit(" ", 1)[1])
    return total


def completion(url: str, body: dict, key: str | None = None) -> dict:
    """Through the router (no key: the local profile has none), or to an engine with the cluster's own key."""
    headers = {"authorization": f"Bearer {key}"} if key else {}
    response = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_both_instances_are_healthy(local_cluster: LocalCluster):
    report = local_cluster.status()
    assert [(i.id, i.role, i.phase) for i in report.instances] == [
        ("prefill-0", "PREFILLING", "healthy"),
        ("decode-0", "DECODING", "healthy"),
    ]
    for instance in local_cluster.plan.instances:
        assert httpx.get(f"{instance.url}/health", timeout=10).status_code == 200


def test_engine_ports_refuse_v1_without_the_clusters_key(local_cluster: LocalCluster):
    """vLLM got the cluster's key (VLLM_API_KEY): only the router holds it. /health and /metrics stay open, for
    the supervisor and the router's scrape."""
    key = local_cluster.dir.engine_key()
    assert key
    body = {"model": local_cluster.plan.served_model_name, "prompt": "Hi", "max_tokens": 1}
    for instance in local_cluster.plan.instances:
        assert httpx.get(f"{instance.url}/v1/models", timeout=10).status_code == 401
        assert httpx.post(f"{instance.url}/v1/completions", json=body, timeout=30).status_code == 401
        wrong = httpx.post(
            f"{instance.url}/v1/completions", json=body, headers={"authorization": "Bearer x"}, timeout=30
        )
        assert wrong.status_code == 401
        assert completion(instance.url, body, key)["usage"]["completion_tokens"] == 1
        assert httpx.get(f"{instance.url}/health", timeout=10).status_code == 200
        assert httpx.get(f"{instance.url}/metrics", timeout=10).status_code == 200


def test_prefill_then_decode_moves_the_kv_cache_through_nixl(local_cluster: LocalCluster):
    prefill, decode = local_cluster.plan.instances
    model = local_cluster.plan.served_model_name
    key = local_cluster.dir.engine_key()
    before = nixl_transfers(httpx.get(f"{decode.url}/metrics", timeout=10).text)
    first = completion(
        prefill.url,
        {
            "model": model,
            "prompt": PROMPT,
            "max_tokens": 1,
            "temperature": 0,
            "kv_transfer_params": dict(REMOTE_DECODE),  # what the router sends on a prefill hop
        },
        key,
    )
    params = first["kv_transfer_params"]
    assert params["do_remote_prefill"] is True and params["remote_block_ids"]
    pd = completion(
        decode.url,
        {"model": model, "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "kv_transfer_params": params},
        key,
    )
    assert pd["usage"]["completion_tokens"] == 12
    after = nixl_transfers(httpx.get(f"{decode.url}/metrics", timeout=10).text)
    assert after > before

    # Temperature 0: the decode instance alone, prefilling itself, gives the same tokens as the PD path.
    alone = completion(decode.url, {"model": model, "prompt": PROMPT, "max_tokens": 12, "temperature": 0}, key)
    assert alone["choices"][0]["text"] == pd["choices"][0]["text"]


def test_every_process_carries_the_cluster_token(local_cluster: LocalCluster):
    marked = procs.marked_processes(local_cluster.state().token)
    # Each vLLM API server has an EngineCore child: both are found, so down can stop both.
    assert len(marked) >= 4


def test_each_instance_runs_its_model_on_its_own_core(local_cluster: LocalCluster):
    """vLLM's NIXL connector moves the thread that builds it, the Worker's main thread, which runs the model, to
    the host's last core: the decode instance's here. pdctl's runtime hook keeps it where vLLM bound it."""
    bound = []
    # From each API server down: vLLM's setproctitle hides the Worker's own environment from /proc.
    for server in procs.marked_processes(local_cluster.state().token):
        cores = server.environ()["VLLM_CPU_OMP_THREADS_BIND"]
        workers = [p for p in server.children(recursive=True) if p.name() == "VLLM::Worker"]
        bound += [(cores, sorted(os.sched_getaffinity(worker.pid))) for worker in workers]
    assert sorted(bound) == [("0", [0]), ("1", [1])]


def test_the_router_sends_long_prompts_through_prefill_and_nixl(local_cluster: LocalCluster):
    decode = local_cluster.plan.instances[1]
    before = nixl_transfers(httpx.get(f"{decode.url}/metrics", timeout=10).text)
    body = {"model": local_cluster.plan.served_model_name, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    response = httpx.post(f"{local_cluster.router}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    assert response.headers["x-pdctl-phase"] == "PREFILLING"
    assert (response.headers["x-pdctl-prefill"], response.headers["x-pdctl-decode"]) == ("prefill-0", "decode-0")
    assert nixl_transfers(httpx.get(f"{decode.url}/metrics", timeout=10).text) > before
    short = httpx.post(f"{local_cluster.router}/v1/completions", json={**body, "prompt": "Hi"}, timeout=120)
    assert short.status_code == 200 and short.headers["x-pdctl-phase"] == "DECODING"


def test_openai_sdk_through_the_router(local_cluster: LocalCluster):
    import openai

    client = openai.OpenAI(base_url=f"{local_cluster.router}/v1", api_key="unused", max_retries=0)
    model = local_cluster.plan.served_model_name
    messages = [{"role": "user", "content": PROMPT}]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0)
    assert chat.usage.completion_tokens == 6
    streamed = list(client.chat.completions.create(model=model, messages=messages, max_tokens=6, stream=True))
    assert streamed and streamed[-1].choices[0].finish_reason == "length"
    text = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0)
    assert text.usage.completion_tokens == 6
    chunks = list(client.completions.create(model=model, prompt="Hello", max_tokens=6, stream=True))
    assert chunks and chunks[-1].choices[0].finish_reason == "length"


BENCH = """
import json, sys
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = FlexibleArgumentParser()
add_cli_args(parser)
result = main(parser.parse_args(sys.argv[1:]))
print("PDCTL_BENCH " + json.dumps({"completed": result["completed"], "failed": result["failed"]}))
"""


def test_vllm_bench_serve_through_the_router_has_no_failures(local_cluster: LocalCluster, tmp_path):
    plan = local_cluster.plan
    args = [
        "--backend", "vllm", "--base-url", local_cluster.router, "--endpoint", "/v1/completions",
        "--model", plan.served_model_name, "--tokenizer", plan.model_path,
        "--dataset-name", "random", "--random-input-len", "200", "--random-output-len", "8",
        "--num-prompts", "12", "--max-concurrency", "4", "--ignore-eos", "--disable-tqdm",
    ]  # fmt: skip
    result = subprocess.run(
        [plan.engine_python, "-c", BENCH, *args], capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    line = next((x for x in result.stdout.splitlines() if x.startswith("PDCTL_BENCH ")), None)
    assert line, result.stdout[-2000:] + result.stderr[-2000:]
    assert json.loads(line.removeprefix("PDCTL_BENCH ")) == {"completed": 12, "failed": 0}


def test_status_figures_agree_with_the_engines_own_counters(local_cluster: LocalCluster):
    """After requests sharing a long prefix, the router's stats show cache hits and NIXL transfers, and every
    engine counter it reports equals the engine's own /metrics once the last scrape has followed the traffic."""
    from pdctl import dashboard
    from pdctl.router.scrape import parse_engine_metrics

    model = local_cluster.plan.served_model_name
    shared = "Shared system prompt for the cache test. " * 8  # 328 tokens: PD-split, several cached blocks
    for question in range(4):
        completion(local_cluster.router, {"model": model, "prompt": f"{shared}Question {question}?", "max_tokens": 4})
    time.sleep(2.5)  # the router scrapes every second
    snapshot = dashboard.collect(local_cluster.dir)
    stats = snapshot.stats
    assert stats is not None, snapshot.stats_error
    assert stats.kv_cache_hit_rate is not None and stats.kv_cache_hit_rate > 0
    assert stats.nixl["transfers"] > 0 and stats.nixl["bytes"] > 0
    assert stats.windows["total"].split["PREFILLING"] >= 4
    for shown, planned in zip(stats.instances, local_cluster.plan.instances, strict=True):
        own = parse_engine_metrics(httpx.get(f"{planned.url}/metrics", timeout=10).text)
        assert shown.id == planned.id
        assert (shown.prefix_hits, shown.prefix_queries) == (own.prefix_hits, own.prefix_queries)
        assert (shown.nixl_transfers, shown.nixl_bytes) == (own.nixl_transfers, own.nixl_bytes)
        assert shown.prompt_tokens_by_source["external_kv_transfer"] == own.prompt_transferred
    decode = stats.instances[1]
    assert decode.prompt_tokens_by_source["external_kv_transfer"] > 0  # the prompt's KV came over NIXL
    text = pdctl_status(local_cluster)
    assert "KV-cache hit rate" in text and "NIXL" in text and "decode-0" in text


def pdctl_status(local_cluster: LocalCluster) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "pdctl", "status", "--state-dir", str(local_cluster.dir.root)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "80"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_a_request_submitted_through_the_manager_goes_prefill_then_decode(local_cluster: LocalCluster):
    """The design document's API over the real cluster: ControlPlaneManager routes a long prompt through the
    prefill instance, and the decode instance pulls its KV cache over NIXL."""
    import asyncio

    from pdctl.control_plane.manager import ControlPlaneManager
    from pdctl.control_plane.types import ExecutionInstance, PDSeparationConfig, RequestMetadata

    decode_url = local_cluster.plan.instances[1].url
    before = nixl_transfers(httpx.get(f"{decode_url}/metrics", timeout=10).text)
    config = PDSeparationConfig(routing_policy="threshold", prefilling_threshold_input_tokens=64,
                                prefilling_threshold_ratio=1.0)  # fmt: skip
    manager = ControlPlaneManager(
        scheduling_policy="slo_aware",
        routing_strategy="load_balanced",
        pd_config=config,
        instance_api_key=local_cluster.dir.engine_key(),  # the cluster's engines want its key
    )
    for planned in local_cluster.plan.instances:
        manager.executor.register_instance(ExecutionInstance(instance_id=planned.id, instance_type=planned.role,
                                                             host=planned.host, port=planned.port))  # fmt: skip
    asyncio.run(manager.start())
    try:
        request = RequestMetadata(request_id="manager-e2e", max_tokens=8)
        # The manager has no tokenizer for remote instances: it estimates 4 bytes a token, so 540 bytes is over 64.
        request.prompt = PROMPT * 3
        asyncio.run(manager.submit_request(request))
        result = asyncio.run(manager.result("manager-e2e", timeout_s=120))
    finally:
        asyncio.run(manager.stop())
    assert result.ok, result.error
    assert (result.phase, result.prefill_instance, result.decode_instance) == ("PREFILLING", "prefill-0", "decode-0")
    assert nixl_transfers(httpx.get(f"{decode_url}/metrics", timeout=10).text) > before


def test_a_killed_daemon_is_back_within_seconds_adopting_the_running_engines(local_cluster: LocalCluster):
    """The daemon SIGKILLed: its watchdog starts another, which adopts the running vLLM engines (the same
    processes, none restarted) and serves on the same address within 10 s. Runs last: it changes the daemon."""
    before = local_cluster.state()
    body = {"model": local_cluster.plan.served_model_name, "prompt": PROMPT, "max_tokens": 4}
    os.kill(before.daemon.pid, signal.SIGKILL)
    killed = time.monotonic()

    def served_by_a_new_daemon() -> bool:
        if local_cluster.state().daemon.pid == before.daemon.pid:
            return False
        try:
            return httpx.post(f"{local_cluster.router}/v1/completions", json=body, timeout=30).status_code == 200
        except httpx.HTTPError:
            return False

    while not served_by_a_new_daemon():
        assert time.monotonic() - killed < 10, "the router is not back within 10 s"
        time.sleep(0.2)
    after = local_cluster.state()
    assert {i: (s.process.pid, s.restarts) for i, s in after.instances.items()} == {
        i: (s.process.pid, s.restarts) for i, s in before.instances.items()
    }
