"""Profile + host devices -> the plan: every instance with its devices, ports, argv and environment.

`pdctl plan` prints it, `pdctl up` acts on it; both take this one path, so a dry run cannot drift from
what really runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, Field

from pdctl.engines import commands
from pdctl.engines.adapter import engine_adapter
from pdctl.engines.commands import EngineCommand, InstanceContext, LaunchPrefix
from pdctl.gpus import GpuInventory
from pdctl.placement import Assignment, DeviceMode, GpuSlot, PlacementRequest
from pdctl.profile import ENV_REFERENCE, ClusterProfile, LauncherSpec, RouterSpec, is_secret_name
from pdctl.types import ExecutionInstance, ExecutionInstanceType

MASK = "***"


class PlannedInstance(BaseModel):
    id: str
    role: ExecutionInstanceType
    host: str
    port: int
    launch: bool
    nixl_side_channel_port: int | None = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    gpus: list[GpuSlot] = Field(default_factory=list)
    cpu_cores: list[int] = Field(default_factory=list)
    affinity: list[int] = Field(
        default_factory=list, description="the cores every process of the instance runs on (empty: any core)"
    )
    node: str | None = Field(None, description="the node it runs on (a launcher with several nodes)")
    node_id: str | None = None
    needs: dict[str, float] = Field(
        default_factory=dict, description="what it asks of a node, for a launcher that places by resources"
    )
    argv: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


class Placer(Protocol):
    """Where instances go: a launcher (`pdctl.launchers`), seen from the plan."""

    def device_mode(self, profile: ClusterProfile, inventory: GpuInventory) -> DeviceMode: ...

    def place(
        self,
        profile: ClusterProfile,
        requests: list[PlacementRequest],
        device: DeviceMode,
        inventory: GpuInventory,
        *,
        force: bool = False,
        cores: list[int] | None = None,
    ) -> dict[str, Assignment]: ...


class Plan(BaseModel):
    cluster: str
    profile_path: str | None = None
    launcher: LauncherSpec = Field(default_factory=LauncherSpec)
    device: DeviceMode
    engine: str = Field(description="the engine kind (engine.kind): its adapter, `pdctl.engines.adapter`")
    engine_python: str | None = None
    model_path: str
    served_model_name: str
    router: RouterSpec
    instances: list[PlannedInstance]
    notes: list[str] = Field(default_factory=list)

    def masked(self) -> Plan:
        """The plan with secret values hidden: what `plan` prints and what state files hold."""
        copy = self.model_copy(deep=True)
        for instance in copy.instances:
            instance.env = {key: mask_value(key, value) for key, value in instance.env.items()}
            instance.argv = mask_argv(instance.argv)
        return copy

    @property
    def launched(self) -> list[PlannedInstance]:
        return [instance for instance in self.instances if instance.launch]


def mask_value(name: str, value: str) -> str:
    # A ${VAR} reference is resolved at launch from the environment: it is safe to show as written.
    return MASK if is_secret_name(name) and not ENV_REFERENCE.match(value) else value


def mask_argv(argv: list[str]) -> list[str]:
    masked = list(argv)
    for index, arg in enumerate(argv[:-1]):
        if arg.startswith("--") and is_secret_name(arg):
            masked[index + 1] = MASK
    return [
        f"{arg.split('=', 1)[0]}={MASK}"
        if arg.startswith("--") and "=" in arg and is_secret_name(arg.split("=")[0])
        else arg
        for arg in masked
    ]


def make_plan(
    profile: ClusterProfile,
    inventory: GpuInventory,
    *,
    placer: Placer,
    model_path: str,
    launch_prefix: LaunchPrefix,
    device: DeviceMode | None = None,
    engine_python: Path | None = None,
    profile_path: Path | None = None,
    force: bool = False,
    cores: list[int] | None = None,
) -> Plan:
    """The plan; `device`, where the caller has resolved it already, saves asking the placer (a Ray cluster)
    again."""
    instances = profile.resolved_instances()
    device = device or placer.device_mode(profile, inventory)
    requests = [
        PlacementRequest(instance=instance, memory_fraction=commands.memory_fraction(profile, instance))
        for instance in instances
        if instance.launch
    ]
    assignments = placer.place(profile, requests, device, inventory, force=force, cores=cores)
    planned: list[PlannedInstance] = []
    notes = _profile_notes(profile, device, launches=bool(requests))
    for index, instance in enumerate(instances):
        assignment = assignments.get(instance.instance_id, Assignment(instance_id=instance.instance_id))
        ctx = InstanceContext(
            instance=_on_node(instance, assignment),
            assignment=assignment,
            device=device,
            model_path=model_path,
            nixl_port=profile.ports.nixl_side_channel + index,
        )
        command = _engine_command(profile, ctx, launch_prefix) if instance.launch else EngineCommand(argv=[])
        notes += [note for note in command.notes if note not in notes]
        planned.append(_planned(ctx, command, profile.cpu.pin_processes))
    return Plan(
        cluster=profile.name,
        profile_path=str(profile_path) if profile_path else None,
        launcher=profile.launcher,
        device=device,
        engine=profile.engine.kind,
        engine_python=str(engine_python) if engine_python else None,
        model_path=model_path,
        served_model_name=profile.served_model_name,
        router=profile.router,
        instances=planned,
        notes=notes,
    )


def plan_added_instance(
    profile: ClusterProfile,
    plan: Plan,
    instance: ExecutionInstance,
    assignment: Assignment,
    nixl_port: int,
    launch_prefix: LaunchPrefix,
) -> PlannedInstance:
    """One instance the scaler adds to a running cluster (or one moved off a lost node), built the way
    make_plan builds the first ones."""
    ctx = InstanceContext(_on_node(instance, assignment), assignment, plan.device, plan.model_path, nixl_port)
    return _planned(ctx, _engine_command(profile, ctx, launch_prefix), profile.cpu.pin_processes)


def _on_node(instance: ExecutionInstance, assignment: Assignment) -> ExecutionInstance:
    """An instance placed on a node binds to that node's address, where the router and NIXL reach it."""
    return instance.model_copy(update={"host": assignment.node}) if assignment.node else instance


def _engine_command(profile: ClusterProfile, ctx: InstanceContext, prefix: LaunchPrefix) -> EngineCommand:
    return engine_adapter(profile.engine.kind).command(profile, ctx, prefix)


def _planned(ctx: InstanceContext, command: EngineCommand, pin_processes: bool) -> PlannedInstance:
    instance = ctx.instance
    return PlannedInstance(
        id=instance.instance_id,
        role=instance.instance_type,
        host=instance.host,
        node=ctx.assignment.node,
        node_id=ctx.assignment.node_id,
        needs=ctx.assignment.needs,
        port=instance.port or 0,
        launch=instance.launch,
        nixl_side_channel_port=command.side_channel_port,
        tensor_parallel_size=instance.tensor_parallel_size or 1,
        pipeline_parallel_size=instance.pipeline_parallel_size or 1,
        gpus=ctx.assignment.gpus,
        cpu_cores=ctx.assignment.cpu_cores,
        affinity=ctx.assignment.cpu_cores if pin_processes else [],
        argv=command.argv,
        env=command.env,
    )


def _profile_notes(profile: ClusterProfile, device: DeviceMode, launches: bool) -> list[str]:
    notes = [
        "prefill.target_throughput_tokens_per_sec, decode.target_latency_ms and "
        "decode.target_tokens_per_sec_per_gpu are goals for the router and the dashboard, not engine flags",
    ]
    if not launches:
        notes.append(
            "every instance is attached (launch: false): `up` starts the router and its monitoring only, and "
            "needs no engine runtime here"
        )
    else:
        notes.append(
            "launched engines get an API key of the cluster's own (VLLM_API_KEY, made by `up` into engine.key in "
            "the state directory, mode 0600): only the router sends it, so an engine's port is no way around it"
        )
    if profile.pd.kv_cache_eviction_policy == "lfu":
        notes.append(
            "kv_cache_eviction_policy: lfu: vLLM's prefix cache evicts LRU only; LFU applies where pdctl owns "
            "eviction (the router's prefix-affinity table)"
        )
    if profile.pd.kv_cache_storage == "cpu":
        notes.append("kv_cache_storage: cpu: NIXL stages KV transfers through host memory (kv_buffer_device: cpu)")
    if profile.pd.enable_dynamic_scaling and profile.scaling.mode != "off":
        notes.append(
            f"enable_dynamic_scaling: the pools start at their minimum sizes; the scaler ({profile.scaling.mode}) "
            "sizes them between their bounds as the load moves"
        )
    if device == "cpu":
        notes.append(
            "device: cpu: KV cache size comes from cpu.kv_cache_space_gib (VLLM_CPU_KVCACHE_SPACE), "
            "not from the memory fractions"
        )
    return notes
