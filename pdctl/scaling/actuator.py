"""The scaler inside the daemon: reads signals, asks the policy, and changes the pools without losing requests.

Scale-out: place the new instance (free GPUs, or a share of the cores), launch it through the supervisor;
the router gets it at once but sends it nothing until the supervisor finds it healthy. No free device:
the pool is marked blocked with the reason (status, log, /metrics) and not tried again for a while.
Scale-in: the least loaded instance is drained (the router stops choosing it), its in-flight requests
finish, a prefill instance also waits until no decode request still has to read its KV cache; past the
drain deadline what is cut is reported. Then its process group is stopped and it leaves plan and state.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from pdctl.errors import PlacementError
from pdctl.plan import Plan, PlannedInstance
from pdctl.profile import ClusterProfile
from pdctl.replan import InstancePlanner
from pdctl.router.pool import Instance
from pdctl.router.proxy import Exchange, Router
from pdctl.router.server import max_num_seqs
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
from pdctl.scaling.report import REPORT_FILE, DecisionRecord, PoolReport, ScalerMetrics, ScalingReport
from pdctl.scaling.signals import LatencyWindow, PoolSignals, Role, Sample, pool_signals, traffic
from pdctl.state import ClusterDir, InstancePhase
from pdctl.supervisor import Supervisor

log = logging.getLogger("pdctl.scaler")

PREFIX = {Role.PREFILL: "prefill", Role.DECODE: "decode"}


class ScaleRequestError(ValueError):
    """A manual scale request the cluster cannot take (outside the bounds, an unknown pool)."""


@dataclass
class Action:
    decision: DecisionRecord
    started: float
    deadline: float
    instance_ids: list[str]
    stopping: asyncio.Task[None] | None = None
    cut: str | None = None

    @property
    def scale_out(self) -> bool:
        return self.decision.delta > 0


@dataclass
class PoolRuntime:
    role: Role
    bounds: Bounds
    mode: str
    desired: int
    hysteresis: Hysteresis
    forecaster: Forecaster = field(default_factory=Forecaster)
    floor: int = 0
    floor_why: str = ""
    action: Action | None = None
    blocked: str | None = None
    blocked_until: float = 0.0
    signals: dict[str, float] = field(default_factory=dict)


class Scaler:
    def __init__(
        self,
        profile: ClusterProfile,
        plan: Plan,
        supervisor: Supervisor,
        router: Router,
        cluster_dir: ClusterDir,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.profile, self.plan, self.supervisor, self.router, self.dir = profile, plan, supervisor, router, cluster_dir
        self.planner = InstancePlanner(profile, plan, supervisor.launcher)
        self.spec = profile.scaling
        self.clock = clock
        enabled = profile.pd.enabled and profile.pd.enable_dynamic_scaling
        self.mode = self.spec.mode if enabled else "off"
        self.targets = Targets(
            ttft_ms=profile.router.slo.ttft_ms,
            tpot_ms=profile.slo_tpot_ms,
            backlog_s=self.spec.prefill_backlog_s or profile.router.slo.ttft_ms / 2000,
            busy_high=self.spec.decode_busy_high,
            margin=self.spec.scale_in_margin,
            percentile=self.spec.percentile,
            default_prefill_tokens_per_s=profile.prefill.target_throughput_tokens_per_sec,
        )
        pd = profile.pd
        bounds = {
            Role.PREFILL: Bounds(pd.prefilling_min_instances, pd.prefilling_max_instances),
            Role.DECODE: Bounds(pd.decoding_min_instances, pd.decoding_max_instances),
        }
        self._removing: set[str] = set()
        self.pools: dict[Role, PoolRuntime] = {}
        for role in Role if profile.pd.enabled else ():
            hysteresis = Hysteresis(self.spec.scale_out_after_s, self.spec.scale_in_after_s)
            pool = PoolRuntime(role, bounds[role], self.mode, self.current(role), hysteresis)
            pool.floor = pool.bounds.min  # until the first forecast
            self.pools[role] = pool
        self.window = LatencyWindow(self.spec.window_s)
        self.decisions: collections.deque[DecisionRecord] = collections.deque(maxlen=20)
        self.metrics = ScalerMetrics()
        self.started = clock()
        self.next_forecast = self.started + self.spec.forecast_interval_s
        self.startup_s = self._initial_startup_s()
        self._ids = {role: self._highest_index(role) + 1 for role in Role}
        router.on_complete = self.record_completion

    # ---- inputs ------------------------------------------------------------------------------------------

    def record_completion(self, exchange: Exchange, ttft_s: float | None, tpot_s: float | None, tokens: int) -> None:
        decode = exchange.route.decode.instance.id if exchange.route.decode else None
        prefill = exchange.prefill_instance.id if exchange.prefill_instance else None
        self.window.record(Sample(self.clock(), ttft_s, tpot_s, exchange.route.input_tokens, tokens, prefill, decode))

    def members(self, role: Role) -> list[str]:
        """The pool's launched instances, starting ones included, ones being removed not."""
        draining = {
            i for p in self.pools.values() if p.action and not p.action.scale_out for i in p.action.instance_ids
        }
        leaving = draining | self._removing
        return [
            m.planned.id
            for m in self.supervisor.managed.values()
            if m.planned.role is role.instance_type and not m.retired and m.planned.id not in leaving
        ]

    def current(self, role: Role) -> int:
        return len(self.members(role))

    def _cold(self) -> set[str]:
        """Instances not serving yet or healthy for less than warmup_s: their samples are ignored."""
        now = time.time()
        return {
            id_
            for id_, status in self.supervisor.state.instances.items()
            if status.phase not in (InstancePhase.HEALTHY, InstancePhase.ATTACHED)
            or (status.phase is InstancePhase.HEALTHY and now - (status.healthy_at or 0) < self.spec.warmup_s)
        }

    def _initial_startup_s(self) -> float:
        spans = [
            s.healthy_at - s.started_at
            for s in self.supervisor.state.instances.values()
            if s.healthy_at and s.started_at and s.healthy_at >= s.started_at
        ]
        return max(spans) if spans else self.profile.engine.start_timeout_s / 10

    def _highest_index(self, role: Role) -> int:
        indices = [
            int(i.id.rsplit("-", 1)[1])
            for i in self.plan.instances
            if i.id.startswith(PREFIX[role] + "-") and i.id.rsplit("-", 1)[1].isdigit()
        ]
        return max(indices, default=-1)

    # ---- the loop ----------------------------------------------------------------------------------------

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            try:
                await self.tick()
            except Exception:  # the scaler must never take the daemon (and the cluster) down with it
                log.exception("scaler tick failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), timeout=self.spec.interval_s)

    async def tick(self) -> None:
        now = self.clock()
        samples = self.window.recent(now)
        cold = self._cold()
        forecast = now >= self.next_forecast
        if forecast:
            self.next_forecast = now + self.spec.forecast_interval_s
        for pool in self.pools.values():
            self._progress(pool, now)
            signals = pool_signals(
                pool.role, self.router.pool.role(pool.role.instance_type), samples, cold, self.spec.percentile
            )
            self._record_signals(pool, signals)
            if forecast and self.spec.predictive:
                self._forecast(pool, signals, samples, now)
            if pool.mode in ("auto", "advisory") and pool.action is None and now >= pool.blocked_until:
                decision = self._decide(pool, signals, now)
                if decision is not None:
                    self._adopt(pool, decision)
            if pool.mode != "advisory" and pool.action is None and now >= pool.blocked_until:
                self._reconcile(pool, now)
        self._publish()

    def _size(self, pool: PoolRuntime) -> int:
        """What decisions start from: the pool as it is, or in advisory mode as the advice would have made it."""
        return pool.desired if pool.mode == "advisory" else self.current(pool.role)

    def _decide(self, pool: PoolRuntime, signals: PoolSignals, now: float) -> Decision | None:
        size = self._size(pool)
        decision = None
        if self.spec.predictive:
            decision = floor_decision(pool.role, size, pool.floor, pool.bounds, pool.floor_why)
        if decision is None:
            verdict = VERDICTS[pool.role](signals, self.targets)
            decision = pool.hysteresis.step(verdict, now, size, pool.bounds, pool.floor, pool.role)
        return decision

    def _adopt(self, pool: PoolRuntime, decision: Decision) -> None:
        pool.hysteresis.reset()
        record = self._record(decision)
        pool.desired = pool.bounds.clamp(self._size(pool) + decision.delta)
        if pool.mode == "advisory":
            record.outcome = "advisory: not acted on"
            self.metrics.count(record)
        log.info("%s%s", "advisory: " if pool.mode == "advisory" else "", decision.reason)

    def _record(self, decision: Decision) -> DecisionRecord:
        record = DecisionRecord(
            at=time.time(), pool=str(decision.role), delta=decision.delta, loop=decision.loop, reason=decision.reason
        )
        self.decisions.append(record)
        return record

    def _record_signals(self, pool: PoolRuntime, signals: PoolSignals) -> None:
        n = len(signals.instances)
        figures: dict[str, float] = {"warm_instances": n, "samples": signals.samples}
        if signals.ttft_ms is not None:
            figures["ttft_ms"] = round(signals.ttft_ms, 1)
        if signals.tpot_ms is not None:
            figures["tpot_ms"] = round(signals.tpot_ms, 1)
        if n and pool.role is Role.PREFILL:
            figures["backlog_s"] = round(prefill_backlog(signals, self.targets)[0], 3)
        if n:
            figures["busy"] = round(sum(i.busy for i in signals.instances) / n, 3)
            figures["kv_usage"] = round(sum(i.kv_usage for i in signals.instances) / n, 3)
        pool.signals = figures

    def _forecast(self, pool: PoolRuntime, signals: PoolSignals, samples: list[Sample], now: float) -> None:
        lengths = traffic(samples, min(self.spec.window_s, now - self.started))
        rate = lengths.prefill_rate if pool.role is Role.PREFILL else lengths.rate
        pool.forecaster.update(rate)
        ahead = (self.startup_s + self.spec.forecast_interval_s) / self.spec.forecast_interval_s
        expected = pool.forecaster.forecast(ahead)
        rule = prefill_floor if pool.role is Role.PREFILL else decode_floor
        need, why = rule(expected, lengths, signals, self.targets)
        pool.floor = pool.bounds.clamp(need)
        pool.floor_why = (
            f"{why}, {self.startup_s + self.spec.forecast_interval_s:.0f} s ahead (start-up {self.startup_s:.0f} s)"
        )

    # ---- manual control ----------------------------------------------------------------------------------

    def check_count(self, role: Role, count: int) -> PoolRuntime:
        pool = self.pools.get(role)
        if pool is None:
            raise ScaleRequestError(f"this cluster has no {role} pool (pd.enabled is false)")
        if not pool.bounds.min <= count <= pool.bounds.max:
            raise ScaleRequestError(
                f"{role} {count} is outside the pool's bounds {pool.bounds.min}..{pool.bounds.max} "
                f"(pd.{'prefilling' if role is Role.PREFILL else 'decoding'}_min/max_instances)"
            )
        return pool

    def set_manual(self, role: Role, count: int) -> None:
        pool = self.check_count(role, count)
        pool.mode = "manual"
        pool.desired = count
        pool.hysteresis.reset()
        pool.blocked_until = 0.0
        record = self._record(Decision(role, count - self.current(role), f"{role} set to {count} by hand", "manual"))
        if record.delta == 0:
            record.outcome = "no change"
        log.info("%s set to %d by hand; its scaler is paused until `pdctl scale --auto`", role, count)

    def update_pd(self, changes: dict[str, Any]) -> list[str]:
        """Apply changes to the running cluster's PD config (the design document's remedies: raise a pool's
        maximum, turn dynamic scaling on). All are validated together first, so a bad one changes nothing;
        the router shares the same object, so routing changes apply to its next request."""
        pd = self.profile.pd
        unknown = sorted(set(changes) - set(type(pd).model_fields) | {k for k in changes if k.endswith("_config")})
        if unknown:
            raise ScaleRequestError(f"not a PD setting that can change at run time: {', '.join(unknown)}")
        try:
            type(pd).model_validate({**pd.model_dump(), **changes})
        except ValidationError as error:
            raise ScaleRequestError("; ".join(e["msg"] for e in error.errors())) from None
        said = [
            f"{name} {getattr(pd, name)} -> {value}" for name, value in changes.items() if getattr(pd, name) != value
        ]
        for name, value in changes.items():
            setattr(pd, name, value)
        self._apply_pd()
        if said:
            reason = "pd: " + ", ".join(said)
            self.decisions.append(DecisionRecord(at=time.time(), pool="pd", delta=0, loop="manual", reason=reason))
            self.decisions[-1].outcome = "applied"
            log.info("pd config changed at run time: %s", ", ".join(said))
        # Readers of the state directory (`pdctl status`, a Python client attaching later) see what is in force.
        self.dir.write_json(self.dir.profile_file, self.profile.model_dump(mode="json"))
        self._publish()
        return said

    def _apply_pd(self) -> None:
        pd = self.profile.pd
        bounds = {
            Role.PREFILL: Bounds(pd.prefilling_min_instances, pd.prefilling_max_instances),
            Role.DECODE: Bounds(pd.decoding_min_instances, pd.decoding_max_instances),
        }
        self.mode = self.spec.mode if pd.enabled and pd.enable_dynamic_scaling else "off"
        for pool in self.pools.values():
            pool.bounds = bounds[pool.role]
            pool.floor = pool.bounds.clamp(pool.floor)
            if pool.mode != "manual":
                pool.mode = self.mode
            pool.desired = pool.bounds.clamp(pool.desired)

    def set_auto(self) -> None:
        for pool in self.pools.values():
            if pool.mode == "manual":
                pool.mode = self.mode
                log.info("%s pool back to the scaler (%s)", pool.role, self.mode)

    # ---- acting ------------------------------------------------------------------------------------------

    def _reconcile(self, pool: PoolRuntime, now: float) -> None:
        current = self.current(pool.role)
        if current < pool.desired:
            self._scale_out(pool, pool.desired - current, now)
        elif current > pool.desired:
            self._scale_in(pool, now)

    def _decision_for(self, pool: PoolRuntime, delta: int) -> DecisionRecord:
        """The latest decision of this pool, or a record of the catch-up when there is none to attach to."""
        for record in reversed(self.decisions):
            if record.pool == pool.role and record.outcome == "in progress":
                return record
        return self._record(
            Decision(pool.role, delta, f"{pool.role} {delta:+d}: back to desired {pool.desired}", pool.mode)
        )

    def _scale_out(self, pool: PoolRuntime, count: int, now: float) -> None:
        record = self._decision_for(pool, count)
        added: list[str] = []
        for _ in range(count):
            try:
                planned = self._plan_instance(pool.role)
            except PlacementError as error:
                self._block(pool, record, str(error), now)
                break
            self.supervisor.add(planned)
            self.router.pool.add(
                Instance(planned.id, planned.role, planned.url, max_num_seqs=max_num_seqs(self.profile, planned.role))
            )
            added.append(planned.id)
            log.info("%s: launching %s on %s", pool.role, planned.id, planned.url)
        if added:
            deadline = now + self.profile.engine.start_timeout_s + 30
            pool.action = Action(record, now, deadline, added)
            self._write_plan()

    def _block(self, pool: PoolRuntime, record: DecisionRecord, why: str, now: float) -> None:
        pool.blocked = why
        pool.blocked_until = now + self.spec.blocked_retry_s
        pool.desired = self.current(pool.role)
        record.outcome = f"blocked: {why}"
        self.metrics.count(record)
        log.error("%s cannot grow: %s; trying again in %g s", pool.role, why, self.spec.blocked_retry_s)

    def _scale_in(self, pool: PoolRuntime, now: float) -> None:
        candidates = [
            self.router.pool.by_id[i]
            for i in self.members(pool.role)
            if i in self.router.pool.by_id and self._launched(i)
        ]
        if not candidates:
            return
        # Least loaded first; among equals the newest, whose caches are the least warm.
        chosen = min(candidates, key=lambda i: (i.in_flight + i.kv_pending, i.load, -self._index(i.id)))
        chosen.draining = True
        record = self._decision_for(pool, -1)
        pool.action = Action(record, now, now + self.spec.drain_timeout_s, [chosen.id])
        log.info(
            "%s: draining %s (%d in flight, %d KV reads pending)",
            pool.role,
            chosen.id,
            chosen.in_flight,
            chosen.kv_pending,
        )

    def _launched(self, instance_id: str) -> bool:
        managed = self.supervisor.managed.get(instance_id)
        return managed is not None and managed.planned.launch

    @staticmethod
    def _index(instance_id: str) -> int:
        tail = instance_id.rsplit("-", 1)[-1]
        return int(tail) if tail.isdigit() else -1

    def _progress(self, pool: PoolRuntime, now: float) -> None:
        action = pool.action
        if action is None:
            return
        if action.scale_out:
            self._progress_out(pool, action, now)
        else:
            self._progress_in(pool, action, now)

    def _progress_out(self, pool: PoolRuntime, action: Action, now: float) -> None:
        phases = {
            i: self.supervisor.managed[i].status.phase for i in action.instance_ids if i in self.supervisor.managed
        }
        failed = [i for i, phase in phases.items() if phase is InstancePhase.FAILED]
        if failed or now > action.deadline:
            why = f"{', '.join(failed or action.instance_ids)} did not become healthy"
            for instance_id in action.instance_ids:
                self._start_removal(instance_id)
            self._finish(pool, action, f"failed: {why}")
            pool.blocked, pool.blocked_until = why, now + self.spec.blocked_retry_s
            pool.desired = pool.bounds.clamp(self.current(pool.role) - len(action.instance_ids))
            return
        if all(phase is InstancePhase.HEALTHY for phase in phases.values()):
            for instance_id in action.instance_ids:
                self.supervisor.settled(instance_id)
            took = now - action.started
            self.startup_s = 0.5 * self.startup_s + 0.5 * took
            pool.blocked = None
            self._finish(pool, action, f"done: healthy after {took:.1f} s")

    def _progress_in(self, pool: PoolRuntime, action: Action, now: float) -> None:
        if action.stopping is not None:
            if action.stopping.done():
                took = now - action.started
                self._finish(pool, action, action.cut or f"done: drained and stopped in {took:.1f} s")
            return
        instance = self.router.pool.by_id.get(action.instance_ids[0])
        if instance is None:
            return
        if instance.in_flight or instance.kv_pending:
            if now < action.deadline:
                return
            action.cut = (
                f"drain deadline {self.spec.drain_timeout_s:g} s passed: cut {instance.in_flight} in-flight "
                f"requests and {instance.kv_pending} pending KV reads"
            )
            log.warning("%s: %s", instance.id, action.cut)
        action.stopping = self._start_removal(instance.id)

    def _start_removal(self, instance_id: str) -> asyncio.Task[None]:
        self._removing.add(instance_id)  # out of the pool's count from now, not once the task has run
        return asyncio.get_running_loop().create_task(self._remove(instance_id))

    async def _remove(self, instance_id: str) -> None:
        try:
            if instance_id in self.supervisor.managed:
                await self.supervisor.retire(instance_id)
            self.router.pool.remove(instance_id)
            self.router.tables.pop(instance_id, None)
            self._write_plan()
        finally:
            self._removing.discard(instance_id)
        log.info("%s stopped and removed", instance_id)

    def _finish(self, pool: PoolRuntime, action: Action, outcome: str) -> None:
        action.decision.outcome = outcome
        self.metrics.count(action.decision)
        pool.action = None
        pool.hysteresis.reset()
        log.info("%s: %s", action.decision.reason, outcome)

    # ---- placement ---------------------------------------------------------------------------------------

    def _plan_instance(self, role: Role) -> PlannedInstance:
        index = self._ids[role]
        self._ids[role] += 1
        return self.planner.new(f"{PREFIX[role]}-{index}", role.instance_type)

    # ---- outputs -----------------------------------------------------------------------------------------

    def report(self) -> ScalingReport:
        return ScalingReport(
            mode=self.mode,
            pools=[
                PoolReport(
                    pool=str(pool.role),
                    mode=pool.mode,
                    current=self.current(pool.role),
                    desired=pool.desired,
                    min=pool.bounds.min,
                    max=pool.bounds.max,
                    floor=pool.floor,
                    action=self._describe(pool.action),
                    blocked=pool.blocked,
                    signals=pool.signals,
                )
                for pool in self.pools.values()
            ],
            decisions=list(self.decisions),
        )

    @staticmethod
    def _describe(action: Action | None) -> str | None:
        if action is None:
            return None
        verb = "starting" if action.scale_out else ("stopping" if action.stopping else "draining")
        return f"{verb} {', '.join(action.instance_ids)}"

    def _publish(self) -> None:
        report = self.report()
        self.metrics.report = report
        self.dir.write_json(self.dir.path / REPORT_FILE, report.model_dump(mode="json"))

    def _write_plan(self) -> None:
        self.dir.write_plan(self.plan)
