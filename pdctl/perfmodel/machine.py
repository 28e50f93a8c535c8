"""The machine a hardware profile is used on, against the one it was measured on.

A profile's timings are one machine's: cpu-local, fitted on a 2-core AVX-512 machine, ran 3.4 times slow on
one with AMX. So a profile used on a visibly different machine (another CPU model or instruction sets for a
CPU profile, another GPU for a GPU profile on a host that has GPUs) is named in one line, with how to measure
this one. A GPU profile used where there is no GPU is the simulator's purpose (sizing GPUs not bought), so it
says nothing there."""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

from pdctl.gpus import GpuSource, discover
from pdctl.perfmodel.hardware import HardwareProfile, Machine, get_hardware

# Instruction sets that change how fast vLLM's CPU kernels run (oneDNN and its own kernels pick by them).
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "avx_vnni", "amx_bf16", "amx_int8",
             "amx_tile")  # fmt: skip
CPUINFO = Path("/proc/cpuinfo")


def cpu_of(cpuinfo: str) -> tuple[str | None, list[str] | None]:
    """(model name, the ISA_FLAGS it has) from /proc/cpuinfo's text; None where it says nothing (not Linux x86)."""
    model = flags = None
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key == "flags" and flags is None:
            have = set(value.split())
            flags = [flag for flag in ISA_FLAGS if flag in have]
    return model, flags


def this_cpu() -> Machine:
    try:
        text = CPUINFO.read_text()
    except OSError:
        text = ""
    model, flags = cpu_of(text)
    return Machine(cpu=model, cpu_flags=flags, cores=len(os.sched_getaffinity(0)))


def this_machine(source: GpuSource | None = None, **versions: str | None) -> Machine:
    """This machine's CPU and GPUs (as NVML sees them), with the software versions the caller knows."""
    inventory = discover(source)
    gpu = inventory.gpus[0].name if inventory.gpus else None
    driver = inventory.driver_version if gpu else None
    return this_cpu().model_copy(update={"gpu": gpu, "gpus": len(inventory.gpus), "driver": driver, **versions})


def differences(recorded: Machine, here: Machine) -> list[str]:
    """What visibly differs, in words; only what both record is compared."""
    if recorded.gpu:
        return [f"this one has {here.gpu}"] if here.gpu and here.gpu != recorded.gpu else []
    if recorded.cpu is None and recorded.cpu_flags is None:
        return [f"this one is {here.cpu or 'a CPU it cannot be told from'}"]  # nothing says it is the same
    found = []
    if recorded.cpu and here.cpu and recorded.cpu != here.cpu:
        found.append(f"this one is {here.cpu}")
    if recorded.cpu_flags is not None and here.cpu_flags is not None:
        more = [f for f in here.cpu_flags if f not in recorded.cpu_flags]
        fewer = [f for f in recorded.cpu_flags if f not in here.cpu_flags]
        found += [f"this one has {', '.join(more)}"] if more else []
        found += [f"this one lacks {', '.join(fewer)}"] if fewer else []
    return found


def machine_note(hardware: HardwareProfile, source: GpuSource | None = None) -> str | None:
    """One line when `hardware` was measured on a visibly different machine than this one, else None."""
    recorded = hardware.measured.machine
    if recorded is None:
        return None
    here = this_machine(source) if recorded.gpu else this_cpu()
    found = differences(recorded, here)
    if not found:
        return None
    return (
        f"hardware profile {hardware.name} was measured on {recorded.describe()}; {'; '.join(found)}: its "
        "timings may not hold here. `pdctl calibrate NAME` measures this machine (then --hardware NAME)"
    )


@cache
def note_for(name: str) -> str | None:
    """machine_note of a profile by name, once per process (plan asks for each instance)."""
    return machine_note(get_hardware(name))
