"""`pdctl simulate PROFILE`: load what the simulation needs from a profile and run it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from pdctl.errors import UsageError
from pdctl.perfmodel.arch import ModelArch, UnknownModel, get_model
from pdctl.perfmodel.hardware import HardwareProfile, UnknownHardware, get_hardware
from pdctl.profile import ClusterProfile
from pdctl.simulate.des import ClusterSim
from pdctl.simulate.report import SLO, RequestRecord, summarize
from pdctl.simulate.workload import SimRequest, WorkloadSpec, generate


class SimulationInputError(UsageError):
    """The profile names no model or hardware the performance model knows."""


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
    cost_per_m_output_tokens_usd: float = 0.0
    records: list[RequestRecord] = field(default_factory=list, repr=False)

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
            "cost_per_m_output_tokens_usd": round(self.cost_per_m_output_tokens_usd, 4),
            "wall_s": round(self.wall_s, 3),
            **self.metrics,
        }


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
    )  # fmt: skip


def cost_per_million(gpus: int, gpu_hour_usd: float, output_tokens_per_s: float) -> float:
    """Dollars per million output tokens: the cluster's GPU-hours over the tokens it makes in an hour."""
    if output_tokens_per_s <= 0:
        return float("inf")
    return gpus * gpu_hour_usd / (output_tokens_per_s * 3600) * 1e6


def simulate_spec(profile: ClusterProfile, spec: WorkloadSpec, **kwargs: Any) -> SimulationResult:
    return simulate(profile, generate(spec), spec.max_concurrency, seed=spec.seed, **kwargs)
