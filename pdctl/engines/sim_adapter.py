"""The sim engine (`python -m pdctl.engines.sim`): an emulator of vLLM's HTTP API, its metrics and its hand-off
included, that runs in pdctl's own interpreter on no device of its own."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from pdctl.engines.adapter import EngineAdapter
from pdctl.engines.commands import EngineCommand, InstanceContext, LaunchPrefix, add_engine_key
from pdctl.engines.vllm_adapter import VllmEngine
from pdctl.perfmodel.hardware import UnknownHardware
from pdctl.perfmodel.machine import note_for
from pdctl.types import ExecutionInstance, ExecutionInstanceType

if TYPE_CHECKING:  # the profile reads the engines' registry: engines only name its type
    from pdctl.profile import ClusterProfile

SIM_ROLE = {
    ExecutionInstanceType.PREFILLING: "prefill",
    ExecutionInstanceType.DECODING: "decode",
    ExecutionInstanceType.HYBRID: "hybrid",
}


class SimEngine(EngineAdapter, name="sim"):
    metrics = VllmEngine.metrics
    handoff = VllmEngine.handoff
    uses_devices = False
    emulates = "vLLM"

    def command(self, profile: ClusterProfile, ctx: InstanceContext, prefix: LaunchPrefix) -> EngineCommand:
        instance = ctx.instance
        max_num_seqs = (
            (instance.prefilling_config or profile.prefill).target_batch_size
            if instance.instance_type is ExecutionInstanceType.PREFILLING
            else (instance.decoding_config or profile.decode).max_parallel_requests
        )
        argv = [sys.executable, "-m", "pdctl.engines.sim", "--host", instance.host, "--port", str(instance.port)]
        argv += ["--served-model-name", instance.model_name or profile.served_model_name]
        argv += ["--role", SIM_ROLE[instance.instance_type], "--max-num-seqs", str(max_num_seqs)]
        argv += ["--prefill-ms-per-token", str(profile.engine.sim.prefill_ms_per_token)]
        argv += ["--decode-ms-per-token", str(profile.engine.sim.decode_ms_per_token)]
        argv += _model_args(profile, instance)
        command = EngineCommand(argv=argv + profile.engine.extra_args)
        command.env.update(profile.engine.env)
        add_engine_key(command)
        command.notes.append("engine: sim is an emulator of vLLM's HTTP API, not vLLM: its figures are modelled")
        command.notes += _machine_notes(profile)
        return command


def _machine_notes(profile: ClusterProfile) -> list[str]:
    """The line saying the hardware profile was measured on a visibly different machine, where it was."""
    if profile.engine.sim.hardware is None:
        return []
    try:
        note = note_for(profile.engine.sim.hardware)
    except UnknownHardware:  # the sim engine refuses it by name when it starts
        return []
    return [note] if note else []


def _model_args(profile: ClusterProfile, instance: ExecutionInstance) -> list[str]:
    """With a hardware profile, the sim times its steps with pdctl's engine model, batching as vLLM would."""
    sim = profile.engine.sim
    if sim.hardware is None:
        return []
    argv = ["--hardware", sim.hardware, "--architecture", sim.architecture or profile.model.path]
    argv += ["--tensor-parallel-size", str(instance.tensor_parallel_size or 1)]
    if sim.speed is not None:
        argv += ["--speed", str(sim.speed)]
    if instance.instance_type is ExecutionInstanceType.PREFILLING:
        argv += ["--max-num-batched-tokens", str((instance.prefilling_config or profile.prefill).max_chunk_size_tokens)]
    if profile.router.scheduling_policy == "slo_aware":
        argv += ["--scheduling-policy", "priority"]
    return argv
