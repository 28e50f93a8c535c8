"""Launchers: where and how instances run. One class per module, registered by its `kind`
(`launcher.kind` in the profile); `base` holds the contract."""

from pdctl.launchers import local, ray_cluster
from pdctl.launchers.base import LAUNCHERS, InstanceHandle, Launcher, LaunchError, SweepReport, make_launcher

__all__ = [
    "LAUNCHERS",
    "InstanceHandle",
    "LaunchError",
    "Launcher",
    "SweepReport",
    "local",
    "make_launcher",
    "ray_cluster",
]
