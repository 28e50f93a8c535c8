"""End to end on the real CPU build of vLLM: one cluster for the whole session (start-up takes a minute).

The engine runtime is installed on first use (`pdctl engine install`, about four minutes), the tiny model
is written by pdctl, and the prefill -> decode flow moves the KV cache through NIXL for real.
"""

from __future__ import annotations

import re

import httpx
import pytest

from pdctl import procs
from tests.e2e import LocalCluster

pytestmark = pytest.mark.e2e

PROMPT = "The quick brown fox jumps over the lazy dog. " * 4  # 180 byte tokens: above the split threshold


def nixl_transfers(metrics_text: str) -> float:
    total = 0.0
    for line in metrics_text.splitlines():
        if re.match(r"^vllm:nixl_xfer_time_seconds_count(\{.*\})? ", line):
            total += float(line.rsplit(" ", 1)[1])
    return total


def completion(url: str, body: dict) -> dict:
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
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


def test_prefill_then_decode_moves_the_kv_cache_through_nixl(local_cluster: LocalCluster):
    prefill, decode = local_cluster.plan.instances
    model = local_cluster.plan.served_model_name
    before = nixl_transfers(httpx.get(f"{decode.url}/metrics", timeout=10).text)
    first = completion(
        prefill.url,
        {
            "model": model,
            "prompt": PROMPT,
            "max_tokens": 1,
            "temperature": 0,
            "kv_transfer_params": {
                "do_remote_decode": True,
                "do_remote_prefill": False,
                "remote_engine_id": None,
                "remote_block_ids": None,
                "remote_host": None,
                "remote_port": None,
            },
        },
    )
    params = first["kv_transfer_params"]
    assert params["do_remote_prefill"] is True and params["remote_block_ids"]
    pd = completion(
        decode.url,
        {"model": model, "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "kv_transfer_params": params},
    )
    assert pd["usage"]["completion_tokens"] == 12
    after = nixl_transfers(httpx.get(f"{decode.url}/metrics", timeout=10).text)
    assert after > before

    # Temperature 0: the decode instance alone, prefilling itself, gives the same tokens as the PD path.
    alone = completion(decode.url, {"model": model, "prompt": PROMPT, "max_tokens": 12, "temperature": 0})
    assert alone["choices"][0]["text"] == pd["choices"][0]["text"]


def test_every_process_carries_the_cluster_token(local_cluster: LocalCluster):
    marked = procs.marked_processes(local_cluster.state().token)
    # Each vLLM API server has an EngineCore child: both are found, so down can stop both.
    assert len(marked) >= 4
