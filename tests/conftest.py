from __future__ import annotations

from pathlib import Path

import httpx
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


@pytest.fixture(scope="session")
def engine_runtime():
    """The real engine (vLLM's CPU build), installed on first use."""
    from pdctl.engines import runtime

    return runtime.install_runtime(runtime.default_runtime_dir(), on_step=lambda step: print(f"engine runtime: {step}"))


@pytest.fixture(scope="session")
def local_cluster(tmp_path_factory, engine_runtime):
    """`pdctl up profiles/local.yaml` once per session; `down` at the end must leave no process."""
    from pdctl import lifecycle, procs
    from pdctl.cluster import plan_profile
    from pdctl.state import ClusterDir
    from tests.e2e import LOCAL_PROFILE, LocalCluster

    planned = plan_profile(LOCAL_PROFILE)
    cluster_dir = ClusterDir(tmp_path_factory.mktemp("state"), planned.profile.name)
    started = lifecycle.start(planned, cluster_dir)
    failures = lifecycle.wait_ready(started, lambda state: None)
    if failures:
        lifecycle.down(cluster_dir)
        pytest.fail(
            "local cluster did not start:\n"
            + "\n".join(f"{f.id}: {f.message}\n" + "\n".join(f.last_lines) for f in failures)
        )
    token = cluster_dir.read_state().token
    cluster = LocalCluster(cluster_dir, started.plan)
    # One request through prefill and decode first: the first NIXL handshake is slow, and no test should time it.
    warm = {"model": started.plan.served_model_name, "prompt": "warm up " * 20, "max_tokens": 2}
    assert httpx.post(f"{cluster.router}/v1/completions", json=warm, timeout=300).status_code == 200
    yield cluster
    report = lifecycle.down(cluster_dir)
    assert report.remaining == [] and procs.marked_processes(token) == [], "down left processes behind"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests on the session's real cluster run last: its vLLM processes take CPU even when idle, so every
    other test (the scaling test's own vLLM cluster among them) runs faster and steadier before it starts."""
    items.sort(key=lambda item: "local_cluster" in getattr(item, "fixturenames", ()))
