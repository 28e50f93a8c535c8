"""The launcher contract: the one boundary between what to run (the plan: argv, environment, devices) and
where and how it runs (child processes of the daemon here, Ray actors on other nodes; pods later).

The supervisor keeps the instance state machine (health, backoff, failed) and starts, polls and stops
instances only through this contract; `down`, the scaler's placement and its port choice go through it too.
Nothing here assumes Ray: a launcher places instances on devices, allocates their ports, starts one and
hands back a handle, and finds and stops everything a cluster owns, also when the daemon that started it
is gone. A new launcher is one subclass in one module, registered by its `kind`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from pdctl.errors import ClusterError
from pdctl.gpus import GpuInventory, discover
from pdctl.placement import Assignment, DeviceMode, PlacementRequest, choose_device_mode
from pdctl.plan import Plan, PlannedInstance
from pdctl.profile import ClusterProfile, LauncherSpec
from pdctl.state import ProcessRecord

LAUNCHERS: dict[str, type[Launcher]] = {}


class LaunchError(ClusterError):
    """An instance could not be started (its port is taken, its node is gone): the message says why."""


class InstanceHandle(ABC):
    """One started engine, wherever it runs."""

    record: ProcessRecord

    @abstractmethod
    def poll(self) -> int | None:
        """Its exit code once it has exited, else None. Never blocks."""

    @abstractmethod
    def stop(self, grace_s: float) -> None:
        """Stop everything it started (SIGTERM, grace, SIGKILL); blocks until done."""

    def exit_message(self, exit_code: int) -> str:
        return f"exited with code {exit_code}"

    def sync_log(self) -> None:  # noqa: B027 - most launchers write the log in place: nothing to do
        """Bring its log under the cluster's state directory up to date (one written elsewhere is copied)."""


@dataclass
class SweepReport:
    stopped: list[int] = field(default_factory=list)
    killed: list[int] = field(default_factory=list)


class Launcher(ABC):
    kind: ClassVar[str]
    # A dry run may plan without asking where instances would run (a cluster that does not answer): each
    # instance then says what it needs instead of where it goes.
    dry_run: bool = False

    def __init_subclass__(cls, kind: str | None = None, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if kind is not None:
            cls.kind = kind
            LAUNCHERS[kind] = cls

    def __init__(
        self,
        spec: LauncherSpec,
        cluster: str,
        token: str = "",
        inventory: Callable[[], GpuInventory] = discover,
    ):
        self.spec = spec
        self.cluster = cluster
        self.token = token
        self.inventory = inventory

    # ---- planning ----------------------------------------------------------------------------------------

    def device_mode(self, profile: ClusterProfile, inventory: GpuInventory) -> DeviceMode:
        return choose_device_mode(profile.device, inventory)

    @abstractmethod
    def place(
        self,
        profile: ClusterProfile,
        requests: list[PlacementRequest],
        device: DeviceMode,
        inventory: GpuInventory,
        *,
        force: bool = False,
        cores: list[int] | None = None,
    ) -> dict[str, Assignment]:
        """Devices (and nodes) for the first instances of a cluster; PlacementError when they do not fit."""

    @abstractmethod
    def place_added(self, profile: ClusterProfile, request: PlacementRequest, plan: Plan) -> Assignment:
        """Devices for one more instance beside the plan's (scale-out, or one whose node was lost)."""

    @abstractmethod
    def free_port(self, where: Assignment, start: int, used: set[int]) -> int:
        """The first port from `start`, not in `used`, that can be bound where the instance will run."""

    # ---- starting ----------------------------------------------------------------------------------------

    @abstractmethod
    def preflight(self, profile: ClusterProfile, plan: Plan) -> None:
        """Before anything starts: ports free, the engine runtime and the model where the instances will run."""

    @abstractmethod
    def start(self, planned: PlannedInstance, env: dict[str, str], log_path: Path, cwd: Path) -> InstanceHandle:
        """Start one engine; `env` is the plan's, resolved, plus the cluster's marks. LaunchError if it cannot."""

    @abstractmethod
    def adopt(self, planned: PlannedInstance, record: ProcessRecord, log_path: Path) -> InstanceHandle | None:
        """A handle to an engine that is already running (its daemon died and a new one took over), or None
        where it is gone."""

    def lost(self, planned: PlannedInstance) -> str | None:
        """Why the instance's place can no longer run it (its node is gone), or None."""
        return None

    # ---- cleaning ----------------------------------------------------------------------------------------

    @abstractmethod
    def sweep(self, records: list[ProcessRecord], grace_s: float) -> SweepReport:
        """Stop everything this cluster runs: the recorded engines and anything else carrying its mark."""

    @abstractmethod
    def leftovers(self, records: list[ProcessRecord]) -> list[str]:
        """What of this cluster still runs, one description each ("pid 12 on 127.0.0.3")."""

    def close(self) -> None:  # noqa: B027 - a launcher without a connection has nothing to let go of
        """Let go of connections (a Ray driver); the instances keep running."""


def make_launcher(
    spec: LauncherSpec, cluster: str, token: str = "", inventory: Callable[[], GpuInventory] = discover
) -> Launcher:
    return LAUNCHERS[spec.kind](spec, cluster, token, inventory)
