"""The sim engine as pdctl runs it: real subprocesses on real ports, spoken to over HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from pdctl.engines.sim import Admission

MODEL = "sim-model"


@dataclass
class Sim:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    launched_at: float
    # One client per sim: a new httpx client per call costs an SSL context, which slows every test.
    http: httpx.Client

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str) -> httpx.Response:
        return self.http.get(f"{self.url}{path}")

    def post(self, path: str, body: dict[str, object]) -> httpx.Response:
        return self.http.post(f"{self.url}{path}", json=body)

    def complete(self, prompt: str, **fields: object) -> httpx.Response:
        return self.post("/v1/completions", {"model": MODEL, "prompt": prompt, **fields})

    def metric(self, name: str, **labels: str) -> float:
        """One sample of /metrics; labels select among a family's samples."""
        text = self.get("/metrics").text
        for line in text.splitlines():
            sample, _, value = line.rpartition(" ")
            if sample.split("{")[0] == name and all(f'{key}="{val}"' in sample for key, val in labels.items()):
                return float(value)
        raise AssertionError(f"{name} {labels} not in /metrics")

    def log(self) -> str:
        return self.log_path.read_text()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_healthy(sim: Sim, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sim.process.poll() is not None:
            raise AssertionError(f"sim exited with {sim.process.returncode}:\n{sim.log()}")
        try:
            if sim.get("/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.02)
    raise AssertionError(f"sim not healthy within {timeout_s} s:\n{sim.log()}")


def launch(log_dir: Path, *args: str, env: dict[str, str] | None = None) -> Sim:
    port = free_port()
    log_path = log_dir / f"sim-{port}.log"
    argv = [sys.executable, "-m", "pdctl.engines.sim", "--port", str(port), "--served-model-name", MODEL, *args]
    environ = {k: v for k, v in os.environ.items() if k != "VLLM_API_KEY"} | (env or {})
    with log_path.open("wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=environ)
    return Sim(process, port, log_path, time.monotonic(), httpx.Client(timeout=10))


def kill(sim: Sim) -> None:
    sim.http.close()
    if sim.process.poll() is None:
        sim.process.kill()
    sim.process.wait(timeout=10)


FAST = ("--prefill-ms-per-token", "0", "--decode-ms-per-token", "0")
# Every sim of the module, started at once: most of a sim's start-up is Python importing, so starting them
# in parallel keeps the module fast.
SIMS = {
    "hybrid": ("--role", "hybrid", "--max-body-bytes", "65536", "--kv-cache-blocks", "64", *FAST),
    "prefill": ("--role", "prefill", *FAST),
    "decode": ("--role", "decode", *FAST),
    "doomed_prefill": ("--role", "prefill", *FAST),
    "queued": ("--max-num-seqs", "1", "--prefill-ms-per-token", "0", "--decode-ms-per-token", "20"),
    "delayed": ("--startup-delay-s", "60", *FAST),
    "keyed": ("--role", "prefill", "--api-key", "sim-key", "other-key", *FAST),
    "env_keyed": ("--role", "hybrid", *FAST),
}
# As vLLM, the sim takes its key from VLLM_API_KEY when --api-key is not given (pdctl's engines get theirs so).
ENVIRONMENTS = {"env_keyed": {"VLLM_API_KEY": "from-env"}}


@pytest.fixture(scope="module")
def sims(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Sim]]:
    log_dir = tmp_path_factory.mktemp("sims")
    started: dict[str, Sim] = {}
    try:
        for name, args in SIMS.items():
            started[name] = launch(log_dir, *args, env=ENVIRONMENTS.get(name))
        for name, sim in started.items():
            if name != "delayed":
                wait_healthy(sim)
        yield started
    finally:
        for sim in started.values():
            kill(sim)


@pytest.fixture
def hybrid(sims: dict[str, Sim]) -> Sim:
    return sims["hybrid"]


@pytest.fixture
def pd_pair(sims: dict[str, Sim]) -> tuple[Sim, Sim]:
    return sims["prefill"], sims["decode"]


def sse_events(response: httpx.Response) -> list[str]:
    assert response.headers["content-type"] == "text/event-stream"
    frames = response.text.split("\n\n")
    assert frames[-1] == ""
    assert all(frame.startswith("data: ") for frame in frames[:-1])
    return [frame.removeprefix("data: ") for frame in frames[:-1]]


def remote_prefill(prefill: Sim, prompt: str) -> dict[str, object]:
    """The router's first hop: a prefill-only request; returns the kv_transfer_params for the second."""
    response = prefill.complete(prompt, max_tokens=1, kv_transfer_params={"do_remote_decode": True})
    assert response.status_code == 200, response.text
    params = response.json()["kv_transfer_params"]
    assert isinstance(params, dict)
    return params


# -- the OpenAI surface -----------------------------------------------------------------------------------


def test_health_models_and_startup_log(hybrid: Sim) -> None:
    assert hybrid.get("/health").status_code == 200
    models = hybrid.get("/v1/models").json()
    assert models["object"] == "list"
    assert [(card["id"], card["object"], card["owned_by"]) for card in models["data"]] == [
        (MODEL, "model", "pdctl-sim")
    ]
    assert f"pdctl sim engine (emulator, not vLLM): role=hybrid model={MODEL} listening on {hybrid.url}" in hybrid.log()


def test_completion(hybrid: Sim) -> None:
    prompt = "héllo wörld"  # 13 UTF-8 bytes: one token each
    body = hybrid.complete(prompt, max_tokens=5, temperature=0.7, ignore_eos=True, priority=3, whatever=1).json()
    assert body["object"] == "text_completion"
    assert body["model"] == MODEL
    assert body["system_fingerprint"] == "pdctl-sim"
    assert body["id"].startswith("cmpl-")
    usage = {"prompt_tokens": 13, "completion_tokens": 5, "total_tokens": 18, "prompt_tokens_details": None}
    assert body["usage"] == usage
    [choice] = body["choices"]
    assert (choice["index"], choice["finish_reason"]) == (0, "length")
    assert len(choice["text"].split()) == 5
    assert body["kv_transfer_params"] is None


def test_default_max_tokens_and_prompt_list(hybrid: Sim) -> None:
    body = hybrid.complete(["a prompt in a list"]).json()
    assert body["usage"]["completion_tokens"] == 16
    assert len(body["choices"][0]["text"].split()) == 16


def test_same_prompt_same_text_and_another_prompt_another(hybrid: Sim) -> None:
    first = hybrid.complete("tell me about the sea", max_tokens=12).json()["choices"][0]["text"]
    again = hybrid.complete("tell me about the sea", max_tokens=12).json()["choices"][0]["text"]
    other = hybrid.complete("tell me about the sky", max_tokens=12).json()["choices"][0]["text"]
    assert first == again
    assert first != other


def test_streamed_completion_with_usage(hybrid: Sim) -> None:
    response = hybrid.complete("stream me", max_tokens=4, stream=True, stream_options={"include_usage": True})
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    text_chunks, usage_chunk = chunks[:-1], chunks[-1]
    assert len(text_chunks) == 4
    assert all(chunk["object"] == "text_completion" and chunk["model"] == MODEL for chunk in chunks)
    assert all(chunk["usage"] is None for chunk in text_chunks)
    assert [chunk["choices"][0]["finish_reason"] for chunk in text_chunks] == [None, None, None, "length"]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["prompt_tokens"] == 9 and usage_chunk["usage"]["completion_tokens"] == 4
    plain = hybrid.complete("stream me", max_tokens=4).json()["choices"][0]["text"]
    assert "".join(chunk["choices"][0]["text"] for chunk in text_chunks) == plain


def test_streamed_completion_with_usage_in_every_chunk(hybrid: Sim) -> None:
    """vLLM's continuous_usage_stats: each chunk says how many tokens have been generated so far."""
    options = {"include_usage": True, "continuous_usage_stats": True}
    chunks = [json.loads(e) for e in sse_events(hybrid.complete("count me", max_tokens=3, stream=True,
                                                                stream_options=options))[:-1]]  # fmt: skip
    assert [chunk["usage"]["completion_tokens"] for chunk in chunks] == [1, 2, 3, 3]
    assert all(chunk["usage"]["prompt_tokens"] == 8 for chunk in chunks)
    assert chunks[-1]["choices"] == []


def test_streamed_completion_without_usage(hybrid: Sim) -> None:
    events = sse_events(hybrid.complete("no usage", max_tokens=2, stream=True))
    chunks = [json.loads(event) for event in events[:-1]]
    assert len(chunks) == 2 and all("usage" not in chunk for chunk in chunks)


def test_chat_completion(hybrid: Sim) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi there"}]},
    ]
    body = hybrid.post("/v1/chat/completions", {"model": MODEL, "messages": messages, "max_tokens": 3}).json()
    assert body["object"] == "chat.completion"
    assert body["system_fingerprint"] == "pdctl-sim"
    assert body["usage"]["prompt_tokens"] == len("be briefhi there")
    [choice] = body["choices"]
    assert choice["message"]["role"] == "assistant"
    assert len(choice["message"]["content"].split()) == 3
    assert choice["finish_reason"] == "length"
    # The same contents as a completion prompt give the same text: the sim has no chat template.
    as_completion = hybrid.complete("be briefhi there", max_tokens=3).json()["choices"][0]["text"]
    assert choice["message"]["content"] == as_completion


def test_streamed_chat_completion(hybrid: Sim) -> None:
    request = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "stream a chat"}],
        "max_completion_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events = sse_events(hybrid.post("/v1/chat/completions", request))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    words = chunks[1:-1]
    assert len(words) == 3
    assert [chunk["choices"][0]["finish_reason"] for chunk in words] == [None, None, "length"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize(
    ("body", "status", "error_type"),
    [
        (b'{"model": "nope", "prompt": "x"}', 404, "NotFoundError"),
        (b'{"model": "sim-model", "prompt": ', 400, "invalid_request_error"),
        (b'{"model": "sim-model"}', 400, "BadRequestError"),
        (b'{"model": "sim-model", "prompt": "x", "n": 2}', 400, "BadRequestError"),
    ],
)
def test_request_errors(hybrid: Sim, body: bytes, status: int, error_type: str) -> None:
    response = hybrid.http.post(f"{hybrid.url}/v1/completions", content=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["type"] == error_type and error["code"] == status and error["message"]


def test_oversized_body_is_refused(hybrid: Sim) -> None:
    response = hybrid.complete("x" * 100_000)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == 413
    assert hybrid.complete("still serving", max_tokens=1).status_code == 200


def test_unknown_route_is_404(hybrid: Sim) -> None:
    assert hybrid.get("/v1/nothing").status_code == 404


# -- metrics and the prefix cache -------------------------------------------------------------------------


def test_metrics_exposition(hybrid: Sim) -> None:
    text = hybrid.get("/metrics").text
    assert text.startswith("# pdctl-sim")
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:num_preemptions_total",
        "vllm:nixl_bytes_transferred",
        "vllm:nixl_num_failed_transfers_total",
    ):
        assert f"# TYPE {name} " in text
    assert f'vllm:prompt_tokens_total{{model_name="{MODEL}",engine="0"}}' in text
    for source in ("local_compute", "local_cache_hit", "external_kv_transfer"):
        assert f'source="{source}"' in text
    assert 'vllm:nixl_xfer_time_seconds_bucket{model_name="sim-model",engine="0",le="+Inf"}' in text


def test_prefix_cache_hits_on_a_repeated_prompt(hybrid: Sim) -> None:
    prompt = "a long shared system prompt " * 4  # 112 bytes: 7 full blocks of 16
    queries, hits = hybrid.metric("vllm:prefix_cache_queries_total"), hybrid.metric("vllm:prefix_cache_hits_total")
    cache_hit_tokens = hybrid.metric("vllm:prompt_tokens_by_source_total", source="local_cache_hit")
    hybrid.complete(prompt, max_tokens=1)
    assert hybrid.metric("vllm:prefix_cache_hits_total") == hits
    hybrid.complete(prompt, max_tokens=1)
    assert hybrid.metric("vllm:prefix_cache_queries_total") == queries + 2 * 112
    # Like vLLM, the last prompt token is always computed, so the last full block is not a hit.
    assert hybrid.metric("vllm:prefix_cache_hits_total") == hits + 96
    assert hybrid.metric("vllm:prompt_tokens_by_source_total", source="local_cache_hit") == cache_hit_tokens + 96


def test_a_full_kv_cache_evicts_least_recently_used_blocks(hybrid: Sim) -> None:
    # The hybrid sim holds 64 blocks: two 40-block prompts do not fit together.
    first, second = "A" * 641, "B" * 641
    hybrid.complete(first, max_tokens=1)
    hybrid.complete(second, max_tokens=1)
    hits = hybrid.metric("vllm:prefix_cache_hits_total")
    hybrid.complete(first, max_tokens=1)
    assert hybrid.metric("vllm:prefix_cache_hits_total") == hits
    hybrid.complete(first, max_tokens=1)
    assert hybrid.metric("vllm:prefix_cache_hits_total") == hits + 640


# -- prefill/decode disaggregation ------------------------------------------------------------------------


def test_two_hop_pd_flow(pd_pair: tuple[Sim, Sim], hybrid: Sim) -> None:
    prefill, decode = pd_pair
    prompt = "disaggregate this prompt please, it is long enough for blocks"
    tokens = len(prompt.encode())
    params = remote_prefill(prefill, prompt)
    assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
    assert (params["remote_host"], params["remote_port"], params["tp_size"]) == ("127.0.0.1", prefill.port, 1)
    assert params["remote_num_tokens"] == tokens
    assert isinstance(params["remote_engine_id"], str) and isinstance(params["remote_request_id"], str)
    block_ids = params["remote_block_ids"]
    assert isinstance(block_ids, list) and len(block_ids) == 1 and len(block_ids[0]) == -(-tokens // 16)

    transfers = decode.metric("vllm:nixl_xfer_time_seconds_count")
    external = decode.metric("vllm:prompt_tokens_by_source_total", source="external_kv_transfer")
    computed = decode.metric("vllm:prompt_tokens_by_source_total", source="local_compute")
    failed = decode.metric("vllm:nixl_num_failed_transfers_total")
    response = decode.complete(prompt, max_tokens=6, kv_transfer_params=params)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] == tokens
    assert decode.metric("vllm:nixl_xfer_time_seconds_count") == transfers + 1
    assert decode.metric("vllm:nixl_bytes_transferred_count") >= 1
    assert decode.metric("vllm:prompt_tokens_by_source_total", source="external_kv_transfer") == external + tokens
    assert decode.metric("vllm:prompt_tokens_by_source_total", source="local_compute") == computed
    assert decode.metric("vllm:nixl_num_failed_transfers_total") == failed
    # A split request says what a whole one says.
    assert response.json()["choices"][0]["text"] == hybrid.complete(prompt, max_tokens=6).json()["choices"][0]["text"]

    # The prefill instance frees the KV once read: a second read fails, and decode computes it itself.
    again = decode.complete(prompt, max_tokens=1, kv_transfer_params=params)
    assert again.status_code == 200
    assert decode.metric("vllm:nixl_num_failed_transfers_total") == failed + 1


def test_an_api_key_guards_v1_as_vllms_does(sims: dict[str, Sim], pd_pair: tuple[Sim, Sim]) -> None:
    keyed, from_env, decode = sims["keyed"], sims["env_keyed"], pd_pair[1]
    for sim, key in ((keyed, "sim-key"), (keyed, "other-key"), (from_env, "from-env")):
        refused = sim.get("/v1/models")
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        assert sim.http.get(f"{sim.url}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert sim.http.get(f"{sim.url}/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert sim.get("/health").status_code == 200 and sim.get("/metrics").status_code == 200
    assert keyed.complete("hi").status_code == 401
    # The decode side's KV read is no /v1 path (NIXL's side channel has no key either): it reads a keyed prefill.
    prompt = "a prompt prefilled by an engine with a key"
    first = keyed.http.post(
        f"{keyed.url}/v1/completions",
        json={"model": MODEL, "prompt": prompt, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}},
        headers={"Authorization": "Bearer sim-key"},
    )
    assert first.status_code == 200, first.text
    external = decode.metric("vllm:prompt_tokens_by_source_total", source="external_kv_transfer")
    second = decode.complete(prompt, max_tokens=2, kv_transfer_params=first.json()["kv_transfer_params"])
    assert second.status_code == 200
    transferred = decode.metric("vllm:prompt_tokens_by_source_total", source="external_kv_transfer") - external
    assert transferred == len(prompt.encode())


def test_pd_fallback_when_the_prefill_sim_is_gone(sims: dict[str, Sim]) -> None:
    prefill, decode = sims["doomed_prefill"], sims["decode"]
    prompt = "the prefill instance will die before decode reads this"
    params = remote_prefill(prefill, prompt)
    prefill.process.send_signal(signal.SIGTERM)
    assert prefill.process.wait(timeout=3) == 0

    failed = decode.metric("vllm:nixl_num_failed_transfers_total")
    transfers = decode.metric("vllm:nixl_xfer_time_seconds_count")
    computed = decode.metric("vllm:prompt_tokens_by_source_total", source="local_compute")
    external = decode.metric("vllm:prompt_tokens_by_source_total", source="external_kv_transfer")
    response = decode.complete(prompt, max_tokens=3, kv_transfer_params=params)
    assert response.status_code == 200
    assert len(response.json()["choices"][0]["text"].split()) == 3
    assert decode.metric("vllm:nixl_num_failed_transfers_total") == failed + 1
    assert decode.metric("vllm:nixl_xfer_time_seconds_count") == transfers
    assert decode.metric("vllm:prompt_tokens_by_source_total", source="local_compute") == computed + len(prompt)
    assert decode.metric("vllm:prompt_tokens_by_source_total", source="external_kv_transfer") == external
    assert "recomputing the prompt here" in decode.log()


def test_incomplete_kv_transfer_params_fall_back_to_local_prefill(pd_pair: tuple[Sim, Sim]) -> None:
    _, decode = pd_pair
    failed = decode.metric("vllm:nixl_num_failed_transfers_total")
    response = decode.complete("nowhere", max_tokens=1, kv_transfer_params={"do_remote_prefill": True})
    assert response.status_code == 200
    assert decode.metric("vllm:nixl_num_failed_transfers_total") == failed + 1


def test_hybrid_ignores_kv_transfer_params(hybrid: Sim) -> None:
    body = hybrid.complete("no connector here", max_tokens=1, kv_transfer_params={"do_remote_decode": True}).json()
    assert body["kv_transfer_params"] is None


# -- scheduling, aborts, process life ---------------------------------------------------------------------


def test_max_num_seqs_queues_the_rest(sims: dict[str, Sim]) -> None:
    sim = sims["queued"]  # --max-num-seqs 1
    done = sim.metric("vllm:request_success_total", finished_reason="length")
    results: list[int] = []
    clients = [
        # 100 tokens at 20 ms: long enough that all three are inside the engine at once, even on a loaded box
        threading.Thread(target=lambda: results.append(sim.complete("queued", max_tokens=100).status_code))
        for _ in range(3)
    ]
    for client in clients:
        client.start()
    deadline = time.monotonic() + 5
    while sim.metric("vllm:num_requests_waiting") < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sim.metric("vllm:num_requests_waiting") == 2
    assert sim.metric("vllm:num_requests_running") == 1
    assert sim.metric("vllm:kv_cache_usage_perc") > 0
    for client in clients:
        client.join(timeout=30)
    assert results == [200, 200, 200]
    assert sim.metric("vllm:num_requests_waiting") == 0
    assert sim.metric("vllm:request_success_total", finished_reason="length") == done + 3


def test_client_disconnect_aborts_the_request(sims: dict[str, Sim]) -> None:
    sim = sims["queued"]
    aborted = sim.metric("vllm:request_success_total", finished_reason="abort")
    generated = sim.metric("vllm:generation_tokens_total")
    request = {"model": MODEL, "prompt": "abort me", "max_tokens": 500, "stream": True}
    with httpx.Client() as client, client.stream("POST", f"{sim.url}/v1/completions", json=request) as response:
        lines = response.iter_lines()  # held: dropping the iterator would close the connection
        assert next(lines).startswith("data: ")
        assert sim.metric("vllm:num_requests_running") == 1
    deadline = time.monotonic() + 5
    while sim.metric("vllm:request_success_total", finished_reason="abort") == aborted and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sim.metric("vllm:request_success_total", finished_reason="abort") == aborted + 1
    assert sim.metric("vllm:num_requests_running") == 0
    assert sim.metric("vllm:generation_tokens_total") < generated + 500
    # The slot was given back: the next request runs.
    assert sim.complete("after the abort", max_tokens=1).status_code == 200


def test_not_listening_during_startup_delay_and_sigterm_exits_promptly(sims: dict[str, Sim]) -> None:
    sim = sims["delayed"]  # --startup-delay-s 60
    time.sleep(max(0.0, sim.launched_at + 1.5 - time.monotonic()))  # past the imports, into the delay
    with pytest.raises(httpx.TransportError):
        sim.get("/health")
    sim.process.send_signal(signal.SIGTERM)
    assert sim.process.wait(timeout=3) == 0
    assert "listening on" not in sim.log()


def test_admission_runs_the_lowest_priority_value_first_and_forgets_the_cancelled() -> None:
    async def scenario() -> list[str]:
        admission, order = Admission(1), []
        await admission.acquire(0)

        async def request(name: str, priority: int) -> None:
            await admission.acquire(priority)
            order.append(name)
            admission.release()

        tasks = {
            name: asyncio.create_task(request(name, priority))
            for name, priority in [("late", 5), ("urgent", -1), ("first-normal", 0), ("gone", -9), ("second-normal", 0)]
        }
        await asyncio.sleep(0)
        tasks["gone"].cancel()
        admission.release()
        await asyncio.wait_for(asyncio.gather(*tasks.values(), return_exceptions=True), timeout=2)
        await asyncio.wait_for(admission.acquire(0), timeout=1)  # every slot came back
        return order

    assert asyncio.run(scenario()) == ["urgent", "first-normal", "second-normal", "late"]


def test_unknown_argument_fails_like_vllm() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "pdctl.engines.sim", "--served-model-name", MODEL, "--no-such-flag"],
        capture_output=True,
        timeout=30,
    )
    assert run.returncode == 2
    assert b"--no-such-flag" in run.stderr
