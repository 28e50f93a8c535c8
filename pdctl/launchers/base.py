"""The launcher contract: the one boundary between what to run (the plan: argv, environment, devices) and
where and how it runs (child processes of the daemon here, Ray actors on other nodes; pods later).

The supervisor keeps the instance state machine (health, backoff, failed) and starts, polls and stops
instances only through this contract; `down`, the scaler's placement and its port choice go through it too.
Nothing here assumes Ray: a launcher places instances on devices, allocates their ports, starts one and
hands back a handle, and finds and stops everything a cluster owns, also when the daemon that started it
is gone. A new launcher is one subclass in one module, registered by its `kind`: every module of this package
is loaded at the first lookup (`launcher_class`), so none is listed anywhere. A module here must not import an
optional dependency when it is loaded (Ray's launcher imports Ray when a profile asks for it).
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from pdctl.errors import ClusterError, UsageError
from pdctl.gpus import GpuInventory, discover
from pdctl.placement import Assignment, DeviceMode, PlacementRequest, choose_device_mode
from pdctl.plan import Plan, PlannedInstance
from pdctl.procs import Activity
from pdctl.profile import ClusterProfile, LauncherSpec
from pdctl.state import ProcessRecord
from pdctl.yaml_source import Loc

LAUNCHERS: dict[str, type[Launcher]] = {}


class LaunchError(ClusterError):
    """An instance could not be started (its port is taken, its node is gone): the message says why."""


class PortTaken(LaunchError):
    """Another process holds a port the instance needs: no fault of the engine's, so it waits (blocked) and is
    tried again, instead of spending its restart budget and failing for good."""


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

    def activity(self, window_s: float) -> Activity | None:
        """What its processes did over window_s (blocks that long); None where this launcher cannot see them."""
        return None

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

    @classmethod
    def spec_problems(cls, spec: LauncherSpec) -> list[tuple[str, str]]:
        """(field of `launcher:`, what is wrong) for each setting this launcher needs and the profile lacks."""
        return []

    @classmethod
    def where(cls, plan: Plan) -> str:
        """Where the plan's instances run, as `pdctl plan` shows it ("here", "on the Ray cluster at ...")."""
        return "here"

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
    """The spec's launcher; UsageError naming the field where its kind is unknown or a setting it needs is missing
    (a profile is checked with its file and line before, by `launcher_problems`)."""
    problems = _spec_problems(spec)
    if problems:
        raise UsageError("\n".join(f"launcher.{field}: {message}" for field, message in problems))
    return LAUNCHERS[spec.kind](spec, cluster, token, inventory)


def launcher_class(kind: str) -> type[Launcher]:
    """The launcher registered as `kind`, or UsageError naming the known kinds."""
    _load_builtin()
    if kind not in LAUNCHERS:
        raise UsageError(_unknown(kind))
    return LAUNCHERS[kind]


def known_launchers() -> list[str]:
    _load_builtin()
    return sorted(LAUNCHERS)


def launcher_problems(profile: ClusterProfile) -> list[tuple[Loc, str]]:
    """The profile's launcher section checked against the registry: a `load_profile` check."""
    return [(("launcher", field), message) for field, message in _spec_problems(profile.launcher)]


def _spec_problems(spec: LauncherSpec) -> list[tuple[str, str]]:
    _load_builtin()
    if spec.kind not in LAUNCHERS:
        return [("kind", _unknown(spec.kind))]
    return LAUNCHERS[spec.kind].spec_problems(spec)


def _unknown(kind: str) -> str:
    return f"unknown launcher {kind!r}; known launchers: {', '.join(known_launchers())}"


@functools.cache
def _load_builtin() -> None:
    package = importlib.import_module("pdctl.launchers")
    for module in pkgutil.iter_modules(package.__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{module.name}")
