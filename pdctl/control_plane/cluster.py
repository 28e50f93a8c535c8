"""The PD config of a cluster `pdctl up` started, as the design document's object: assigning a field changes
the running cluster, without a restart (the document's remedy `pd_config.prefilling_max_instances = 6`).

Each assignment is validated here first (a bad value raises and leaves the object as it was), then sent to
the cluster's daemon over its owner-only control socket, which applies it to the scaler's bounds and the
router's policy at once; if the daemon refuses, the object keeps its old value too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import PrivateAttr

from pdctl.control_plane.types import PDSeparationConfig
from pdctl.errors import PdctlError
from pdctl.scaling.control import ScaleRequest, send
from pdctl.state import ClusterDir, state_root


class RunningPDConfig(PDSeparationConfig):
    _cluster_dir: ClusterDir | None = PrivateAttr(default=None)

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in type(self).model_fields or name.endswith("_config"):
            super().__setattr__(name, value)
            return
        before = self.__dict__[name]
        super().__setattr__(name, value)
        if self._cluster_dir is None:
            return
        try:
            send(self._cluster_dir, ScaleRequest(pd={name: self.__dict__[name]}))
        except PdctlError:
            self.__dict__[name] = before
            raise


def running_pd_config(cluster: str | None = None, state_dir: Path | None = None) -> RunningPDConfig:
    """The named running cluster's PD config (the only cluster when no name is given)."""
    cluster_dir = ClusterDir.find(state_root(state_dir), cluster)
    resolved = json.loads(cluster_dir.profile_file.read_bytes())
    config = RunningPDConfig.model_validate(resolved.get("pd", {}))
    config._cluster_dir = cluster_dir
    return config
