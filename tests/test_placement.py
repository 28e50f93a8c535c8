from __future__ import annotations

import pytest

from pdctl.control_plane.types import ExecutionInstance
from pdctl.errors import PlacementError
from pdctl.gpus import GpuInventory, StaticGpuSource, discover, visible_gpus
from pdctl.placement import PlacementRequest, place_on_cpus, place_on_gpus
from tests.conftest import fake_gpu


def request(instance_id: str, kind: str, gpus: int, fraction: float = 0.85) -> PlacementRequest:
    return PlacementRequest(
        instance=ExecutionInstance(id=instance_id, type=kind, gpu_count=gpus, tensor_parallel_size=gpus),
        memory_fraction=fraction,
    )


def inventory(*gpus) -> GpuInventory:
    return GpuInventory(driver_version="fake", gpus=list(gpus))


def test_tp4_prefill_and_four_decoders_get_distinct_gpus():
    requests = [request("prefill-0", "PREFILLING", 4)] + [request(f"decode-{i}", "DECODING", 1) for i in range(4)]
    assignments = place_on_gpus(requests, inventory(*(fake_gpu(i) for i in range(8))))
    indices = [gpu.index for a in assignments for gpu in a.gpus]
    assert len(indices) == len(set(indices)) == 8
    assert [len(a.gpus) for a in assignments] == [4, 1, 1, 1, 1]
    assert [a.instance_id for a in assignments] == ["prefill-0", "decode-0", "decode-1", "decode-2", "decode-3"]


def test_too_few_gpus_names_the_arithmetic():
    requests = [request("prefill-0", "PREFILLING", 4)] + [request(f"decode-{i}", "DECODING", 1) for i in range(8)]
    with pytest.raises(PlacementError) as caught:
        place_on_gpus(requests, inventory(*(fake_gpu(i) for i in range(8))))
    assert str(caught.value) == "the profile needs 12 GPUs: 1 prefill x 4 + 8 decode x 1; this host has 8"


def test_a_filled_gpu_is_avoided():
    gpus = [fake_gpu(0, used_gib=70, pids=(4242,)), fake_gpu(1), fake_gpu(2)]
    assignments = place_on_gpus([request("d0", "DECODING", 1), request("d1", "DECODING", 1)], inventory(*gpus))
    assert sorted(gpu.index for a in assignments for gpu in a.gpus) == [1, 2]


def test_a_filled_gpu_is_refused_without_force_and_named():
    gpus = [fake_gpu(0, used_gib=70, pids=(4242,)), fake_gpu(1)]
    requests = [request("d0", "DECODING", 1), request("d1", "DECODING", 1)]
    with pytest.raises(PlacementError) as caught:
        place_on_gpus(requests, inventory(*gpus))
    message = str(caught.value)
    assert "GPU 0 (10.0 of 80.0 GiB free: pid 4242 python)" in message and "--force" in message
    forced = place_on_gpus(requests, inventory(*gpus), force=True)
    assert sorted(gpu.index for a in forced for gpu in a.gpus) == [0, 1]


def test_a_gpu_with_a_small_process_but_enough_room_is_usable_after_free_ones():
    gpus = [fake_gpu(0, used_gib=2, pids=(1,)), fake_gpu(1)]
    first = place_on_gpus([request("d0", "DECODING", 1)], inventory(*gpus))
    assert first[0].gpus[0].index == 1
    both = place_on_gpus([request("d0", "DECODING", 1), request("d1", "DECODING", 1)], inventory(*gpus))
    assert sorted(gpu.index for a in both for gpu in a.gpus) == [0, 1]


def test_cpu_cores_are_split_between_instances():
    requests = [request("p", "PREFILLING", 1), request("d", "DECODING", 1)]
    assignments = place_on_cpus(requests, [0, 1, 2, 3])
    assert [a.cpu_cores for a in assignments] == [[0, 1], [2, 3]]


def test_fewer_cores_than_instances_share_them():
    requests = [request(f"d{i}", "DECODING", 1) for i in range(3)]
    assert [a.cpu_cores for a in place_on_cpus(requests, [0, 1])] == [[0], [1], [0]]


def test_cuda_visible_devices_by_index_and_uuid():
    gpus = [fake_gpu(i) for i in range(4)]
    assert [g.index for g in visible_gpus(gpus, "2,0")] == [2, 0]
    assert [g.index for g in visible_gpus(gpus, f"{gpus[3].uuid[:12]}")] == [3]
    assert [g.index for g in visible_gpus(gpus, "1,9,2")] == [1]  # CUDA stops at the first invalid entry
    assert visible_gpus(gpus, "") == []


def test_discover_applies_the_mask_and_explains_an_empty_one():
    source = StaticGpuSource([fake_gpu(i) for i in range(2)])
    assert [g.index for g in discover(source, environ={"CUDA_VISIBLE_DEVICES": "1"}).gpus] == [1]
    hidden = discover(source, environ={"CUDA_VISIBLE_DEVICES": "-1"})
    assert hidden.gpus == [] and "hides every GPU" in (hidden.unavailable_reason or "")


def test_no_nvml_is_the_cpu_case_not_a_crash():
    inventory = discover(environ={})
    assert inventory.gpus == [] or inventory.driver_version  # a GPU host answers, any other host explains
    assert inventory.gpus or inventory.unavailable_reason
