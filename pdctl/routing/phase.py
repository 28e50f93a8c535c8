"""Which phase a request takes: PREFILLING (prefill instance, then decode with the KV cache moved),
DECODING (straight to a decode instance, which prefills itself), or HYBRID (PD disabled).

Each policy is one class that registers itself, `class MyPolicy(PhasePolicy, name="mine")`, with one method.
That registration is the only place a policy's name is written: the profile, the router, the simulation and
`bench --policies` read the registry. The availability of each pool is applied after the policy, the same way
for all of them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from pdctl.errors import UnknownPolicy
from pdctl.routing.pieces import unknown_name
from pdctl.routing.pool import Instance
from pdctl.types import ExecutionInstanceType as Phase
from pdctl.types import PDSeparationConfig

T = TypeVar("T")


@dataclass(slots=True)
class RequestFeatures:
    input_tokens: int
    expected_output_tokens: float
    # Prompt tokens the chosen decode instance likely holds in its prefix cache (0 when unknown).
    decode_cached_tokens: int = 0


@dataclass(slots=True)
class PoolLoad:
    """The live figures the load-aware policies (adaptive, conditional) decide by."""

    prefill_backlog_s: float = 0.0  # queued prompt tokens on the least loaded prefill instance / its speed
    prefill_queue_tokens: float = 0.0  # those queued prompt tokens
    prefill_tokens_per_s: float = 1000.0  # that speed (measured, else the profile's goal)
    decode_queue_tokens: float = 0.0  # prompt tokens the chosen decode instance is prefilling itself
    decode_running: float = 0.0  # sequences running on the chosen decode instance
    decode_max_seqs: int = 1
    decode_prefill_tokens_per_s: float = 1000.0
    ttft_slo_s: float = 1.0
    tpot_target_s: float = 0.05


def pool_load(
    decode: Instance | None, prefills: list[Instance], default_speed: float, ttft_slo_s: float, tpot_target_s: float
) -> PoolLoad:
    """The pools' load as the router (and the simulation, on its own records) sees it now."""
    load = PoolLoad(
        ttft_slo_s=ttft_slo_s,
        tpot_target_s=tpot_target_s,
        prefill_tokens_per_s=default_speed,
        decode_prefill_tokens_per_s=default_speed,
    )
    backlog = None
    for prefill in prefills:  # a loop, not min(): this runs per request on the router's hot path
        speed = prefill.prefill_tokens_per_s or default_speed
        queued = prefill.in_flight_prompt_tokens
        if backlog is None or queued / speed < backlog:
            backlog, load.prefill_queue_tokens, load.prefill_tokens_per_s = queued / speed, queued, speed
    load.prefill_backlog_s = backlog or 0.0
    if decode is not None:
        load.decode_running = decode.in_flight if decode.in_flight > decode.running else decode.running
        load.decode_max_seqs = decode.max_num_seqs
        load.decode_prefill_tokens_per_s = decode.prefill_tokens_per_s or default_speed
        load.decode_queue_tokens = decode.prefilling_tokens
    return load


@dataclass(slots=True)
class PhaseDecision:
    phase: Phase
    reason: str
    figures: dict[str, float] = field(default_factory=dict)


class PhasePolicy(ABC):
    """Decides a request's phase from its features and the pools' load. A subclass names itself (`name=`) and
    is then a `pd.routing_policy` everywhere a policy is chosen by name."""

    registry: ClassVar[dict[str, type[PhasePolicy]]] = {}
    name: ClassVar[str]
    # Prefix hashes cost time on the hot path: the router computes them (and so decode_cached_tokens) for the
    # policy only where it says it reads them.
    uses_prefixes: ClassVar[bool] = False

    def __init_subclass__(cls, name: str, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        cls.name = name
        PhasePolicy.registry[name] = cls

    def __init__(self, config: PDSeparationConfig):
        # Kept, not copied: a threshold changed on a running system applies from the next decision.
        self.config = config

    @abstractmethod
    def decide(self, features: RequestFeatures, load: PoolLoad) -> PhaseDecision: ...


def _ratio(tokens: float, expected_output: float) -> float:
    return tokens / max(expected_output, 1.0)


class ThresholdPolicy(PhasePolicy, name="threshold"):
    """Split when input tokens >= threshold and input / expected output tokens >= ratio."""

    def decide(self, features: RequestFeatures, load: PoolLoad) -> PhaseDecision:
        tokens = features.input_tokens
        ratio = _ratio(tokens, features.expected_output_tokens)
        threshold, min_ratio = self.config.prefilling_threshold_input_tokens, self.config.prefilling_threshold_ratio
        figures = {"input_tokens": tokens, "threshold": threshold, "ratio": round(ratio, 3), "min_ratio": min_ratio}
        if tokens >= threshold and ratio >= min_ratio:
            return PhaseDecision(
                Phase.PREFILLING, f"{tokens} tokens >= {threshold} and ratio {ratio:.2f} >= {min_ratio:g}", figures
            )
        why = f"{tokens} tokens < {threshold}" if tokens < threshold else f"ratio {ratio:.2f} < {min_ratio:g}"
        return PhaseDecision(Phase.DECODING, why, figures)


class AdaptivePolicy(PhasePolicy, name="adaptive"):
    """The threshold rule on the tokens the decode instance would really compute (prompt minus its likely
    cached prefix), with the cut-off moved by live load:

        cut-off = threshold x (1 + prefill backlog / TTFT SLO) / (1 + decode load)

    A backed-up prefill pool raises the cut-off (fewer requests wait for it); a busy decode instance lowers
    it (its running streams would stall while it prefills). And whenever prefilling on the decode instance
    would stall its running streams for longer than the TPOT target, the request is split, if the prefill
    pool can still meet the TTFT SLO."""

    uses_prefixes = True

    def decide(self, features: RequestFeatures, load: PoolLoad) -> PhaseDecision:
        uncached = max(0, features.input_tokens - features.decode_cached_tokens)
        ratio = _ratio(uncached, features.expected_output_tokens)
        decode_load = load.decode_running / max(1, load.decode_max_seqs)
        cutoff = (
            self.config.prefilling_threshold_input_tokens
            * (1 + load.prefill_backlog_s / load.ttft_slo_s)
            / (1 + decode_load)
        )
        stall_s = uncached / max(load.decode_prefill_tokens_per_s, 1.0)
        figures = {
            "input_tokens": features.input_tokens,
            "decode_cached_tokens": features.decode_cached_tokens,
            "uncached_tokens": uncached,
            "cutoff": round(cutoff, 1),
            "ratio": round(ratio, 3),
            "min_ratio": self.config.prefilling_threshold_ratio,
            "prefill_backlog_s": round(load.prefill_backlog_s, 4),
            "decode_load": round(decode_load, 3),
            "decode_stall_s": round(stall_s, 4),
        }
        prefill_has_room = load.prefill_backlog_s < load.ttft_slo_s
        if load.decode_running > 0 and stall_s > load.tpot_target_s and prefill_has_room and uncached > 0:
            return PhaseDecision(
                Phase.PREFILLING,
                f"prefilling {uncached} tokens on the decode instance would stall its {load.decode_running:g} "
                f"streams {stall_s * 1000:.0f} ms > TPOT target {load.tpot_target_s * 1000:.0f} ms",
                figures,
            )
        if uncached >= cutoff and ratio >= self.config.prefilling_threshold_ratio:
            return PhaseDecision(
                Phase.PREFILLING, f"{uncached} uncached tokens >= cut-off {cutoff:.0f} and ratio {ratio:.2f}", figures
            )
        if uncached < cutoff:
            cached = (
                f" ({features.decode_cached_tokens} cached on the decode instance)"
                if features.decode_cached_tokens
                else ""
            )
            return PhaseDecision(Phase.DECODING, f"{uncached} uncached tokens{cached} < cut-off {cutoff:.0f}", figures)
        return PhaseDecision(Phase.DECODING, f"ratio {ratio:.2f} < {self.config.prefilling_threshold_ratio:g}", figures)


class ConditionalPolicy(ThresholdPolicy, name="conditional"):
    """The threshold rule, except that a prompt it would split goes to the chosen decode instance when the
    prefill pool is behind: the least loaded prefill instance has more prompt tokens queued than the decode
    instance is prefilling itself, and prefilling there (that queue and this prompt, at the prefill pool's
    measured speed: the same engine) would hold the decode instance's running streams no longer than the TPOT
    target. A burst of long prompts is then shared by both pools, as colocated instances share it, instead of
    queueing on the prefill instance (conditional disaggregation, as NVIDIA Dynamo's router does it)."""

    def decide(self, features: RequestFeatures, load: PoolLoad) -> PhaseDecision:
        decision = super().decide(features, load)
        if decision.phase is not Phase.PREFILLING or load.prefill_queue_tokens <= load.decode_queue_tokens:
            return decision
        prefill_queue, decode_queue = round(load.prefill_queue_tokens), round(load.decode_queue_tokens)
        stall_s = (load.decode_queue_tokens + features.input_tokens) / max(load.prefill_tokens_per_s, 1.0)
        figures = {
            **decision.figures,
            "prefill_queue_tokens": prefill_queue,
            "decode_queue_tokens": decode_queue,
            "decode_stall_s": round(stall_s, 4),
        }
        if load.decode_running > 0 and stall_s > load.tpot_target_s:
            why = f"; prefilling on the decode instance would stall its streams {stall_s * 1000:.0f} ms"
            return PhaseDecision(Phase.PREFILLING, decision.reason + why, figures)
        return PhaseDecision(
            Phase.DECODING,
            f"prefill queue {prefill_queue} tokens > the decode instance's own {decode_queue}: it prefills this one",
            figures,
        )


class AlwaysPolicy(PhasePolicy, name="always"):
    """Every request through a prefill instance (A/B comparisons)."""

    def decide(self, features: RequestFeatures, load: PoolLoad) -> PhaseDecision:
        return PhaseDecision(Phase.PREFILLING, "routing_policy: always", {"input_tokens": features.input_tokens})


class NeverPolicy(PhasePolicy, name="never"):
    """No request through a prefill instance (A/B comparisons)."""

    def decide(self, features: RequestFeatures, load: PoolLoad) -> PhaseDecision:
        return PhaseDecision(Phase.DECODING, "routing_policy: never", {"input_tokens": features.input_tokens})


def registered_policy(name: str) -> str:
    """The name, if a policy registered it; a ValueError naming the known ones (for a validator) otherwise."""
    if name not in PhasePolicy.registry:
        raise ValueError(unknown_name("routing policy", name, PhasePolicy.registry))
    return name


def make_phase_policy(config: PDSeparationConfig) -> PhasePolicy:
    policy = PhasePolicy.registry.get(config.routing_policy)
    if policy is None:
        raise UnknownPolicy(unknown_name("routing policy", config.routing_policy, PhasePolicy.registry))
    return policy(config)


def with_availability(decision: PhaseDecision, enabled: bool, available: set[Phase]) -> PhaseDecision:
    """Apply what the cluster can do now, the same for every policy: PD off means HYBRID; a phase whose pool
    has no healthy instance falls back to one that has (a split needs both a prefill and a decode instance).
    With no healthy decode or hybrid instance, prefill instances serve whole requests (HYBRID goes to any
    instance): an engine serves a request that carries no KV-transfer fields itself."""
    if not enabled:
        return PhaseDecision(Phase.HYBRID, "PD disabled: whole requests on any instance", decision.figures)
    phase, missing = decision.phase, None
    if phase is Phase.PREFILLING and Phase.PREFILLING not in available:
        phase, missing = Phase.DECODING, "prefill"
    if phase in (Phase.PREFILLING, Phase.DECODING) and Phase.DECODING not in available and available:
        phase, missing = Phase.HYBRID, "decode"
    if missing is None:
        return decision
    return PhaseDecision(phase, f"no healthy {missing} instance (policy said: {decision.reason})", decision.figures)


def instances_for_phase(phase: Phase, by_role: Mapping[Phase, list[T]]) -> list[T]:
    """Where a request of this phase may go: its own pool; a HYBRID request with no hybrid instance goes to any
    instance (PD disabled on a cluster of prefill and decode instances)."""
    if phase is Phase.HYBRID and not by_role.get(Phase.HYBRID):
        return [instance for role in Phase for instance in by_role.get(role, [])]
    return list(by_role.get(phase, []))
