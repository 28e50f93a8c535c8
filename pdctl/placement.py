"""Placement: which devices each launched instance gets. Pure: an inventory in, assignments out."""

from __future__ import annotations

import os
from collections import Counter
from typing import Literal

from pydantic import BaseModel, Field

from pdctl.errors import PlacementError
from pdctl.gpus import Gpu, GpuInventory
from pdctl.types import ExecutionInstance, ExecutionInstanceType

DeviceMode = Literal["cuda", "cpu"]

ROLE_NOUN = {
    ExecutionInstanceType.PREFILLING: "prefill",
    ExecutionInstanceType.DECODING: "decode",
    ExecutionInstanceType.HYBRID: "hybrid",
}


class GpuSlot(BaseModel):
    index: int
    uuid: str
    name: str


class Assignment(BaseModel):
    instance_id: str
    gpus: list[GpuSlot] = Field(default_factory=list)
    cpu_cores: list[int] = Field(default_factory=list)
    # On a launcher with several nodes: the node chosen (its address, which the engine binds) and what the
    # instance asks of whichever node runs it, in the launcher's words ("1 GPU", "1 CPU, decode_node").
    node: str | None = None
    node_id: str | None = None
    needs: dict[str, float] = Field(default_factory=dict)


class PlacementRequest(BaseModel):
    """One launched instance's need: how many GPUs and which share of each GPU's memory its engine takes."""

    instance: ExecutionInstance
    memory_fraction: float


def choose_device_mode(requested: Literal["auto", "cuda", "cpu"], inventory: GpuInventory) -> DeviceMode:
    if requested == "cpu":
        return "cpu"
    if inventory.gpus:
        return "cuda"
    if requested == "cuda":
        raise PlacementError(f"device: cuda, but no GPU is usable here ({inventory.unavailable_reason})")
    return "cpu"


def place_on_gpus(requests: list[PlacementRequest], inventory: GpuInventory, force: bool = False) -> list[Assignment]:
    """Give each instance gpu_count distinct GPUs, largest instances first, free GPUs before busy ones."""
    needed = sum(request.instance.gpu_count or 1 for request in requests)
    if needed > len(inventory.gpus):
        raise PlacementError(
            f"the profile needs {needed} GPUs: {_need_summary(requests)}; this host has {len(inventory.gpus)}"
        )
    free = sorted(inventory.gpus, key=lambda gpu: (bool(gpu.processes), -gpu.memory_free_mib, gpu.index))
    taken: set[int] = set()
    by_id: dict[str, Assignment] = {}
    for request in sorted(requests, key=lambda r: -(r.instance.gpu_count or 1)):
        usable = [gpu for gpu in free if gpu.index not in taken and (force or gpu.fits(request.memory_fraction))]
        count = request.instance.gpu_count or 1
        if len(usable) < count:
            raise PlacementError(_busy_message(request, inventory, taken))
        chosen = sorted(usable[:count], key=lambda gpu: gpu.index)
        taken.update(gpu.index for gpu in chosen)
        by_id[request.instance.instance_id] = Assignment(
            instance_id=request.instance.instance_id,
            gpus=[GpuSlot(index=gpu.index, uuid=gpu.uuid, name=gpu.name) for gpu in chosen],
        )
    return [by_id[request.instance.instance_id] for request in requests]


def _need_summary(requests: list[PlacementRequest]) -> str:
    groups: Counter[tuple[str, int]] = Counter()
    for request in requests:
        groups[(ROLE_NOUN[request.instance.instance_type], request.instance.gpu_count or 1)] += 1
    return " + ".join(f"{count} {role} x {size}" for (role, size), count in groups.items())


def _busy_message(request: PlacementRequest, inventory: GpuInventory, taken: set[int]) -> str:
    busy = [gpu for gpu in inventory.gpus if gpu.index not in taken and not gpu.fits(request.memory_fraction)]
    held = "; ".join(_describe_busy(gpu) for gpu in busy) or "none"
    return (
        f"instance {request.instance.instance_id} needs {request.instance.gpu_count} GPU(s) with "
        f"{request.memory_fraction:.0%} of their memory free; GPUs already filled by other processes: {held}. "
        "Free them, lower the memory fraction, or pass --force"
    )


def _describe_busy(gpu: Gpu) -> str:
    owners = ", ".join(f"pid {p.pid} {p.name or '?'}" for p in gpu.processes) or "unknown processes"
    return f"GPU {gpu.index} ({gpu.memory_free_mib / 1024:.1f} of {gpu.memory_total_mib / 1024:.1f} GiB free: {owners})"


def available_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def place_on_cpus(requests: list[PlacementRequest], cores: list[int]) -> list[Assignment]:
    """Split the cores into equal contiguous slices, one per instance (vLLM's CPU backend binds OMP threads)."""
    if not requests:
        return []
    if len(cores) < len(requests):
        # Fewer cores than instances: share them round-robin rather than refuse (a laptop, a CI box).
        return [
            Assignment(instance_id=r.instance.instance_id, cpu_cores=[cores[i % len(cores)]])
            for i, r in enumerate(requests)
        ]
    share = len(cores) // len(requests)
    return [
        Assignment(instance_id=r.instance.instance_id, cpu_cores=cores[i * share : (i + 1) * share])
        for i, r in enumerate(requests)
    ]


def place_added_on_gpus(request: PlacementRequest, inventory: GpuInventory, taken: set[int]) -> Assignment:
    """GPUs for one instance added to a running cluster: only GPUs no instance of the cluster holds."""
    count = request.instance.gpu_count or 1
    free = [gpu for gpu in inventory.gpus if gpu.index not in taken]
    fitting = [gpu for gpu in free if gpu.fits(request.memory_fraction)]
    if len(fitting) < count:
        busy = "; ".join(_describe_busy(gpu) for gpu in free if not gpu.fits(request.memory_fraction))
        raise PlacementError(
            f"no free GPU for {request.instance.instance_id}: it needs {count}, {len(fitting)} of "
            f"{len(inventory.gpus)} are free ({len(taken)} held by the cluster"
            + (f"; filled by other processes: {busy}" if busy else "")
            + ")"
        )
    return place_on_gpus([request], GpuInventory(gpus=fitting))[0]


def cores_for_added(cores: list[int], held: list[list[int]]) -> list[int]:
    """Cores for one instance added on the CPU: the slice the fewest instances bind, shared with them (the
    first instances split every core between them, so an added one shares rather than goes without)."""
    if not held:
        return list(cores)
    use = Counter(core for slice_ in held for core in slice_)
    return min(held, key=lambda slice_: (sum(use[core] for core in slice_) / max(1, len(slice_)), slice_))


# Node resources a launcher that places by resources counts (GPUs first); any other is a node resource by name.
DEVICE_RESOURCES = ("GPU", "CPU")


def describe_needs(needs: dict[str, float], free: bool = False) -> str:
    """{"GPU": 4} -> "4 GPUs"; {"CPU": 1, "decode_node": 1} -> "1 CPU, decode_node", or with free,
    "1 free CPU and decode_node" (what no node has room for)."""
    adjective = "free " if free else ""
    parts = [
        f"{_count(needs[k])} {adjective}{k}{'s' if needs[k] != 1 else ''}" for k in DEVICE_RESOURCES if needs.get(k)
    ]
    parts += [k if v == 1 else f"{_count(v)} {k}" for k, v in sorted(needs.items()) if k not in DEVICE_RESOURCES]
    return (" and " if free else ", ").join(parts) or ("room" if free else "nothing")


def _count(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"
