"""The scaler's acting half: carries out the decider's ScaleOut and ScaleIn without losing requests, follows
each action to its end, and says what it led to (the decider's events).

Scale-out: place the new instance (free GPUs, or a share of the cores), launch it through the supervisor;
the router gets it at once but sends it nothing until the supervisor finds it healthy. No free device:
the decision is marked blocked with the reason (status, log, /metrics).
Scale-in: the least loaded instance is drained (the router stops choosing it), its in-flight requests
finish, a prefill instance also waits until no decode request still has to read its KV cache; past the
drain deadline what is cut is reported. Then its process group is stopped and it leaves plan and state.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from pdctl.errors import PlacementError
from pdctl.plan import Plan, PlannedInstance
from pdctl.profile import ClusterProfile
from pdctl.replan import InstancePlanner
from pdctl.router.proxy import Router
from pdctl.router.server import max_num_seqs
from pdctl.routing.pool import Instance
from pdctl.scaling.decider import Drained, Event, Healthy, NeverHealthy, NoDevice, ScaleIn, ScaleOut
from pdctl.scaling.report import DecisionLog, DecisionRecord
from pdctl.scaling.signals import Role
from pdctl.state import ClusterDir, InstancePhase
from pdctl.supervisor import Supervisor

log = logging.getLogger("pdctl.scaler")

PREFIX = {Role.PREFILL: "prefill", Role.DECODE: "decode"}


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

    def describe(self) -> str:
        verb = "starting" if self.scale_out else ("stopping" if self.stopping else "draining")
        return f"{verb} {', '.join(self.instance_ids)}"


class Actuator:
    """Acts through the supervisor (which launches and stops through the cluster's launcher) and the router's
    pool; records each action's outcome on its decision; writes the plan when the cluster's instances change."""

    def __init__(
        self,
        profile: ClusterProfile,
        plan: Plan,
        supervisor: Supervisor,
        router: Router,
        cluster_dir: ClusterDir,
        decisions: DecisionLog,
    ):
        self.profile, self.plan, self.supervisor, self.router, self.dir = profile, plan, supervisor, router, cluster_dir
        self.decisions = decisions
        self.spec = profile.scaling
        self.planner = InstancePlanner(profile, plan, supervisor.launcher)
        self.actions: dict[Role, Action] = {}  # at most one under way per pool
        self._removing: set[str] = set()
        self._ids = {role: self._highest_index(role) + 1 for role in Role}

    def members(self, role: Role) -> list[str]:
        """The pool's launched instances, starting ones included, ones being removed not."""
        draining = {i for a in self.actions.values() if not a.scale_out for i in a.instance_ids}
        leaving = draining | self._removing
        return [
            m.planned.id
            for m in self.supervisor.managed.values()
            if m.planned.role is role.instance_type and not m.retired and m.planned.id not in leaving
        ]

    def current(self, role: Role) -> int:
        return len(self.members(role))

    def acting(self, role: Role) -> bool:
        return role in self.actions

    def describe(self, role: Role) -> str | None:
        action = self.actions.get(role)
        return action.describe() if action else None

    # ---- carrying out ----------------------------------------------------------------------------------------

    def scale_out(self, step: ScaleOut, now: float) -> NoDevice | None:
        record = self.decisions.for_action(step.catch_up)
        added: list[str] = []
        blocked = None
        for _ in range(step.count):
            try:
                planned = self._plan_instance(step.role)
            except PlacementError as error:
                blocked = NoDevice(step.role, str(error), self.current(step.role))
                self.decisions.settle(record, f"blocked: {error}")
                log.error("%s cannot grow: %s; trying again in %g s", step.role, error, self.spec.blocked_retry_s)
                break
            self.supervisor.add(planned)
            self.router.pool.add(
                Instance(planned.id, planned.role, planned.url, max_num_seqs=max_num_seqs(self.profile, planned.role))
            )
            added.append(planned.id)
            log.info("%s: launching %s on %s", step.role, planned.id, planned.url)
        if added:
            deadline = now + self.profile.engine.start_timeout_s + 30
            self.actions[step.role] = Action(record, now, deadline, added)
            self._write_plan()
        return blocked

    def scale_in(self, step: ScaleIn, now: float) -> None:
        pool = self.router.pool
        candidates = [pool.by_id[i] for i in self.members(step.role) if i in pool.by_id and self._launched(i)]
        if not candidates:
            return
        # Least loaded first; among equals the newest, whose caches are the least warm.
        chosen = min(candidates, key=lambda i: (i.in_flight + i.kv_pending, i.load, -self._index(i.id)))
        chosen.draining = True
        record = self.decisions.for_action(step.catch_up)
        self.actions[step.role] = Action(record, now, now + self.spec.drain_timeout_s, [chosen.id])
        log.info(
            "%s: draining %s (%d in flight, %d KV reads pending)",
            step.role,
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

    # ---- following an action to its end -----------------------------------------------------------------------

    def progress(self, role: Role, now: float) -> Event | None:
        """What the pool's action has come to by now: an event once it has ended, else None."""
        action = self.actions.get(role)
        if action is None:
            return None
        if action.scale_out:
            return self._progress_out(role, action, now)
        return self._progress_in(role, action, now)

    def _progress_out(self, role: Role, action: Action, now: float) -> Event | None:
        phases = {
            i: self.supervisor.managed[i].status.phase for i in action.instance_ids if i in self.supervisor.managed
        }
        failed = [i for i, phase in phases.items() if phase is InstancePhase.FAILED]
        if failed or now > action.deadline:
            why = f"{', '.join(failed or action.instance_ids)} did not become healthy"
            for instance_id in action.instance_ids:
                self._start_removal(instance_id)
            self._finish(role, action, f"failed: {why}")
            # Being removed, they are already out of the count: the pool goes back to what runs.
            return NeverHealthy(role, why, self.current(role))
        if all(phase is InstancePhase.HEALTHY for phase in phases.values()):
            for instance_id in action.instance_ids:
                self.supervisor.settled(instance_id)
            took = now - action.started
            self._finish(role, action, f"done: healthy after {took:.1f} s")
            return Healthy(role, took)
        return None

    def _progress_in(self, role: Role, action: Action, now: float) -> Event | None:
        if action.stopping is not None:
            if not action.stopping.done():
                return None
            took = now - action.started
            self._finish(role, action, action.cut or f"done: drained and stopped in {took:.1f} s")
            return Drained(role)
        instance = self.router.pool.by_id.get(action.instance_ids[0])
        if instance is None:
            return None
        if instance.in_flight or instance.kv_pending:
            if now < action.deadline:
                return None
            action.cut = (
                f"drain deadline {self.spec.drain_timeout_s:g} s passed: cut {instance.in_flight} in-flight "
                f"requests and {instance.kv_pending} pending KV reads"
            )
            log.warning("%s: %s", instance.id, action.cut)
        action.stopping = self._start_removal(instance.id)
        return None

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

    def _finish(self, role: Role, action: Action, outcome: str) -> None:
        self.decisions.settle(action.decision, outcome)
        del self.actions[role]
        log.info("%s: %s", action.decision.reason, outcome)

    # ---- placement ---------------------------------------------------------------------------------------

    def _highest_index(self, role: Role) -> int:
        indices = [
            int(i.id.rsplit("-", 1)[1])
            for i in self.plan.instances
            if i.id.startswith(PREFIX[role] + "-") and i.id.rsplit("-", 1)[1].isdigit()
        ]
        return max(indices, default=-1)

    def _plan_instance(self, role: Role) -> PlannedInstance:
        index = self._ids[role]
        self._ids[role] += 1
        return self.planner.new(f"{PREFIX[role]}-{index}", role.instance_type)

    def _write_plan(self) -> None:
        self.dir.write_plan(self.plan)
