"""Engines are a registry: a new engine is one adapter class, and the profile, the plan, the launcher, the router's
hand-off and scrape, and the supervisor's log check take it by its name, with no list edited anywhere."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import fields
from typing import Any

import httpx
import pytest

from pdctl.cluster import plan_profile
from pdctl.engines import failures
from pdctl.engines.adapter import EngineAdapter, EngineMetrics, Handoff, engine_adapter, known_engines
from pdctl.engines.commands import EngineCommand, InstanceContext, LaunchPrefix
from pdctl.errors import ProfileError, UnknownEngine
from pdctl.gpus import StaticGpuSource
from pdctl.httpserver import HttpServer, Request, Response, json_response
from pdctl.profile import ClusterProfile, load_profile
from pdctl.router.proxy import Router, RouterSettings
from pdctl.router.scrape import EngineSample, scrape_once
from pdctl.router.tokens import TokenCounter, utf8_length
from pdctl.routing.pool import Instance, Pool
from pdctl.types import ExecutionInstanceType as Role
from pdctl.types import PDSeparationConfig
from tests.conftest import ROOT, fake_gpu

RELAY_PROFILE = "name: r\nmodel: {path: some/model}\nengine:\n  kind: relay\n"


@pytest.fixture
def relay() -> Iterator[type[EngineAdapter]]:
    """A third engine, all of it in one class: its command line, metric names, hand-off field and fatal line."""

    class RelayEngine(EngineAdapter, name="relay"):
        metrics = EngineMetrics(samples={"relay_running": "running", "relay_prompt_tokens_total": "prompt_tokens"})
        handoff = Handoff(request_field="relay_kv", prefill_params={"hand_off": "decode"})
        fatal_markers = ("relay core lost",)
        uses_devices = False

        def command(self, profile: ClusterProfile, ctx: InstanceContext, prefix: LaunchPrefix) -> EngineCommand:
            role = ctx.instance.instance_type.value.lower()
            return EngineCommand(argv=["relay-serve", profile.model.path, "--port", str(ctx.instance.port), role])

    yield RelayEngine
    del EngineAdapter.registry["relay"]


def test_a_third_engine_is_one_class_the_plan_takes_by_name(relay, write_profile):
    planned = plan_profile(write_profile(RELAY_PROFILE), StaticGpuSource([fake_gpu(i) for i in range(8)]))
    plan = planned.plan
    assert planned.profile.engine.kind == plan.engine == "relay"
    assert [i.argv for i in plan.instances] == [
        ["relay-serve", "some/model", "--port", "8100", "prefilling"],
        ["relay-serve", "some/model", "--port", "8101", "decoding"],
        ["relay-serve", "some/model", "--port", "8102", "decoding"],
    ]
    # No runtime of its own and no devices: nothing to install, and the host's GPUs stay free.
    assert plan.engine_python is None
    assert all(not i.gpus and not i.cpu_cores and i.nixl_side_channel_port is None for i in plan.instances)


def test_an_unknown_engine_kind_names_the_field_and_the_known_kinds(write_profile):
    path = write_profile("name: t\nmodel: {path: m}\nengine:\n  kind: sglang\n")
    with pytest.raises(ProfileError) as caught:
        load_profile(path)
    assert str(caught.value) == f"{path}:4:3: engine.kind: unknown engine 'sglang'; known engines: sim, vllm"
    result = subprocess.run(
        [sys.executable, "-m", "pdctl", "validate", str(path)], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 2 and "engine.kind: unknown engine 'sglang'; known engines: sim, vllm" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_known_kinds_are_the_registry(relay):
    assert known_engines() == ["relay", "sim", "vllm"]
    with pytest.raises(UnknownEngine, match="unknown engine 'gone'; known engines: relay, sim, vllm"):
        engine_adapter("gone")


def test_every_engines_metrics_fill_fields_the_router_has():
    sample_fields = {f.name for f in fields(EngineSample)}
    for kind in known_engines():
        metrics = engine_adapter(kind).metrics
        assert set(metrics.samples.values()) | set(metrics.sources.values()) <= sample_fields, kind


def test_the_supervisors_log_check_reads_a_registered_engines_fatal_lines(relay):
    log = "loading\n12:00:01 ERROR relay core lost: out of memory\nmore\n"
    assert failures.fatal_line(log) == "12:00:01 ERROR relay core lost: out of memory"
    assert failures.fatal_line("(EngineCore_DP0 pid=7) ERROR EngineCore failed to start.\n") is not None


class RelayServer:
    """One relay instance on a real socket: it records what it was sent and answers in the relay's own names."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.server = HttpServer(self.handle)

    async def handle(self, request: Request) -> Response:
        if request.path == "/metrics":
            return Response(200, b"relay_running 3\nrelay_prompt_tokens_total 120\nvllm:num_requests_running 9\n")
        body = request.json()
        self.bodies.append(body)
        answer: dict[str, Any] = {"choices": [{"index": 0, "text": "ok", "finish_reason": "length"}]}
        if "relay_kv" in body and body["relay_kv"].get("hand_off") == "decode":
            answer["relay_kv"] = {"blocks": [1, 2], "from": "prefill"}
        return json_response(answer)


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.anyio
async def test_the_router_hands_off_and_scrapes_in_the_engines_own_names(relay):
    prefill, decode = RelayServer(), RelayServer()
    for engine in (prefill, decode):
        await engine.server.start()
    instances = [
        Instance("prefill-0", Role.PREFILLING, f"http://127.0.0.1:{prefill.server.port}", max_num_seqs=4),
        Instance("decode-0", Role.DECODING, f"http://127.0.0.1:{decode.server.port}", max_num_seqs=4),
    ]
    for instance in instances:
        instance.healthy = True
    pd = PDSeparationConfig(
        routing_policy="threshold", prefilling_threshold_input_tokens=0, prefilling_threshold_ratio=0
    )
    router = Router(RouterSettings("relay-model", pd, engine="relay"), Pool(instances), TokenCounter(utf8_length))
    server = HttpServer(router.handle)
    await server.start()
    try:
        async with httpx.AsyncClient() as client:
            response = await client.post(
                f"http://127.0.0.1:{server.port}/v1/completions",
                json={"model": "relay-model", "prompt": "hello relay", "max_tokens": 4},
            )
        assert response.status_code == 200 and response.json()["choices"][0]["text"] == "ok"
        (first,) = prefill.bodies
        assert first["relay_kv"] == {"hand_off": "decode"} and "kv_transfer_params" not in first
        (second,) = decode.bodies
        assert second["relay_kv"] == {"blocks": [1, 2], "from": "prefill"} and second["max_tokens"] == 4
        await scrape_once(router.telemetry, instances[1])
        latest = router.telemetry.history("decode-0").latest
        assert latest is not None and (latest.running, latest.prompt_tokens) == (3.0, 120.0)
        assert instances[1].running == 3.0  # vLLM's running gauge on the same page is not the relay's
    finally:
        await server.stop()
        await router.aclose()
        for engine in (prefill, decode):
            await engine.server.stop()
