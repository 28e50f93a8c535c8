"""The Ray launcher: each instance runs on a node of a Ray cluster, held by a small detached actor.

pdctl chooses the node (a node with the instance's GPUs, or CPUs, and the resources its role asks for;
spread over the nodes) and pins the actor there, so `plan` shows where each instance goes and `up` does
that. The actor starts the engine with the argv and environment the local launcher would use, in its own
process group, reports its exit and stops the whole group (`ray_node.EngineHost`). Actors live in a
namespace of their own per cluster start, so `down` finds them, and every engine process of the cluster on
every node, also after the daemon was SIGKILLed.

Ray is imported only when a profile asks for this launcher (`pip install 'pdctl[ray]'`).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

from pdctl.engines import tinymodel
from pdctl.engines.adapter import engine_adapter
from pdctl.errors import ClusterError, PlacementError, UsageError
from pdctl.gpus import GpuInventory
from pdctl.launchers import ray_node
from pdctl.launchers.base import InstanceHandle, Launcher, LaunchError, SweepReport
from pdctl.launchers.local import LocalLauncher
from pdctl.placement import (
    DEVICE_RESOURCES,
    Assignment,
    DeviceMode,
    PlacementRequest,
    cores_for_added,
    describe_needs,
    place_on_cpus,
)
from pdctl.plan import Plan, PlannedInstance
from pdctl.profile import ClusterProfile, LauncherSpec
from pdctl.state import ProcessRecord

LOST_EXIT = -1  # the code an instance "exits" with when its actor or node is gone
PLACE_TIMEOUT_S = 60.0  # an actor pinned to a node with room starts in about a second
CALL_TIMEOUT_S = 30.0
LOG_READ_INTERVAL_S = 1.0


class RayNode:
    def __init__(self, entry: dict[str, Any]):
        self.id: str = entry["NodeID"]
        self.address: str = entry["NodeManagerAddress"]
        self.resources: dict[str, float] = {
            k: float(v) for k, v in entry["Resources"].items() if not k.startswith("node:") and "memory" not in k
        }


class RayHandle(InstanceHandle):
    def __init__(self, ray: Any, actor: Any, record: ProcessRecord, log_path: Path, log_offset: int = 0):
        self._ray, self._actor, self.record, self._log_path = ray, actor, record, log_path
        self._exit = actor.wait.remote()
        self._log_read: Any = None
        self._next_read_at = 0.0
        self._offset = log_offset
        self._code: int | None = None
        self._lost: str | None = None

    def poll(self) -> int | None:
        if self._code is None and self._ray.wait([self._exit], timeout=0)[0]:
            try:
                self._code = int(self._ray.get(self._exit))
            except self._ray.exceptions.RayError as error:
                self._code = LOST_EXIT
                self._lost = f"lost with its Ray actor on node {self.record.node} ({type(error).__name__})"
        return self._code

    def exit_message(self, exit_code: int) -> str:
        return self._lost or f"exited with code {exit_code} on node {self.record.node}"

    def stop(self, grace_s: float) -> None:
        with contextlib.suppress(self._ray.exceptions.RayError, TimeoutError):
            self._ray.get(self._actor.stop.remote(grace_s), timeout=grace_s + CALL_TIMEOUT_S)
        self.sync_log(wait=True)
        with contextlib.suppress(self._ray.exceptions.RayError):
            self._ray.kill(self._actor)

    def sync_log(self, wait: bool = False) -> None:
        """Copy what the engine wrote on its node into the cluster's log here: one read in flight at a time,
        at most one a second (the supervisor's tick is faster)."""
        if self._log_read is None:
            if not wait and time.monotonic() < self._next_read_at:
                return
            self._next_read_at = time.monotonic() + LOG_READ_INTERVAL_S
            self._log_read = self._actor.read_log.remote(self._offset)
        if not self._ray.wait([self._log_read], timeout=5.0 if wait else 0)[0]:
            return
        try:
            data, self._offset = self._ray.get(self._log_read)
        except self._ray.exceptions.RayError:
            data = b""
        self._log_read = None
        if data:
            with self._log_path.open("ab") as handle:
                handle.write(data)


class RayLauncher(Launcher, kind="ray"):
    @classmethod
    def spec_problems(cls, spec: LauncherSpec) -> list[tuple[str, str]]:
        if spec.address:
            return []
        return [("address", "required for launcher kind ray (the head node's HOST:PORT)")]

    @classmethod
    def where(cls, plan: Plan) -> str:
        asked = "" if any(i.node for i in plan.launched) else " (it did not answer: each instance says what it needs)"
        return f"on the Ray cluster at {plan.launcher.address}{asked}"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._ray: Any = None
        self._started_ray = False
        self._cores_of: dict[str, list[int]] = {}
        self._connecting = threading.Lock()

    @property
    def namespace(self) -> str:
        # One per start of the cluster: `down` of this start never touches another's actors.
        return f"pdctl-{self.cluster}-{self.token[:12]}" if self.token else f"pdctl-{self.cluster}"

    # ---- the connection ----------------------------------------------------------------------------------

    def connect(self) -> Any:
        # The supervisor starts and adopts instances from several threads at once: one connects.
        with self._connecting:
            return self._connect()

    def _connect(self) -> Any:
        if self._ray is not None:
            return self._ray
        address = self.spec.address or ""
        try:
            import ray
        except ImportError:
            raise UsageError("launcher.kind ray needs Ray here: pip install 'pdctl[ray]'") from None
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=3).close()
        except OSError as error:
            raise UsageError(f"the Ray cluster at {address} (launcher.address) does not answer: {error}") from None
        if not ray.is_initialized():
            ray.init(
                address=address,
                namespace=self.namespace,
                log_to_driver=False,
                logging_level=logging.ERROR,
                configure_logging=False,
            )
            self._started_ray = True
        ray.cloudpickle.register_pickle_by_value(ray_node)
        self._ray = ray
        return ray

    def close(self) -> None:
        if self._started_ray and self._ray is not None:
            self._ray.shutdown()
        self._ray, self._started_ray = None, False

    def nodes(self) -> list[RayNode]:
        return [RayNode(entry) for entry in self.connect().nodes() if entry.get("Alive")]

    def _on(self, node_id: str, function: Any, *args: Any) -> Any:
        """Run a function of ray_node on one node: a reference to its result."""
        ray = self.connect()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        remote = ray.remote(num_cpus=0, max_retries=0)(function).options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)
        )
        return remote.remote(*args)

    def _on_each(self, node_ids: list[str], function: Any, *args: Any) -> dict[str, Any]:
        refs = {node_id: self._on(node_id, function, *args) for node_id in node_ids}
        return dict(zip(refs, self.connect().get(list(refs.values()), timeout=CALL_TIMEOUT_S), strict=True))

    # ---- planning ----------------------------------------------------------------------------------------

    def _answers(self) -> bool:
        """Whether a dry run can ask the Ray cluster (anything else asks, and stops where it does not answer)."""
        if not self.dry_run:
            return True
        try:
            self.connect()
            return True
        except UsageError:
            return False

    def device_mode(self, profile: ClusterProfile, inventory: GpuInventory) -> DeviceMode:
        if profile.device == "cpu" or not engine_adapter(profile.engine.kind).uses_devices:
            return "cpu"
        if not self._answers():
            return "cuda" if profile.device == "cuda" else "cpu"
        if any(node.resources.get("GPU") for node in self.nodes()):
            return "cuda"
        if profile.device == "cuda":
            raise PlacementError(f"device: cuda, but no node of the Ray cluster at {self.spec.address} has a GPU")
        return "cpu"

    def needs(self, profile: ClusterProfile, request: PlacementRequest, device: DeviceMode) -> dict[str, float]:
        instance = request.instance
        base = {"GPU": float(instance.gpu_count or 1)} if device == "cuda" else {"CPU": self.spec.cpus_per_instance}
        return {**base, **self.spec.selector(instance.instance_id, instance.instance_type).resources}

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
        if not self._answers():
            return {r.instance.instance_id: self._needs_only(profile, r, device) for r in requests}
        nodes = self.nodes()
        free = {node.id: dict(node.resources) for node in nodes}
        chosen: dict[str, tuple[RayNode, dict[str, float]]] = {}
        needs_of = {r.instance.instance_id: self.needs(profile, r, device) for r in requests}
        # The most demanding first (most GPUs, then node resources asked for), so the instances that fit
        # few nodes get them before the ones that fit anywhere take their room.
        for request in sorted(requests, key=lambda r: _demand(needs_of[r.instance.instance_id])):
            needs = needs_of[request.instance.instance_id]
            node = self._pick(nodes, free, needs, request.instance.instance_id)
            for key, value in needs.items():
                free[node.id][key] -= value
            chosen[request.instance.instance_id] = (node, needs)
        cores_by_instance = self._cores(profile, device, requests, chosen)
        return {
            instance_id: Assignment(
                instance_id=instance_id,
                node=node.address,
                node_id=node.id,
                needs=needs,
                cpu_cores=cores_by_instance.get(instance_id, []),
            )
            for instance_id, (node, needs) in chosen.items()
        }

    def _needs_only(self, profile: ClusterProfile, request: PlacementRequest, device: DeviceMode) -> Assignment:
        return Assignment(instance_id=request.instance.instance_id, needs=self.needs(profile, request, device))

    def _pick(self, nodes: list[RayNode], free: dict[str, dict[str, float]], needs: dict[str, float], who: str):
        fitting = [n for n in nodes if all(free[n.id].get(k, 0.0) >= v - 1e-9 for k, v in needs.items())]
        if fitting:
            primary = "GPU" if needs.get("GPU") else "CPU"
            return max(fitting, key=lambda n: free[n.id].get(primary, 0.0))  # spread; ties: Ray's node order
        raise PlacementError(self._no_room(nodes, needs, who))

    def _no_room(self, nodes: list[RayNode], needs: dict[str, float], who: str) -> str:
        gpus = needs.get("GPU", 0)
        largest = max((n.resources.get("GPU", 0.0) for n in nodes), default=0.0)
        if gpus > largest:
            return (
                f"instance {who} needs {describe_needs({'GPU': gpus})} on one node; "
                f"the largest Ray node has {largest:g}"
            )
        custom = [k for k in needs if k not in DEVICE_RESOURCES and not any(k in n.resources for n in nodes)]
        if custom:
            return f"instance {who} asks for node resource {', '.join(custom)}, which no Ray node has"
        return f"no Ray node with {describe_needs(needs, free=True)} for {who} ({len(nodes)} nodes alive)"

    def _cores(
        self,
        profile: ClusterProfile,
        device: DeviceMode,
        requests: list[PlacementRequest],
        chosen: dict[str, tuple[RayNode, dict[str, float]]],
    ) -> dict[str, list[int]]:
        """On CPU nodes, each node's cores split between the instances placed on it (as on one host)."""
        if device != "cpu" or not engine_adapter(profile.engine.kind).uses_devices or not chosen:
            return {}
        on_node: dict[str, list[PlacementRequest]] = defaultdict(list)
        for request in requests:
            on_node[chosen[request.instance.instance_id][0].id].append(request)
        node_cores = self._node_cores(list(on_node))
        return {
            a.instance_id: a.cpu_cores
            for node_id, placed in on_node.items()
            for a in place_on_cpus(placed, node_cores[node_id])
        }

    def _node_cores(self, node_ids: list[str]) -> dict[str, list[int]]:
        """Each node's cores, asked once per node: a node's cores do not change while it lives."""
        unknown = [n for n in node_ids if n not in self._cores_of]
        if unknown:
            found = self._on_each(unknown, ray_node.probe, "", [], [], [])
            self._cores_of.update({node_id: result["cores"] for node_id, result in found.items()})
        return {node_id: self._cores_of[node_id] for node_id in node_ids}

    def place_added(self, profile: ClusterProfile, request: PlacementRequest, plan: Plan) -> Assignment:
        nodes = self.nodes()
        free = {node.id: dict(node.resources) for node in nodes}
        for held in plan.launched:
            for key, value in held.needs.items():
                if held.node_id in free:
                    free[held.node_id][key] = free[held.node_id].get(key, 0.0) - value
        needs = self.needs(profile, request, plan.device)
        try:
            node = self._pick(nodes, free, needs, request.instance.instance_id)
        except PlacementError:
            self._ask_autoscaler(needs)
            raise PlacementError(f"no Ray node with {describe_needs(needs, free=True)}") from None
        cores: list[int] = []
        if plan.device == "cpu" and engine_adapter(profile.engine.kind).uses_devices:
            node_cores = self._node_cores([node.id])[node.id]
            cores = cores_for_added(node_cores, [i.cpu_cores for i in plan.launched if i.node_id == node.id])
        return Assignment(
            instance_id=request.instance.instance_id, node=node.address, node_id=node.id, needs=needs, cpu_cores=cores
        )

    def _ask_autoscaler(self, needs: dict[str, float]) -> None:
        """Where Ray's autoscaler runs, a standing request for the bundle brings a node that has it."""
        with contextlib.suppress(Exception):  # no autoscaler, or an old one: the placement stays blocked
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=[needs])

    def free_port(self, where: Assignment, start: int, used: set[int]) -> int:
        # Checked on the node when the engine starts (the actor names the holder of a taken port).
        return next(port for port in range(start, 65535) if port not in used)

    def lost(self, planned: PlannedInstance) -> str | None:
        if planned.node_id is None or planned.node_id in {node.id for node in self.nodes()}:
            return None
        return f"its Ray node {planned.node} is gone"

    # ---- starting ----------------------------------------------------------------------------------------

    def preflight(self, profile: ClusterProfile, plan: Plan) -> None:
        """On every node that will run an instance: the engine program, the model and the ports."""
        launched = plan.launched
        if not launched:
            return
        self.connect()
        model = self._model_path(profile, plan)
        by_node: dict[str, list[PlannedInstance]] = defaultdict(list)
        for instance in launched:
            by_node[instance.node_id or ""].append(instance)
        problems: list[str] = []
        for node_id, instances in by_node.items():
            programs = sorted({i.argv[0] for i in instances if i.argv})
            ports = [p for i in instances for p in (i.port, i.nixl_side_channel_port) if p]
            found = self.connect().get(
                self._on(node_id, ray_node.probe, instances[0].host, programs, [model] if model else [], ports),
                timeout=CALL_TIMEOUT_S,
            )
            problems += _node_problems(found, profile, model)
        if problems:
            raise ClusterError("cannot start on the Ray cluster: " + "; ".join(problems))

    def _model_path(self, profile: ClusterProfile, plan: Plan) -> str | None:
        """The model directory every node needs; the builtin model is written here and copied to them."""
        if engine_adapter(profile.engine.kind).runtime is None:
            return None
        if profile.model.is_builtin_tiny:
            self._copy_builtin_model(plan)
            return None
        path = profile.model.path
        return path if path.startswith(("/", "./", "../", "~")) else None  # a hub id: vLLM fetches it

    def _copy_builtin_model(self, plan: Plan) -> None:
        model_dir = Path(plan.model_path)
        if not tinymodel.is_complete(model_dir):
            python = Path(plan.engine_python) if plan.engine_python else None
            try:
                tinymodel.write_tiny_model(model_dir, python=python)
            except ClusterError as error:
                raise ClusterError(
                    f"the builtin model is written with the engine runtime of the host that runs `up`: {error}"
                ) from None
            except Exception as error:  # the runtime's own failure: say which model could not be written
                raise ClusterError(f"writing the builtin model in {model_dir} failed: {error}") from None
        files = {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()}
        node_ids = sorted({i.node_id for i in plan.launched if i.node_id})
        self._on_each(node_ids, ray_node.write_files, str(model_dir), files)

    def start(self, planned: PlannedInstance, env: dict[str, str], log_path: Path, cwd: Path) -> InstanceHandle:
        ray = self.connect()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        needs = dict(planned.needs)
        name = f"{planned.id}-{uuid.uuid4().hex[:8]}"
        actor = (
            ray.remote(ray_node.EngineHost)
            .options(
                name=name,
                namespace=self.namespace,
                lifetime="detached",
                max_concurrency=4,  # wait() blocks for the engine's life; stop and read_log run beside it
                num_cpus=needs.pop("CPU", 0.0),
                num_gpus=needs.pop("GPU", 0.0),
                resources=needs,
                scheduling_strategy=NodeAffinitySchedulingStrategy(planned.node_id, soft=False),
            )
            .remote(f"{self.namespace}/{name}.log")
        )
        ports = [p for p in (planned.port, planned.nixl_side_channel_port) if p]
        try:
            info = ray.get(actor.start.remote(planned.argv, env, planned.host, ports), timeout=PLACE_TIMEOUT_S)
        except (ray.exceptions.RayError, TimeoutError) as error:
            with contextlib.suppress(ray.exceptions.RayError):
                ray.kill(actor)
            raise LaunchError(f"on Ray node {planned.node}: {_reason(error)}") from None
        record = ProcessRecord(
            pid=info["pid"],
            create_time=info["create_time"],
            cmdline=planned.argv,
            pgid=info["pgid"],
            node=planned.node,
            handle=name,
        )
        return RayHandle(ray, actor, record, log_path)

    def adopt(self, planned: PlannedInstance, record: ProcessRecord, log_path: Path) -> InstanceHandle | None:
        ray = self.connect()
        try:
            actor = ray.get_actor(record.handle, namespace=self.namespace)
            # What the engine wrote while no daemon copied it stays on its node; copying goes on from here.
            size = ray.get(actor.log_size.remote(), timeout=CALL_TIMEOUT_S)
        except (ValueError, ray.exceptions.RayError, TimeoutError):
            return None
        return RayHandle(ray, actor, record, log_path, log_offset=size)

    # ---- cleaning ----------------------------------------------------------------------------------------

    def sweep(self, records: list[ProcessRecord], grace_s: float) -> SweepReport:
        report = SweepReport()
        try:
            ray = self.connect()
        except UsageError:
            return report  # leftovers() says the nodes could not be checked
        actors = self._actors()
        stops = [actor.stop.remote(grace_s) for actor in actors]
        for stop in stops:
            with contextlib.suppress(ray.exceptions.RayError, TimeoutError):
                report.stopped += ray.get(stop, timeout=grace_s + CALL_TIMEOUT_S)
        for actor in actors:
            with contextlib.suppress(ray.exceptions.RayError):
                ray.kill(actor)
        groups = _groups(records)
        for pids in self._on_each_node(ray_node.stop_processes, self.token, groups, grace_s).values():
            report.killed += [pid for pid in pids if pid not in report.stopped]
        local = LocalLauncher(self.spec, self.cluster, self.token).sweep([], grace_s)  # `up`'s host is a node too
        report.stopped += local.stopped
        report.killed += local.killed
        return report

    def leftovers(self, records: list[ProcessRecord]) -> list[str]:
        try:
            self.connect()
        except UsageError as error:
            return [f"{error}: engines on its nodes could not be checked"]
        left = [f"Ray actor {name}" for name in self._actor_names()]
        for node, pids in self._on_each_node(ray_node.cluster_processes, self.token, _groups(records)).items():
            left += [f"pid {pid} on {node}" for pid in pids]
        return left + LocalLauncher(self.spec, self.cluster, self.token).leftovers([])

    def _actor_names(self) -> list[str]:
        named = self.connect().util.list_named_actors(all_namespaces=True)
        return [entry["name"] for entry in named if entry["namespace"] == self.namespace]

    def _actors(self) -> list[Any]:
        ray = self.connect()
        found = []
        for name in self._actor_names():
            with contextlib.suppress(ValueError):
                found.append(ray.get_actor(name, namespace=self.namespace))
        return found

    def _on_each_node(self, function: Any, *args: Any) -> dict[str, Any]:
        nodes = {node.id: node.address for node in self.nodes()}
        return {nodes[node_id]: result for node_id, result in self._on_each(list(nodes), function, *args).items()}


def _demand(needs: dict[str, float]) -> tuple[float, int]:
    return -needs.get("GPU", 0.0), -sum(1 for k in needs if k not in DEVICE_RESOURCES)


def _groups(records: list[ProcessRecord]) -> list[tuple[int, float]]:
    return [(r.pgid, r.create_time) for r in records if r.pgid is not None]


def _node_problems(found: dict[str, Any], profile: ClusterProfile, model: str | None) -> list[str]:
    node = found["address"]
    problems = []
    engine_runtime = engine_adapter(profile.engine.kind).runtime
    fix = engine_runtime.missing_fix if engine_runtime else "install pdctl there"
    for program in found["missing_programs"]:
        problems.append(f"Ray node {node} has no engine runtime: {program} does not exist there ({fix})")
    problems += [f"Ray node {node} has no {path} (model.path)" for path in found["missing_paths"]]
    problems += [f"port {port} on Ray node {node} cannot be bound: {why}" for port, why in found["taken_ports"]]
    return problems


def _reason(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return f"its actor was not placed within {PLACE_TIMEOUT_S:g} s (the node's resources are taken)"
    cause = getattr(error, "cause", None) or error
    text = str(cause).strip().splitlines()
    return text[-1] if text else type(error).__name__
