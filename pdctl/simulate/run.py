"""`pdctl simulate PROFILE`: load what the simulation needs from a profile and run it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from pdctl.errors import UsageError
from pdctl.perfmodel.arch import ModelArch, UnknownModel, get_model
from pdctl.perfmodel.hardware import HardwareProfile, UnknownHardware, get_hardware
from pdctl.perfmodel.machine import machine_note
from pdctl.perfmodel.steptime import StepModel
from pdctl.profile import ClusterProfile
from pdctl.simulate.des import ClusterSim, engine_config
from pdctl.simulate.report import SLO, RequestRecord, summarize
from pdctl.simulate.workload import SimRequest, WorkloadSpec, generate
from pdctl.types import ExecutionInstance
from pdctl.types import ExecutionInstanceType as Phase

GIB = 2**30
ROLE = {Phase.PREFILLING: "prefill", Phase.DECODING: "decode", Phase.HYBRID: "hybrid"}


class SimulationInputError(UsageError):
    """The profile names no model or hardware the performance model knows."""


@dataclass(frozen=True)
class Shortfall:
    """Instances of one kind that cannot run, why, and what would let them."""

    instances: str  # "decode TP 2"
    why: str
    fix: str

    def __str__(self) -> str:
        return f"{self.instances} {self.why}"


class CannotRunError(SimulationInputError):
    """The profile's instances cannot serve the workload on the hardware: vLLM would not start, or a request
    would wait forever. Said before simulating, so that no request is silently left unanswered."""

    def __init__(self, profile: str, hardware: str, shortfalls: tuple[Shortfall, ...]):
        self.shortfalls = shortfalls
        lines = [f"profile {profile!r} cannot run this workload on {hardware}:", *(f"  {s}" for s in shortfalls)]
        lines += [f"to fix: {fix}" for fix in dict.fromkeys(s.fix for s in shortfalls)]
        super().__init__("\n".join(lines))


@dataclass
class SimulationResult:
    profile: str
    model: str
    hardware: str
    gpus: int
    metrics: dict[str, Any]
    decisions: dict[str, int]
    preemptions: int
    wall_s: float
    gpu_efficiency: float = 0.0
    cost_per_m_output_tokens_usd: float | None = 0.0
    records: list[RequestRecord] = field(default_factory=list, repr=False)
    hardware_fidelity: dict[str, Any] = field(default_factory=dict)  # hardware_fidelity(the profile)

    def as_dict(self) -> dict[str, Any]:
        return {
            "engine": "pdctl simulate (a model, not a measurement)",
            "profile": self.profile,
            "model": self.model,
            "hardware": self.hardware,
            "gpus": self.gpus,
            "decisions": self.decisions,
            "preemptions": self.preemptions,
            "gpu_efficiency": round(self.gpu_efficiency, 4),
            "cost_per_m_output_tokens_usd": _rounded(self.cost_per_m_output_tokens_usd),
            "wall_s": round(self.wall_s, 3),
            "hardware_fidelity": self.hardware_fidelity,
            **self.metrics,
        }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def resolve(
    profile: ClusterProfile, hardware: str | None, architecture: str | None
) -> tuple[ModelArch, HardwareProfile]:
    sim = profile.engine.sim
    hardware_name = hardware or sim.hardware
    if hardware_name is None:
        raise SimulationInputError("no hardware profile: pass --hardware or set engine.sim.hardware in the profile")
    try:
        return get_model(architecture or sim.architecture or profile.model.path), get_hardware(hardware_name)
    except (UnknownModel, UnknownHardware) as error:
        raise SimulationInputError(error.args[0]) from None


def hardware_fidelity(hw: HardwareProfile) -> dict[str, Any]:
    """What the hardware profile's figures rest on, as simulate's output carries it: the machine it was measured
    on and its fidelity on held-out measurements of that machine."""
    machine, fidelity = hw.measured.machine, hw.fidelity
    summary = fidelity.summary() if fidelity else "no fidelity recorded"
    on = machine.describe() if machine else "a machine not recorded"
    return {"profile": hw.name, "measured_on": on, "summary": f"{hw.name}: {summary}; measured on {on}",
            "within": fidelity.within() if fidelity else None, "figures": len(fidelity.figures) if fidelity else None,
            "median_error": round(fidelity.median_error(), 4) if fidelity else None}  # fmt: skip


def hardware_note(profile: ClusterProfile, hardware: str | None) -> str | None:
    """The line saying the hardware profile was measured on a visibly different machine than this one."""
    return machine_note(resolve(profile, hardware, None)[1])


def gpu_count(profile: ClusterProfile) -> int:
    return sum(i.gpu_count or 1 for i in profile.resolved_instances())


def simulate(
    profile: ClusterProfile,
    requests: list[SimRequest],
    max_concurrency: int | None = None,
    hardware: str | None = None,
    architecture: str | None = None,
    seed: int = 0,
    hop_s: float = 0.0,
) -> SimulationResult:
    arch, hw = resolve(profile, hardware, architecture)
    short = shortfalls(profile, arch, hw, requests)
    if short:
        raise CannotRunError(profile.name, hw.name, short)
    started = time.perf_counter()
    sim = ClusterSim(profile, arch, hw, seed, hop_s)
    duration = sim.run(requests, max_concurrency)
    slo = SLO(profile.router.slo.ttft_ms, profile.slo_tpot_ms)
    metrics = summarize(sim.records, duration, slo)
    preemptions = sum(node.engine.preemptions for node in sim.nodes.values())
    gpus = gpu_count(profile)
    return SimulationResult(
        profile.name, arch.name, hw.name, gpus, metrics, dict(sim.decisions), preemptions,
        time.perf_counter() - started, sim.gpu_busy_fraction(duration),
        cost_per_million(gpus, profile.cost.gpu_hour_usd, metrics["output_throughput"]), sim.records,
        hardware_fidelity(hw),
    )  # fmt: skip


def cost_per_million(gpus: int, gpu_hour_usd: float, output_tokens_per_s: float) -> float | None:
    """Dollars per million output tokens: the cluster's GPU-hours over the tokens it makes in an hour; None (not
    known, as JSON's null) when it makes none."""
    if output_tokens_per_s <= 0:
        return None
    return gpus * gpu_hour_usd / (output_tokens_per_s * 3600) * 1e6


def simulate_spec(profile: ClusterProfile, spec: WorkloadSpec, **kwargs: Any) -> SimulationResult:
    return simulate(profile, generate(spec), spec.max_concurrency, seed=spec.seed, **kwargs)


def shortfalls(
    profile: ClusterProfile, arch: ModelArch, hw: HardwareProfile, requests: list[SimRequest]
) -> tuple[Shortfall, ...]:
    """Why the profile's instances cannot serve the workload, nothing when they can: with the memory fraction
    each is given, the weights and activations leave no KV cache (vLLM does not start), or the KV cache cannot
    hold the longest request (it would wait forever) or `model.max_model_len` (vLLM does not start)."""
    prompt = max((r.input_tokens for r in requests), default=0)
    whole = max((r.input_tokens + r.output_tokens for r in requests), default=0)
    kinds = {(i.instance_type, i.tensor_parallel_size or 1, i.pipeline_parallel_size or 1): i
             for i in profile.resolved_instances()}  # fmt: skip
    found = (
        _shortfall(profile, instance, arch, hw, prompt + 1 if phase is Phase.PREFILLING else whole)
        for (phase, _, _), instance in kinds.items()
    )
    return tuple(shortfall for shortfall in found if shortfall)


def _shortfall(
    profile: ClusterProfile, instance: ExecutionInstance, arch: ModelArch, hw: HardwareProfile, longest: int
) -> Shortfall | None:
    phase, tp, pp = instance.instance_type, instance.tensor_parallel_size or 1, instance.pipeline_parallel_size or 1
    config = engine_config(profile, instance, hw)
    fraction = config.gpu_memory_utilization
    setting = "pd" if phase is Phase.PREFILLING else "decode"
    given = f"{setting}.kv_cache_memory_fraction {fraction:g}"
    what = f"{ROLE[phase]} TP {tp}" + (f" PP {pp}" if pp > 1 else "")
    tokens = StepModel(arch, hw, tp, pp).kv_cache_tokens(fraction) // config.block_size * config.block_size
    if tokens == 0:
        needs = (arch.weight_bytes_per_gpu(tp, pp) + hw.activation_reserve_bytes) / GIB
        memory = hw.memory_bytes / GIB
        return Shortfall(
            what,
            f"needs {needs:.1f} GiB per GPU for weights and activations, "
            f"{given} gives it {memory * fraction:.1f} of {hw.name}'s {memory:.1f} GiB",
            "a larger tensor_parallel_size, hardware with more memory (--hardware), or a smaller model (model.path, "
            "engine.sim.architecture); `--sweep N` tries the layouts of N GPUs",
        )
    needed, by, shorter = longest, "the workload's longest request", "shorter requests (--input-len, --output-len)"
    limit = profile.model.max_model_len or 0
    if limit > needed:
        needed, by, shorter = limit, "model.max_model_len", "a smaller model.max_model_len"
    if tokens < needed:
        return Shortfall(
            what,
            f"has KV cache for {tokens} tokens ({given}), {by} needs {needed}",
            f"{shorter}, a larger kv_cache_memory_fraction or tensor_parallel_size, or hardware with more memory "
            "(--hardware)",
        )
    return None
