"""The scaler inside the daemon: each tick it reads every pool's signals, asks the decider, and has the actuator
carry out what was decided; it takes `pdctl scale` requests, and writes what it shows.

Deciding (decider.py: signals and the policy to a list of decisions) touches no process; acting (actuator.py:
the launcher through the supervisor, the router's pool) reports what its actions led to back to the decider.
SkyPilot's serve is split the same way: its autoscaler returns decisions, a replica manager carries them out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from pdctl.plan import Plan
from pdctl.profile import ClusterProfile
from pdctl.router.proxy import Exchange
from pdctl.router.server import RouterService
from pdctl.scaling.actuator import Actuator
from pdctl.scaling.decider import (
    Adopt,
    Decider,
    PoolView,
    ScaleOut,
    ScaleRequestError,
    Step,
    pool_bounds,
    profile_targets,
    scaling_mode,
)
from pdctl.scaling.report import REPORT_FILE, DecisionLog, PoolReport, ScalingReport
from pdctl.scaling.signals import LatencyWindow, Role, Sample, pool_signals
from pdctl.state import ClusterDir, InstancePhase
from pdctl.supervisor import Supervisor

log = logging.getLogger("pdctl.scaler")


def _pd_problems(error: ValidationError) -> str:
    """What is wrong with a PD change, each problem under the setting it is about."""
    return "; ".join(
        (f"pd.{'.'.join(map(str, e['loc']))}: " if e["loc"] else "") + e["msg"].removeprefix("Value error, ")
        for e in error.errors()
    )


class Scaler:
    def __init__(
        self,
        profile: ClusterProfile,
        plan: Plan,
        supervisor: Supervisor,
        router: RouterService,
        cluster_dir: ClusterDir,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.profile, self.supervisor, self.router, self.dir = profile, supervisor, router, cluster_dir
        self.spec = profile.scaling
        self.clock = clock
        self.decisions = DecisionLog()
        self.actuator = Actuator(profile, plan, supervisor, router.router, cluster_dir, self.decisions)
        sizes = {role: self.actuator.current(role) for role in Role} if profile.pd.enabled else {}
        self.decider = Decider(
            self.spec,
            profile_targets(profile),
            pool_bounds(profile.pd),
            scaling_mode(profile),
            sizes,
            self._initial_startup_s(),
            clock(),
        )
        self.window = LatencyWindow(self.spec.window_s)
        router.router.on_complete = self.record_completion

    # ---- inputs ------------------------------------------------------------------------------------------

    def record_completion(self, exchange: Exchange, ttft_s: float | None, tpot_s: float | None, tokens: int) -> None:
        decode = exchange.route.decode.instance.id if exchange.route.decode else None
        prefill = exchange.prefill_instance.id if exchange.prefill_instance else None
        self.window.record(Sample(self.clock(), ttft_s, tpot_s, exchange.route.input_tokens, tokens, prefill, decode))

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
        forecast = self.decider.forecast_due(now)
        for role in self.decider.pools:
            event = self.actuator.progress(role, now)
            if event is not None:
                self.decider.learn(event, now)
            instances = self.router.router.pool.role(role.instance_type)
            signals = pool_signals(role, instances, samples, cold, self.spec.percentile)
            view = PoolView(signals, self.actuator.current(role), self.actuator.acting(role))
            for step in self.decider.decide(view, samples, now, forecast):
                self._carry_out(step, now)
        self._publish()

    def _carry_out(self, step: Step, now: float) -> None:
        if isinstance(step, Adopt):
            record = self.decisions.add(step.decision)
            if step.advisory:
                self.decisions.settle(record, "advisory: not acted on")
            log.info("%s%s", "advisory: " if step.advisory else "", step.decision.reason)
        elif isinstance(step, ScaleOut):
            blocked = self.actuator.scale_out(step, now)
            if blocked is not None:
                self.decider.learn(blocked, now)
        else:
            self.actuator.scale_in(step, now)

    # ---- manual control ----------------------------------------------------------------------------------

    def check_count(self, role: Role, count: int) -> None:
        self.decider.check_count(role, count)

    def set_manual(self, role: Role, count: int) -> None:
        decision = self.decider.set_manual(role, count, self.actuator.current(role))
        self.decisions.add(decision, "in progress" if decision.delta else "no change")
        log.info("%s set to %d by hand; its scaler is paused until `pdctl scale --auto`", role, count)

    def set_auto(self) -> None:
        for role in self.decider.set_auto():
            log.info("%s pool back to the scaler (%s)", role, self.decider.mode)

    def update_pd(self, changes: dict[str, Any]) -> list[str]:
        """Apply changes to the running cluster's PD config (the design document's remedies: raise a pool's
        maximum, turn dynamic scaling on). All are validated together first, so a bad one changes nothing;
        the router is handed the new config, so routing changes apply to its next request."""
        pd = self.profile.pd
        unknown = sorted(set(changes) - set(type(pd).model_fields) | {k for k in changes if k.endswith("_config")})
        if unknown:
            raise ScaleRequestError(f"not a PD setting that can change at run time: {', '.join(unknown)}")
        try:
            new = type(pd).model_validate({**pd.model_dump(), **changes})
        except ValidationError as error:
            raise ScaleRequestError(_pd_problems(error)) from None
        said = [
            f"{name} {getattr(pd, name)} -> {value}" for name, value in changes.items() if getattr(pd, name) != value
        ]
        # Swapped whole: set one field at a time, a valid change can pass through an invalid middle (both bounds
        # raised, the minimum first, is above the old maximum). The profile links its role configs into it again.
        self.profile.pd = new
        self.decider.reconfigure(pool_bounds(new), scaling_mode(self.profile))
        self.router.apply_pd(new)
        if said:
            self.decisions.note("pd", "pd: " + ", ".join(said), "applied")
            log.info("pd config changed at run time: %s", ", ".join(said))
        # Readers of the state directory (`pdctl status`, a Python client attaching later) see what is in force.
        self.dir.write_json(self.dir.profile_file, self.profile.model_dump(mode="json"))
        self._publish()
        return said

    # ---- outputs -----------------------------------------------------------------------------------------

    def report(self) -> ScalingReport:
        return ScalingReport(
            mode=self.decider.mode,
            pools=[
                PoolReport(
                    pool=str(pool.role),
                    mode=pool.mode,
                    current=self.actuator.current(pool.role),
                    desired=pool.desired,
                    min=pool.bounds.min,
                    max=pool.bounds.max,
                    floor=pool.floor,
                    action=self.actuator.describe(pool.role),
                    blocked=pool.blocked,
                    signals=pool.signals,
                )
                for pool in self.decider.pools.values()
            ],
            decisions=list(self.decisions.records),
        )

    def _publish(self) -> None:
        report = self.report()
        self.decisions.metrics.report = report
        self.dir.write_json(self.dir.path / REPORT_FILE, report.model_dump(mode="json"))
