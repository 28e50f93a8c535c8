"""`pdctl calibrate`: measure the machine it runs on and fit a named hardware profile to it, recording the machine
and the fidelity of the profile on its own held-out runs.

On a CPU host: real vLLM CPU measurements of the builtin tiny model (pdctl.simulate.cpumeasure), fitted by
pdctl.simulate.cpufit; each measurement's validation runs are not in the fit and are its check. The full mode
pools eight measurements: 11 minutes on the 2-core AMD EPYC here (about 26 where cpu-local was measured), and
47 of the 48 median figures within 10 %, median error 4.3 %, where real against real kept 29, 7.1 %.
`--quick` cuts the validation runs and takes two measurements where they fit its budget, one where they do
not (156 s here): a first profile, and a check that the machine is the one measured.

On a GPU host: pdctl/perfmodel/measure_gpu.py (GEMMs, attention, bandwidth, whole layers, all-reduce on two
GPUs or more) in a Python that has PyTorch, fitted by pdctl.perfmodel.calibrate; the whole layers are its check.
What one GPU cannot measure (the engine's per-step overhead, the PD link, and the all-reduce on one GPU) is
h100-sxm's, and the profile's notes say so."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pdctl.engines import runtime
from pdctl.errors import PdctlError, UsageError
from pdctl.gpus import discover
from pdctl.perfmodel import calibrate as gpufit
from pdctl.perfmodel.arch import DATA
from pdctl.perfmodel.hardware import (
    Fidelity,
    HardwareProfile,
    Machine,
    get_hardware,
    shipped_hardware,
    user_hardware_dir,
)
from pdctl.perfmodel.machine import this_cpu
from pdctl.simulate import cpufit, cpumeasure

DEFAULT_NAME = "calibrated"
FULL_MEASUREMENTS = 8
# --quick measures twice where two fit in this many seconds, else once. Two give the check its floor (real
# against real), which one cannot: on a shared 2-core machine one measurement's own speed drifts by 20 % and
# more, and its check with it. About 80 s a measurement on the 2-core AMD EPYC here, 170 s where cpu-local
# was measured.
QUICK_BUDGET_S = 200.0
QUICK_MEASUREMENTS = 2
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
GPU_BASE = "h100-sxm"  # what a GPU host cannot measure comes from here
Progress = Callable[[str], None]


class CalibrationError(PdctlError):
    """The GPU measurement failed."""


@dataclass(frozen=True)
class Request:
    name: str = DEFAULT_NAME
    quick: bool = False
    measurements: int | None = None  # CPU: real vLLM measurements pooled (FULL_MEASUREMENTS; quick: 2 or 1)
    device: str = "auto"  # auto (GPU where NVML sees one), cpu or gpu
    out: Path | None = None  # default: user_hardware_dir() / NAME.json
    runs_out: Path | None = None  # CPU: also write the raw measurements here
    from_runs: Path | None = None  # CPU: fit these raw measurements instead of measuring


@dataclass
class Calibrated:
    profile: HardwareProfile
    path: Path
    wall_s: float


def calibrate(request: Request, progress: Progress) -> Calibrated:
    started = time.monotonic()
    path = target_path(request)
    gpu = _on_gpu(request.device) and request.from_runs is None
    profile = _gpu(request, progress) if gpu else _cpu(request, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(profile.model_dump_json(indent=1) + "\n")
    return Calibrated(profile, path, time.monotonic() - started)


def target_path(request: Request) -> Path:
    """Where the profile goes, checked before anything is measured."""
    if not NAME.match(request.name):
        raise UsageError(f"profile name {request.name!r}: letters, digits, '.', '_' and '-' only")
    if request.out is not None:
        return request.out
    if request.name in shipped_hardware():
        raise UsageError(f"{request.name!r} is a shipped hardware profile: give the calibrated one another name")
    return user_hardware_dir() / f"{request.name}.json"


def _on_gpu(device: str) -> bool:
    if device not in ("auto", "cpu", "gpu"):
        raise UsageError(f"--device {device!r}: choose auto, cpu or gpu")
    return device == "gpu" or (device == "auto" and bool(discover().gpus))


# -- CPU -----------------------------------------------------------------------------------------------------


def cpu_machine(source: str) -> Machine:
    """This machine's CPU, with the engine runtime's vLLM version."""
    info = runtime.find_runtime()
    return this_cpu().model_copy(update={"vllm": info.vllm_version if info else None, "source": source})


def _cpu(request: Request, progress: Progress) -> HardwareProfile:
    runs = _read_runs(request.from_runs) if request.from_runs else _measure_cpu(request, progress)
    if request.runs_out:
        cpumeasure.write_runs(request.runs_out, runs)
    quick = runs.get("validation") == "quick"
    machine = Machine.model_validate(runs["machine"]) if runs.get("machine") else None
    description = (f"{machine.describe() if machine else 'a CPU'}, one core per instance, serving the builtin tiny "
                   "model on vLLM's CPU build: fitted by pdctl calibrate" + (" --quick" if quick else ""))  # fmt: skip
    source = request.from_runs.name if request.from_runs else "pdctl calibrate's runs"
    validation = cpufit.QUICK_VALIDATION if quick else cpufit.VALIDATION
    progress("fitting the engine model and checking it on the validation runs")
    return cpufit.calibrated_profile(runs, request.name, description, source, validation)


def _measure_cpu(request: Request, progress: Progress) -> dict[str, Any]:
    if runtime.find_runtime() is None:
        raise UsageError(runtime.missing_message(None))
    count = request.measurements or (QUICK_MEASUREMENTS if request.quick else FULL_MEASUREMENTS)
    how = "pdctl calibrate" + (" --quick" if request.quick else "")
    runs: dict[str, Any] = {"machine": cpu_machine(how).model_dump(exclude_none=True),
                            "validation": "quick" if request.quick else "full", "measurements": []}  # fmt: skip
    validation = cpufit.QUICK_VALIDATION if request.quick else cpufit.VALIDATION
    started = time.monotonic()
    for index in range(count):
        progress(f"measurement {index + 1} of {count}: starting a real vLLM CPU instance")
        runs["measurements"].append(cpumeasure.measure(how, validation, progress))
        budgeted = request.quick and request.measurements is None and index + 1 < count
        if budgeted and not another_fits(time.monotonic() - started, index + 1):
            progress(f"one more measurement would take --quick past {QUICK_BUDGET_S:.0f} s: fitting {index + 1}")
            break
    return runs


def another_fits(elapsed_s: float, done: int, budget_s: float = QUICK_BUDGET_S) -> bool:
    """Whether one more measurement, as long as the ones so far, ends within the budget."""
    return elapsed_s + elapsed_s / done <= budget_s


def _read_runs(path: Path) -> dict[str, Any]:
    try:
        runs = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UsageError(f"--from-runs {path}: {error}") from None
    if not isinstance(runs, dict) or not runs.get("measurements"):
        raise UsageError(f"--from-runs {path}: no measurements (write them with `pdctl calibrate --runs FILE`)")
    return runs


# -- GPU -----------------------------------------------------------------------------------------------------


def _gpu(request: Request, progress: Progress) -> HardwareProfile:
    python = torch_python()
    script = importlib.util.find_spec("pdctl.perfmodel.measure_gpu")
    assert script is not None and script.origin is not None
    with tempfile.TemporaryDirectory() as tmp:
        raw_path = Path(tmp) / "raw.json"
        argv = [str(python), script.origin, "--models", str(DATA / "models.json"), "--out", str(raw_path)]
        _run_streamed(argv + (["--quick"] if request.quick else []), progress)
        raw = json.loads(raw_path.read_text())
    base = get_hardware(GPU_BASE)
    notes = [f"per-step overhead, PD link and pipeline link: {GPU_BASE}'s (one host, no vLLM in the measurement)"]
    if not raw.get("nccl"):
        notes.append(f"all-reduce: {GPU_BASE}'s (one GPU here: nothing to measure it between)")
    links, notes = gpufit.with_collectives(
        raw, {"allreduce": base.allreduce, "pipeline": base.pipeline, "kv_transfer": base.kv_transfer}, notes
    )
    info = runtime.find_runtime(runtime.runtime_python(runtime.default_runtime_dir("cuda")))
    progress("fitting the GEMM, attention and elementwise curves and checking them on whole layers")
    return gpufit.fit_profile(raw, request.name, f"{raw['info'].get('name', 'GPU')}, bf16: fitted by pdctl calibrate"
                              + (" --quick" if request.quick else ""), links, base.overhead, notes,
                              info.vllm_version if info else None)  # fmt: skip


def torch_python() -> Path:
    """A Python that imports PyTorch: this one, else the CUDA engine runtime's (vLLM brings it)."""
    if importlib.util.find_spec("torch") is not None:
        return Path(sys.executable)
    engine = runtime.runtime_python(runtime.default_runtime_dir("cuda"))
    if engine.exists():
        return engine
    raise UsageError(
        f"calibrating a GPU needs PyTorch: none in {sys.executable}, and no CUDA engine runtime at {engine} "
        "(`pdctl engine install --build cuda` makes one)"
    )


def _run_streamed(argv: list[str], progress: Progress) -> None:
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process:
        assert process.stdout is not None
        last: list[str] = []
        for line in process.stdout:
            progress(line.rstrip())
            last = [*last[-19:], line.rstrip()]
    if process.returncode != 0:
        raise CalibrationError(f"{' '.join(argv[:2])} exited with {process.returncode}:\n" + "\n".join(last))


# -- the report ----------------------------------------------------------------------------------------------

UNITS = {"output_throughput": (1.0, "tok/s"), "layer_s": (1e6, "us")}  # the rest: seconds, shown in ms


def render_fidelity(fidelity: Fidelity) -> str:
    """One row per held-out run: each figure real / modelled (error)."""
    rows: dict[str, dict[str, str]] = defaultdict(dict)
    for f in fidelity.figures:
        scale, _ = UNITS.get(f.figure, (1000.0, "ms"))
        rows[f.run][f.figure] = f"{f.real * scale:.1f} / {f.modelled * scale:.1f} ({f.error * 100:+.0f} %)"
    keys = list(dict.fromkeys(f.figure for f in fidelity.figures))
    lines = ["| run | " + " | ".join(keys) + " |", "| --- |" + " --- |" * len(keys)]
    lines += [f"| {run} | " + " | ".join(cells.get(k, "") for k in keys) + " |" for run, cells in rows.items()]
    units = [f"{key} in {UNITS[key][1]}" for key in keys if key in UNITS]
    units += ["times in ms"] if any(key not in UNITS for key in keys) else []
    return "\n".join([*lines, "", f"real / modelled (error); {', '.join(units)}.", fidelity.summary()])


def report(result: Calibrated) -> str:
    profile = result.profile
    lines = [render_fidelity(profile.fidelity)] if profile.fidelity else []
    machine = profile.measured.machine
    lines.append(f"measured on {machine.describe() if machine else 'a machine not recorded'}")
    lines.append(f"wrote {result.path} in {result.wall_s:.0f} s: use it with --hardware {_use_name(result)} or "
                 f"engine.sim.hardware: {_use_name(result)}")  # fmt: skip
    return "\n".join(lines)


def _use_name(result: Calibrated) -> str:
    """The profile's name where a lookup by name finds this file, else its path."""
    by_name = user_hardware_dir() / f"{result.profile.name}.json"
    return result.profile.name if result.path == by_name else str(result.path)
