"""From a planned instance to the exact argv and environment of vLLM (the vLLM adapter's command line), and what
every engine's command shares: pure functions.

docs/profile.md's "Profile to engine" table documents this mapping; tests pin it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pdctl.auth import ENGINE_KEY_ENV, VLLM_KEY_ENV
from pdctl.placement import Assignment, DeviceMode
from pdctl.types import ExecutionInstance, ExecutionInstanceType

if TYPE_CHECKING:  # the profile reads the engines' registry: engines only name its type
    from pdctl.profile import ClusterProfile

# The names pdctl/engines/runtime_hooks.py reads (that module runs in vLLM's interpreter, not here).
NIXL_PROGRESS_ENV = "PDCTL_NIXL_PROGRESS_DELAY_US"
SHM_SPIN_ENV = "PDCTL_SHM_SPIN_US"
KEEP_WORKER_CORES_ENV = "PDCTL_KEEP_WORKER_CORES"
KV_ROLE = {
    ExecutionInstanceType.PREFILLING: "kv_producer",
    ExecutionInstanceType.DECODING: "kv_consumer",
}


@dataclass(frozen=True)
class LaunchPrefix:
    """How the engine program is started: `vllm serve MODEL` takes the model positionally, the module form
    (`python -m vllm.entrypoints.openai.api_server --model MODEL`) as a flag."""

    argv: tuple[str, ...]
    model_positional: bool = False


@dataclass
class EngineCommand:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # The port the engine's KV connector listens on beside its API, where it has one.
    side_channel_port: int | None = None


@dataclass(frozen=True)
class InstanceContext:
    """Everything about one instance that the profile alone does not say."""

    instance: ExecutionInstance
    assignment: Assignment
    device: DeviceMode
    model_path: str
    nixl_port: int


def vllm_command(profile: ClusterProfile, ctx: InstanceContext, prefix: LaunchPrefix) -> EngineCommand:
    instance = ctx.instance
    model = [ctx.model_path] if prefix.model_positional else ["--model", ctx.model_path]
    argv = [*prefix.argv, *model, "--served-model-name", instance.model_name or profile.served_model_name]
    argv += ["--host", instance.host, "--port", str(instance.port)]
    argv += _parallelism_args(instance)
    argv += _batching_args(profile, instance)
    argv += _model_args(profile)
    if profile.router.scheduling_policy == "slo_aware":
        argv += ["--scheduling-policy", "priority"]
    command = EngineCommand(argv=argv)
    _add_kv_transfer(profile, ctx, command)
    _add_device_env(profile, ctx, command)
    if ctx.device == "cuda":
        command.argv += ["--gpu-memory-utilization", str(memory_fraction(profile, instance))]
    command.argv += profile.engine.extra_args
    command.env.update(profile.engine.env)
    add_engine_key(command)
    return command


def add_engine_key(command: EngineCommand) -> None:
    # The environment, not --api-key: a command line is readable by every user of the host (and state.json
    # records it), the environment only by the engine's owner. Resolved at launch by the daemon.
    command.env[VLLM_KEY_ENV] = f"${{{ENGINE_KEY_ENV}}}"


def memory_fraction(profile: ClusterProfile, instance: ExecutionInstance) -> float:
    """Share of each GPU's memory the engine takes. PrefillingConfig has no such knob: the PD config's applies."""
    if instance.instance_type is ExecutionInstanceType.PREFILLING:
        return profile.pd.kv_cache_memory_fraction
    return (instance.decoding_config or profile.decode).kv_cache_memory_fraction


def _parallelism_args(instance: ExecutionInstance) -> list[str]:
    tp = instance.tensor_parallel_size or 1
    pp = instance.pipeline_parallel_size or 1
    argv = ["--tensor-parallel-size", str(tp), "--pipeline-parallel-size", str(pp)]
    data_parallel = (instance.gpu_count or tp * pp) // (tp * pp)
    if data_parallel > 1:
        argv += ["--data-parallel-size", str(data_parallel)]
    return argv


def _batching_args(profile: ClusterProfile, instance: ExecutionInstance) -> list[str]:
    prefix_caching = (instance.decoding_config or profile.decode).enable_prefix_caching
    argv = ["--enable-prefix-caching" if prefix_caching else "--no-enable-prefix-caching"]
    if instance.instance_type is ExecutionInstanceType.PREFILLING:
        prefill = instance.prefilling_config or profile.prefill
        argv += ["--max-num-seqs", str(prefill.target_batch_size)]
        argv += ["--enable-chunked-prefill" if prefill.enable_chunked_prefill else "--no-enable-chunked-prefill"]
        argv += ["--max-num-batched-tokens", str(prefill.max_chunk_size_tokens)]
    else:
        decode = instance.decoding_config or profile.decode
        argv += ["--max-num-seqs", str(decode.max_parallel_requests)]
    return argv


def _model_args(profile: ClusterProfile) -> list[str]:
    argv: list[str] = []
    load_format = profile.engine.load_format or ("dummy" if profile.model.is_builtin_tiny else None)
    if load_format:
        argv += ["--load-format", load_format]
    if profile.model.max_model_len:
        argv += ["--max-model-len", str(profile.model.max_model_len)]
    if profile.model.dtype:
        argv += ["--dtype", profile.model.dtype]
    if profile.engine.seed is not None:
        argv += ["--seed", str(profile.engine.seed)]
    return argv


def _add_kv_transfer(profile: ClusterProfile, ctx: InstanceContext, command: EngineCommand) -> None:
    role = KV_ROLE.get(ctx.instance.instance_type)
    if role is None or not profile.pd.enabled:
        return
    host_buffer = ctx.device == "cpu" or profile.pd.kv_cache_storage == "cpu"
    config = {
        "kv_connector": "NixlConnector",
        "kv_role": role,
        "kv_buffer_device": "cpu" if host_buffer else "cuda",
        # A KV cache that cannot be read (its prefill instance died after answering) is computed again on the
        # decode instance: the request is answered, later, instead of failing.
        "kv_load_failure_policy": "recompute",
    }
    command.argv += ["--kv-transfer-config", json.dumps(config, separators=(",", ":"))]
    command.env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(ctx.nixl_port)
    command.side_channel_port = ctx.nixl_port
    command.env["VLLM_NIXL_SIDE_CHANNEL_HOST"] = ctx.instance.host
    if ctx.device == "cpu" and profile.cpu.keep_worker_cores:
        # Read by pdctl's hook in the runtime: vLLM's NIXL connector would move the Worker's forward pass to the
        # host's last core, another instance's here.
        command.env[KEEP_WORKER_CORES_ENV] = "1"
    if ctx.device == "cpu" and profile.cpu.nixl_progress_delay_us:
        # Read by pdctl's hook in the runtime (pdctl/engines/runtime_hooks.py): cores are the engine's here.
        command.env[NIXL_PROGRESS_ENV] = str(profile.cpu.nixl_progress_delay_us)


def _add_device_env(profile: ClusterProfile, ctx: InstanceContext, command: EngineCommand) -> None:
    if ctx.device == "cpu":
        if profile.cpu.shm_spin_us:
            command.env[SHM_SPIN_ENV] = str(profile.cpu.shm_spin_us)  # read by the runtime's hook, as NIXL's
        command.env["VLLM_CPU_KVCACHE_SPACE"] = _number(profile.cpu.kv_cache_space_gib)
        command.env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_bind_spec(ctx.assignment.cpu_cores, ctx.instance)
        return
    if not ctx.assignment.gpus:
        return  # placed by a launcher that hands out the node's GPUs itself (Ray sets CUDA_VISIBLE_DEVICES)
    # UUIDs, not indices: CUDA's own device order can differ from NVML's, UUIDs cannot be misread.
    command.env["CUDA_VISIBLE_DEVICES"] = ",".join(gpu.uuid for gpu in ctx.assignment.gpus)
    command.env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"


def cpu_bind_spec(cores: list[int], instance: ExecutionInstance) -> str:
    """VLLM_CPU_OMP_THREADS_BIND: one core range per tensor/pipeline rank, ranks separated by `|`."""
    ranks = (instance.tensor_parallel_size or 1) * (instance.pipeline_parallel_size or 1)
    share = max(1, len(cores) // ranks)
    groups = [cores[i * share : (i + 1) * share] or cores[-1:] for i in range(ranks)]
    return "|".join(_core_range(group) for group in groups)


def _core_range(cores: list[int]) -> str:
    if len(cores) > 1 and cores == list(range(cores[0], cores[-1] + 1)):
        return f"{cores[0]}-{cores[-1]}"
    return ",".join(str(core) for core in cores)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)
