"""The state directory of each cluster: what runs, where its logs are. Files written atomically, owner-only."""

from __future__ import annotations

import json
import os
import secrets
import tempfile
import time
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from pydantic import BaseModel, Field

from pdctl.errors import UsageError

if TYPE_CHECKING:
    from pdctl.plan import Plan

STATE_ENV = "PDCTL_STATE_DIR"


def state_root(override: Path | None = None) -> Path:
    """--state-dir, else $PDCTL_STATE_DIR, else $XDG_STATE_HOME/pdctl (~/.local/state/pdctl)."""
    if override:
        return override
    if os.environ.get(STATE_ENV):
        return Path(os.environ[STATE_ENV])
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "pdctl"


def write_atomic(path: Path, data: str | bytes, mode: int = 0o600) -> None:
    """Readers see the old file or the new one, never half of one; by default only the owner can read either."""
    payload = data.encode() if isinstance(data, str) else data
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, mode)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def open_log(path: Path) -> BinaryIO:
    """Append to a log that only its owner can read (engine logs may echo prompts)."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab")


class NoCluster(UsageError):
    """No cluster state where one was looked for."""

    exit_code = 1

    def __init__(self, root: Path):
        self.root = root
        super().__init__(f"no cluster is running (state in {root}): start one with `pdctl up PROFILE`")


class ProcessRecord(BaseModel):
    """Enough to be sure a pid is still the process pdctl started, not a recycled one, and to find what it
    started: its process group outlives it (vLLM's EngineCore stays in the group of a dead API server)."""

    pid: int
    create_time: float
    cmdline: list[str]
    pgid: int | None = Field(None, description="the process group it leads; None for the daemon")
    node: str | None = Field(None, description="the node's address where a launcher ran it elsewhere (Ray)")
    handle: str | None = Field(None, description="the launcher's own name for it (a Ray actor)")


class InstancePhase(StrEnum):
    LAUNCHING = "launching"
    LOADING = "loading"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    BACKOFF = "backoff"
    FAILED = "failed"
    STOPPING = "stopping"
    STOPPED = "stopped"
    ATTACHED = "attached"
    UNREACHABLE = "unreachable"
    BLOCKED = "blocked"  # no node has room to start it again (its node was lost); retried


class InstanceStatus(BaseModel):
    id: str
    phase: InstancePhase = InstancePhase.LAUNCHING
    process: ProcessRecord | None = None
    started_at: float | None = None
    healthy_at: float | None = None
    restarts: int = 0
    exit_code: int | None = None
    message: str | None = None


class ClusterPhase(StrEnum):
    STARTING = "starting"
    READY = "ready"
    DEGRADED = "degraded"
    FAILED = "failed"
    STOPPING = "stopping"


class ClusterState(BaseModel):
    cluster: str
    token: str = Field(description="marks every process of this cluster in its environment, for down's sweep")
    phase: ClusterPhase = ClusterPhase.STARTING
    daemon: ProcessRecord | None = None
    router: str | None = Field(None, description="the router's URL once it listens")
    message: str | None = None
    instances: dict[str, InstanceStatus] = Field(default_factory=dict)
    updated_at: float = Field(default_factory=time.time)


class ClusterDir:
    """One cluster's state directory."""

    def __init__(self, root: Path, name: str):
        self.root = root
        self.name = name
        self.path = root / name

    @classmethod
    def find(cls, root: Path, name: str | None) -> ClusterDir:
        """The named cluster, or the only one there is."""
        if name:
            return cls(root, name)
        names = sorted(p.name for p in root.glob("*") if (p / "state.json").exists()) if root.is_dir() else []
        if len(names) == 1:
            return cls(root, names[0])
        if not names:
            raise NoCluster(root)
        raise UsageError(f"several clusters in {root} ({', '.join(names)}): name one")

    def create(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.path.mkdir(mode=0o700, exist_ok=True)
        self.logs.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.path, 0o700)

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    @property
    def state_file(self) -> Path:
        return self.path / "state.json"

    @property
    def plan_file(self) -> Path:
        return self.path / "plan.json"

    @property
    def profile_file(self) -> Path:
        return self.path / "profile.json"

    @property
    def daemon_log(self) -> Path:
        return self.path / "daemon.log"

    @property
    def engine_key_file(self) -> Path:
        return self.path / "engine.key"

    def new_engine_key(self) -> None:
        """A fresh random key for the cluster's engines, readable by the owner only; the router sends it."""
        write_atomic(self.engine_key_file, secrets.token_urlsafe(32))

    def engine_key(self) -> str | None:
        """None for a cluster started before engines had keys: its engines want none."""
        try:
            return self.engine_key_file.read_text().strip() or None
        except FileNotFoundError:
            return None

    def instance_log(self, instance_id: str) -> Path:
        return self.logs / f"{instance_id}.log"

    def exists(self) -> bool:
        return self.state_file.exists()

    def read_state(self) -> ClusterState | None:
        try:
            return ClusterState.model_validate_json(self.state_file.read_bytes())
        except FileNotFoundError:
            return None
        except ValueError as error:
            raise UsageError(f"{self.state_file} is damaged ({error}); `pdctl down {self.name}` cleans up") from None

    def write_state(self, state: ClusterState) -> None:
        state.updated_at = time.time()
        write_atomic(self.state_file, state.model_dump_json(indent=2))

    def write_plan(self, plan: Plan) -> None:
        """The plan as readers of the state directory see it: secrets masked."""
        self.write_json(self.plan_file, plan.masked().model_dump(mode="json"))

    def write_json(self, path: Path, data: object) -> None:
        write_atomic(path, json.dumps(data, indent=2, default=str))


def tail(path: Path, lines: int = 20) -> list[str]:
    """The last lines of a log without reading a multi-gigabyte file whole."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 256 * 1024))
            text = handle.read().decode(errors="replace")
    except FileNotFoundError:
        return []
    return text.splitlines()[-lines:]
