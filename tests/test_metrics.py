"""Metric arithmetic against hand-computed values: percentiles, windows, rates from counter deltas, SLO
attainment, cost, PDMetrics and the troubleshooting hints."""

from __future__ import annotations

import bisect
import itertools
import re
from datetime import UTC, datetime

import pytest

from pdctl.cost import CostComparison, load_comparison, save_comparison, usd_per_million_tokens
from pdctl.metrics import (
    LATENCY_BUCKETS_S,
    Ledger,
    LedgerCounter,
    LedgerHistogram,
    histogram_quantile,
    log_buckets,
    window_span,
)
from pdctl.router.recorder import FOLD_BATCH, RouterMetrics
from pdctl.router.scrape import EngineHistory, parse_engine_metrics
from pdctl.router.stats import exposition
from tests.figures import FakeClock, fixed_cluster, sample


def test_quantile_interpolates_inside_the_bucket():
    bounds = (1.0, 2.0, 4.0)
    assert histogram_quantile(bounds, [2, 2, 0, 0], 0.5) == 1.0  # rank 2 ends the first bucket
    assert histogram_quantile(bounds, [2, 2, 0, 0], 0.75) == 1.5  # rank 3: half way through (1, 2]
    assert histogram_quantile(bounds, [0, 0, 0, 3], 0.5) == 4.0  # the overflow bucket reports the last bound
    assert histogram_quantile(bounds, [0, 0, 0, 0], 0.5) is None


def test_log_buckets_step_by_the_ratio():
    assert log_buckets(1.0, 3.0, 2.0) == (1.0, 2.0, 4.0)
    bounds = log_buckets(0.0005, 120.0, 1.25)
    assert bounds[0] == 0.0005 and bounds[-1] >= 120.0
    assert all(1.2 < b / a < 1.3 for a, b in itertools.pairwise(bounds))


def ledger_counter(ledger: Ledger) -> LedgerCounter:
    column = ledger.reserve(1)
    return LedgerCounter(ledger, "c", "help", ("phase",), lambda key: ((key, column),))


def ledger_histogram(ledger: Ledger, buckets=LATENCY_BUCKETS_S) -> LedgerHistogram:
    return LedgerHistogram(ledger, "h", "help", ("phase",), buckets, label_of=lambda key: key)


def test_a_streams_gaps_recorded_together_count_as_each_observed_alone():
    clock = FakeClock(1000.2)
    together_ledger, alone_ledger = Ledger(clock), Ledger(clock)
    together, alone = ledger_histogram(together_ledger), ledger_histogram(alone_ledger)
    gaps = [0.001, 0.004, 0.004, 0.2, 300.0]
    together.observe_each(together_ledger.row(1000, ("DECODING",)), gaps)
    for gap in gaps:
        alone.observe(alone_ledger.row(1000, ("DECODING",)), gap)
    clock.now = 1001.7  # a later second: a new row, the first one still in the window
    together.observe_each(together_ledger.row(1001, ("DECODING",)), [0.01])
    alone.observe(alone_ledger.row(1001, ("DECODING",)), 0.01)
    assert together.series_of(together_ledger.totals()) == alone.series_of(alone_ledger.totals())
    assert together.window(10) == alone.window(10)
    assert together.window(10)[-1] == 6 and together.window(10)[-2] == pytest.approx(sum(gaps) + 0.01)


def test_ledger_keeps_each_second_for_a_minute_and_totals_since_start():
    clock = FakeClock(1000.2)
    ledger = Ledger(clock)
    counter = ledger_counter(ledger)
    ledger.row(1000, ("a",))[0] += 5
    clock.now = 1005.5
    ledger.row(1005, ("b",))[0] += 3
    clock.now = 1030.4
    ledger.row(1030, ("a",))[0] += 2
    assert counter.window(10) == {("a",): 2.0}
    assert counter.window(60) == {("a",): 7.0, ("b",): 3.0}
    assert counter.values == {("a",): 7.0, ("b",): 3.0}
    clock.now = 1066.0  # the minute is 1007..1066: 1000 and 1005 have left it, 1030 has not
    assert counter.window(60) == {("a",): 2.0}
    assert counter.values == {("a",): 7.0, ("b",): 3.0}  # since start never forgets
    per_second = counter.per_second(60)
    assert len(per_second) == 60 and per_second[1030 - 1006] == 2.0 and sum(per_second) == 2.0


def test_a_late_second_counts_in_the_current_one_and_once_in_the_totals():
    clock = FakeClock(1001.0)
    ledger = Ledger(clock)
    counter = ledger_counter(ledger)
    ledger.row(1001, ("a",))[0] += 1
    ledger.row(1000, ("a",))[0] += 1  # read the clock before an await: its second has been left already
    clock.now = 1002.0
    ledger.row(1002, ("a",))[0] += 1
    assert counter.values == {("a",): 3.0}
    assert counter.per_second(2) == [0.0, 2.0]


def test_columns_are_reserved_before_anything_is_recorded():
    ledger = Ledger(FakeClock())
    assert (ledger.reserve(1), ledger.reserve(3), ledger.width) == (0, 1, 4)
    assert len(ledger.row(1000, ("a",))) == 4
    with pytest.raises(RuntimeError):
        ledger.reserve(1)


def test_window_span_is_whole_seconds_plus_the_current_part_and_no_more_than_uptime():
    clock = FakeClock(1030.5)
    assert window_span(clock, started=1000.0, seconds=10) == pytest.approx(9.5)
    assert window_span(clock, started=1027.0, seconds=10) == pytest.approx(3.5)


def test_histogram_windows_and_since_start():
    clock = FakeClock(1000.0)
    ledger = Ledger(clock)
    histogram = ledger_histogram(ledger, buckets=(1.0, 2.0, 4.0))
    histogram.observe(ledger.row(1000, ("a",)), 0.5)
    for _ in range(3):
        histogram.observe(ledger.row(1000, ("b",)), 3.0)
    clock.now = 1020.0
    histogram.observe(ledger.row(1020, ("a",)), 1.5)
    recent = histogram.window(10)
    assert recent[:-2] == [0, 1, 0, 0] and recent[-2] == 1.5 and recent[-1] == 1
    merged = histogram.merged()
    assert merged[:-2] == [1, 1, 3, 0] and merged[-2] == pytest.approx(11.0) and merged[-1] == 5
    assert histogram.quantile(0.5, "b") == pytest.approx(3.0)  # rank 1.5 of 3 in (2, 4]
    by_second = histogram.per_second_quantile(0.5, 21)  # 999 to 1019
    assert by_second[1] == pytest.approx(2 + 2 * (2 - 1) / 3)  # 1000: rank 2 of 4, the first of 3 in (2, 4]
    assert by_second[0] is None and by_second[2:] == [None] * 19


def test_slo_attainment_streamed_and_plain():
    metrics = RouterMetrics(ttft_slo_s=1.0, tpot_slo_s=0.05, clock=FakeClock())
    metrics.finished("DECODING", "ok", "d", e2e_s=2.0, ttft_s=0.5, tpot_s=0.04, output_tokens=10)  # met
    metrics.finished("DECODING", "ok", "d", e2e_s=2.0, ttft_s=1.5, tpot_s=0.04, output_tokens=10)  # TTFT missed
    metrics.finished("DECODING", "ok", "d", e2e_s=2.0, ttft_s=0.5, tpot_s=0.06, output_tokens=10)  # TPOT missed
    # Not streamed, 11 tokens: due by 1.0 + 0.05 * 10 = 1.5 s.
    metrics.finished("PREFILLING", "ok", "d", e2e_s=1.4, output_tokens=11)
    metrics.finished("PREFILLING", "ok", "d", e2e_s=1.6, output_tokens=11)
    metrics.finished("PREFILLING", "failed", None, e2e_s=0.1)
    assert metrics.slo.values == {("met",): 2.0, ("missed",): 3.0}
    assert metrics.requests.values[("PREFILLING", "failed")] == 1.0
    assert metrics.ttft.merged()[-1] == 3  # plain answers have no TTFT of their own


def test_a_requests_figures_land_in_their_families_once_folded():
    clock = FakeClock(1000.5)
    metrics = RouterMetrics(clock=clock)
    hops = {"decision_s": 4e-5, "prefill_instance": "prefill-0"}
    metrics.finished("PREFILLING", "ok", "decode-0", e2e_s=0.5, input_tokens=100, output_tokens=10, queue_s=0.0,
                     prefill_s=0.2, **hops)  # fmt: skip
    clock.now = 1001.5
    metrics.finished("PREFILLING", "ok", "decode-0", e2e_s=0.7, input_tokens=50, output_tokens=5, queue_s=0.003,
                     prefill_s=0.1, **hops)  # fmt: skip
    metrics.finished("DECODING", "http_400", "decode-1", e2e_s=0.01, decision_s=2e-5, queue_s=0.0)
    assert len(metrics.ledger.pending) == 3  # deferred: fewer than a batch
    assert metrics.requests.values == {("PREFILLING", "ok"): 2.0, ("DECODING", "http_400"): 1.0}
    assert not metrics.ledger.pending  # reading folded them
    assert metrics.input_tokens.values == {("PREFILLING",): 150.0, ("DECODING",): 0.0}
    clock.now = 1002.0
    assert metrics.requests.per_second(2) == [1.0, 2.0]  # each in its own second, though folded together
    queue = metrics.queue.merged()
    waited = bisect.bisect_left(LATENCY_BUCKETS_S, 0.003)
    assert queue[0] == 2 and queue[waited] == 1 and queue[-2] == pytest.approx(0.003) and queue[-1] == 3
    assert metrics.prefill.merged()[-2] == pytest.approx(0.3) and metrics.decision.merged()[-1] == 3
    assert metrics.e2e.merged()[-1] == 2  # a failed request's latency is not the service's
    text = metrics.render()
    assert 'pdctl_router_instance_requests_total{instance="prefill-0",hop="prefill"} 2.0' in text
    assert 'pdctl_router_instance_requests_total{instance="decode-1",hop="decode"} 1.0' in text


def test_a_full_batch_is_folded_without_a_read():
    metrics = RouterMetrics(clock=FakeClock())
    for _ in range(FOLD_BATCH):
        metrics.finished("DECODING", "ok", "decode-0", e2e_s=0.1)
    assert not metrics.ledger.pending
    assert metrics.requests.values_of(metrics.ledger.rows) == {("DECODING", "ok"): FOLD_BATCH}


def test_rates_come_from_counter_deltas_over_the_window():
    history = EngineHistory()
    history.add(sample(0.0, prefix_hits=0, prefix_queries=0, prompt_tokens=0))
    history.add(sample(30.0, prefix_hits=50, prefix_queries=100, prompt_tokens=600))
    history.add(sample(61.0, prefix_hits=80, prefix_queries=300, prompt_tokens=1220, running=2))
    increase, span = history.over(60)
    assert span == 61.0  # the newest sample at least 60 s old is the one at 0
    assert increase.prefix_hits / increase.prefix_queries == pytest.approx(80 / 300)
    assert increase.prompt_tokens / span == pytest.approx(20.0)
    assert increase.running == 2  # gauges are the latest value


def test_a_counter_reset_counts_the_new_value_as_the_increase():
    history = EngineHistory()
    history.add(sample(0.0, prompt_tokens=1000))
    history.add(sample(10.0, prompt_tokens=40))  # the engine restarted
    increase, span = history.over(60)
    assert increase.prompt_tokens == 40 and span == 10.0


def test_busy_share_is_the_share_of_samples_with_requests_running():
    history = EngineHistory()
    for second, running in enumerate([0, 1, 3, 0]):
        history.add(sample(float(second), running=running))
    assert history.busy_share(60) == 0.5


def test_an_engine_makes_no_progress_when_its_token_counters_stand_still_for_the_limit():
    history = EngineHistory()
    for second in range(12):  # prompt and output tokens stand still from second 2 on
        history.add(sample(float(second), prompt_tokens=100, generation_tokens=min(second, 2) * 10))
    assert history.no_progress(9.0, now=11.5)  # 9 s flat: from the sample at 2 to the one at 11
    assert not history.no_progress(10.0, now=11.5)  # not yet 10 s
    assert not history.no_progress(9.0, now=20.0)  # the latest sample is stale: the scrape fails, no verdict
    history.add(sample(12.0, prompt_tokens=100, generation_tokens=21))
    assert not history.no_progress(9.0, now=12.5)  # a token again


VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 2.0
vllm:num_requests_running{engine="1",model_name="m"} 1.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.25
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 48.0
vllm:prefix_cache_hits_created{engine="0",model_name="m"} 1.7e9
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 160.0
# TYPE vllm:prompt_tokens_by_source counter
vllm:prompt_tokens_by_source_total{engine="0",model_name="m",source="local_compute"} 112.0
vllm:prompt_tokens_by_source_total{engine="0",model_name="m",source="local_cache_hit"} 48.0
vllm:prompt_tokens_by_source_total{engine="0",model_name="m",source="external_kv_transfer"} 64.0
# TYPE vllm:nixl_xfer_time_seconds histogram
vllm:nixl_xfer_time_seconds_bucket{engine="0",le="0.005",model_name="m"} 1.0
vllm:nixl_xfer_time_seconds_bucket{engine="0",le="+Inf",model_name="m"} 2.0
vllm:nixl_xfer_time_seconds_count{engine="0",model_name="m"} 2.0
vllm:nixl_xfer_time_seconds_sum{engine="0",model_name="m"} 0.012
# TYPE vllm:nixl_bytes_transferred histogram
vllm:nixl_bytes_transferred_count{engine="0",model_name="m"} 2.0
vllm:nixl_bytes_transferred_sum{engine="0",model_name="m"} 65536.0
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001",model_name="m"} 0.0
"""


def test_parse_engine_metrics_sums_engines_and_averages_kv_usage():
    parsed = parse_engine_metrics(VLLM_METRICS, at=5.0)
    assert parsed.at == 5.0 and parsed.running == 3.0 and parsed.kv_usage == pytest.approx(0.375)
    assert (parsed.prefix_hits, parsed.prefix_queries) == (48.0, 160.0)
    assert (parsed.prompt_computed, parsed.prompt_cache_hit, parsed.prompt_transferred) == (112.0, 48.0, 64.0)
    assert (parsed.nixl_transfers, parsed.nixl_seconds, parsed.nixl_bytes) == (2.0, 0.012, 65536.0)


def test_cost_per_million_tokens_and_the_measured_comparison(tmp_path):
    assert usd_per_million_tokens(2, 2.0, 100.0) == pytest.approx(4 / 3600 / 100 * 1e6)
    assert usd_per_million_tokens(2, 2.0, 0.0) is None
    comparison = CostComparison(
        profile="p", measured_at=datetime(2026, 11, 28, tzinfo=UTC), workload="chat", engine="sim", devices=4,
        gpu_hour_usd=3.0, pd_output_tokens_per_s=150.0, colocated_output_tokens_per_s=100.0,
    )  # fmt: skip
    assert comparison.optimization_percent == pytest.approx(100 / 3)
    assert comparison.pd_usd_per_million == pytest.approx(12 / 3600 / 150 * 1e6)
    assert load_comparison(tmp_path, "p") is None
    save_comparison(tmp_path, comparison)
    assert load_comparison(tmp_path, "p") == comparison


def test_cluster_stats_pd_metrics_and_hints_at_fixed_data():
    stats = fixed_cluster(FakeClock(2000.0))
    last_minute = stats.windows["60s"]
    # Seconds 1941..2000 of the clock fall in the last minute: requests at even offsets 2..60 -> 30 of 31.
    assert last_minute.requests == 30 and stats.windows["total"].requests == 31
    assert last_minute.output_tokens_per_s == pytest.approx(30 * 20 / 59.5)
    assert last_minute.slo_attainment == 1.0
    assert stats.windows["total"].split == {"PREFILLING": 16, "DECODING": 15, "HYBRID": 0}
    prefill, decode = stats.instances
    assert prefill.prompt_tokens_per_s == pytest.approx(100.0)
    assert prefill.prefix_hit_rate == pytest.approx(0.1) and decode.prefix_hit_rate == pytest.approx(0.4)
    assert stats.kv_cache_hit_rate == pytest.approx((2 + 8) / (20 + 20))
    assert prefill.busy_share == 1.0 and decode.busy_share == pytest.approx(30 / 60)
    assert stats.nixl == {"transfers": 60.0, "seconds": 0.0, "bytes": 60000.0}
    pd = stats.pd_metrics
    assert pd.prefilling_throughput_tokens_per_sec == pytest.approx(100.0)
    assert pd.decoding_latency_avg_ms == pytest.approx(20.0)
    assert pd.prefilling_latency_p99_ms == pytest.approx(200, rel=0.25)  # within one bucket of 25 %
    assert pd.kv_cache_hit_rate == pytest.approx(0.25)
    assert (pd.requests_routed_to_prefilling, pd.requests_routed_to_decoding) == (16, 15)
    assert pd.total_cost_optimization_percent == 0.0 and stats.cost.optimization_percent is None
    assert stats.cost.usd_per_million_output_tokens == pytest.approx(4 / 3600 / (30 * 20 / 59.5) * 1e6)
    symptoms = [hint.symptom for hint in stats.hints]
    assert symptoms == [
        "routing decisions slower than 10 ms",
        "KV-cache hit rate under 30 %",
        "prefill instance prefill-0 over 95 % busy",
    ]
    text = exposition(stats)
    assert 'pdctl_instance_prefix_hit_rate{instance="decode-0",role="DECODING"} 0.4' in text
    assert "pdctl_pd_requests_routed_to_prefilling 16.0" in text
    assert 'pdctl_instance_nixl_bytes_total{instance="decode-0"} 60000.0' in text


def test_the_cost_optimization_comes_only_from_a_measured_comparison(tmp_path):
    save_comparison(tmp_path, CostComparison(
        profile="c", measured_at=datetime(2026, 11, 28, tzinfo=UTC), workload="chat", engine="sim", devices=2,
        gpu_hour_usd=2.0, pd_output_tokens_per_s=120.0, colocated_output_tokens_per_s=100.0,
    ))  # fmt: skip
    stats = fixed_cluster(FakeClock(2000.0), state_root=tmp_path)
    assert stats.pd_metrics.total_cost_optimization_percent == pytest.approx(100 / 6)
    assert stats.cost.comparison is not None and stats.cost.comparison.workload == "chat"


def test_every_series_the_grafana_dashboard_queries_is_exposed():
    from pathlib import Path

    dashboard = (Path(__file__).parent.parent / "dashboards" / "pdctl-grafana.json").read_text()
    queried = {name.removesuffix("_bucket") for name in re.findall(r"pdctl_[a-z0-9_]+", dashboard)}
    exposed = RouterMetrics().render() + exposition(fixed_cluster(FakeClock(2000.0)))
    families = set(re.findall(r"^# TYPE (pdctl_[a-z0-9_]+) ", exposed, re.M))
    assert queried and queried <= families, queried - families


async def _serve_answers(answers: list[bytes]):
    """A server that answers each GET on a connection with the next canned reply, closing after the last."""
    import asyncio

    async def handle(reader, writer):
        for answer in answers:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer)
            await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def test_the_metrics_connection_keeps_alive_and_reads_every_framing():
    import asyncio

    from pdctl.router.scrape import MetricsConnection

    answers = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nsec\r\n3;x=1\r\nond\r\n0\r\n\r\n",
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy",
        b"HTTP/1.0 200 OK\r\n\r\nthird, to the end",
    ]

    async def scenario() -> list[str]:
        server = await _serve_answers(answers)
        port = server.sockets[0].getsockname()[1]
        connection = MetricsConnection(f"http://127.0.0.1:{port}/metrics")
        got = [await connection.get(), await connection.get()]
        with pytest.raises(ValueError, match="503 Service Unavailable"):
            await connection.get()  # read whole: the connection stays usable
        got.append(await connection.get())  # no length, no chunks: to the end, then closed
        got.append(await connection.get())  # a new connection, the server's script from the start
        server.close()
        connection.close()
        return got

    assert asyncio.run(scenario()) == ["first", "second", "third, to the end", "first"]
