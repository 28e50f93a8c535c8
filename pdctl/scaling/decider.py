"""The scaler's deciding half: each pool's signals and the clock in, a list of decisions out; no process, no I/O.

Every tick the scaler shows the decider one pool at a time (its signals, its size, whether an action on it is
under way) and carries out what comes back: a policy decision to record (`Adopt`), then `ScaleOut` or `ScaleIn`
to bring the pool to the size the decider wants. What carrying them out led to comes back as events (no free
device, instances healthy or never so, a drain done): the decider holds off a blocked pool and learns how long
an instance takes to start. `pdctl scale` and PD config changes set its modes and bounds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pdctl.profile import ClusterProfile, ScalingSpec
from pdctl.scaling.policy import (
    VERDICTS,
    Bounds,
    Decision,
    Forecaster,
    Hysteresis,
    Targets,
    decode_floor,
    floor_decision,
    prefill_backlog,
    prefill_floor,
)
from pdctl.scaling.signals import PoolSignals, Role, Sample, traffic
from pdctl.types import PDSeparationConfig


class ScaleRequestError(ValueError):
    """A manual scale request the cluster cannot take (outside the bounds, an unknown pool)."""


# ---- what the decider reads ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PoolView:
    """One pool as the scaler finds it at a tick."""

    signals: PoolSignals
    current: int  # launched instances, starting ones included, leaving ones not
    acting: bool  # an action on the pool is under way


# ---- what it decides -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Adopt:
    """A policy decision taken on: recorded and logged; in advisory mode that is all that happens."""

    decision: Decision
    advisory: bool


@dataclass(frozen=True)
class ScaleOut:
    """Launch `count` instances; `catch_up` is recorded if no decision of the pool is waiting for them."""

    role: Role
    count: int
    catch_up: Decision


@dataclass(frozen=True)
class ScaleIn:
    """Drain one instance of the pool, then stop it; `catch_up` as for ScaleOut."""

    role: Role
    catch_up: Decision


Step = Adopt | ScaleOut | ScaleIn


# ---- what carrying it out led to ---------------------------------------------------------------------------


@dataclass(frozen=True)
class NoDevice:
    """A scale-out found no free device: the pool stays at `size` and is not tried again for a while."""

    role: Role
    why: str
    size: int


@dataclass(frozen=True)
class NeverHealthy:
    """A scale-out's instances failed or missed their deadline and are being removed: the pool goes back to
    `size` (within its bounds) and is not tried again for a while."""

    role: Role
    why: str
    size: int


@dataclass(frozen=True)
class Healthy:
    """A scale-out's instances are serving, `took_s` after their launch."""

    role: Role
    took_s: float


@dataclass(frozen=True)
class Drained:
    """A scale-in's instance has drained and stopped."""

    role: Role


Event = NoDevice | NeverHealthy | Healthy | Drained


# ---- from the profile ----------------------------------------------------------------------------------------


def pool_bounds(pd: PDSeparationConfig) -> dict[Role, Bounds]:
    return {
        Role.PREFILL: Bounds(pd.prefilling_min_instances, pd.prefilling_max_instances),
        Role.DECODE: Bounds(pd.decoding_min_instances, pd.decoding_max_instances),
    }


def scaling_mode(profile: ClusterProfile) -> str:
    enabled = profile.pd.enabled and profile.pd.enable_dynamic_scaling
    return profile.scaling.mode if enabled else "off"


def profile_targets(profile: ClusterProfile) -> Targets:
    spec = profile.scaling
    return Targets(
        ttft_ms=profile.router.slo.ttft_ms,
        tpot_ms=profile.slo_tpot_ms,
        backlog_s=spec.prefill_backlog_s or profile.router.slo.ttft_ms / 2000,
        busy_high=spec.decode_busy_high,
        margin=spec.scale_in_margin,
        percentile=spec.percentile,
        default_prefill_tokens_per_s=profile.prefill.target_throughput_tokens_per_sec,
    )


# ---- the decider -----------------------------------------------------------------------------------------------


@dataclass
class PoolState:
    """What the decider keeps of one pool between ticks."""

    role: Role
    bounds: Bounds
    mode: str  # auto, advisory, manual or off
    desired: int
    hysteresis: Hysteresis
    forecaster: Forecaster = field(default_factory=Forecaster)
    floor: int = 0
    floor_why: str = ""
    blocked: str | None = None
    blocked_until: float = 0.0
    signals: dict[str, float] = field(default_factory=dict)  # the figures shown for the latest decision


class Decider:
    """sizes: the pools to decide for and their sizes now; startup_s: how long an instance takes to start (the
    predictive loop looks that far ahead), refined by every scale-out that comes up."""

    def __init__(
        self,
        spec: ScalingSpec,
        targets: Targets,
        bounds: dict[Role, Bounds],
        mode: str,
        sizes: dict[Role, int],
        startup_s: float,
        now: float,
    ):
        self.spec, self.targets, self.mode, self.startup_s = spec, targets, mode, startup_s
        self.pools: dict[Role, PoolState] = {}
        for role, size in sizes.items():
            hysteresis = Hysteresis(spec.scale_out_after_s, spec.scale_in_after_s)
            # The floor is the minimum until the first forecast.
            self.pools[role] = PoolState(role, bounds[role], mode, size, hysteresis, floor=bounds[role].min)
        self.started = now
        self.next_forecast = now + spec.forecast_interval_s

    def forecast_due(self, now: float) -> bool:
        """Whether this tick runs the predictive loop too; asked once per tick."""
        if now < self.next_forecast:
            return False
        self.next_forecast = now + self.spec.forecast_interval_s
        return True

    def decide(self, view: PoolView, samples: list[Sample], now: float, forecast: bool) -> list[Step]:
        pool = self.pools[view.signals.role]
        pool.signals = self._figures(pool.role, view.signals)
        if forecast and self.spec.predictive:
            self._forecast(pool, view.signals, samples, now)
        if view.acting or now < pool.blocked_until:
            return []
        steps: list[Step] = []
        if pool.mode in ("auto", "advisory"):
            decision = self._policy(pool, view, now)
            if decision is not None:
                steps.append(self._adopt(pool, decision, view.current))
        if pool.mode != "advisory":
            steps.extend(self._reconcile(pool, view.current))
        return steps

    def learn(self, event: Event, now: float) -> None:
        pool = self.pools[event.role]
        if not isinstance(event, NoDevice):  # an action ended: its signals start holding afresh
            pool.hysteresis.reset()
        match event:
            case NoDevice(why=why, size=size):
                self._block(pool, why, now, size)
            case NeverHealthy(why=why, size=size):
                self._block(pool, why, now, pool.bounds.clamp(size))
            case Healthy(took_s=took):
                self.startup_s = 0.5 * self.startup_s + 0.5 * took
                pool.blocked = None

    def _size(self, pool: PoolState, current: int) -> int:
        """What decisions start from: the pool as it is, or in advisory mode as the advice would have made it."""
        return pool.desired if pool.mode == "advisory" else current

    def _policy(self, pool: PoolState, view: PoolView, now: float) -> Decision | None:
        size = self._size(pool, view.current)
        decision = None
        if self.spec.predictive:
            decision = floor_decision(pool.role, size, pool.floor, pool.bounds, pool.floor_why)
        if decision is None:
            verdict = VERDICTS[pool.role](view.signals, self.targets)
            decision = pool.hysteresis.step(verdict, now, size, pool.bounds, pool.floor, pool.role)
        return decision

    def _adopt(self, pool: PoolState, decision: Decision, current: int) -> Adopt:
        pool.hysteresis.reset()
        pool.desired = pool.bounds.clamp(self._size(pool, current) + decision.delta)
        return Adopt(decision, advisory=pool.mode == "advisory")

    def _reconcile(self, pool: PoolState, current: int) -> list[Step]:
        if current < pool.desired:
            count = pool.desired - current
            return [ScaleOut(pool.role, count, self._catch_up(pool, count))]
        if current > pool.desired:
            return [ScaleIn(pool.role, self._catch_up(pool, -1))]
        return []

    @staticmethod
    def _catch_up(pool: PoolState, delta: int) -> Decision:
        return Decision(pool.role, delta, f"{pool.role} {delta:+d}: back to desired {pool.desired}", pool.mode)

    def _block(self, pool: PoolState, why: str, now: float, size: int) -> None:
        pool.blocked, pool.blocked_until = why, now + self.spec.blocked_retry_s
        pool.desired = size

    def _figures(self, role: Role, signals: PoolSignals) -> dict[str, float]:
        n = len(signals.instances)
        figures: dict[str, float] = {"warm_instances": n, "samples": signals.samples}
        if signals.ttft_ms is not None:
            figures["ttft_ms"] = round(signals.ttft_ms, 1)
        if signals.tpot_ms is not None:
            figures["tpot_ms"] = round(signals.tpot_ms, 1)
        if n and role is Role.PREFILL:
            figures["backlog_s"] = round(prefill_backlog(signals, self.targets)[0], 3)
        if n:
            figures["busy"] = round(sum(i.busy for i in signals.instances) / n, 3)
            figures["kv_usage"] = round(sum(i.kv_usage for i in signals.instances) / n, 3)
        return figures

    def _forecast(self, pool: PoolState, signals: PoolSignals, samples: list[Sample], now: float) -> None:
        lengths = traffic(samples, min(self.spec.window_s, now - self.started))
        rate = lengths.prefill_rate if pool.role is Role.PREFILL else lengths.rate
        pool.forecaster.update(rate)
        ahead_s = self.startup_s + self.spec.forecast_interval_s
        expected = pool.forecaster.forecast(ahead_s / self.spec.forecast_interval_s)
        rule = prefill_floor if pool.role is Role.PREFILL else decode_floor
        need, why = rule(expected, lengths, signals, self.targets)
        pool.floor = pool.bounds.clamp(need)
        pool.floor_why = f"{why}, {ahead_s:.0f} s ahead (start-up {self.startup_s:.0f} s)"

    # ---- by hand ---------------------------------------------------------------------------------------------

    def check_count(self, role: Role, count: int) -> PoolState:
        pool = self.pools.get(role)
        if pool is None:
            raise ScaleRequestError(f"this cluster has no {role} pool (pd.enabled is false)")
        if not pool.bounds.min <= count <= pool.bounds.max:
            raise ScaleRequestError(
                f"{role} {count} is outside the pool's bounds {pool.bounds.min}..{pool.bounds.max} "
                f"(pd.{'prefilling' if role is Role.PREFILL else 'decoding'}_min/max_instances)"
            )
        return pool

    def set_manual(self, role: Role, count: int, current: int) -> Decision:
        """The pool goes to `count` and its policy pauses until set_auto."""
        pool = self.check_count(role, count)
        pool.mode = "manual"
        pool.desired = count
        pool.hysteresis.reset()
        pool.blocked_until = 0.0
        return Decision(role, count - current, f"{role} set to {count} by hand", "manual")

    def set_auto(self) -> list[Role]:
        """The pools set by hand go back to the policy; returns them."""
        back = [pool for pool in self.pools.values() if pool.mode == "manual"]
        for pool in back:
            pool.mode = self.mode
        return [pool.role for pool in back]

    def reconfigure(self, bounds: dict[Role, Bounds], mode: str) -> None:
        """New bounds and mode from a PD config changed at run time; pools set by hand stay so."""
        self.mode = mode
        for pool in self.pools.values():
            pool.bounds = bounds[pool.role]
            pool.floor = pool.bounds.clamp(pool.floor)
            if pool.mode != "manual":
                pool.mode = mode
            pool.desired = pool.bounds.clamp(pool.desired)
