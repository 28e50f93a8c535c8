"""The verbs behind the CLI, callable from tests and scripts: load a profile, plan it on this host."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pdctl.engines import tinymodel
from pdctl.engines.adapter import engine_adapter
from pdctl.engines.commands import LaunchPrefix
from pdctl.gpus import GpuSource, discover
from pdctl.launchers import launcher_problems, make_launcher
from pdctl.placement import DeviceMode
from pdctl.plan import Plan, make_plan
from pdctl.profile import ClusterProfile, load_profile


@dataclass
class PlannedCluster:
    profile: ClusterProfile
    plan: Plan


def engine_python(profile: ClusterProfile, device: DeviceMode) -> Path | None:
    """The profile's engine.python, else its engine runtime's for the plan's device (`pdctl engine install`'s
    for vLLM); None for an engine with no runtime of its own or a program of the profile's own."""
    engine_runtime = engine_adapter(profile.engine.kind).runtime
    if engine_runtime is None or profile.engine.command:
        return None
    return profile.engine.python or engine_runtime.default_python(device)


def launch_prefix(profile: ClusterProfile, python: Path | None) -> LaunchPrefix:
    if profile.engine.command:
        return LaunchPrefix(argv=tuple(profile.engine.command))
    engine_runtime = engine_adapter(profile.engine.kind).runtime
    if python is None or engine_runtime is None:
        return LaunchPrefix(argv=())
    return engine_runtime.launch_prefix(python)


def load_cluster_profile(path: Path) -> ClusterProfile:
    """The profile, with what only this layer knows checked too (its launcher's kind and settings), each problem
    named with its file, line and field."""
    return load_profile(path, checks=[launcher_problems])


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
    profile = load_cluster_profile(path)
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
