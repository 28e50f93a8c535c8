from __future__ import annotations

from pathlib import Path

import pytest

from pdctl.gpus import Gpu, GpuProcess, StaticGpuSource

ROOT = Path(__file__).resolve().parent.parent
PROFILES = ROOT / "profiles"


def fake_gpu(index: int, used_gib: float = 0.5, total_gib: float = 80.0, pids: tuple[int, ...] = ()) -> Gpu:
    return Gpu(
        index=index,
        name="NVIDIA H100 80GB HBM3",
        uuid=f"GPU-{index:08d}-fake-0000-0000-000000000000",
        memory_total_mib=total_gib * 1024,
        memory_used_mib=used_gib * 1024,
        memory_free_mib=(total_gib - used_gib) * 1024,
        utilization_percent=0,
        processes=[GpuProcess(pid=pid, used_memory_mib=used_gib * 1024, name="python") for pid in pids],
    )


@pytest.fixture
def eight_gpus() -> StaticGpuSource:
    return StaticGpuSource([fake_gpu(i) for i in range(8)])


@pytest.fixture
def write_profile(tmp_path: Path):
    def write(text: str, name: str = "profile.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write
