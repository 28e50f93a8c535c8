"""The session's one real cluster (profiles/local.yaml on the CPU build of vLLM)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pdctl import lifecycle
from pdctl.plan import Plan
from pdctl.state import ClusterDir, ClusterState


@dataclass
class LocalCluster:
    dir: ClusterDir
    plan: Plan

    def status(self) -> lifecycle.StatusReport:
        return lifecycle.status(self.dir)

    @property
    def router(self) -> str:
        url = self.state().router
        assert url is not None
        return url

    def state(self) -> ClusterState:
        state = self.dir.read_state()
        assert state is not None
        return state


ROOT = Path(__file__).resolve().parent.parent
LOCAL_PROFILE = ROOT / "profiles" / "local.yaml"
