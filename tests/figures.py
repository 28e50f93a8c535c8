"""Router and engine figures at fixed, hand-computable values, for the metrics and dashboard tests."""

from __future__ import annotations

from pdctl.control_plane.types import ExecutionInstanceType, PDSeparationConfig
from pdctl.router.recorder import RouterMetrics
from pdctl.router.scrape import EngineSample, EngineTelemetry
from pdctl.router.stats import ClusterStats, StatsContext, build
from pdctl.routing.pool import Instance, Pool


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def sample(at: float, **figures: float) -> EngineSample:
    return EngineSample(at=at, **figures)


def fixed_cluster(clock: FakeClock, state_root=None) -> ClusterStats:
    """Two instances, a minute of requests and engine samples, all figures chosen to be computed by hand."""
    metrics = RouterMetrics(ttft_slo_s=1.0, tpot_slo_s=0.05, clock=clock)
    prefill = Instance("prefill-0", ExecutionInstanceType.PREFILLING, "http://127.0.0.1:1", healthy=True)
    decode = Instance("decode-0", ExecutionInstanceType.DECODING, "http://127.0.0.1:2", healthy=True)
    telemetry = EngineTelemetry(clock)
    start = clock.now
    for second in range(61):
        clock.now = start + second
        telemetry.record(prefill, sample(clock.now, running=1, prompt_tokens=100 * second, prefix_queries=20 * second,
                                         prefix_hits=2 * second))  # fmt: skip
        telemetry.record(decode, sample(clock.now, running=1 if second % 2 else 0, generation_tokens=30 * second,
                                        prefix_queries=20 * second, prefix_hits=8 * second,
                                        nixl_transfers=second, nixl_bytes=1000.0 * second))  # fmt: skip
        if second % 2 == 0:  # 31 requests, one every other second
            phase = "PREFILLING" if second % 4 == 0 else "DECODING"
            # 20 ms decisions: the slow-routing hint.
            metrics.finished(phase, "ok", "decode-0", e2e_s=1.0, ttft_s=0.3, tpot_s=0.02, input_tokens=100,
                             output_tokens=20, decision_s=0.02, prefill_instance="prefill-0",
                             prefill_s=0.2)  # fmt: skip
    clock.now = start + 60.5
    metrics.started = start
    context = StatsContext(cluster="c", engine="sim", devices={"prefill-0": 1, "decode-0": 1}, gpu_hour_usd=2.0,
                           state_root=state_root)  # fmt: skip
    return build(metrics, Pool([prefill, decode]), telemetry, context, PDSeparationConfig(), "load_balanced")
