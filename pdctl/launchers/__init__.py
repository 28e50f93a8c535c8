"""Launchers: where and how instances run. One class per module, registered by its `kind`
(`launcher.kind` in the profile); `base` holds the contract and loads every module here at the first lookup."""

from pdctl.launchers.base import (
    LAUNCHERS,
    InstanceHandle,
    Launcher,
    LaunchError,
    PortTaken,
    SweepReport,
    known_launchers,
    launcher_class,
    launcher_problems,
    make_launcher,
)

__all__ = [
    "LAUNCHERS",
    "InstanceHandle",
    "LaunchError",
    "Launcher",
    "PortTaken",
    "SweepReport",
    "known_launchers",
    "launcher_class",
    "launcher_problems",
    "make_launcher",
]
