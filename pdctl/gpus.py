"""GPU discovery: one small adapter over NVML, the only seam tests replace.

No driver, no library or no GPU is the normal CPU case, reported in `GpuInventory.unavailable_reason`,
never an exception. CUDA_VISIBLE_DEVICES is honoured (indices or UUIDs), so pdctl sees what CUDA will.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import psutil
from pydantic import BaseModel, Field, ValidationError

from pdctl.errors import UsageError

MIB = 1024 * 1024


class GpuProcess(BaseModel):
    pid: int
    used_memory_mib: float | None = None
    name: str | None = None


class Gpu(BaseModel):
    index: int = Field(description="NVML index (PCI bus order)")
    name: str
    uuid: str
    pci_bus_id: str | None = None
    memory_total_mib: float
    memory_used_mib: float
    memory_free_mib: float
    utilization_percent: float | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    processes: list[GpuProcess] = Field(default_factory=list)

    def fits(self, memory_fraction: float) -> bool:
        """Whether an engine that takes `memory_fraction` of the whole memory can start here (as vLLM checks)."""
        return self.memory_free_mib >= memory_fraction * self.memory_total_mib


class GpuInventory(BaseModel):
    driver_version: str | None = None
    gpus: list[Gpu] = Field(default_factory=list)
    unavailable_reason: str | None = Field(None, description="why no GPU is seen (no driver, none visible)")


class GpuSource(Protocol):
    def inventory(self) -> GpuInventory: ...


class NvmlGpuSource:
    """Reads every GPU through NVML (the nvidia-ml-py package, imported as pynvml)."""

    def inventory(self) -> GpuInventory:
        try:
            import pynvml
        except ImportError:
            return GpuInventory(unavailable_reason="nvidia-ml-py is not installed")
        try:
            with _nvml(pynvml):
                driver = _text(pynvml.nvmlSystemGetDriverVersion())
                count = pynvml.nvmlDeviceGetCount()
                gpus = [_read_gpu(pynvml, index) for index in range(count)]
        except pynvml.NVMLError as error:
            return GpuInventory(unavailable_reason=f"NVML: {error}")
        inventory = GpuInventory(driver_version=driver, gpus=gpus)
        if not gpus:
            inventory.unavailable_reason = "NVML sees no GPU"
        return inventory


class FileGpuSource:
    """An inventory saved by `pdctl gpus --json`, to plan for a host other than this one."""

    def __init__(self, path: Path):
        self.path = path

    def inventory(self) -> GpuInventory:
        try:
            return GpuInventory.model_validate(json.loads(self.path.read_text()))
        except OSError as error:
            raise UsageError(f"{self.path}: cannot read the GPU inventory: {error.strerror or error}") from None
        except (ValueError, ValidationError) as error:
            raise UsageError(f"{self.path}: not a GPU inventory from `pdctl gpus --json`: {error}") from None


class StaticGpuSource:
    """A fixed list of GPUs: the seam for tests that need more GPUs than the host has."""

    def __init__(self, gpus: list[Gpu], driver_version: str = "fake"):
        self._inventory = GpuInventory(driver_version=driver_version, gpus=gpus)

    def inventory(self) -> GpuInventory:
        return self._inventory.model_copy(deep=True)


@contextmanager
def _nvml(pynvml: Any) -> Iterator[None]:
    pynvml.nvmlInit()
    try:
        yield
    finally:
        pynvml.nvmlShutdown()


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _optional(read: Callable[[], Any]) -> Any:
    # Some figures are NotSupported on some boards (or under MIG); the rest of the GPU is still useful.
    try:
        return read()
    except Exception:
        return None


def _read_gpu(pynvml: Any, index: int) -> Gpu:
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
    utilization = _optional(lambda: pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
    power_mw = _optional(lambda: pynvml.nvmlDeviceGetPowerUsage(handle))
    return Gpu(
        index=index,
        name=_text(pynvml.nvmlDeviceGetName(handle)),
        uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
        pci_bus_id=_optional(lambda: _text(pynvml.nvmlDeviceGetPciInfo(handle).busId)),
        memory_total_mib=memory.total / MIB,
        memory_used_mib=memory.used / MIB,
        memory_free_mib=memory.free / MIB,
        utilization_percent=utilization,
        temperature_c=_optional(lambda: pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)),
        power_w=power_mw / 1000 if power_mw is not None else None,
        processes=_read_processes(pynvml, handle),
    )


def _read_processes(pynvml: Any, handle: Any) -> list[GpuProcess]:
    found: dict[int, GpuProcess] = {}
    for query in (pynvml.nvmlDeviceGetComputeRunningProcesses, pynvml.nvmlDeviceGetGraphicsRunningProcesses):
        for process in _optional(lambda query=query: query(handle)) or []:
            used = process.usedGpuMemory
            found[process.pid] = GpuProcess(
                pid=process.pid,
                used_memory_mib=used / MIB if isinstance(used, int) and used >= 0 else None,
                name=_process_name(process.pid),
            )
    return list(found.values())


def _process_name(pid: int) -> str | None:
    try:
        return psutil.Process(pid).name()
    except (psutil.Error, OSError):
        return None  # another container's pid, or gone already


def visible_gpus(gpus: list[Gpu], cuda_visible_devices: str | None) -> list[Gpu]:
    """The GPUs CUDA would show under CUDA_VISIBLE_DEVICES, in its order (indices or UUID prefixes)."""
    if cuda_visible_devices is None:
        return gpus
    chosen: list[Gpu] = []
    for token in (part.strip() for part in cuda_visible_devices.split(",")):
        match = _match_visible(gpus, token)
        if match is None:
            break  # CUDA ignores everything after the first invalid entry
        if match not in chosen:
            chosen.append(match)
    return chosen


def _match_visible(gpus: list[Gpu], token: str) -> Gpu | None:
    if token.isdigit():
        return next((gpu for gpu in gpus if gpu.index == int(token)), None)
    if token.startswith("GPU-"):
        matches = [gpu for gpu in gpus if gpu.uuid.startswith(token)]
        return matches[0] if len(matches) == 1 else None
    return None


def discover(source: GpuSource | None = None, environ: dict[str, str] | None = None) -> GpuInventory:
    """This host's GPUs as CUDA would show them to pdctl's engines."""
    inventory = (source or NvmlGpuSource()).inventory()
    mask = (os.environ if environ is None else environ).get("CUDA_VISIBLE_DEVICES")
    if inventory.gpus and mask is not None:
        inventory.gpus = visible_gpus(inventory.gpus, mask)
        if not inventory.gpus:
            inventory.unavailable_reason = f"CUDA_VISIBLE_DEVICES={mask!r} hides every GPU"
    return inventory


class GpuUse(BaseModel):
    """What one owner's processes hold on one GPU, as NVML reports it."""

    index: int
    memory_mib: float
    pids: list[int]
    utilization_percent: float | None = None


def attribute(inventory: GpuInventory, pids_by_owner: dict[str, set[int]]) -> dict[str, list[GpuUse]]:
    """Each owner's GPU memory, from NVML's per-GPU process lists (matched by pid)."""
    uses: dict[str, list[GpuUse]] = {owner: [] for owner in pids_by_owner}
    for gpu in inventory.gpus:
        for owner, pids in pids_by_owner.items():
            mine = [p for p in gpu.processes if p.pid in pids]
            if mine:
                uses[owner].append(
                    GpuUse(
                        index=gpu.index,
                        memory_mib=sum(p.used_memory_mib or 0 for p in mine),
                        pids=sorted(p.pid for p in mine),
                        utilization_percent=gpu.utilization_percent,
                    )
                )
    return uses
