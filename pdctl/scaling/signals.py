"""What the scaler decides on: a small snapshot per pool, filled from what the router already knows.

The router's per-instance figures (its own in-flight counts, the engines' scraped gauges, the measured
prefill speed) and the latency clients saw, kept here in a short window of completed requests. Instances
still warming up, and requests they served, are left out: a new instance's slow first steps are not load.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from pdctl.routing.pool import Instance, instance_load
from pdctl.types import ExecutionInstanceType


class Role(StrEnum):
    PREFILL = "prefill"
    DECODE = "decode"

    @property
    def instance_type(self) -> ExecutionInstanceType:
        return ExecutionInstanceType.PREFILLING if self is Role.PREFILL else ExecutionInstanceType.DECODING


@dataclass(frozen=True, slots=True)
class InstanceSignal:
    id: str
    in_flight: int = 0
    in_flight_prompt_tokens: int = 0
    running: float = 0.0
    waiting: float = 0.0
    kv_usage: float = 0.0
    prefill_tokens_per_s: float = 0.0
    max_num_seqs: int = 256
    kv_pending: int = 0

    @property
    def busy(self) -> float:
        """Share of the engine's sequence slots taken, counting queued requests (may exceed 1)."""
        return instance_load(self.in_flight, self.running, self.waiting, self.max_num_seqs)

    @classmethod
    def of(cls, instance: Instance) -> InstanceSignal:
        return cls(
            id=instance.id,
            in_flight=instance.in_flight,
            in_flight_prompt_tokens=instance.in_flight_prompt_tokens,
            running=instance.running,
            waiting=instance.waiting,
            kv_usage=instance.kv_usage,
            prefill_tokens_per_s=instance.prefill_tokens_per_s,
            max_num_seqs=instance.max_num_seqs,
            kv_pending=instance.kv_pending,
        )


@dataclass(frozen=True, slots=True)
class Traffic:
    """The window's requests: what the predictive loop forecasts from."""

    rate: float = 0.0  # completed requests per second
    prefill_rate: float = 0.0  # of which went through a prefill instance
    mean_prefill_input: float = 0.0  # prompt tokens of those
    mean_output: float = 0.0
    tpot_mean_s: float | None = None


@dataclass(frozen=True, slots=True)
class PoolSignals:
    role: Role
    instances: tuple[InstanceSignal, ...]  # warm, serving, not draining
    ttft_ms: float | None = None  # client-observed percentile over the window
    tpot_ms: float | None = None
    samples: int = 0


@dataclass(frozen=True, slots=True)
class Sample:
    at: float
    ttft_s: float | None
    tpot_s: float | None
    input_tokens: int
    output_tokens: int
    prefill_id: str | None
    decode_id: str | None


class LatencyWindow:
    """Completed requests of the last window_s seconds, fed from the router's completion path."""

    def __init__(self, window_s: float):
        self.window_s = window_s
        self._samples: collections.deque[Sample] = collections.deque()

    def record(self, sample: Sample) -> None:
        self._samples.append(sample)

    def recent(self, now: float) -> list[Sample]:
        while self._samples and now - self._samples[0].at > self.window_s:
            self._samples.popleft()
        return list(self._samples)


def percentile(values: Iterable[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def pool_signals(
    role: Role, instances: Iterable[Instance], samples: list[Sample], cold: set[str], q: float
) -> PoolSignals:
    """One pool's snapshot; `cold` are instances in warm-up, left out with the requests they served."""
    kept = tuple(InstanceSignal.of(i) for i in instances if i.healthy and not i.draining and i.id not in cold)
    served = [s for s in samples if s.prefill_id not in cold and s.decode_id not in cold]
    ttft = percentile((s.ttft_s * 1000 for s in served if s.ttft_s is not None), q)
    tpot = percentile((s.tpot_s * 1000 for s in served if s.tpot_s is not None), q)
    return PoolSignals(role, kept, ttft, tpot, len(served))


def traffic(samples: list[Sample], span_s: float) -> Traffic:
    """Rates over span_s: the window, or less while the window has not filled since the scaler started."""
    if not samples:
        return Traffic()
    span = max(1.0, span_s)
    split = [s for s in samples if s.prefill_id is not None]
    tpots = [s.tpot_s for s in samples if s.tpot_s is not None]
    return Traffic(
        rate=len(samples) / span,
        prefill_rate=len(split) / span,
        mean_prefill_input=sum(s.input_tokens for s in split) / len(split) if split else 0.0,
        mean_output=sum(s.output_tokens for s in samples) / len(samples),
        tpot_mean_s=sum(tpots) / len(tpots) if tpots else None,
    )
