"""The routing daemon on a sim cluster: real processes, real sockets, the emulator standing in for vLLM."""

from __future__ import annotations

import gc
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from pdctl import lifecycle
from tests.clusters import metric, sim_profile, up, wait_for

LONG = "The quick brown fox jumps over the lazy dog. " * 8  # 360 byte tokens
SECTIONS = (
    "pd: {prefilling_min_instances: 1, decoding_min_instances: 2, enable_dynamic_scaling: false,\n"
    "     routing_policy: threshold, prefilling_threshold_input_tokens: 64, prefilling_threshold_ratio: 1.0}\n"
    "decode: {max_parallel_requests: 64}\n"
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("router")
    profile = sim_profile(tmp, port_start=31000, extra="  sim: {decode_ms_per_token: 20}\n")
    text = profile.read_text().replace(
        "pd: {prefilling_min_instances: 1, decoding_min_instances: 1, enable_dynamic_scaling: false}\n", SECTIONS
    )
    profile.write_text(text)
    cluster_dir, started, failures = up(profile, tmp / "state")
    assert failures == []
    yield cluster_dir, started.plan, cluster_dir.read_state().router
    lifecycle.down(cluster_dir, grace_s=2)


def completion(router: str, prompt: str, **extra) -> httpx.Response:
    body = {"model": "sim-model", "prompt": prompt, "max_tokens": 4, **extra}
    return httpx.post(f"{router}/v1/completions", json=body, timeout=30)


def test_long_prompts_go_prefill_then_decode_with_the_kv_cache(cluster):
    _, plan, router = cluster
    decoders = [i for i in plan.instances if i.role.value == "DECODING"]
    before = sum(metric(d.url, "vllm:prompt_tokens_by_source_total", source="external_kv_transfer") for d in decoders)
    response = completion(router, LONG)
    assert response.status_code == 200
    assert response.headers["x-pdctl-phase"] == "PREFILLING"
    assert response.headers["x-pdctl-prefill"] == "prefill-0"
    assert response.headers["x-pdctl-decode"] in {"decode-0", "decode-1"}
    after = sum(metric(d.url, "vllm:prompt_tokens_by_source_total", source="external_kv_transfer") for d in decoders)
    assert after - before == len(LONG.encode())
    assert response.json()["system_fingerprint"] == "pdctl-sim"


def test_short_prompts_go_straight_to_decode(cluster):
    response = completion(cluster[2], "hi")
    assert response.status_code == 200 and response.headers["x-pdctl-phase"] == "DECODING"
    assert "x-pdctl-prefill" not in response.headers and response.headers["x-pdctl-request-id"].startswith("pdctl-")


def test_pd_and_direct_give_the_same_text(cluster):
    router = cluster[2]
    pd = completion(router, LONG, max_tokens=6).json()["choices"][0]["text"]
    decode = next(i for i in cluster[1].instances if i.id == "decode-0")
    body = {"model": "sim-model", "prompt": LONG, "max_tokens": 6}
    key = {"authorization": f"Bearer {cluster[0].engine_key()}"}
    direct = httpx.post(f"{decode.url}/v1/completions", json=body, headers=key)
    assert direct.json()["choices"][0]["text"] == pd


def test_openai_sdk_chat_and_completions_streamed_and_not(cluster):
    client = openai.OpenAI(base_url=f"{cluster[2]}/v1", api_key="unused")
    chat = client.chat.completions.create(model="sim-model", messages=[{"role": "user", "content": LONG}], max_tokens=5)
    assert chat.choices[0].message.content and chat.usage.completion_tokens == 5
    text = client.completions.create(model="sim-model", prompt="hello", max_tokens=3)
    assert text.usage.completion_tokens == 3
    streamed = client.chat.completions.create(
        model="sim-model", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True
    )
    assert len([c for c in streamed if c.choices and c.choices[0].delta.content]) == 4
    models = client.models.list()
    assert [m.id for m in models.data] == ["sim-model"]


def test_bad_input_gets_openai_errors_and_the_daemon_lives(cluster):
    router = cluster[2]
    cases = [
        (httpx.post(f"{router}/v1/completions", content=b"{not json"), 400),
        (httpx.post(f"{router}/v1/completions", json={"model": "other", "prompt": "x"}), 404),
        (httpx.post(f"{router}/v1/completions", json={"model": "sim-model"}), 400),
        (httpx.post(f"{router}/v1/chat/completions", json={"model": "sim-model", "messages": "hi"}), 400),
        (httpx.post(f"{router}/v1/completions", json={"model": "sim-model", "prompt": "x", "max_tokens": -1}), 400),
        (httpx.post(f"{router}/v1/completions", content=b"x" * (17 * 1024 * 1024)), 413),
        (httpx.get(f"{router}/v2/anything"), 404),
    ]
    for response, status in cases:
        assert response.status_code == status, response.text
        assert set(response.json()["error"]) >= {"message", "type", "code"}
    assert httpx.get(f"{router}/health").status_code == 200


def test_streams_pass_through_and_end_with_done(cluster):
    body = {"model": "sim-model", "prompt": LONG, "max_tokens": 5, "stream": True}
    with httpx.stream("POST", f"{cluster[2]}/v1/completions", json=body, timeout=30) as response:
        assert response.headers["x-pdctl-phase"] == "PREFILLING"
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) == 6


def test_a_client_that_goes_away_cancels_the_upstream_request(cluster):
    _, plan, router = cluster
    body = {"model": "sim-model", "prompt": "cancel me", "max_tokens": 500, "stream": True}
    with httpx.stream("POST", f"{router}/v1/completions", json=body, timeout=30) as response:
        decode = next(i for i in plan.instances if i.id == response.headers["x-pdctl-decode"])
        next(response.iter_lines())
    # 500 tokens at 20 ms would run 10 s; the abandoned request must stop at once instead.
    deadline = time.monotonic() + 3
    while metric(decode.url, "vllm:num_requests_running") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(decode.url, "vllm:num_requests_running") == 0


def test_router_metrics_count_requests_by_phase(cluster):
    router = cluster[2]
    before = metric(router, "pdctl_router_requests_total", phase="PREFILLING", outcome="ok")
    completion(router, LONG)
    assert metric(router, "pdctl_router_requests_total", phase="PREFILLING", outcome="ok") == before + 1
    assert metric(router, "pdctl_router_ttft_seconds_count") >= 1


def test_explain_a_decision(cluster):
    decision = httpx.post(
        f"{cluster[2]}/pdctl/route", json={"model": "sim-model", "prompt": LONG, "max_tokens": 4}
    ).json()
    assert decision["phase"] == "PREFILLING" and decision["figures"]["threshold"] == 64
    assert decision["prefill"]["instance"] == "prefill-0" and set(decision["decode"]["scores"]) == {
        "decode-0",
        "decode-1",
    }


def test_decode_killed_mid_stream_ends_the_stream_with_an_error(tmp_path):
    profile = sim_profile(tmp_path, name="midstream", port_start=14000, extra="  sim: {decode_ms_per_token: 50}\n")
    cluster_dir, _started, failures = up(profile, tmp_path / "state")
    try:
        assert failures == []
        router = cluster_dir.read_state().router
        body = {"model": "sim-model", "prompt": "hi", "max_tokens": 400, "stream": True}
        lines: list[str] = []
        began = time.monotonic()
        with httpx.stream("POST", f"{router}/v1/completions", json=body, timeout=30) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    lines.append(line)
                if len(lines) == 3:
                    pid = cluster_dir.read_state().instances["decode-0"].process.pid
                    threading.Thread(target=os.killpg, args=(pid, signal.SIGKILL)).start()
        assert time.monotonic() - began < 15  # ended, not hung
        error = json.loads(lines[-2][6:])
        assert error["error"]["type"] == "ServiceUnavailableError" and lines[-1] == "data: [DONE]"
    finally:
        lifecycle.down(cluster_dir, grace_s=2)


def test_a_dead_prefill_instance_falls_back_to_decode(tmp_path):
    profile = sim_profile(tmp_path, name="noprefill", port_start=15000)
    cluster_dir, _, failures = up(profile, tmp_path / "state")
    try:
        assert failures == []
        router = cluster_dir.read_state().router
        os.killpg(cluster_dir.read_state().instances["prefill-0"].process.pid, signal.SIGSTOP)  # hung, not gone
        text = "x" * 5000  # above the base example's 800-token threshold
        response = httpx.post(
            f"{router}/v1/completions", json={"model": "sim-model", "prompt": text, "max_tokens": 2}, timeout=300
        )
        assert response.status_code == 200
        assert response.headers["x-pdctl-phase"] == "DECODING"  # the hung prefill hop timed out: served anyway
        assert metric(router, "pdctl_router_fallbacks_total", reason="prefill_failed") == 1
    finally:
        os.killpg(cluster_dir.read_state().instances["prefill-0"].process.pid, signal.SIGCONT)
        lifecycle.down(cluster_dir, grace_s=2)


def test_full_instances_queue_and_a_hopeless_deadline_gets_429(tmp_path):
    profile = sim_profile(
        tmp_path,
        name="full",
        port_start=17000,
        extra="  sim: {decode_ms_per_token: 50}\n",
        sections="decode: {max_parallel_requests: 1}\n",
    )
    cluster_dir, _, failures = up(profile, tmp_path / "state")
    try:
        assert failures == []
        router = cluster_dir.read_state().router
        body = {"model": "sim-model", "prompt": "busy", "max_tokens": 60, "stream": True}
        with httpx.stream("POST", f"{router}/v1/completions", json=body, timeout=30) as busy:
            events = busy.iter_lines()  # kept: a dropped iterator closes the connection, and the request with it
            next(events)
            refused = completion(router, "in a hurry", slo_deadline_ms=200)
            assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
            assert refused.json()["error"]["type"] == "RateLimitError"
        patient = completion(router, "patient")  # queued until the slot frees, then served
        assert patient.status_code == 200
    finally:
        lifecycle.down(cluster_dir, grace_s=2)


def test_pdctl_route_explains_sends_and_times(cluster):
    cluster_dir = cluster[0]
    argv = [sys.executable, "-m", "pdctl", "route", "--prompt", LONG, "--max-tokens", "5"]
    argv += ["--state-dir", str(cluster_dir.root), "--cluster", cluster_dir.name]
    shown = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert re.search(r"phase PREFILLING: \d+ tokens >= 64 and ratio [\d.]+ >= 1", shown.stdout)
    assert "prefill: prefill-0" in shown.stdout and "PREFILLING via prefill-0 -> decode-" in shown.stdout
    assert "TTFT" in shown.stdout and "TPOT" in shown.stdout
    dry = subprocess.run([*argv, "--dry-run", "--json"], capture_output=True, text=True, timeout=60)
    assert json.loads(dry.stdout)["decision"]["phase"] == "PREFILLING"
    sent = json.loads(subprocess.run([*argv, "--json"], capture_output=True, text=True, timeout=60).stdout)
    assert sent["result"]["usage"]["completion_tokens"] == 5 and sent["result"]["phase"] == "PREFILLING"


def test_start_up_heap_freezes_out_of_the_collectors_reach():
    from pdctl.router.server import freeze_startup_heap

    gc.unfreeze()
    try:
        freeze_startup_heap()
        # pdctl's modules, pydantic's models and the like: never walked by a full collection again.
        assert gc.get_freeze_count() > 10_000
        assert len(gc.get_objects()) < gc.get_freeze_count()  # a full collection now walks only what came after
    finally:
        gc.unfreeze()


def test_conditional_shares_a_burst_of_long_prompts_between_the_pools(tmp_path):
    """Four long prompts at once: the first finds the prefill instance idle and is split; each later one goes to
    whichever instance has fewer prompt tokens still to prefill (ties to the prefill instance), so the decode
    instance prefills every other one itself. Once all are answered both queues are empty again."""
    profile = sim_profile(
        tmp_path, name="burst", port_start=18000, extra="  sim: {prefill_ms_per_token: 5, decode_ms_per_token: 5}\n"
    )
    conditional = "routing_policy: conditional, prefilling_threshold_input_tokens: 64, prefilling_threshold_ratio: 1}"
    text = profile.read_text().replace(
        "enable_dynamic_scaling: false}", f"enable_dynamic_scaling: false, {conditional}"
    )
    # A TPOT target no stall breaks: the prefill speed is the profile's default until the first split is timed.
    profile.write_text(text.replace("router: {port:", "router: {slo: {tpot_ms: 60000}, port:"))
    cluster_dir, _, failures = up(profile, tmp_path / "state")
    try:
        assert failures == []
        router = cluster_dir.read_state().router
        # The router hears of health from the supervisor: a prompt decided before then is not split.
        wait_for(lambda: "prefill->decode" in httpx.get(f"{router}/health").json()["paths"], what="both pools healthy")
        for wave in range(2):  # the second finds both queues empty again, or it splits differently
            phases: list[str] = []

            def send(prompt: str, phases: list[str] = phases) -> None:
                response = completion(router, prompt)
                assert response.status_code == 200
                phases.append(response.headers["x-pdctl-phase"])

            # 720 byte tokens, seconds of prefill; a prompt of its own each time: none is in a prefix cache.
            threads = [threading.Thread(target=send, args=(f"{wave} {i} {LONG * 2}",)) for i in range(4)]
            for thread in threads:
                thread.start()
                time.sleep(0.05)  # in this order: each decision sees the ones before it
            for thread in threads:
                thread.join()
            assert sorted(phases) == ["DECODING", "DECODING", "PREFILLING", "PREFILLING"], (wave, phases)
    finally:
        lifecycle.down(cluster_dir, grace_s=2)
