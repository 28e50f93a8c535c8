"""Launchers are a registry: a new launcher is one class in one module, and the profile, `plan` and its view
take it by its `launcher.kind`, with no list edited anywhere; an unknown kind is named with its file and line."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest
from rich.console import Console

from pdctl import views
from pdctl.cluster import load_cluster_profile, plan_profile
from pdctl.errors import ProfileError, UsageError
from pdctl.gpus import GpuInventory
from pdctl.launchers import LAUNCHERS, known_launchers, make_launcher
from pdctl.launchers.local import LocalLauncher
from pdctl.placement import Assignment, DeviceMode, PlacementRequest
from pdctl.plan import Plan
from pdctl.profile import ClusterProfile, LauncherSpec, load_profile
from tests.conftest import ROOT

SPREAD_PROFILE = (
    "name: s\nmodel: {path: sim-model}\ndevice: cpu\nengine: {kind: sim}\n"
    "pd: {prefilling_min_instances: 1, decoding_min_instances: 2}\nlauncher:\n  kind: spread\n"
)


@pytest.fixture
def spread() -> Iterator[type[LocalLauncher]]:
    """A third launcher, all of it in one class: each instance on a loopback address of its own, as if on a node."""

    class SpreadLauncher(LocalLauncher, kind="spread"):
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
            return {
                r.instance.instance_id: Assignment(instance_id=r.instance.instance_id, node=f"127.0.0.{n + 2}")
                for n, r in enumerate(requests)
            }

        @classmethod
        def where(cls, plan: Plan) -> str:
            return f"on {len({i.node for i in plan.launched})} loopback nodes"

    yield SpreadLauncher
    del LAUNCHERS["spread"]


def shown(plan: Plan) -> str:
    console = Console(record=True, width=400)
    console.print(views.plan_view(plan))
    return console.export_text()


def test_a_third_launcher_is_one_class_the_plan_takes_by_name(spread, write_profile):
    plan = plan_profile(write_profile(SPREAD_PROFILE), dry_run=True).plan
    assert plan.launcher.kind == "spread" and "spread" in known_launchers()
    assert [(i.id, i.node, i.host) for i in plan.instances] == [
        ("prefill-0", "127.0.0.2", "127.0.0.2"),
        ("decode-0", "127.0.0.3", "127.0.0.3"),
        ("decode-1", "127.0.0.4", "127.0.0.4"),
    ]
    assert "3 of 3 instances launched on 3 loopback nodes on cpu" in shown(plan)


def test_an_unknown_launcher_kind_names_the_file_line_field_and_the_known_kinds(write_profile):
    path = write_profile("name: t\nmodel: {path: m}\nlauncher:\n  kind: kube\n")
    load_profile(path)  # the profile's own layer cannot know the launchers: the layer that chooses one checks
    with pytest.raises(ProfileError) as caught:
        load_cluster_profile(path)
    assert str(caught.value) == f"{path}:4:3: launcher.kind: unknown launcher 'kube'; known launchers: local, ray"
    for verb in ("validate", "plan"):
        result = subprocess.run(
            [sys.executable, "-m", "pdctl", verb, str(path)], capture_output=True, text=True, timeout=60, cwd=ROOT
        )
        assert result.returncode == 2, (verb, result.stderr)
        assert "launcher.kind: unknown launcher 'kube'; known launchers: local, ray" in result.stderr
        assert "Traceback" not in result.stderr


def test_a_launchers_own_settings_are_checked_by_it_with_file_and_line(write_profile):
    path = write_profile("name: t\nmodel: {path: m}\nlauncher:\n  kind: ray\n")
    with pytest.raises(ProfileError) as caught:
        load_cluster_profile(path)
    assert str(caught.value) == (
        f"{path}:3:1: launcher.address: required for launcher kind ray (the head node's HOST:PORT)"
    )


def test_a_plan_naming_a_launcher_that_is_gone_is_a_usage_error():
    # A plan read back from a state file is checked where its launcher is chosen, without a profile to point at.
    with pytest.raises(UsageError, match=r"^launcher.kind: unknown launcher 'kube'; known launchers: local, ray$"):
        make_launcher(LauncherSpec(kind="kube"), "t")


def test_loading_every_launcher_leaves_ray_unimported():
    script = "import sys; from pdctl.launchers import known_launchers; print(known_launchers(), 'ray' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.stdout.strip() == "['local', 'ray'] False", result.stderr
