from __future__ import annotations

import json

import pytest

from pdctl.cluster import plan_profile
from pdctl.engines.commands import LaunchPrefix
from pdctl.errors import PlacementError
from pdctl.gpus import GpuInventory, StaticGpuSource
from pdctl.launchers.local import LocalLauncher
from pdctl.plan import MASK, make_plan
from pdctl.profile import load_profile
from tests.conftest import PROFILES, fake_gpu

MODULE_FORM = LaunchPrefix(argv=("/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"))
NO_GPU = GpuInventory(unavailable_reason="NVML: not found")


def plan_of(path, inventory=NO_GPU, prefix=MODULE_FORM, cores=(0, 1)):
    profile = load_profile(path)
    placer = LocalLauncher(profile.launcher, profile.name)
    return make_plan(profile, inventory, placer=placer, model_path="/models/m", launch_prefix=prefix, cores=list(cores))


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_local_profile_on_the_cpu():
    plan = plan_of(PROFILES / "local.yaml")
    assert plan.device == "cpu"
    prefill, decode = plan.instances
    assert (prefill.id, prefill.role.value, decode.id, decode.role.value) == (
        "prefill-0",
        "PREFILLING",
        "decode-0",
        "DECODING",
    )
    assert prefill.argv[:5] == [*MODULE_FORM.argv, "--model", "/models/m"]
    assert flag(prefill.argv, "--served-model-name") == "pdctl-tiny-llama"
    assert (flag(prefill.argv, "--host"), flag(prefill.argv, "--port")) == ("127.0.0.1", "8100")
    assert flag(decode.argv, "--port") == "8101"
    assert json.loads(flag(prefill.argv, "--kv-transfer-config")) == {
        "kv_connector": "NixlConnector",
        "kv_role": "kv_producer",
        "kv_buffer_device": "cpu",
        "kv_load_failure_policy": "recompute",
    }
    assert json.loads(flag(decode.argv, "--kv-transfer-config"))["kv_role"] == "kv_consumer"
    assert flag(prefill.argv, "--load-format") == "dummy"
    assert flag(prefill.argv, "--max-num-seqs") == "16" and flag(decode.argv, "--max-num-seqs") == "16"
    assert flag(prefill.argv, "--max-num-batched-tokens") == "2048"
    assert "--enable-chunked-prefill" in prefill.argv and "--enable-prefix-caching" in decode.argv
    assert flag(prefill.argv, "--scheduling-policy") == "priority"
    assert "--gpu-memory-utilization" not in prefill.argv  # the CPU backend sizes KV from VLLM_CPU_KVCACHE_SPACE
    assert prefill.env["VLLM_CPU_OMP_THREADS_BIND"] == "0" and decode.env["VLLM_CPU_OMP_THREADS_BIND"] == "1"
    assert prefill.env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert prefill.env["VLLM_NIXL_SIDE_CHANNEL_PORT"] != decode.env["VLLM_NIXL_SIDE_CHANNEL_PORT"]
    assert prefill.env["PDCTL_NIXL_PROGRESS_DELAY_US"] == decode.env["PDCTL_NIXL_PROGRESS_DELAY_US"] == "100"
    assert prefill.env["PDCTL_SHM_SPIN_US"] == decode.env["PDCTL_SHM_SPIN_US"] == "1000"
    assert prefill.env["PDCTL_KEEP_WORKER_CORES"] == decode.env["PDCTL_KEEP_WORKER_CORES"] == "1"
    assert (prefill.cpu_cores, decode.cpu_cores) == ([0], [1])
    assert (prefill.affinity, decode.affinity) == ([], [])  # cpu.pin_processes is off unless asked


def test_gpu_profile_maps_every_knob(write_profile):
    path = write_profile(
        "name: g\nmodel: {path: meta-llama/Llama-2-70b, served_name: llama}\n"
        "router: {scheduling_policy: fifo}\n"
        "pd: {kv_cache_memory_fraction: 0.8}\n"
        "prefill: {tensor_parallel_size: 4, target_batch_size: 32, enable_chunked_prefill: false, "
        "max_chunk_size_tokens: 8192}\n"
        "decode: {enable_prefix_caching: false, max_parallel_requests: 128, kv_cache_memory_fraction: 0.9}\n"
    )
    plan = plan_of(path, GpuInventory(driver_version="x", gpus=[fake_gpu(i) for i in range(8)]))
    assert plan.device == "cuda"
    prefill, decode0, decode1 = plan.instances
    assert flag(prefill.argv, "--tensor-parallel-size") == "4"
    assert flag(prefill.argv, "--max-num-seqs") == "32" and flag(prefill.argv, "--max-num-batched-tokens") == "8192"
    assert "--no-enable-chunked-prefill" in prefill.argv
    assert flag(prefill.argv, "--gpu-memory-utilization") == "0.8"
    assert flag(decode0.argv, "--gpu-memory-utilization") == "0.9"
    assert "--no-enable-prefix-caching" in decode0.argv and flag(decode0.argv, "--max-num-seqs") == "128"
    assert "--scheduling-policy" not in prefill.argv
    assert json.loads(flag(prefill.argv, "--kv-transfer-config"))["kv_buffer_device"] == "cuda"
    assert prefill.env["CUDA_VISIBLE_DEVICES"] == ",".join(fake_gpu(i).uuid for i in range(4))
    assert {decode0.env["CUDA_VISIBLE_DEVICES"], decode1.env["CUDA_VISIBLE_DEVICES"]} == {
        fake_gpu(4).uuid,
        fake_gpu(5).uuid,
    }
    # A GPU host's NIXL progress thread keeps NIXL's own busy polling: cores are not what limits there.
    assert "PDCTL_NIXL_PROGRESS_DELAY_US" not in prefill.env and "PDCTL_SHM_SPIN_US" not in prefill.env
    assert "PDCTL_KEEP_WORKER_CORES" not in prefill.env


def test_each_hook_can_be_turned_off_for_vllms_and_nixls_own_behaviour(write_profile):
    plan = plan_of(
        write_profile(
            "name: g\nmodel: {path: m}\ndevice: cpu\n"
            "cpu: {nixl_progress_delay_us: 0, shm_spin_us: 0, keep_worker_cores: false}\n"
            "prefill: {tensor_parallel_size: 1}\ndecode: {tensor_parallel_size: 1}\n"
        )
    )
    hooked = [name for instance in plan.instances for name in instance.env if name.startswith("PDCTL_")]
    assert plan.instances and hooked == []


def test_document_gpu_count_beyond_parallelism_is_data_parallel(write_profile):
    path = write_profile(
        "name: g\nmodel: {path: m}\ninstances:\n"
        "  - {id: prefill-0, type: PREFILLING, gpu_count: 8, tensor_parallel_size: 4}\n"
    )
    plan = plan_of(path, GpuInventory(driver_version="x", gpus=[fake_gpu(i) for i in range(8)]))
    assert flag(plan.instances[0].argv, "--data-parallel-size") == "2"
    assert len(plan.instances[0].gpus) == 8


def test_console_script_form_takes_the_model_positionally(write_profile):
    prefix = LaunchPrefix(argv=("/venv/bin/vllm", "serve"), model_positional=True)
    plan = plan_of(PROFILES / "local.yaml", prefix=prefix)
    assert plan.instances[0].argv[:3] == ["/venv/bin/vllm", "serve", "/models/m"]


def test_kv_cache_storage_cpu_and_lfu_are_mapped_with_notes(write_profile):
    path = write_profile("name: g\nmodel: {path: m}\npd: {kv_cache_storage: cpu, kv_cache_eviction_policy: lfu}\n")
    plan = plan_of(path, GpuInventory(driver_version="x", gpus=[fake_gpu(i) for i in range(8)]))
    assert json.loads(flag(plan.instances[0].argv, "--kv-transfer-config"))["kv_buffer_device"] == "cpu"
    assert any("evicts LRU only" in note for note in plan.notes)
    assert any("kv_cache_storage: cpu" in note for note in plan.notes)


def test_pd_disabled_runs_hybrid_instances_without_a_connector(write_profile):
    plan = plan_of(write_profile("name: g\nmodel: {path: m}\npd: {enabled: false}\ndevice: cpu\n"))
    assert [i.role.value for i in plan.instances] == ["HYBRID", "HYBRID"]
    assert all("--kv-transfer-config" not in i.argv for i in plan.instances)


def test_secrets_are_masked_and_references_kept(write_profile):
    path = write_profile(
        "name: g\nmodel: {path: m}\ndevice: cpu\nprefill: {tensor_parallel_size: 1}\n"
        "engine:\n  env: {HF_TOKEN: hf_abc123secret, OTHER_TOKEN: '${OTHER_TOKEN}', LOG_LEVEL: debug}\n"
        "  extra_args: ['--hf-token', 'sk-secret', '--hf-token=hf_x']\n"
    )
    masked = plan_of(path).masked()
    text = masked.model_dump_json()
    assert "hf_abc123secret" not in text and "sk-secret" not in text and "hf_x" not in text
    env = masked.instances[0].env
    assert env["HF_TOKEN"] == MASK and env["OTHER_TOKEN"] == "${OTHER_TOKEN}" and env["LOG_LEVEL"] == "debug"
    assert "--hf-token=***" in masked.instances[0].argv


def test_sim_engine_needs_no_devices_and_says_it_is_an_emulator(write_profile):
    plan = plan_of(write_profile("name: s\nmodel: {path: m}\nengine: {kind: sim}\ndevice: cpu\n"))
    assert plan.instances[0].argv[1:3] == ["-m", "pdctl.engines.sim"]
    assert any("emulator" in note for note in plan.notes)


def test_tensor_parallel_on_too_few_cores_is_refused(write_profile):
    with pytest.raises(PlacementError, match="tensor x pipeline parallel size 4 on the CPU"):
        plan_of(write_profile("name: g\nmodel: {path: m}\ndevice: cpu\n"))


def test_device_cuda_without_gpus_is_refused(write_profile):
    with pytest.raises(PlacementError, match="device: cuda, but no GPU is usable here"):
        plan_of(write_profile("name: g\nmodel: {path: m}\ndevice: cuda\n"))


def test_attached_instances_are_not_launched(write_profile):
    path = write_profile(
        "name: g\nmodel: {path: m}\ndevice: cpu\ninstances:\n"
        "  - {id: p, type: PREFILLING, tensor_parallel_size: 1}\n"
        "  - {id: remote, type: DECODING, host: 10.0.0.2, port: 8001, launch: false}\n"
    )
    plan = plan_of(path)
    assert [i.id for i in plan.launched] == ["p"]
    assert plan.instances[1].argv == [] and plan.instances[1].url == "http://10.0.0.2:8001"
    assert plan.instances[0].cpu_cores == [0, 1]


def test_the_default_engine_runtime_is_the_build_of_the_plans_device(monkeypatch, tmp_path):
    monkeypatch.delenv("PDCTL_ENGINE_HOME", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    engines = tmp_path / "pdctl" / "engines"
    on_gpus = plan_profile(PROFILES / "code.yaml", StaticGpuSource([fake_gpu(i) for i in range(8)])).plan
    assert (on_gpus.device, on_gpus.engine_python) == ("cuda", str(engines / "vllm-cuda" / "bin" / "python"))
    assert on_gpus.instances[0].argv[0] == on_gpus.engine_python
    on_cpu = plan_profile(PROFILES / "local.yaml", StaticGpuSource([])).plan
    assert (on_cpu.device, on_cpu.engine_python) == ("cpu", str(engines / "vllm-cpu" / "bin" / "python"))


def test_pinned_processes_run_on_the_instances_own_cores(write_profile):
    plan = plan_of(
        write_profile(
            "name: g\nmodel: {path: m}\ndevice: cpu\ncpu: {pin_processes: true}\n"
            "prefill: {tensor_parallel_size: 1}\ndecode: {tensor_parallel_size: 1}\n"
        )
    )
    assert plan.instances and all(i.affinity == i.cpu_cores != [] for i in plan.instances)
