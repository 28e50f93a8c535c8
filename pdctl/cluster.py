"""The verbs behind the CLI, callable from tests and scripts: load a profile, plan it on this host."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pdctl.engines import runtime, tinymodel
from pdctl.engines.commands import LaunchPrefix
from pdctl.gpus import GpuSource, discover
from pdctl.launchers import make_launcher
from pdctl.placement import DeviceMode
from pdctl.plan import Plan, make_plan
from pdctl.profile import ClusterProfile, load_profile


@dataclass
class PlannedCluster:
    profile: ClusterProfile
    plan: Plan


def engine_python(profile: ClusterProfile, device: DeviceMode) -> Path | None:
    """The profile's engine.python, else the runtime `pdctl engine install` makes for the plan's device."""
    if profile.engine.kind == "sim" or profile.engine.command:
        return None
    return profile.engine.python or runtime.runtime_python(runtime.default_runtime_dir(device))


def launch_prefix(profile: ClusterProfile, python: Path | None) -> LaunchPrefix:
    if profile.engine.command:
        return LaunchPrefix(argv=tuple(profile.engine.command))
    if python is None:
        return LaunchPrefix(argv=())
    return runtime.launch_prefix(python)


def model_path(profile: ClusterProfile) -> str:
    return str(tinymodel.default_model_dir()) if profile.model.is_builtin_tiny else profile.model.path


def plan_profile(
    path: Path,
    gpu_source: GpuSource | None = None,
    force: bool = False,
    cores: list[int] | None = None,
    dry_run: bool = False,
) -> PlannedCluster:
    """The profile planned on this host, or on its launcher's nodes; a dry run (`pdctl plan`) also plans
    for a Ray cluster that does not answer, with what each instance needs in place of its node."""
    profile = load_profile(path)
    launcher = make_launcher(profile.launcher, profile.name)
    launcher.dry_run = dry_run
    try:
        inventory = discover(gpu_source)
        device = launcher.device_mode(profile, inventory)
        python = engine_python(profile, device)
        plan = make_plan(
            profile,
            inventory,
            device=device,
            placer=launcher,
            model_path=model_path(profile),
            launch_prefix=launch_prefix(profile, python),
            engine_python=python,
            profile_path=path.resolve(),
            force=force,
            cores=cores,
        )
    finally:
        launcher.close()
    return PlannedCluster(profile, plan)
