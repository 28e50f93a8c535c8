"""The daemon's instance supervisor: launch every instance in parallel, health-check, restart with backoff.

A small explicit state machine per instance (launching -> loading -> healthy; exited -> backoff ->
launching; too many failures in a window -> failed; its node lost and no other with room -> blocked),
driven by one periodic tick, like supervisord's. Where and how a process runs is the launcher's business
(`pdctl.launchers`): this module never starts or signals one itself. The clock is injectable for tests.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx

from pdctl import health, procs
from pdctl.engines import failures
from pdctl.errors import PlacementError
from pdctl.launchers import InstanceHandle, Launcher, LaunchError, PortTaken
from pdctl.plan import Plan, PlannedInstance
from pdctl.procs import Activity
from pdctl.state import ClusterDir, ClusterPhase, ClusterState, InstancePhase, InstanceStatus, open_log

log = logging.getLogger("pdctl.supervisor")
# An instance's log is read for engine failures a tick's new lines at a time, with this much of the last
# look again (a line cut there), and at most this much a tick (a flood of log lines must not stall the tick).
_LOG_OVERLAP = 512
# Seconds what a crashed engine left (an orphaned EngineCore) gets to exit on SIGTERM before SIGKILL.
CRASHED_GRACE_S = 3.0
# How long the CPU use of a suspected stalled engine is sampled: long enough to see a starved engine's share.
ACTIVITY_WINDOW_S = 0.5
_LOG_READ_MAX = 1 << 20
_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


SERVING = (InstancePhase.HEALTHY, InstancePhase.ATTACHED)


@dataclass(frozen=True)
class SupervisorPolicy:
    start_timeout_s: float = 600.0
    tick_s: float = 0.25
    health_interval_s: float = 2.0
    unhealthy_after_failures: int = 3
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 30.0
    max_failures: int = 5
    failure_window_s: float = 300.0
    stop_grace_s: float = 15.0


@dataclass
class _Managed:
    planned: PlannedInstance
    status: InstanceStatus
    handle: InstanceHandle | None = None
    starting: bool = False  # a launch is in flight (a launcher may take a while: a Ray actor to place)
    launched_at: float = 0.0
    log_size_at_launch: int = 0
    log_read_to: int = 0  # how far the log was read for an engine failure (failures.fatal_line)
    restart_at: float | None = None
    failures: collections.deque[float] = field(default_factory=collections.deque)
    health_failures: int = 0
    last_health_check: float = 0.0
    retired: bool = False  # being removed by the scaler: a check still in flight must not revive it


def expand_env(env: dict[str, str], environ: dict[str, str]) -> dict[str, str]:
    """Resolve ${VAR} references at launch, so secrets live in the environment, never in state files."""
    return {key: _REFERENCE.sub(lambda m: environ.get(m.group(1), ""), value) for key, value in env.items()}


class Supervisor:
    def __init__(
        self,
        plan: Plan,
        cluster_dir: ClusterDir,
        state: ClusterState,
        policy: SupervisorPolicy,
        launcher: Launcher,
        clock: Callable[[], float] = time.monotonic,
        on_health: Callable[[str, bool], None] = lambda instance_id, healthy: None,
        relocate: Callable[[PlannedInstance], PlannedInstance] | None = None,
        on_moved: Callable[[PlannedInstance], None] = lambda planned: None,
        engine_headers: dict[str, str] | None = None,
        before_ready: Callable[[], Awaitable[None]] | None = None,
    ):
        """engine_headers: sent with every health check (the engines' API key: /v1/models is behind it).
        before_ready: awaited once every instance is healthy at start, before the cluster is ready (the router's
        KV-path warm-ups: `up` returns when a first request would not race them)."""
        self.plan = plan
        self.dir = cluster_dir
        self.state = state
        self.policy = policy
        self.launcher = launcher
        self.clock = clock
        self.on_health = on_health
        self.relocate = relocate
        self.on_moved = on_moved
        self.before_ready = before_ready
        self.managed = {i.id: _Managed(i, state.instances.get(i.id) or InstanceStatus(id=i.id)) for i in plan.instances}
        for managed in self.managed.values():
            state.instances[managed.planned.id] = managed.status
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(3.0), trust_env=False, headers=engine_headers)
        self._dirty = True
        # Instances the scaler is adding or removing: not yet (or no longer) part of the cluster's health.
        self.transient: set[str] = set()

    # ---- lifecycle -------------------------------------------------------------------------------------

    async def start_all(self, stopping: asyncio.Event, adopt: bool = False) -> bool:
        """Launch every instance at once (or, taking over from a daemon that died, adopt those still running);
        True when all are healthy, False as soon as one fails."""
        for managed in self.managed.values():
            if not managed.planned.launch:
                managed.status.phase = InstancePhase.LOADING
        launched = [m for m in self.managed.values() if m.planned.launch]
        if adopt:
            # The cluster was serving: go on supervising it as it is (an instance blocked or failed stays so).
            await asyncio.gather(*(self._adopt(m) for m in launched))
            self._update_cluster_phase()
            self._save(force=True)
            return True
        await asyncio.gather(*(self._launch(m, starting=True) for m in launched))
        while not stopping.is_set():
            await self._check_all(starting=True)
            self._save()
            if any(m.status.phase is InstancePhase.FAILED for m in self.managed.values()):
                self.state.phase = ClusterPhase.FAILED
                self._save(force=True)
                return False
            if all(m.status.phase in SERVING for m in self.managed.values()):
                if self.before_ready is not None:
                    await self.before_ready()
                self.state.phase = ClusterPhase.READY
                self._save(force=True)
                return True
            await _sleep_or_stop(stopping, self.policy.tick_s)
        return False

    async def supervise(self, stopping: asyncio.Event) -> None:
        """After start: restart what crashes, mark what keeps crashing failed, keep the rest serving."""
        while not stopping.is_set():
            await self._check_all(starting=False)
            self._update_cluster_phase()
            self._save()
            await _sleep_or_stop(stopping, self.policy.tick_s)

    async def stop(self) -> None:
        self.state.phase = ClusterPhase.STOPPING
        for managed in self.managed.values():
            if managed.handle is not None:
                managed.status.phase = InstancePhase.STOPPING
        self._save(force=True)
        records = [m.status.process for m in self.managed.values() if m.status.process is not None]
        await asyncio.to_thread(self.launcher.sweep, records, self.policy.stop_grace_s)
        for managed in self.managed.values():
            if managed.planned.launch:
                managed.status.phase = InstancePhase.STOPPED
                managed.status.exit_code = managed.handle.poll() if managed.handle else managed.status.exit_code
        self._save(force=True)
        await self._http.aclose()

    # ---- the scaler's changes -------------------------------------------------------------------------

    def add(self, planned: PlannedInstance) -> None:
        """Launch one more instance; the router is told through on_health once it is healthy."""
        self.plan.instances.append(planned)
        managed = _Managed(planned, InstanceStatus(id=planned.id))
        managed.starting = True  # from now: the tick must not take the launch in flight for an exit
        self.managed[planned.id] = managed
        self.state.instances[planned.id] = managed.status
        self.transient.add(planned.id)
        asyncio.get_running_loop().create_task(self._launch(managed))
        self._save(force=True)

    def stalled(self, instance_id: str, why: str) -> None:
        """The router saw a stream stall on this instance (its process runs, its /health answers): restart it."""
        managed = self.managed.get(instance_id)
        running = (InstancePhase.HEALTHY, InstancePhase.UNHEALTHY)
        if managed is None or managed.starting or not managed.planned.launch or managed.status.phase not in running:
            return  # already being stopped or restarted, or attached (not ours to restart)
        self._set(managed, InstancePhase.STOPPING, message=f"stalled: {why}")
        asyncio.get_running_loop().create_task(self._restart_stalled(managed, why))

    async def activity(self, instance_id: str) -> Activity | None:
        """What the instance's processes do, sampled for ACTIVITY_WINDOW_S: the router's stall verdict."""
        managed = self.managed.get(instance_id)
        if managed is None or managed.handle is None:
            return None
        return await asyncio.to_thread(managed.handle.activity, ACTIVITY_WINDOW_S)

    async def _restart_stalled(self, managed: _Managed, why: str) -> None:
        log.error("%s stalled (%s): restarting it", managed.planned.id, why)
        await asyncio.to_thread(self._kill_instance, managed)
        self._record_failure(managed, f"stalled: {why}")

    def settled(self, instance_id: str) -> None:
        """An added instance is healthy: from now on it counts for the cluster's health like the others."""
        self.transient.discard(instance_id)

    async def retire(self, instance_id: str) -> None:
        """Stop one instance's whole process group and forget it (the router has drained it first)."""
        managed = self.managed[instance_id]
        self.transient.add(instance_id)
        self._set(managed, InstancePhase.STOPPING, message="removed by the scaler")
        managed.retired = True
        self._save(force=True)
        await asyncio.to_thread(self._kill_instance, managed)
        del self.managed[instance_id]
        self.state.instances.pop(instance_id, None)
        self.plan.instances.remove(managed.planned)
        self.transient.discard(instance_id)
        self._dirty = True
        self._save()

    # ---- one tick --------------------------------------------------------------------------------------

    async def _check_all(self, starting: bool) -> None:
        await asyncio.gather(*(self._check(m, starting) for m in self.managed.values()))

    async def _check(self, managed: _Managed, starting: bool) -> None:
        phase = managed.status.phase
        if managed.retired or phase in (InstancePhase.FAILED, InstancePhase.STOPPING, InstancePhase.STOPPED):
            return
        if not managed.planned.launch:
            await self._check_attached(managed)
            return
        if managed.starting:
            return
        if phase in (InstancePhase.BACKOFF, InstancePhase.BLOCKED):
            if self.clock() >= (managed.restart_at or 0):
                await self._launch(managed)
            return
        if managed.handle is None:
            return
        managed.handle.sync_log()
        exit_code = managed.handle.poll()
        if exit_code is not None:
            await self._exited(managed, exit_code, starting)
            return
        fatal = self._engine_failure_logged(managed)
        if fatal is not None:
            message = f"its engine failed inside while its API server runs: {fatal}"
            log.error("%s: %s", managed.planned.id, message)
            await self._clear_crashed(managed, message)
            self._fail(managed, message, starting)
            return
        if phase in (InstancePhase.LAUNCHING, InstancePhase.LOADING):
            await self._check_starting(managed, starting)
        else:
            await self._check_running(managed)

    async def _check_starting(self, managed: _Managed, starting: bool) -> None:
        if managed.status.phase is InstancePhase.LAUNCHING and self._log_grew(managed):
            self._set(managed, InstancePhase.LOADING)
        if await self._healthy(managed.planned):
            managed.status.healthy_at = time.time()
            managed.health_failures = 0
            self._set(managed, InstancePhase.HEALTHY, message=None)
            log.info("%s is healthy after %.1f s", managed.planned.id, self.clock() - managed.launched_at)
            return
        if self.clock() - managed.launched_at > self.policy.start_timeout_s:
            message = f"not healthy within its start timeout of {self.policy.start_timeout_s:g} s"
            log.error("%s: %s", managed.planned.id, message)
            await asyncio.to_thread(self._kill_instance, managed)
            if starting:
                self._set(managed, InstancePhase.FAILED, message=message)
            else:
                self._record_failure(managed, message)

    async def _check_running(self, managed: _Managed) -> None:
        now = self.clock()
        if now - managed.last_health_check < self.policy.health_interval_s:
            return
        managed.last_health_check = now
        if await self._healthy(managed.planned):
            managed.health_failures = 0
            if managed.status.phase is InstancePhase.UNHEALTHY:
                self._set(managed, InstancePhase.HEALTHY, message=None)
            return
        managed.health_failures += 1
        if managed.health_failures >= self.policy.unhealthy_after_failures:
            self._set(managed, InstancePhase.UNHEALTHY, message="health check failing")

    async def _check_attached(self, managed: _Managed) -> None:
        now = self.clock()
        if (
            managed.status.phase is InstancePhase.ATTACHED
            and now - managed.last_health_check < self.policy.health_interval_s
        ):
            return
        managed.last_health_check = now
        healthy = await self._healthy(managed.planned)
        self._set(managed, InstancePhase.ATTACHED if healthy else InstancePhase.UNREACHABLE)

    async def _exited(self, managed: _Managed, exit_code: int, starting: bool) -> None:
        managed.status.exit_code = exit_code
        assert managed.handle is not None
        message = managed.handle.exit_message(exit_code)
        log.error("%s %s", managed.planned.id, message)
        # Its EngineCore child may outlive it, holding ports: clear the instance's whole group first.
        await self._clear_crashed(managed, message)
        self._fail(managed, message, starting)

    async def _clear_crashed(self, managed: _Managed, message: str) -> None:
        """Stop what a failed engine left (its group), shown as stopping meanwhile: the router and `status`
        must not take it for healthy for the seconds that takes. A short grace: nothing of it serves any more,
        and its restart waits for its ports."""
        self._set(managed, InstancePhase.STOPPING, message=f"{message}; stopping what it left")
        self._save()
        await asyncio.to_thread(self._kill_instance, managed, CRASHED_GRACE_S)

    def _fail(self, managed: _Managed, message: str, starting: bool) -> None:
        if starting:
            self._set(managed, InstancePhase.FAILED, message=message)
        else:
            self._record_failure(managed, message)

    def _record_failure(self, managed: _Managed, message: str) -> None:
        now = self.clock()
        managed.failures.append(now)
        while managed.failures and now - managed.failures[0] > self.policy.failure_window_s:
            managed.failures.popleft()
        if len(managed.failures) >= self.policy.max_failures:
            text = f"{message}; failed {len(managed.failures)} times in {self.policy.failure_window_s:g} s: given up"
            log.error("%s: %s", managed.planned.id, text)
            self._set(managed, InstancePhase.FAILED, message=text)
            return
        delay = min(self.policy.backoff_max_s, self.policy.backoff_initial_s * 2 ** (len(managed.failures) - 1))
        managed.restart_at = now + delay
        log.warning("%s: %s; restarting in %.1f s", managed.planned.id, message, delay)
        self._set(managed, InstancePhase.BACKOFF, message=f"{message}; restarting in {delay:g} s")

    def _update_cluster_phase(self) -> None:
        healthy = all(m.status.phase in SERVING for m in self.managed.values() if m.planned.id not in self.transient)
        phase = ClusterPhase.READY if healthy else ClusterPhase.DEGRADED
        if phase is not self.state.phase:
            self.state.phase = phase
            self._dirty = True

    # ---- processes -------------------------------------------------------------------------------------

    async def _launch(self, managed: _Managed, starting: bool = False) -> None:
        managed.starting = True
        try:
            if not await self._placed(managed):
                return
            await self._start(managed, starting)
        finally:
            managed.starting = False

    async def _adopt(self, managed: _Managed) -> None:
        """Take over an engine an earlier daemon started. One that is gone is started again through the usual
        backoff; one that was failed stays failed, one that was waiting (backoff, blocked) is tried now."""
        record, planned, phase = managed.status.process, managed.planned, managed.status.phase
        if phase is InstancePhase.FAILED:
            return
        log_path = self.dir.instance_log(planned.id)
        handle = await asyncio.to_thread(self.launcher.adopt, planned, record, log_path) if record else None
        if handle is None:
            managed.restart_at = self.clock()
            if phase not in (InstancePhase.BACKOFF, InstancePhase.BLOCKED):
                self._set(managed, InstancePhase.BACKOFF, message="gone when a new daemon took over; restarting")
            return
        managed.handle = handle
        managed.launched_at = self.clock()
        # Its log from here on: earlier runs' lines (a failure among them) are not this engine's.
        managed.log_size_at_launch = self._log_size(planned.id)
        if phase is InstancePhase.HEALTHY:
            # Serving as it was, at once: supervise()'s health checks say otherwise within a round if it is not.
            self.on_health(planned.id, True)
        else:
            self._set(managed, InstancePhase.LOADING, message=None)
        log.info("%s adopted: pid %d still runs", planned.id, record.pid)

    async def _placed(self, managed: _Managed) -> bool:
        """Its place can still run it, or it has a new one (its node was lost); False: blocked, retried."""
        lost = self.launcher.lost(managed.planned)
        if lost is None:
            return True
        if self.relocate is None:
            self._set_blocked(managed, lost)
            return False
        try:
            moved = await asyncio.to_thread(self.relocate, managed.planned)
        except PlacementError as error:
            self._set_blocked(managed, f"{lost}; {error}")
            return False
        index = self.plan.instances.index(managed.planned)
        self.plan.instances[index] = managed.planned = moved
        log.warning("%s: %s; moving it to %s", moved.id, lost, moved.node or moved.host)
        self.on_moved(moved)
        return True

    def _set_blocked(self, managed: _Managed, why: str) -> None:
        managed.restart_at = self.clock() + self.policy.backoff_max_s
        log.error("%s is blocked: %s; trying again in %g s", managed.planned.id, why, self.policy.backoff_max_s)
        self._set(managed, InstancePhase.BLOCKED, message=f"blocked: {why}")

    async def _start(self, managed: _Managed, starting: bool) -> None:
        planned = managed.planned
        log_path = self.dir.instance_log(planned.id)
        with open_log(log_path) as handle:
            handle.write(f"\n=== pdctl: starting {planned.id} at {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
            managed.log_size_at_launch = handle.tell()
        try:
            managed.handle = await asyncio.to_thread(
                self.launcher.start, planned, self._env(planned), log_path, self.dir.path
            )
        except PortTaken as error:
            managed.handle = None
            if starting:
                self._fail(managed, f"cannot start: {error}", starting)
            else:
                self._set_blocked(managed, f"cannot start: {error}")
            return
        except LaunchError as error:
            log.error("%s cannot start: %s", planned.id, error)
            managed.handle = None
            self._fail(managed, f"cannot start: {error}", starting)
            return
        if managed.status.process is not None:
            managed.status.restarts += 1
        managed.status.process = managed.handle.record
        managed.status.started_at = time.time()
        managed.status.exit_code = None
        managed.launched_at = self.clock()
        managed.health_failures = 0
        self._set(managed, InstancePhase.LAUNCHING, message=None)
        where = f" on {planned.node}" if planned.node else ""
        log.info("%s launched as pid %d%s", planned.id, managed.handle.record.pid, where)

    def _env(self, planned: PlannedInstance) -> dict[str, str]:
        env = expand_env(planned.env, dict(os.environ))
        env[procs.TOKEN_ENV] = self.state.token
        env[procs.INSTANCE_ENV] = planned.id
        return env

    def _kill_instance(self, managed: _Managed, grace_s: float | None = None) -> None:
        if managed.handle is not None:
            managed.handle.stop(self.policy.stop_grace_s if grace_s is None else grace_s)

    def _engine_failure_logged(self, managed: _Managed) -> str | None:
        """A line the engine logged since the last look that says its engine core died."""
        start = max(managed.log_size_at_launch, managed.log_read_to - _LOG_OVERLAP)  # a line cut at the last look
        try:
            with self.dir.instance_log(managed.planned.id).open("rb") as log_file:
                log_file.seek(start)
                new = log_file.read(_LOG_READ_MAX)
        except FileNotFoundError:
            return None
        managed.log_read_to = start + len(new)
        return failures.fatal_line(new.decode(errors="replace"))

    def _log_grew(self, managed: _Managed) -> bool:
        return self._log_size(managed.planned.id) > managed.log_size_at_launch

    def _log_size(self, instance_id: str) -> int:
        try:
            return self.dir.instance_log(instance_id).stat().st_size
        except FileNotFoundError:
            return 0

    async def _healthy(self, planned: PlannedInstance) -> bool:
        return (await health.check(self._http, planned.url, self.plan.served_model_name)).healthy

    # ---- state -----------------------------------------------------------------------------------------

    def _set(self, managed: _Managed, phase: InstancePhase, message: str | None = None) -> None:
        if managed.retired:
            return
        if managed.status.phase is not phase or managed.status.message != message:
            was_serving = managed.status.phase in SERVING
            managed.status.phase = phase
            managed.status.message = message
            self._dirty = True
            if was_serving != (phase in SERVING):
                self.on_health(managed.planned.id, phase in SERVING)

    def _save(self, force: bool = False) -> None:
        if self._dirty or force:
            self.dir.write_state(self.state)
            self._dirty = False


async def _sleep_or_stop(stopping: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stopping.wait(), timeout=seconds)
