"""The scaling policy: pure functions of the signals and the clock, no processes, no I/O.

Two loops per pool, as the best planners do:
- reactive (every few seconds): a verdict of +1, -1 or hold from the pool's signals. Scale-out on prompt
  backlog, busy slots, KV use or the client-observed latency percentile over its target; scale-in only if
  the load spread over one instance fewer still stays under `margin` of every limit (consolidation-aware).
- predictive (every minute or so): a floor from the forecast arrival rate and lengths, looking ahead by the
  measured start-up time of an instance, so capacity is there when the load arrives.
A verdict acts only after holding for a while (scale-in longer), never while the pool's last action is in
progress, never beyond the bounds, and never below the floor. Every decision carries its reason in figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pdctl.scaling.signals import PoolSignals, Role, Traffic


@dataclass(frozen=True)
class Targets:
    ttft_ms: float
    tpot_ms: float
    backlog_s: float
    busy_high: float = 0.8
    margin: float = 0.6
    percentile: float = 90.0
    default_prefill_tokens_per_s: float = 1000.0


@dataclass(frozen=True)
class Verdict:
    direction: int  # +1, -1 or 0
    reason: str = ""


HOLD = Verdict(0)


@dataclass(frozen=True)
class Decision:
    role: Role
    delta: int
    reason: str
    loop: str  # "reactive", "predictive" or "manual"


@dataclass(frozen=True)
class Bounds:
    min: int
    max: int

    def clamp(self, count: int) -> int:
        return max(self.min, min(self.max, count))


def _pct(q: float) -> str:
    return f"p{q:g}"


def _instances(n: int) -> str:
    return f"{n} instance{'s' if n != 1 else ''}"


# ---- reactive verdicts -----------------------------------------------------------------------------------


def prefill_backlog(signals: PoolSignals, targets: Targets) -> tuple[float, int, float]:
    """Seconds of prompt tokens queued or in flight on the pool, over the pool's summed prefill speed."""
    tokens = sum(i.in_flight_prompt_tokens for i in signals.instances)
    speed = sum(i.prefill_tokens_per_s or targets.default_prefill_tokens_per_s for i in signals.instances)
    return (tokens / speed if speed else 0.0), tokens, speed


def prefill_verdict(signals: PoolSignals, targets: Targets) -> Verdict:
    n = len(signals.instances)
    if n == 0:
        return HOLD
    backlog, tokens, speed = prefill_backlog(signals, targets)
    ttft, q = signals.ttft_ms, _pct(targets.percentile)
    if backlog > targets.backlog_s:
        return Verdict(
            +1,
            f"prompt backlog {backlog:.2f} s > {targets.backlog_s:g} s ({tokens} tokens at {speed:.0f} tokens/s)",
        )
    if ttft is not None and ttft > targets.ttft_ms and backlog > 0.25 * targets.backlog_s:
        return Verdict(
            +1, f"TTFT {q} {ttft:.0f} ms > target {targets.ttft_ms:g} ms with {backlog:.2f} s of prompt backlog"
        )
    if n < 2:
        return HOLD
    spread = n / (n - 1)
    busy = max(i.busy for i in signals.instances)
    if (
        backlog * spread < targets.margin * targets.backlog_s
        and busy * spread < targets.margin
        and (ttft is None or ttft < targets.margin * targets.ttft_ms)
    ):
        ttft_part = f", TTFT {q} {ttft:.0f} ms < {targets.margin:g} x {targets.ttft_ms:g} ms" if ttft else ""
        return Verdict(
            -1,
            f"on {_instances(n - 1)} the backlog would be {backlog * spread:.2f} s < {targets.margin:g} x "
            f"{targets.backlog_s:g} s and the busiest {busy * spread:.0%} busy{ttft_part}",
        )
    return HOLD


def decode_verdict(signals: PoolSignals, targets: Targets) -> Verdict:
    n = len(signals.instances)
    if n == 0:
        return HOLD
    busy = sum(i.busy for i in signals.instances) / n
    kv = sum(i.kv_usage for i in signals.instances) / n
    running = sum(max(i.in_flight, i.running + i.waiting) for i in signals.instances)
    slots = sum(i.max_num_seqs for i in signals.instances)
    tpot, q = signals.tpot_ms, _pct(targets.percentile)
    if busy > targets.busy_high:
        return Verdict(
            +1, f"slots busy {busy:.0%} ({running:.0f} running or queued of {slots}) > {targets.busy_high:.0%}"
        )
    if kv > targets.busy_high:
        return Verdict(+1, f"KV cache use {kv:.0%} > {targets.busy_high:.0%}")
    if tpot is not None and tpot > targets.tpot_ms:
        return Verdict(+1, f"TPOT {q} {tpot:.0f} ms > target {targets.tpot_ms:g} ms")
    if n < 2:
        return HOLD
    spread = n / (n - 1)
    limit = targets.margin * targets.busy_high
    if busy * spread < limit and kv * spread < limit and (tpot is None or tpot < targets.margin * targets.tpot_ms):
        tpot_part = f", TPOT {q} {tpot:.0f} ms < {targets.margin:g} x {targets.tpot_ms:g} ms" if tpot else ""
        return Verdict(
            -1,
            f"on {_instances(n - 1)} slots would be {busy * spread:.0%} busy and KV {kv * spread:.0%} used "
            f"< {limit:.0%}{tpot_part}",
        )
    return HOLD


VERDICTS = {Role.PREFILL: prefill_verdict, Role.DECODE: decode_verdict}


# ---- predictive floor ------------------------------------------------------------------------------------


class Forecaster:
    """Holt's linear smoothing with a damped trend, on a rate sampled once per predictive period.

    The damping keeps a step in the load from being extrapolated into an overshoot (and a floor that then
    holds the pool above what the load needs)."""

    def __init__(self, alpha: float = 0.7, beta: float = 0.2, phi: float = 0.8):
        self.alpha, self.beta, self.phi = alpha, beta, phi
        self.level: float | None = None
        self.trend = 0.0

    def update(self, value: float) -> None:
        if self.level is None:
            self.level = value
            return
        previous = self.level
        self.level = self.alpha * value + (1 - self.alpha) * (previous + self.phi * self.trend)
        self.trend = self.beta * (self.level - previous) + (1 - self.beta) * self.phi * self.trend

    def forecast(self, periods_ahead: float) -> float:
        if self.level is None:
            return 0.0
        steps = max(1, math.ceil(periods_ahead))
        damped = sum(self.phi**i for i in range(1, steps + 1))
        return max(0.0, self.level + self.trend * damped)


# The floors size for the forecast at `busy_high` of each instance, where the reactive loop would add one.


def prefill_floor(rate: float, lengths: Traffic, signals: PoolSignals, targets: Targets) -> tuple[int, str]:
    """Instances whose summed prefill speed keeps up with the forecast prompt tokens."""
    speeds = sorted(i.prefill_tokens_per_s for i in signals.instances if i.prefill_tokens_per_s)
    speed = speeds[len(speeds) // 2] if speeds else targets.default_prefill_tokens_per_s
    demand = rate * lengths.mean_prefill_input
    use = targets.busy_high
    need = math.ceil(demand / (speed * use)) if demand else 0
    return need, (
        f"forecast {rate:.1f} split req/s x {lengths.mean_prefill_input:.0f} prompt tokens = {demand:.0f} tokens/s "
        f"over {speed:.0f} tokens/s per instance at {use:.0%}"
    )


def decode_floor(rate: float, lengths: Traffic, signals: PoolSignals, targets: Targets) -> tuple[int, str]:
    """Instances whose slots hold the forecast concurrency (Little's law: rate x decode time)."""
    slots = sum(i.max_num_seqs for i in signals.instances) / len(signals.instances) if signals.instances else 0
    tpot_s = lengths.tpot_mean_s or targets.tpot_ms / 1000
    concurrency = rate * lengths.mean_output * tpot_s
    use = targets.busy_high
    need = math.ceil(concurrency / (slots * use)) if concurrency and slots else 0
    return need, (
        f"forecast {rate:.1f} req/s x {lengths.mean_output:.0f} tokens x {tpot_s * 1000:.0f} ms = "
        f"{concurrency:.1f} sequences over {slots:.0f} slots per instance at {use:.0%}"
    )


# ---- hysteresis ------------------------------------------------------------------------------------------


@dataclass
class Hysteresis:
    """When each direction's verdict began to hold; acting needs it held for out_s (+1) or in_s (-1)."""

    out_s: float
    in_s: float
    up_since: float | None = None
    down_since: float | None = None

    def reset(self) -> None:
        self.up_since = self.down_since = None

    def step(
        self, verdict: Verdict, now: float, current: int, bounds: Bounds, floor: int, role: Role
    ) -> Decision | None:
        if verdict.direction > 0:
            self.down_since = None
            self.up_since = now if self.up_since is None else self.up_since
            held = now - self.up_since
            if held >= self.out_s and current < bounds.max:
                return Decision(role, +1, f"{role} +1: {verdict.reason} for {held:.0f} s", "reactive")
        elif verdict.direction < 0:
            self.up_since = None
            self.down_since = now if self.down_since is None else self.down_since
            held = now - self.down_since
            if held >= self.in_s and current > max(bounds.min, floor):
                return Decision(role, -1, f"{role} -1: {verdict.reason} for {held:.0f} s", "reactive")
        else:
            self.reset()
        return None


def floor_decision(role: Role, current: int, floor: int, bounds: Bounds, why: str) -> Decision | None:
    """The predictive loop raises a pool to its floor at once (by several if need be), within the bounds."""
    target = bounds.clamp(floor)
    if target <= current:
        return None
    return Decision(role, target - current, f"{role} +{target - current}: floor {target}: {why}", "predictive")
