"""Instances planned while a cluster runs: one the scaler adds, one moved off a node that was lost. Both
are placed by the cluster's launcher and built by the plan's own command builder, like the first ones."""

from __future__ import annotations

from pathlib import Path

from pdctl import cluster
from pdctl.engines import commands
from pdctl.launchers import Launcher
from pdctl.placement import Assignment, PlacementRequest
from pdctl.plan import Plan, PlannedInstance, plan_added_instance
from pdctl.profile import ClusterProfile
from pdctl.types import ExecutionInstance, ExecutionInstanceType


class InstancePlanner:
    def __init__(self, profile: ClusterProfile, plan: Plan, launcher: Launcher):
        self.profile, self.plan, self.launcher = profile, plan, launcher
        self._launch_prefix: commands.LaunchPrefix | None = None

    def new(self, instance_id: str, role: ExecutionInstanceType) -> PlannedInstance:
        """One more instance of a pool, on devices no instance of the cluster holds."""
        return self._planned(self.profile.added_instance(instance_id, role), self.plan.instances)

    def moved(self, planned: PlannedInstance) -> PlannedInstance:
        """The same instance (id, role, settings) placed anew, its old place left out."""
        others = [i for i in self.plan.instances if i.id != planned.id]
        return self._planned(self._instance(planned), others, ports=(planned.port, planned.nixl_side_channel_port))

    def rebuilt(self, planned: PlannedInstance) -> PlannedInstance:
        """The same instance in the same place with its command built again from the profile: what a daemon
        taking over needs, as the state directory holds plans with their secrets masked."""
        assignment = Assignment(
            instance_id=planned.id,
            gpus=planned.gpus,
            cpu_cores=planned.cpu_cores,
            node=planned.node,
            node_id=planned.node_id,
            needs=planned.needs,
        )
        placed = self._instance(planned).model_copy(update={"port": planned.port})
        nixl = planned.nixl_side_channel_port or 0
        return plan_added_instance(self.profile, self.plan, placed, assignment, nixl, self._prefix())

    def _instance(self, planned: PlannedInstance) -> ExecutionInstance:
        """Its settings: the profile's own instance of that id, or its pool's (one the scaler added)."""
        resolved = {i.instance_id: i for i in self.profile.resolved_instances()}
        return resolved.get(planned.id) or self.profile.added_instance(planned.id, planned.role)

    def _planned(
        self,
        instance: ExecutionInstance,
        beside: list[PlannedInstance],
        ports: tuple[int, int | None] = (0, None),
    ) -> PlannedInstance:
        request = PlacementRequest(instance=instance, memory_fraction=commands.memory_fraction(self.profile, instance))
        view = self.plan.model_copy(update={"instances": beside})
        assignment = self.launcher.place_added(self.profile, request, view)
        used = {self.plan.router.port} | {i.port for i in beside}
        used |= {i.nixl_side_channel_port for i in beside if i.nixl_side_channel_port}
        port = self.launcher.free_port(assignment, ports[0] or self.profile.ports.instances, used)
        nixl = 0
        if self.profile.pd.enabled:
            nixl = self.launcher.free_port(assignment, ports[1] or self.profile.ports.nixl_side_channel, used | {port})
        placed = instance.model_copy(update={"port": port})
        return plan_added_instance(self.profile, self.plan, placed, assignment, nixl, self._prefix())

    def _prefix(self) -> commands.LaunchPrefix:
        if self._launch_prefix is None:
            python = Path(self.plan.engine_python) if self.plan.engine_python else None
            self._launch_prefix = cluster.launch_prefix(self.profile, python)
        return self._launch_prefix
