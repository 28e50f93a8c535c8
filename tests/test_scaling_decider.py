"""The scaler's deciding half on given signals, no processes: which decisions come out, and when; then the
whole scaler over a plan (engines that never come up), and the PD config reaching the router through a call,
not a shared object, from `pdctl scale --set` over the control socket."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from pdctl.engines.commands import LaunchPrefix
from pdctl.gpus import GpuInventory
from pdctl.launchers.local import LocalLauncher
from pdctl.plan import make_plan
from pdctl.profile import ClusterProfile, ScalingSpec
from pdctl.router import requests
from pdctl.router.server import RouterService, build_router
from pdctl.scaling import control
from pdctl.scaling.decider import (
    Adopt,
    Decider,
    Healthy,
    NeverHealthy,
    NoDevice,
    PoolView,
    ScaleIn,
    ScaleOut,
    ScaleRequestError,
)
from pdctl.scaling.policy import Bounds, Decision, Targets
from pdctl.scaling.scaler import Scaler
from pdctl.scaling.signals import InstanceSignal, PoolSignals, Role, Sample
from pdctl.state import ClusterDir, ClusterState
from pdctl.supervisor import Supervisor, SupervisorPolicy
from pdctl.types import ExecutionInstance, ExecutionInstanceType
from tests.conftest import fake_gpu
from tests.test_scaling_policy import gpu_profile

TARGETS = Targets(ttft_ms=1000, tpot_ms=50, backlog_s=1.5, busy_high=0.8, margin=0.6, percentile=90)
# 60 of 64 slots: 94 % > 80 %.
OVERLOAD = "slots busy 94% (60 running or queued of 64) > 80%"


def decode(*in_flight: int) -> PoolSignals:
    instances = tuple(
        InstanceSignal(f"decode-{i}", in_flight=n, kv_usage=0.1, max_num_seqs=64) for i, n in enumerate(in_flight)
    )
    return PoolSignals(Role.DECODE, instances)


def decider(mode: str = "auto", size: int = 1, predictive: bool = False, top: int = 3) -> Decider:
    spec = ScalingSpec(predictive=predictive, scale_out_after_s=20, scale_in_after_s=90, blocked_retry_s=120)
    bounds = {Role.PREFILL: Bounds(1, 1), Role.DECODE: Bounds(1, top)}
    return Decider(spec, TARGETS, bounds, mode, {Role.DECODE: size}, startup_s=60, now=0)


def test_a_held_overload_is_adopted_then_carried_out_as_one_scale_out():
    d = decider()
    overloaded = PoolView(decode(60), current=1, acting=False)
    assert d.decide(overloaded, [], 0, forecast=False) == []
    assert d.decide(overloaded, [], 19, forecast=False) == []
    assert d.decide(overloaded, [], 20, forecast=False) == [
        Adopt(Decision(Role.DECODE, 1, f"decode +1: {OVERLOAD} for 20 s", "reactive"), advisory=False),
        ScaleOut(Role.DECODE, 1, Decision(Role.DECODE, 1, "decode +1: back to desired 2", "auto")),
    ]
    pool = d.pools[Role.DECODE]
    assert pool.desired == 2
    assert pool.signals == {"warm_instances": 1, "samples": 0, "busy": 0.938, "kv_usage": 0.1}
    # While the new instance starts nothing more is decided, however long the overload holds.
    starting = PoolView(decode(60), current=2, acting=True)
    assert all(d.decide(starting, [], t, forecast=False) == [] for t in range(21, 200))


def test_no_free_device_holds_the_pool_off_for_the_retry_period():
    d = decider()
    overloaded = PoolView(decode(60), current=1, acting=False)
    d.decide(overloaded, [], 0, forecast=False)
    assert [type(step) for step in d.decide(overloaded, [], 20, forecast=False)] == [Adopt, ScaleOut]
    d.learn(NoDevice(Role.DECODE, "no free GPU for decode-1", size=1), 20)
    pool = d.pools[Role.DECODE]
    assert (pool.blocked, pool.desired) == ("no free GPU for decode-1", 1)
    # blocked_retry_s is 120: nothing until 140; then the overload must hold its 20 s again.
    assert all(d.decide(overloaded, [], t, forecast=False) == [] for t in range(21, 160))
    assert [type(step) for step in d.decide(overloaded, [], 160, forecast=False)] == [Adopt, ScaleOut]
    assert pool.blocked == "no free GPU for decode-1"  # until an instance comes up
    d.learn(Healthy(Role.DECODE, took_s=80), 250)
    assert pool.blocked is None and d.startup_s == 70  # half the old 60 s, half the measured 80 s


def test_instances_that_never_come_up_take_the_pool_back_within_its_bounds():
    d = decider(size=2)
    d.learn(NeverHealthy(Role.DECODE, "decode-2 did not become healthy", size=0), 100)
    pool = d.pools[Role.DECODE]
    assert (pool.desired, pool.blocked, pool.blocked_until) == (1, "decode-2 did not become healthy", 220)


def test_scale_in_is_decided_after_the_longer_hold_and_drains_one():
    d = decider(size=3)
    # 3 x 13 of 64 = 20 % busy; on 2 instances 30 % < 0.6 x 80 %.
    quiet = PoolView(decode(13, 13, 13), current=3, acting=False)
    assert all(d.decide(quiet, [], t, forecast=False) == [] for t in range(0, 90))
    adopted, drain = d.decide(quiet, [], 90, forecast=False)
    assert (
        isinstance(adopted, Adopt)
        and adopted.decision.delta == -1
        and adopted.decision.reason.startswith("decode -1: on 2 instances slots would be 30% busy")
    )
    assert drain == ScaleIn(Role.DECODE, Decision(Role.DECODE, -1, "decode -1: back to desired 2", "auto"))


def test_advisory_mode_decides_from_its_own_advice_and_never_acts():
    d = decider(mode="advisory")
    overloaded = PoolView(decode(60), current=1, acting=False)
    steps = [step for t in range(0, 100) for step in d.decide(overloaded, [], t, forecast=False)]
    # +1 at 20 s and at 40 s (from the advised 2, not the 1 running), then the bound of 3 holds.
    assert [(s.advisory, s.decision.delta) for s in steps if isinstance(s, Adopt)] == [(True, 1), (True, 1)]
    assert not any(isinstance(s, ScaleOut | ScaleIn) for s in steps)
    assert d.pools[Role.DECODE].desired == 3


def test_the_forecast_floor_raises_the_pool_at_once_by_several():
    d = decider(predictive=True, top=8)
    # 300 requests in the 30 s window: 10 req/s x 500 tokens x 50 ms = 250 sequences over 64 x 0.8: 5 instances.
    samples = [Sample(i * 0.1, 0.2, 0.05, 100, 500, None, "decode-0") for i in range(300)]
    assert d.forecast_due(29) is False and d.forecast_due(30) is True and d.forecast_due(31) is False
    steps = d.decide(PoolView(decode(10), current=1, acting=False), samples, 30, forecast=True)
    why = (
        "forecast 10.0 req/s x 500 tokens x 50 ms = 250.0 sequences over 64 slots per instance at 80%, "
        "90 s ahead (start-up 60 s)"
    )
    assert steps == [
        Adopt(Decision(Role.DECODE, 4, f"decode +4: floor 5: {why}", "predictive"), advisory=False),
        ScaleOut(Role.DECODE, 4, Decision(Role.DECODE, 4, "decode +4: back to desired 5", "auto")),
    ]
    assert d.pools[Role.DECODE].floor == 5


def test_a_pool_set_by_hand_goes_to_its_count_and_its_policy_pauses():
    d = decider()
    with pytest.raises(ScaleRequestError, match=r"decode 5 is outside the pool's bounds 1\.\.3"):
        d.set_manual(Role.DECODE, 5, current=1)
    with pytest.raises(ScaleRequestError, match="this cluster has no prefill pool"):
        d.check_count(Role.PREFILL, 1)
    assert d.set_manual(Role.DECODE, 3, current=1) == Decision(Role.DECODE, 2, "decode set to 3 by hand", "manual")
    assert d.decide(PoolView(decode(60), current=1, acting=False), [], 0, forecast=False) == [
        ScaleOut(Role.DECODE, 2, Decision(Role.DECODE, 2, "decode +2: back to desired 3", "manual"))
    ]
    idle = PoolView(decode(1, 1, 1), current=3, acting=False)
    assert all(d.decide(idle, [], t, forecast=False) == [] for t in range(0, 300, 10))  # no scale-in by hand
    assert d.set_auto() == [Role.DECODE] and d.pools[Role.DECODE].mode == "auto"


def test_a_lowered_maximum_shrinks_the_pool():
    d = decider(size=3)
    d.reconfigure({Role.PREFILL: Bounds(1, 1), Role.DECODE: Bounds(1, 2)}, "auto")
    assert d.decide(PoolView(decode(30, 30, 30), current=3, acting=False), [], 0, forecast=False) == [
        ScaleIn(Role.DECODE, Decision(Role.DECODE, -1, "decode -1: back to desired 2", "auto"))
    ]


# ---- the whole scaler over a plan: engines that never come up -------------------------------------------------


def scaler_on(profile: ClusterProfile, tmp_path, gpus: int = 2, clock: Callable[[], float] = time.monotonic) -> Scaler:
    """The daemon's scaler, supervisor and router over the profile's plan; its engines are /bin/true."""
    inventory = GpuInventory(gpus=[fake_gpu(i) for i in range(gpus)])
    launcher = LocalLauncher(profile.launcher, "gpu", "t", inventory=lambda: inventory)
    plan = make_plan(
        profile, inventory, placer=launcher, model_path="m", launch_prefix=LaunchPrefix(argv=("/bin/true",))
    )
    cluster_dir = ClusterDir(tmp_path / "state", "gpu")
    cluster_dir.create()
    supervisor = Supervisor(plan, cluster_dir, ClusterState(cluster="gpu", token="t"), SupervisorPolicy(), launcher)
    return Scaler(
        profile, plan, supervisor, RouterService(build_router(profile, plan), "127.0.0.1", 0), cluster_dir, clock
    )


def test_a_failed_scale_out_takes_the_pool_back_to_what_runs_not_below(tmp_path):
    profile = gpu_profile(tmp_path)  # decode 1..3
    profile.instances = [
        ExecutionInstance(id="prefill-0", type="PREFILLING"),
        ExecutionInstance(id="decode-0", type="DECODING"),
        ExecutionInstance(id="decode-1", type="DECODING"),
    ]
    now = [0.0]
    scaler = scaler_on(profile, tmp_path, gpus=4, clock=lambda: now[0])
    supervisor = scaler.supervisor

    async def ticks() -> list[tuple[int, int, str | None]]:
        seen = []
        scaler.set_manual(Role.DECODE, 3)
        await scaler.tick()
        assert scaler.actuator.describe(Role.DECODE) == "starting decode-2"
        now[0] = profile.engine.start_timeout_s + 31  # past its deadline, never healthy
        await scaler.tick()
        while "decode-2" in supervisor.managed:  # its removal runs on
            await asyncio.sleep(0.05)
        for _ in range(2):  # once blocked, then after the hold-off
            decode = next(p for p in scaler.report().pools if p.pool == "decode")
            seen.append((decode.current, decode.desired, decode.blocked))
            now[0] += profile.scaling.blocked_retry_s + 1
            await scaler.tick()
        await supervisor.stop()
        return seen

    assert asyncio.run(ticks()) == [(2, 2, "decode-2 did not become healthy")] * 2
    assert scaler.actuator.describe(Role.DECODE) is None  # decode-1 is not drained
    assert [d.outcome for d in scaler.report().decisions] == ["failed: decode-2 did not become healthy"]


# ---- the router is told of a PD change; it shares no object with the scaler ---------------------------------


def test_a_pd_change_reaches_the_router_through_a_call_not_a_shared_object(tmp_path):
    profile = gpu_profile(tmp_path)
    scaler = scaler_on(profile, tmp_path)
    router = scaler.router.router
    for instance in router.pool.all():
        instance.healthy = True
    request = requests.parse({"model": "m", "prompt": "a long prompt " * 200, "max_tokens": 8}, {}, False, "m")

    def phase() -> ExecutionInstanceType:
        return router.plan(request).decision.phase

    assert router.settings.pd is not profile.pd
    assert scaler.update_pd({"routing_policy": "always"}) == ["routing_policy adaptive -> always"]
    assert phase() is ExecutionInstanceType.PREFILLING
    scaler.update_pd({"routing_policy": "never"})
    assert phase() is ExecutionInstanceType.DECODING
    profile.pd.routing_policy = "always"  # the scaler's own object: the router never sees it
    assert phase() is ExecutionInstanceType.DECODING
    asyncio.run(scaler.supervisor.stop())


def test_adaptive_routing_switched_on_at_run_time_reads_prefixes(tmp_path):
    profile = gpu_profile(tmp_path)
    profile.pd.routing_policy = "never"  # and load_balanced, whose pieces read no prefix
    scaler = scaler_on(profile, tmp_path)
    router = scaler.router.router
    for instance in router.pool.all():
        instance.healthy = True
    # 1400 tokens: over the 800-token cut-off until its prefix is cached on the decode instance.
    request = requests.parse({"model": "m", "prompt": "a long prompt " * 400, "max_tokens": 8}, {}, False, "m")
    assert router.plan(request).routing.prefix_blocks == []
    scaler.update_pd({"routing_policy": "adaptive"})
    first = router.plan(request)
    assert first.routing.prefix_blocks and first.decision.phase is ExecutionInstanceType.PREFILLING
    assert first.decode is not None
    router.tables[first.decode.instance.id].record(first.routing.prefix_blocks)  # as its answer leaves it
    again = router.plan(request).decision
    assert again.phase is ExecutionInstanceType.DECODING and "cached on the decode instance" in again.reason
    asyncio.run(scaler.supervisor.stop())


def test_pdctl_scale_set_applies_a_combined_bounds_change_whole_and_refuses_a_bad_one(tmp_path):
    profile = gpu_profile(tmp_path)  # prefill 1..1, decode 1..3
    scaler = scaler_on(profile, tmp_path)
    env = {**os.environ, "PDCTL_STATE_DIR": str(tmp_path / "state")}

    def pdctl_scale(*settings: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "pdctl", "scale", "gpu", "--json"]
        argv += [arg for setting in settings for arg in ("--set", setting)]
        return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)

    async def over_the_socket() -> list[subprocess.CompletedProcess[str]]:
        server = control.ControlServer(scaler, control.socket_path(scaler.dir))
        await server.start()
        try:
            # The minimum first, above the old maximum of 3: valid only as a whole.
            raised = await asyncio.to_thread(pdctl_scale, "decoding_min_instances=4", "decoding_max_instances=5")
            bad = ("prefilling_min_instances=3", "prefilling_max_instances=2")
            return [raised, await asyncio.to_thread(pdctl_scale, *bad)]
        finally:
            await server.stop()
            await scaler.supervisor.stop()

    raised, refused = asyncio.run(over_the_socket())
    assert raised.returncode == 0, raised.stderr
    decode = next(p for p in json.loads(raised.stdout)["pools"] if p["pool"] == "decode")
    assert (decode["min"], decode["max"], decode["desired"]) == (4, 5, 4)
    assert scaler.router.router.settings.pd.decoding_min_instances == 4
    assert profile.pd.decoding_config is profile.decode  # the swapped-in config is the profile's, linked
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "prefilling_min_instances (3) is above prefilling_max_instances (2)" in refused.stderr
    assert (profile.pd.prefilling_min_instances, profile.pd.prefilling_max_instances) == (1, 1)
    with pytest.raises(
        ScaleRequestError, match=r"^pd\.routing_policy: unknown routing policy 'fastest'; known: threshold,"
    ):
        scaler.update_pd({"routing_policy": "fastest"})
