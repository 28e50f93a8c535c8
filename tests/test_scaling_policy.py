"""The scaling policy on hand-computed signals: no processes, every figure worked out in the comments."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from rich.console import Console

from pdctl.engines.commands import LaunchPrefix
from pdctl.errors import PlacementError, ProfileError
from pdctl.gpus import GpuInventory
from pdctl.launchers.local import LocalLauncher
from pdctl.placement import PlacementRequest, cores_for_added, place_added_on_gpus
from pdctl.plan import make_plan
from pdctl.profile import ClusterProfile, load_profile
from pdctl.router.server import RouterService, build_router
from pdctl.routing.pool import Instance
from pdctl.scaling.policy import (
    Bounds,
    Forecaster,
    Hysteresis,
    Targets,
    Verdict,
    decode_floor,
    decode_verdict,
    floor_decision,
    prefill_floor,
    prefill_verdict,
)
from pdctl.scaling.report import ScalingReport, render_scaling
from pdctl.scaling.scaler import Scaler
from pdctl.scaling.signals import InstanceSignal, PoolSignals, Role, Sample, Traffic, percentile, pool_signals
from pdctl.state import ClusterDir, ClusterState
from pdctl.supervisor import Supervisor, SupervisorPolicy
from tests.conftest import fake_gpu

TARGETS = Targets(ttft_ms=1000, tpot_ms=50, backlog_s=1.5, busy_high=0.8, margin=0.6, percentile=90)


def prefill(*tokens: int, speed: float = 1000.0, busy_seqs: int = 0) -> PoolSignals:
    instances = tuple(
        InstanceSignal(f"prefill-{i}", in_flight=busy_seqs, in_flight_prompt_tokens=t, prefill_tokens_per_s=speed,
                       max_num_seqs=64)
        for i, t in enumerate(tokens)
    )  # fmt: skip
    return PoolSignals(Role.PREFILL, instances)


def decode(*in_flight: int, kv: float = 0.1, tpot_ms: float | None = None) -> PoolSignals:
    instances = tuple(
        InstanceSignal(f"decode-{i}", in_flight=n, kv_usage=kv, max_num_seqs=64) for i, n in enumerate(in_flight)
    )
    return PoolSignals(Role.DECODE, instances, tpot_ms=tpot_ms)


# ---- reactive verdicts --------------------------------------------------------------------------------------


def test_prefill_grows_on_prompt_backlog_in_seconds():
    # 3000 + 1000 tokens over 2 x 1000 tokens/s = 2.0 s of backlog, above the 1.5 s target.
    verdict = prefill_verdict(prefill(3000, 1000), TARGETS)
    assert verdict == Verdict(+1, "prompt backlog 2.00 s > 1.5 s (4000 tokens at 2000 tokens/s)")


def test_prefill_grows_on_client_ttft_only_when_it_holds_a_backlog():
    # 500 tokens at 1000 tokens/s = 0.5 s: under the target, but above a quarter of it (0.375 s).
    signals = PoolSignals(Role.PREFILL, prefill(500).instances, ttft_ms=1450)
    assert prefill_verdict(signals, TARGETS) == Verdict(
        +1, "TTFT p90 1450 ms > target 1000 ms with 0.50 s of prompt backlog"
    )
    # The same TTFT with an idle prefill pool is someone else's problem (decode queueing): no prefill +1.
    idle = PoolSignals(Role.PREFILL, prefill(100).instances, ttft_ms=1450)
    assert prefill_verdict(idle, TARGETS).direction == 0


def test_prefill_scale_in_is_consolidation_aware():
    # 3 instances, 300 tokens each: 0.3 s; on 2 it would be 0.45 s < 0.6 x 1.5 = 0.9 s: remove one.
    verdict = prefill_verdict(prefill(300, 300, 300), TARGETS)
    assert verdict.direction == -1
    assert verdict.reason.startswith("on 2 instances the backlog would be 0.45 s < 0.6 x 1.5 s")
    # 2 instances at 500 tokens each: 0.5 s; on 1 it would be 1.0 s > 0.9 s: keep both.
    assert prefill_verdict(prefill(500, 500), TARGETS).direction == 0
    # A single instance never asks to go: the bounds are the actuator's, but 0 instances serve nothing.
    assert prefill_verdict(prefill(0), TARGETS).direction == 0


def test_decode_grows_on_busy_slots_kv_or_tpot():
    # (60 + 55) running of 2 x 64 slots: 90 % > 80 %.
    assert decode_verdict(decode(60, 55), TARGETS) == Verdict(+1, "slots busy 90% (115 running or queued of 128) > 80%")
    assert decode_verdict(decode(10, kv=0.85), TARGETS) == Verdict(+1, "KV cache use 85% > 80%")
    assert decode_verdict(decode(10, tpot_ms=62), TARGETS) == Verdict(+1, "TPOT p90 62 ms > target 50 ms")


def test_decode_scale_in_predicts_the_load_on_one_instance_fewer():
    # 3 x 13 of 64 = 20 % busy; on 2 instances 30 % < 0.6 x 80 % = 48 %: remove one.
    assert decode_verdict(decode(13, 13, 13), TARGETS).direction == -1
    # 2 x 19 of 64 = 30 %; on 1 instance 59 % > 48 %: keep both, although each alone looks idle enough.
    assert decode_verdict(decode(19, 19), TARGETS).direction == 0
    # Low load but TPOT near its target (40 ms > 0.6 x 50 ms): keep.
    assert decode_verdict(decode(5, 5, tpot_ms=40), TARGETS).direction == 0


# ---- hysteresis and bounds --------------------------------------------------------------------------------


def test_a_signal_must_hold_before_acting_and_the_reason_says_for_how_long():
    h = Hysteresis(out_s=30, in_s=120)
    up = Verdict(+1, "TPOT p90 62 ms > target 50 ms")
    bounds = Bounds(1, 6)
    assert all(h.step(up, t, 2, bounds, 0, Role.DECODE) is None for t in range(30))
    decision = h.step(up, 30, 2, bounds, 0, Role.DECODE)
    assert decision is not None and decision.delta == +1 and decision.loop == "reactive"
    assert decision.reason == "decode +1: TPOT p90 62 ms > target 50 ms for 30 s"


def test_an_interrupted_signal_starts_again_and_scale_in_waits_longer():
    h = Hysteresis(out_s=30, in_s=120)
    up, down, bounds = Verdict(+1, "x"), Verdict(-1, "y"), Bounds(1, 6)
    h.step(up, 0, 2, bounds, 0, Role.DECODE)
    h.step(Verdict(0), 20, 2, bounds, 0, Role.DECODE)  # the load dipped: the clock restarts
    assert h.step(up, 40, 2, bounds, 0, Role.DECODE) is None
    assert h.step(up, 70, 2, bounds, 0, Role.DECODE) is not None
    h.reset()
    assert h.step(down, 0, 3, bounds, 0, Role.DECODE) is None
    assert h.step(down, 119, 3, bounds, 0, Role.DECODE) is None
    assert h.step(down, 120, 3, bounds, 0, Role.DECODE).delta == -1


def test_bounds_and_the_floor_are_never_crossed():
    h = Hysteresis(out_s=0, in_s=0)
    assert h.step(Verdict(+1, "x"), 0, 6, Bounds(1, 6), 0, Role.DECODE) is None  # at max
    assert h.step(Verdict(-1, "y"), 0, 1, Bounds(1, 6), 0, Role.DECODE) is None  # at min
    assert h.step(Verdict(-1, "y"), 0, 3, Bounds(1, 6), 3, Role.DECODE) is None  # at the predictive floor
    # The floor asks for 9; the bound is 6: +4 from 2, never beyond.
    decision = floor_decision(Role.DECODE, 2, 9, Bounds(1, 6), "why")
    assert decision is not None and decision.delta == 4 and decision.loop == "predictive"
    assert floor_decision(Role.DECODE, 3, 2, Bounds(1, 6), "why") is None


# ---- predictive floor ---------------------------------------------------------------------------------------


def test_forecast_follows_a_level_and_damps_a_trend():
    steady = Forecaster()
    for _ in range(10):
        steady.update(12.0)
    assert steady.forecast(2) == pytest.approx(12.0)
    rising = Forecaster()
    for value in (2, 4, 6, 8, 10, 12):
        rising.update(value)
    ahead = rising.forecast(3)
    assert 12.0 < ahead < 12.0 + 3 * 2  # above the last figure, below the undamped extrapolation
    assert Forecaster().forecast(1) == 0.0


def test_floors_from_the_forecast_rate_and_lengths():
    lengths = Traffic(rate=10, prefill_rate=4, mean_prefill_input=1000, mean_output=100, tpot_mean_s=0.05)
    # Decode: 20 req/s x 100 tokens x 50 ms = 100 sequences over 64 x 0.8 = 51.2 per instance: 2.
    need, why = decode_floor(20, lengths, decode(0), TARGETS)
    assert need == 2 and "100.0 sequences over 64 slots" in why
    # Prefill: 4 split req/s x 1000 tokens = 4000 tokens/s over 1000 x 0.8 per instance: 5.
    need, why = prefill_floor(4, lengths, prefill(0), TARGETS)
    assert need == 5 and "4000 tokens/s over 1000 tokens/s per instance at 80%" in why
    assert decode_floor(0, Traffic(), decode(0), TARGETS)[0] == 0


# ---- signals ----------------------------------------------------------------------------------------------


def test_warming_instances_and_the_requests_they_served_are_left_out():
    warm = Instance("decode-0", Role.DECODE.instance_type, "http://x", healthy=True, in_flight=3)
    cold = Instance("decode-1", Role.DECODE.instance_type, "http://y", healthy=True, in_flight=9)
    draining = Instance("decode-2", Role.DECODE.instance_type, "http://z", healthy=True, draining=True)
    samples = [Sample(0, 0.1, 0.02, 10, 5, None, "decode-0"), Sample(0, 9.0, 0.5, 10, 5, None, "decode-1")]
    signals = pool_signals(Role.DECODE, [warm, cold, draining], samples, {"decode-1"}, 90)
    assert [i.id for i in signals.instances] == ["decode-0"]
    assert signals.samples == 1 and signals.ttft_ms == pytest.approx(100) and signals.tpot_ms == pytest.approx(20)


def test_percentile_is_nearest_rank():
    assert percentile(range(1, 101), 90) == 90
    assert percentile([5.0], 90) == 5.0
    assert percentile([], 90) is None


# ---- placement of an added instance ------------------------------------------------------------------------


def gpu_profile(tmp_path: Path) -> ClusterProfile:
    path = tmp_path / "gpu.yaml"
    path.write_text(
        "name: gpu\nmodel: {path: some/model}\ndevice: cuda\nengine: {command: [/bin/true]}\n"
        "pd: {prefilling_min_instances: 1, prefilling_max_instances: 1, decoding_min_instances: 1,\n"
        "     decoding_max_instances: 3}\nprefill: {tensor_parallel_size: 1}\n"
    )
    return load_profile(path)


def test_no_free_gpu_names_what_holds_them(tmp_path):
    profile = gpu_profile(tmp_path)
    instance = profile.added_instance("decode-2", Role.DECODE.instance_type, 9000)
    request = PlacementRequest(instance=instance, memory_fraction=0.85)
    inventory = GpuInventory(gpus=[fake_gpu(0), fake_gpu(1), fake_gpu(2, used_gib=70, pids=(4242,))])
    assert [g.index for g in place_added_on_gpus(request, inventory, {0}).gpus] == [1]
    with pytest.raises(PlacementError) as caught:
        place_added_on_gpus(request, inventory, {0, 1})
    assert str(caught.value).startswith("no free GPU for decode-2: it needs 1, 0 of 3 are free (2 held by the cluster")
    assert "pid 4242" in str(caught.value)


def test_an_added_cpu_instance_shares_the_least_shared_cores():
    assert cores_for_added([0, 1, 2, 3], [[0, 1], [2, 3], [0, 1]]) == [2, 3]
    assert cores_for_added([0, 1], []) == [0, 1]


# ---- the actuator with no device free: blocked, explained, not retried in a storm --------------------------


def test_scale_out_without_a_free_gpu_is_blocked_with_its_reason_and_not_retried(tmp_path):
    profile = gpu_profile(tmp_path)
    inventory = GpuInventory(gpus=[fake_gpu(0), fake_gpu(1)])
    launcher = LocalLauncher(profile.launcher, "gpu", "t", inventory=lambda: inventory)
    prefix = LaunchPrefix(argv=("/bin/true",))
    plan = make_plan(profile, inventory, placer=launcher, model_path="some/model", launch_prefix=prefix)
    cluster_dir = ClusterDir(tmp_path / "state", "gpu")
    cluster_dir.create()
    state = ClusterState(cluster="gpu", token="t")
    supervisor = Supervisor(plan, cluster_dir, state, SupervisorPolicy(), launcher)
    scaler = Scaler(profile, plan, supervisor, RouterService(build_router(profile, plan), "127.0.0.1", 0), cluster_dir)

    async def ticks() -> ScalingReport:
        scaler.set_manual(Role.DECODE, 3)
        for _ in range(5):
            await scaler.tick()
        await supervisor.stop()
        return scaler.report()

    report = asyncio.run(ticks())
    decode = next(p for p in report.pools if p.pool == "decode")
    assert decode.current == 1 and decode.desired == 1
    assert decode.blocked and decode.blocked.startswith("no free GPU for decode-1: it needs 1, 0 of 2 are free")
    assert [d.outcome.split(":")[0] for d in report.decisions] == ["blocked"]  # one attempt, not five
    assert len(plan.instances) == 2  # nothing was added
    console = Console(record=True, width=200)
    console.print(render_scaling(report))
    shown = console.export_text()
    assert "no free GPU for decode-1" in shown and "decode set to 3 by hand" in shown


# ---- the profile's scaling section ----------------------------------------------------------------------


def write_profile(tmp_path: Path, scaling: str) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(f"name: p\nmodel: {{path: sim-model}}\nengine: {{kind: sim}}\nscaling:\n{scaling}")
    return path


def test_scaling_knobs_are_validated_with_file_line_and_field(tmp_path):
    assert load_profile(write_profile(tmp_path, "  mode: off\n")).scaling.mode == "off"  # YAML's bare off
    spec = load_profile(write_profile(tmp_path, "  scale_out_after_s: 10\n")).scaling
    assert (spec.mode, spec.scale_out_after_s, spec.scale_in_after_s, spec.drain_timeout_s) == ("auto", 10, 90, 120)
    with pytest.raises(ProfileError) as caught:
        load_profile(write_profile(tmp_path, "  scale_in_afer_s: 10\n"))
    assert "p.yaml:5:3: scaling.scale_in_afer_s: unknown key; did you mean 'scale_in_after_s'?" in str(caught.value)
    with pytest.raises(ProfileError) as caught:
        load_profile(write_profile(tmp_path, "  scale_out_after_s: 60\n  scale_in_after_s: 30\n"))
    assert "scale_in_after_s (30) is below scale_out_after_s (60)" in str(caught.value)
    with pytest.raises(ProfileError) as caught:
        load_profile(write_profile(tmp_path, "  decode_busy_high: 1.5\n"))
    assert "scaling.decode_busy_high" in str(caught.value)
