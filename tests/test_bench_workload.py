"""`pdctl bench` arithmetic: workloads, traces, metrics and /metrics differences against hand-computed values."""

from __future__ import annotations

import json
import math
import random

import pytest

from pdctl.bench import report, serverstats
from pdctl.bench.client import RequestResult
from pdctl.bench.tokens import ByteTokenizer, HuggingFaceTokenizer
from pdctl.bench.workload import (
    WorkloadSpec,
    arrival_offsets,
    build,
    load_trace,
    parse_extra_body,
    parse_goodput,
    parse_priority_mix,
    sample_length,
)
from pdctl.errors import UsageError

BYTES = ByteTokenizer()


# ---- workloads -------------------------------------------------------------------------------------------


def test_lengths_stay_within_the_range_ratio_and_cover_it():
    rng = random.Random(0)
    lengths = [sample_length(rng, 100, 0.5) for _ in range(2000)]
    assert min(lengths) == 50 and max(lengths) == 150
    assert {sample_length(rng, 100, 0.0) for _ in range(10)} == {100}


def test_arrivals_end_at_count_over_rate_and_burstiness_spreads_them():
    assert arrival_offsets(random.Random(1), 5, math.inf, 1.0) == [0.0] * 5
    poisson = arrival_offsets(random.Random(1), 400, 20.0, 1.0)
    assert poisson[-1] == pytest.approx(20.0) and poisson == sorted(poisson)
    gaps = lambda offsets: [b - a for a, b in zip([0.0, *offsets], offsets, strict=False)]  # noqa: E731
    steady = gaps(arrival_offsets(random.Random(1), 400, 20.0, 100.0))
    bursty = gaps(arrival_offsets(random.Random(1), 400, 20.0, 0.1))
    spread = lambda g: max(g) - min(g)  # noqa: E731
    assert spread(steady) < spread(gaps(poisson)) < spread(bursty)


def test_the_same_seed_gives_the_same_workload_and_another_seed_another():
    spec = WorkloadSpec(num_prompts=20, input_len=64, output_len=8, range_ratio=0.5, rate=10)
    first, again = build(spec, BYTES), build(spec, BYTES)
    other = build(spec.model_copy(update={"seed": 1}), BYTES)
    assert [(r.prompt, r.output_tokens, r.arrival_s) for r in first.requests] == [
        (r.prompt, r.output_tokens, r.arrival_s) for r in again.requests
    ]
    assert [r.prompt for r in first.requests] != [r.prompt for r in other.requests]
    assert all(r.input_tokens == len(r.prompt) and 32 <= r.input_tokens <= 96 for r in first.requests)
    assert first.timed


def test_prefix_groups_share_their_prefix():
    spec = WorkloadSpec(num_prompts=6, input_len=20, output_len=4, prefix_groups=2, prefix_len=50)
    requests = build(spec, BYTES).requests
    prefixes = [r.prompt[:50] for r in requests]
    assert prefixes[0] == prefixes[2] == prefixes[4] != prefixes[1] == prefixes[3] == prefixes[5]
    assert all(r.input_tokens == 70 for r in requests)


def test_chat_turns_carry_the_conversation_so_far():
    requests = build(WorkloadSpec(scenario="chat", num_prompts=8), BYTES).requests
    assert [r.after for r in requests] == [None, 0, 1, 2, None, 4, 5, 6]
    for turn in (1, 2, 3):
        assert requests[turn].prompt.startswith(requests[turn - 1].prompt)
        assert requests[turn].input_tokens > requests[turn - 1].input_tokens
    assert not requests[4].prompt.startswith(requests[3].prompt[:20])


def test_presets_are_scaled_to_fit_the_servers_context():
    fitted = build(WorkloadSpec(scenario="qa", num_prompts=20, max_model_len=2048), BYTES)
    assert fitted.notes and "scaled" in fitted.notes[0]
    assert all(r.input_tokens + r.output_tokens < 2048 for r in fitted.requests)
    full = build(WorkloadSpec(scenario="qa", num_prompts=20), BYTES).requests
    assert all(2000 <= r.input_tokens <= 4000 and 100 <= r.output_tokens <= 200 for r in full)
    with pytest.raises(UsageError, match=r"unknown scenario 'poetry'.*qa, chat, code"):
        build(WorkloadSpec(scenario="poetry"), BYTES)


def test_priority_mix_and_deadlines():
    assert parse_priority_mix("0:1,2:3") == {0: 1.0, 2: 3.0}
    with pytest.raises(UsageError):
        parse_priority_mix("high:1")
    spec = WorkloadSpec(num_prompts=400, input_len=4, output_len=2, priority_mix={0: 1, 2: 3}, deadline_ms=500)
    requests = build(spec, BYTES).requests
    zeros = sum(r.priority == 0 for r in requests)
    assert {r.priority for r in requests} == {0, 2} and 70 < zeros < 130
    assert {r.deadline_ms for r in requests} == {500}


def test_goodput_slos_parse_like_vllm_bench():
    assert parse_goodput(["ttft:500 tpot:50", "e2el:2000"]) == {"ttft": 500, "tpot": 50, "e2el": 2000}
    for bad in ("itl:5", "ttft:soon", "ttft:-1"):
        with pytest.raises(UsageError, match="--goodput"):
            parse_goodput([bad])


def test_a_huggingface_tokenizer_makes_prompts_of_the_asked_length(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {f"w{i}": i for i in range(50)} | {"[UNK]": 50}
    tokenizer = Tokenizer(models.WordLevel(vocab=words, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(["[UNK]"])
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    real = HuggingFaceTokenizer(tmp_path / "tokenizer.json")
    text = real.text(random.Random(0), 30)
    assert real.count(text) == 30 and "[UNK]" not in text


# ---- traces ----------------------------------------------------------------------------------------------


def write_lines(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_a_jsonl_trace_replays_its_arrivals_prompts_and_counts(tmp_path):
    trace = write_lines(
        tmp_path / "t.jsonl",
        [
            {"arrival_s": 10.5, "prompt": "hello there", "output_tokens": 3, "priority": 1},
            {"arrival_s": 10.0, "input_tokens": 40, "output_tokens": 5, "deadline_ms": 800},
        ],
    )
    workload = load_trace(trace, "auto", BYTES, seed=0)
    first, second = workload.requests
    assert (first.arrival_s, first.input_tokens, first.output_tokens, first.deadline_ms) == (0.0, 40, 5, 800)
    assert (second.arrival_s, second.prompt, second.priority) == (0.5, "hello there", 1)
    assert workload.timed and [r.index for r in workload.requests] == [0, 1]


def test_a_mooncake_trace_shares_text_where_hash_ids_repeat(tmp_path):
    trace = write_lines(
        tmp_path / "m.jsonl",
        [
            {"timestamp": 0, "input_length": 1100, "output_length": 10, "hash_ids": [7, 8, 9]},
            {"timestamp": 250, "input_length": 1030, "output_length": 20, "hash_ids": [7, 8, 11]},
        ],
    )
    first, second = load_trace(trace, "auto", BYTES, seed=0).requests
    assert first.prompt[:1024] == second.prompt[:1024] and first.prompt[1024:] != second.prompt[1024:]
    assert (first.input_tokens, second.input_tokens, second.arrival_s, second.output_tokens) == (1100, 1030, 0.25, 20)


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"arrival_s": 0, "prompt": "a", "output_tokens": 1}', "{not json"], r"t.jsonl:2: not JSON"),
        (['{"arrival_s": 0, "prompt": "a"}'], r"t.jsonl:1: output_tokens: Field required"),
        (['{"arrival_s": 0, "output_tokens": 2}'], r"t.jsonl:1: give either prompt or input_tokens"),
        (["", "[1, 2]"], r"t.jsonl:2: each line must be a JSON object"),
        ([""], r"the trace has no requests"),
    ],
)
def test_a_malformed_trace_names_its_line(tmp_path, lines, message):
    trace = write_lines(tmp_path / "t.jsonl", lines)
    with pytest.raises(UsageError, match=message):
        load_trace(trace, "auto", BYTES, seed=0)


def test_an_unreadable_trace_is_bad_input(tmp_path):
    with pytest.raises(UsageError, match="cannot read the trace"):
        load_trace(tmp_path / "missing.jsonl", "auto", BYTES, seed=0)


# ---- metrics ---------------------------------------------------------------------------------------------


def test_percentiles_interpolate_like_numpy():
    values = [4.0, 1.0, 3.0, 2.0]
    assert [report.percentile(values, p) for p in (50, 90, 99)] == pytest.approx([2.5, 3.7, 3.97])
    assert report.percentile([], 99) == 0.0


def hand_made_results() -> list[RequestResult]:
    return [
        RequestResult(
            0,
            start=0.0,
            success=True,
            ttft=0.1,
            itl=[0.1] * 4,
            latency=0.5,
            prompt_tokens=10,
            output_tokens=5,
            token_events=5,
            first_event_tokens=1,
        ),
        RequestResult(
            1,
            start=0.2,
            success=True,
            ttft=0.2,
            latency=0.2,
            prompt_tokens=20,
            output_tokens=1,
            token_events=1,
            first_event_tokens=1,
        ),
        RequestResult(2, start=0.3, error_kind="http_503", error="overloaded", prompt_tokens=30),
    ]


def test_summary_has_vllm_bench_names_and_values():
    summary = report.summarize(hand_made_results(), 2.0, {"ttft": 150})
    assert (summary["completed"], summary["failed"], summary["failures_by_kind"]) == (2, 1, {"http_503": 1})
    assert (summary["total_input_tokens"], summary["total_output_tokens"]) == (30, 6)
    assert summary["request_throughput"] == 1.0
    assert summary["output_throughput"] == 3.0
    assert summary["total_token_throughput"] == 18.0
    assert summary["mean_ttft_ms"] == pytest.approx(150) and summary["median_ttft_ms"] == pytest.approx(150)
    assert summary["p99_ttft_ms"] == pytest.approx(199)
    assert summary["mean_tpot_ms"] == pytest.approx(100)  # (0.5 - 0.1) / (5 - 1); one-token answers have none
    assert summary["mean_itl_ms"] == pytest.approx(100) and summary["mean_e2el_ms"] == pytest.approx(350)
    assert summary["std_e2el_ms"] == pytest.approx(150)
    assert summary["request_goodput"] == 0.5  # only the first meets TTFT <= 150 ms


def test_goodput_counts_a_one_token_answer_as_tpot_zero():
    summary = report.summarize(hand_made_results(), 2.0, {"tpot": 50})
    assert summary["request_goodput"] == 0.5  # the second (TPOT 0) meets it, the first (100 ms) does not
    assert report.summarize(hand_made_results(), 2.0, {})["request_goodput"] is None


def test_timeline_counts_tokens_and_requests_in_flight():
    line = report.timeline(hand_made_results(), bucket_s=0.25)
    # Tokens at 0.1, 0.2, 0.3, 0.4, 0.5 s (first request) and 0.4 s (second); both run in [0, 0.5).
    assert line["t"] == [0.0, 0.25, 0.5]
    assert line["output_tokens_per_s"] == [2 / 0.25, 3 / 0.25, 1 / 0.25]
    assert line["running"] == [2, 2, 1]


def test_cost_per_million_output_tokens():
    # 2 GPUs at $3 an hour for half an hour, 1.5 million tokens: $3 / 1.5 = $2 per million.
    assert report.cost_per_million_output(2, 3.0, 1800, 1_500_000) == pytest.approx(2.0)
    assert report.cost_per_million_output(2, 3.0, 1800, 0) is None


ROUTER_BEFORE = """# TYPE pdctl_router_requests_total counter
pdctl_router_requests_total{phase="PREFILLING",outcome="ok"} 5.0
pdctl_router_requests_total{phase="DECODING",outcome="ok"} 1.0
# TYPE pdctl_router_queue_seconds histogram
pdctl_router_queue_seconds_bucket{le="+Inf"} 6.0
pdctl_router_queue_seconds_sum 0.5
pdctl_router_queue_seconds_count 6.0
"""
ROUTER_AFTER = (
    ROUTER_BEFORE.replace("} 5.0", "} 12.0").replace("} 1.0", "} 4.0")
    + 'pdctl_router_requests_total{phase="DECODING",outcome="error"} 2.0\n'
)
ENGINE = """# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{{engine="0"}} {queries}
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{{engine="0"}} {hits}
# TYPE vllm:nixl_xfer_time_seconds histogram
vllm:nixl_xfer_time_seconds_bucket{{engine="0",le="+Inf"}} {transfers}
vllm:nixl_xfer_time_seconds_sum{{engine="0"}} {seconds}
vllm:nixl_xfer_time_seconds_count{{engine="0"}} {transfers}
# TYPE vllm:nixl_bytes_transferred histogram
vllm:nixl_bytes_transferred_bucket{{engine="0",le="+Inf"}} {transfers}
vllm:nixl_bytes_transferred_sum{{engine="0"}} {nbytes}
vllm:nixl_bytes_transferred_count{{engine="0"}} {transfers}
"""


def test_server_figures_are_differences_over_the_run():
    def engine(queries, hits, transfers, seconds, nbytes):
        return serverstats.parse(
            ENGINE.format(queries=queries, hits=hits, transfers=transfers, seconds=seconds, nbytes=nbytes)
        )

    before = serverstats.Snapshot(
        serverstats.parse(ROUTER_BEFORE), {"p": engine(100, 10, 0, 0, 0), "d": engine(50, 0, 3, 0.3, 3000)}
    )
    after = serverstats.Snapshot(
        serverstats.parse(ROUTER_AFTER), {"p": engine(300, 110, 0, 0, 0), "d": engine(150, 0, 10, 1.0, 10000)}
    )
    figures = serverstats.differences(before, after)
    assert figures["phase_split"] == {"PREFILLING": {"ok": 7.0}, "DECODING": {"ok": 3.0, "error": 2.0}}
    assert figures["prefix_cache_hit_rate"] == pytest.approx(100 / 300)
    assert (figures["nixl_transfers"], figures["nixl_bytes_transferred"]) == (7.0, 7000.0)
    assert figures["nixl_transfer_time_s"] == pytest.approx(0.7)
    assert "router_queue_mean_ms" not in figures  # no request queued during the run


def test_a_server_without_these_metrics_gives_no_figures():
    empty = serverstats.Snapshot(None, {"x": None})
    assert serverstats.differences(empty, empty) == {}


def test_extra_body_fields_reach_every_request_but_never_the_workloads_own():
    from pdctl.bench.client import request_body
    from pdctl.bench.workload import BenchRequest

    extra = parse_extra_body('{"allowed_token_ids": [35, 36], "top_k": 1}')
    body = request_body("m", BenchRequest(0, "hi", 2, 5), extra)
    assert body["allowed_token_ids"] == [35, 36] and body["top_k"] == 1
    assert (body["prompt"], body["max_tokens"], body["ignore_eos"], body["stream"]) == ("hi", 5, True, True)
    assert parse_extra_body(None) is None
    for bad, message in (("{", "not JSON"), ("3", "JSON object"), ('{"prompt": "x"}', "cannot set prompt")):
        with pytest.raises(UsageError, match=message):
            parse_extra_body(bad)


def test_a_figure_no_request_gives_is_none_not_zero():
    # The whole answer in one event (seen on a PD decode instance): its TPOT and ITLs cannot be known.
    one_event = RequestResult(
        0, success=True, ttft=0.3, latency=0.3, output_tokens=32, token_events=1, first_event_tokens=32
    )
    summary = report.summarize([one_event], 1.0, {})
    assert summary["mean_tpot_ms"] is None and summary["p99_tpot_ms"] is None and summary["median_itl_ms"] is None
    assert summary["mean_ttft_ms"] == pytest.approx(300) and summary["total_output_tokens"] == 32
    assert report.timeline([one_event], bucket_s=1.0)["output_tokens_per_s"] == [32.0]
    # Tokens after the first event, not events: 1 + 4 + 4 tokens, 0.8 s after the first event.
    grouped = RequestResult(
        1, success=True, ttft=0.2, latency=1.0, output_tokens=9, token_events=3, first_event_tokens=1
    )
    assert report.tpot_of(grouped) == pytest.approx(0.1)
