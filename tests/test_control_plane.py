"""The design document's Python API (pdctl.control_plane) against a sim cluster: every code block of the
document run in order, runtime configuration changes, requests across event loops, and each error."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from pdctl.cluster import plan_profile
from pdctl.control_plane.errors import (
    DuplicateRequest,
    InstanceUnreachable,
    MissingPrompt,
    NoInstances,
    NotRunning,
    UnknownPolicy,
    UnknownRequest,
)
from pdctl.control_plane.manager import ControlPlaneManager
from pdctl.control_plane.pd_routing import PDRoutingStrategy
from pdctl.control_plane.types import (
    ExecutionInstance,
    ExecutionInstanceType,
    PDSeparationConfig,
    RequestMetadata,
)
from pdctl.engines.sim_adapter import SIM_ROLE
from pdctl.router.server import build_router
from tests.clusters import free_port_block, sim_profile, wait_for

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "design-examples"
LONG = "Explain prefill and decode disaggregation in detail. " * 20  # 1060 byte tokens


@dataclass
class Engine:
    """An engine someone else runs: the manager registers instances, it launches none."""

    id: str
    role: str
    port: int
    process: subprocess.Popen[bytes]
    host: str = "127.0.0.1"


def start_engine(instance_id: str, role: str, port: int, logs: Path, *args: str) -> Engine:
    argv = [sys.executable, "-m", "pdctl.engines.sim", "--port", str(port), "--served-model-name", "sim-model"]
    argv += ["--role", SIM_ROLE[ExecutionInstanceType(role)], *args]
    with (logs / f"{instance_id}.log").open("wb") as log:
        engine = Engine(instance_id, role, port, subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT))
    wait_for(lambda: _answers(port), what=f"{instance_id} to answer /health")
    return engine


def _answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
    except httpx.TransportError:
        return False


def stop_engine(engine: Engine) -> None:
    engine.process.terminate()
    engine.process.wait(timeout=10)


@dataclass
class Engines:
    instances: list[Engine]


@pytest.fixture(scope="module")
def sim_cluster(tmp_path_factory):
    """The document's prefill and decode instances: sim engines without a key, as the document's have none."""
    logs = tmp_path_factory.mktemp("cp")
    base = free_port_block(2, 26000)
    engines = [
        start_engine("prefill-0", "PREFILLING", base, logs),
        start_engine("decode-0", "DECODING", base + 1, logs),
    ]
    yield Engines(engines)
    for engine in engines:
        stop_engine(engine)


def instances_of(plan) -> list[ExecutionInstance]:
    return [ExecutionInstance(instance_id=i.id, instance_type=i.role, host=i.host, port=i.port) for i in plan.instances]


def run_design_document(plan, namespace: dict) -> None:
    """Each block of the document in order, in one namespace, hosts and ports pointed at the cluster."""
    prefill, decode = plan.instances
    for path in sorted(EXAMPLES.glob("*.py")):
        code = path.read_text()
        code = code.replace('host="10.0.0.1",\n    port=8000', f'host="{prefill.host}",\n    port={prefill.port}')
        code = code.replace('host="10.0.0.2",\n    port=8001', f'host="{decode.host}",\n    port={decode.port}')
        exec(compile(code, str(path), "exec"), namespace)  # the document's own code is the test


def test_every_block_of_the_design_document_runs(sim_cluster, capsys):
    # 03_monitoring.py sleeps with `time` that the document never imports; a reader's session has it.
    namespace: dict = {"__name__": "design_document", "time": time}
    run_design_document(sim_cluster, namespace)
    manager, request_id = namespace["manager"], namespace["request_id"]
    try:
        result = asyncio.run(manager.result(request_id, timeout_s=30))  # a third event loop
        assert result.ok and result.text and result.phase == "DECODING" and result.decode_instance == "decode-0"
        printed = capsys.readouterr().out
        assert "Request will be routed to: DECODING" in printed
        assert "Suitable instances: ['decode-0']" in printed
        assert "=== PD分离性能指标 ===" in printed and "路由到Hybrid: 0" in printed
        pd_router, request = namespace["pd_router"], RequestMetadata(request_id="r")
        request.prompt = "short"
        assert namespace["get_cached_route"](request) is ExecutionInstanceType.DECODING
        assert (
            namespace["pd_config"].kv_cache_eviction_policy == "lfu"
            and pd_router.pd_config.prefilling_max_instances == 6
        )
        # The prefill instance's config is the manager's: the document's remedy reaches the router.
        deadline = time.monotonic() + 10
        while manager.router.settings.default_prefill_tokens_per_s != 800 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert manager.router.settings.default_prefill_tokens_per_s == 800
        metrics = manager.executor.metrics
        assert metrics.requests_routed_to_decoding >= 1 and metrics.decoding_latency_avg_ms > 0
    finally:
        asyncio.run(manager.stop())
    assert manager._running is False


@pytest.fixture
def manager(sim_cluster):
    config = PDSeparationConfig(routing_policy="threshold", prefilling_threshold_input_tokens=64,
                                prefilling_threshold_ratio=1.0)  # fmt: skip
    manager = ControlPlaneManager(scheduling_policy="slo_aware", routing_strategy="load_balanced", pd_config=config)
    for instance in instances_of(sim_cluster):
        manager.executor.register_instance(instance)
    asyncio.run(manager.start())
    yield manager
    asyncio.run(manager.stop())


def submit(manager: ControlPlaneManager, request_id: str, prompt: str, max_tokens: int = 8):
    request = RequestMetadata(request_id=request_id, max_tokens=max_tokens)
    request.prompt = prompt

    async def go():
        submitted = await manager.submit_request(request)
        return await manager.result(submitted, timeout_s=30)

    return asyncio.run(go())


def test_policy_changes_apply_to_the_running_manager(manager):
    first = submit(manager, "long-1", LONG)
    assert first.ok and first.phase == "PREFILLING"
    assert (first.prefill_instance, first.decode_instance) == ("prefill-0", "decode-0")
    manager.pd_config.routing_policy = "never"
    assert submit(manager, "long-2", LONG).phase == "DECODING"
    manager.pd_config.enabled = False
    assert submit(manager, "long-3", LONG).phase == "HYBRID"
    manager.pd_config.enabled = True
    manager.pd_config.routing_policy = "threshold"
    manager.pd_config.prefilling_threshold_input_tokens = 5000
    assert submit(manager, "long-4", LONG).phase == "DECODING"


def test_invalid_runtime_changes_fail_where_they_are_made(manager):
    with pytest.raises(
        ValidationError, match=r"prefilling_min_instances \(1\) is above prefilling_max_instances \(0\)"
    ):  # and the config keeps its valid value
        manager.pd_config.prefilling_max_instances = 0
    with pytest.raises(ValidationError, match="routing_policy"):
        manager.pd_config.routing_policy = "fastest"
    assert manager.pd_config.prefilling_max_instances == 3 and manager.pd_config.routing_policy == "threshold"


def test_stream_a_request_started_in_another_event_loop(manager):
    request = RequestMetadata(request_id="streamed", max_tokens=12)
    request.prompt = "hello"
    asyncio.run(manager.submit_request(request))

    async def read() -> str:
        return "".join([chunk async for chunk in manager.stream("streamed")])

    text = asyncio.run(read())
    result = asyncio.run(manager.result("streamed"))
    assert text == result.text and result.output_chunks >= 12 and result.ttft_ms is not None


def test_request_errors_are_pdctl_exceptions(manager):
    with pytest.raises(MissingPrompt, match="request 'bare' has no prompt"):
        asyncio.run(manager.submit_request(RequestMetadata(request_id="bare")))
    submit(manager, "once", "hi")
    with pytest.raises(DuplicateRequest, match="'once' was already submitted"):
        submit(manager, "once", "hi")
    with pytest.raises(UnknownRequest, match="no request 'ghost'"):
        asyncio.run(manager.result("ghost"))


def test_the_manager_builds_its_router_as_the_daemon_does(manager, tmp_path):
    """One builder: over the same configuration the two routers decide, time out and give up alike."""
    planned = plan_profile(sim_profile(tmp_path))  # planned only: nothing starts
    daemon, ours = build_router(planned.profile, planned.plan).settings, manager.router.settings
    alike = ("routing_strategy", "scheduling_policy", "ttft_slo_ms", "tpot_target_ms", "default_prefill_tokens_per_s",
             "prefill_timeout_s", "stall_timeout_s", "max_migrations", "record_metrics")  # fmt: skip
    assert {name: getattr(ours, name) for name in alike} == {name: getattr(daemon, name) for name in alike}
    assert ours.pd is manager.pd_config and ours.served_model_name == "sim-model"


def test_unknown_policy_names():
    with pytest.raises(UnknownPolicy, match="unknown scheduling_policy 'fastest'; known: slo_aware, fifo"):
        ControlPlaneManager(scheduling_policy="fastest")
    with pytest.raises(UnknownPolicy, match="unknown routing_strategy 'random'"):
        ControlPlaneManager(routing_strategy="random")


def test_unreachable_and_missing_instances_fail_start():
    manager = ControlPlaneManager()
    with pytest.raises(NoInstances):
        asyncio.run(manager.start())
    port = free_port_block(1, 27000)
    manager.executor.register_instance(ExecutionInstance(instance_id="gone", instance_type="DECODING", port=port))
    with pytest.raises(InstanceUnreachable, match=f"gone: http://127.0.0.1:{port}") as caught:
        asyncio.run(manager.start())
    assert set(caught.value.reasons) == {"gone"} and manager._running is False
    with pytest.raises(NotRunning):
        submit(manager, "x", "hi")


def test_instances_with_a_key_are_reached_with_instance_api_key(tmp_path):
    port = free_port_block(1, 27100)
    engine = start_engine("keyed", "DECODING", port, tmp_path, "--api-key", "instance-key")
    try:
        keyless = ControlPlaneManager()
        keyless.executor.register_instance(ExecutionInstance(instance_id="keyed", instance_type="DECODING", port=port))
        with pytest.raises(InstanceUnreachable, match="401 Unauthorized"):
            asyncio.run(keyless.start())
        keyed = ControlPlaneManager(instance_api_key="instance-key")
        keyed.executor.register_instance(ExecutionInstance(instance_id="keyed", instance_type="DECODING", port=port))
        asyncio.run(keyed.start())
        try:
            result = submit(keyed, "with-key", "hello")
            assert result.ok and result.decode_instance == "keyed", result.error
        finally:
            asyncio.run(keyed.stop())
    finally:
        stop_engine(engine)


def test_pd_routing_strategy_decides_as_the_router_does():
    config = PDSeparationConfig(routing_policy="threshold", prefilling_threshold_input_tokens=100,
                                prefilling_threshold_ratio=2.0)  # fmt: skip
    strategy = PDRoutingStrategy(config)
    request = RequestMetadata(request_id="r", input_tokens=400, max_tokens=100)
    assert strategy.determine_request_phase(request) is ExecutionInstanceType.PREFILLING
    assert strategy.last_decision is not None and strategy.last_decision.figures["input_tokens"] == 400
    request.max_tokens = 300  # ratio 1.33 < 2
    assert strategy.determine_request_phase(request) is ExecutionInstanceType.DECODING
    request.max_tokens = None  # the average output, 128: ratio 3.1
    assert strategy.determine_request_phase(request, avg_output_tokens=128) is ExecutionInstanceType.PREFILLING
    with pytest.raises(MissingPrompt):
        strategy.determine_request_phase(RequestMetadata(request_id="empty"))
    prefill = ExecutionInstance(instance_id="p", instance_type="PREFILLING")
    decode = ExecutionInstance(instance_id="d", instance_type="DECODING")
    pick = strategy.filter_instances_by_type
    assert pick([prefill, decode], ExecutionInstanceType.DECODING) == [decode]
    assert pick([prefill, decode], ExecutionInstanceType.HYBRID) == [prefill, decode]  # no hybrid: any instance
