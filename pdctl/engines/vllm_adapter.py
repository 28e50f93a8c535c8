"""vLLM: its command line (`pdctl.engines.commands`), its runtime (`pdctl.engines.runtime`), the names of its
metrics, its NIXL hand-off between prefill and decode, and the log lines of its engine core dying."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pdctl.engines import commands, runtime
from pdctl.engines.adapter import EngineAdapter, EngineMetrics, Handoff

if TYPE_CHECKING:  # the profile reads the engines' registry: engines only name its type
    from pdctl.engines.commands import EngineCommand, InstanceContext, LaunchPrefix
    from pdctl.placement import DeviceMode
    from pdctl.profile import ClusterProfile

METRICS = EngineMetrics(
    samples={
        "vllm:num_requests_running": "running",
        "vllm:num_requests_waiting": "waiting",
        "vllm:kv_cache_usage_perc": "kv_usage",
        "vllm:prefix_cache_hits_total": "prefix_hits",
        "vllm:prefix_cache_queries_total": "prefix_queries",
        "vllm:prompt_tokens_total": "prompt_tokens",
        "vllm:generation_tokens_total": "generation_tokens",
        "vllm:num_preemptions_total": "preemptions",
        "vllm:nixl_xfer_time_seconds_count": "nixl_transfers",
        "vllm:nixl_xfer_time_seconds_sum": "nixl_seconds",
        "vllm:nixl_bytes_transferred_sum": "nixl_bytes",
        "vllm:nixl_num_failed_transfers_total": "nixl_failed",
    },
    by_source="vllm:prompt_tokens_by_source_total",
    sources={
        "local_compute": "prompt_computed",
        "local_cache_hit": "prompt_cache_hit",
        "external_kv_transfer": "prompt_transferred",
    },
)

# The prefill hop's kv_transfer_params: compute the prompt, keep its KV blocks for a decode instance to pull.
REMOTE_DECODE = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}

# vLLM's own messages (vllm/v1/engine/core.py, utils.py and exceptions.py, 0.32): each means the engine core
# is gone. The API server logs EngineDeadError when its engine core died (killed, crashed) and exits by itself
# only some seconds later, answering 500 meanwhile.
FATAL_MARKERS = (
    "EngineCore failed to start",
    "EngineCore encountered a fatal error",
    "Engine core initialization failed",
    "EngineDeadError",
)


class VllmRuntime:
    """vLLM and NIXL in a virtual environment of their own, made by `pdctl engine install`."""

    missing_fix = "`pdctl engine install` there creates it"

    def default_python(self, device: DeviceMode) -> Path:
        return runtime.runtime_python(runtime.default_runtime_dir(device))

    def launch_prefix(self, python: Path) -> LaunchPrefix:
        return runtime.launch_prefix(python)

    def check(self, python: Path | None) -> None:
        info = runtime.check_runtime(python)
        if runtime.read_marker(info.dir) is not None:  # a runtime pdctl made; never edit another environment
            runtime.install_hooks(info.dir)


class VllmEngine(EngineAdapter, name="vllm"):
    metrics = METRICS
    handoff = Handoff(request_field="kv_transfer_params", prefill_params=REMOTE_DECODE)
    fatal_markers = FATAL_MARKERS
    runtime = VllmRuntime()

    def command(self, profile: ClusterProfile, ctx: InstanceContext, prefix: LaunchPrefix) -> EngineCommand:
        return commands.vllm_command(profile, ctx, prefix)
