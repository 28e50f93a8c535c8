"""`pdctl simulate`: request timings worked out by hand from the step model, the daemon's routing decisions, the
metrics, the command line; and the sim engine timed by the same model, as a real process over HTTP."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from pdctl import strictjson
from pdctl.bench.report import percentile
from pdctl.engines.sim import parse_args
from pdctl.perfmodel.arch import get_model
from pdctl.perfmodel.hardware import get_hardware
from pdctl.perfmodel.steptime import BatchShape, StepModel
from pdctl.profile import ClusterProfile, load_profile
from pdctl.simulate.des import ClusterSim
from pdctl.simulate.design import DESIGN_DIR, DOCUMENT_ROWS, best, frontier_svg, layouts, sweep
from pdctl.simulate.design import write_profile as write_profile_file
from pdctl.simulate.report import RequestRecord, summarize
from pdctl.simulate.run import simulate
from pdctl.simulate.workload import SimRequest, WorkloadSpec, generate
from tests.conftest import PROFILES
from tests.test_cli import pdctl
from tests.test_sim_engine import kill, launch, wait_healthy

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def write_profile(tmp_path: Path, pd: str, prefill: int = 1, decode: int = 1) -> Path:
    path = tmp_path / "sim.yaml"
    path.write_text(
        f"name: simulated\nmodel: {{path: {MODEL}}}\n"
        "engine: {kind: sim, sim: {hardware: h100-sxm}}\n"
        "router: {scheduling_policy: fifo, slo: {ttft_ms: 500, tpot_ms: 50}}\n"
        f"pd: {{{pd}, prefilling_min_instances: {prefill}, decoding_min_instances: {decode}, "
        "enable_dynamic_scaling: false}\n"
        "prefill: {tensor_parallel_size: 1}\ndecode: {tensor_parallel_size: 1}\n"
    )
    return path


def step(model: StepModel, *requests: tuple[int, int]) -> float:
    shape = BatchShape()
    for new, before in requests:
        shape.add(new, before)
    return model.step_seconds(shape)


def test_one_request_on_a_hybrid_instance_by_hand(tmp_path: Path) -> None:
    profile = load_profile(write_profile(tmp_path, "enabled: false", prefill=0))
    result = simulate(profile, [SimRequest(0, 0.0, 100, 4)])
    model = StepModel(get_model(MODEL), get_hardware("h100-sxm"))
    prefill = step(model, (100, 0))
    decodes = [step(model, (1, 100 + i)) for i in range(3)]
    (record,) = result.records
    assert record.ttft == pytest.approx(prefill)
    assert record.itls == pytest.approx(decodes)
    assert record.e2e == pytest.approx(prefill + sum(decodes))
    assert result.decisions == {"HYBRID": 1}


def test_pd_split_request_by_hand(tmp_path: Path) -> None:
    profile = load_profile(write_profile(tmp_path, "enabled: true, routing_policy: always"))
    result = simulate(profile, [SimRequest(0, 0.0, 300, 3)])
    model = StepModel(get_model(MODEL), get_hardware("h100-sxm"))
    # Prefill instance: the whole prompt, one token sampled; KV over the link; the decode instance computes the
    # prompt's last token again (vLLM's NixlConnector) and samples the client's first token.
    ttft = step(model, (300, 0)) + model.kv_transfer_seconds(300) + step(model, (1, 299))
    (record,) = result.records
    assert record.phase == "PREFILLING"
    assert record.ttft == pytest.approx(ttft)
    assert record.itls == pytest.approx([step(model, (1, 300)), step(model, (1, 301))])


def test_each_hop_to_an_engine_adds_its_latency_before_the_first_token(tmp_path: Path) -> None:
    profile = load_profile(write_profile(tmp_path, "enabled: true, routing_policy: always"))
    (direct,) = simulate(profile, [SimRequest(0, 0.0, 300, 3)]).records
    (hopped,) = simulate(profile, [SimRequest(0, 0.0, 300, 3)], hop_s=0.004).records
    assert hopped.ttft == pytest.approx(direct.ttft + 2 * 0.004)  # router to prefill, router to decode
    assert hopped.itls == pytest.approx(direct.itls)


def test_threshold_policy_decides_as_the_daemon_does(tmp_path: Path) -> None:
    profile = load_profile(
        write_profile(
            tmp_path,
            "enabled: true, routing_policy: threshold, prefilling_threshold_input_tokens: 512, "
            "prefilling_threshold_ratio: 1.0",
        )
    )
    requests = [SimRequest(i, i * 0.01, 1000 if i % 2 else 100, 10) for i in range(10)]
    result = simulate(profile, requests)
    assert result.decisions == {"PREFILLING": 5, "DECODING": 5}
    assert {r.phase for r in result.records if r.input_tokens == 1000} == {"PREFILLING"}


def test_shared_prefixes_hit_the_engine_prefix_cache(tmp_path: Path) -> None:
    profile = load_profile(write_profile(tmp_path, "enabled: false", prefill=0))
    spec = WorkloadSpec(num_requests=20, input_tokens=512, output_tokens=2, prefix_groups=1, prefix_tokens=256,
                        request_rate=10.0)  # fmt: skip
    result = simulate(profile, generate(spec))
    cached = sorted(r.cached_tokens for r in result.records)
    assert cached[0] == 0 and cached[-1] == 256


def test_percentiles_and_metric_names() -> None:
    values = [float(v) for v in range(1, 11)]
    # numpy's linear percentile: rank (n - 1) x p.
    assert (percentile(values, 50), percentile(values, 90), percentile(values, 99)) == pytest.approx((5.5, 9.1, 9.91))
    records = [RequestRecord(i, 10, 3, 0.0, ttft=0.1 * (i + 1), itls=[0.02, 0.04], e2e=0.1 * (i + 1) + 0.06)
               for i in range(4)]  # fmt: skip
    metrics = summarize(records, 2.0)
    assert metrics["output_throughput"] == 6.0 and metrics["request_throughput"] == 2.0
    assert metrics["median_ttft_ms"] == pytest.approx(250.0)
    assert metrics["mean_tpot_ms"] == pytest.approx(30.0)
    assert metrics["p99_itl_ms"] == pytest.approx(40.0)


def test_design_scenario_completes(tmp_path: Path) -> None:
    """The design document's scenario: 1000 requests at once, 200 in, 500 out, Llama-2-70B on H100s."""
    path = tmp_path / "design.yaml"
    path.write_text(
        "name: design\nmodel: {path: meta-llama/Llama-2-70b-hf}\nengine: {kind: sim, sim: {hardware: h100-sxm}}\n"
        "pd: {enabled: true, routing_policy: always, prefilling_min_instances: 1, decoding_min_instances: 1, "
        "enable_dynamic_scaling: false}\n"
        "prefill: {tensor_parallel_size: 8, target_batch_size: 256, max_chunk_size_tokens: 8192}\n"
        "decode: {tensor_parallel_size: 8, max_parallel_requests: 1024}\n"
    )
    result = simulate(
        load_profile(path), generate(WorkloadSpec(num_requests=1000, input_tokens=200, output_tokens=500))
    )
    assert result.metrics["completed"] == 1000
    assert result.metrics["total_output_tokens"] == 500_000
    assert result.gpus == 16 and result.preemptions == 0


def test_cli_prints_modelled_metrics_and_refuses_a_profile_without_hardware(tmp_path: Path) -> None:
    path = write_profile(tmp_path, "enabled: true, routing_policy: always")
    shown = pdctl("simulate", str(path), "--num-prompts", "20", "--input-len", "64", "--output-len", "8")
    assert shown.returncode == 0, shown.stderr
    assert "modelled, not measured" in shown.stdout and "Median TTFT (ms)" in shown.stdout
    data = json.loads(pdctl("simulate", str(path), "--num-prompts", "5", "--json").stdout)
    assert data["completed"] == 5 and "p99_itl_ms" in data and data["engine"].startswith("pdctl simulate")
    bare = tmp_path / "bare.yaml"
    bare.write_text(path.read_text().replace("engine: {kind: sim, sim: {hardware: h100-sxm}}\n", ""))
    refused = pdctl("simulate", str(bare))
    assert refused.returncode == 2
    assert "no hardware profile" in refused.stderr and "Traceback" not in refused.stderr


def test_sim_engine_with_a_hardware_profile_serves_and_says_it_is_a_sim(tmp_path: Path) -> None:
    sim = launch(tmp_path, "--hardware", "h100-sxm", "--architecture", "llama-3.1-8b")
    try:
        wait_healthy(sim)
        response = sim.complete("a prompt of some bytes " * 8, max_tokens=6)
        body = response.json()
        assert response.status_code == 200 and body["system_fingerprint"] == "pdctl-sim"
        assert body["usage"]["completion_tokens"] == 6
        assert sim.metric("vllm:generation_tokens_total") == 6
        assert sim.get("/metrics").text.startswith("# pdctl-sim")
    finally:
        kill(sim)


def test_sim_engine_refuses_an_unknown_hardware_profile(tmp_path: Path) -> None:
    sim = launch(tmp_path, "--hardware", "no-such-gpu")
    try:
        sim.process.wait(timeout=30)
        assert sim.process.returncode != 0
        assert "unknown hardware profile 'no-such-gpu'" in sim.log()
    finally:
        kill(sim)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{sim.port}/health", timeout=1)


def test_layouts_of_four_gpus() -> None:
    labels = [layout.label for layout in layouts(4, tps=(1, 2))]
    # Hybrid pools, and every prefill/decode split using 2 to 4 GPUs with one TP size per role.
    assert "4H·TP1" in labels and "2H·TP2" in labels
    assert "1P·TP1 + 3D·TP1" in labels and "1P·TP2 + 1D·TP2" in labels and "2P·TP1 + 1D·TP2" in labels
    assert all(layout.gpus <= 4 and layout.gpus * 2 >= 4 for layout in layouts(4, tps=(1, 2)))


def test_sweep_chooses_the_best_goodput_per_gpu_and_writes_a_loadable_profile(tmp_path: Path) -> None:
    base_path = write_profile(tmp_path, "enabled: true, routing_policy: always")
    requests = generate(WorkloadSpec(num_requests=60, input_tokens=800, output_tokens=40, request_rate=30.0))
    swept = sweep(load_profile(base_path), 2, requests, None)
    points = swept.points
    assert {p.layout.label for p in points} == {"1P·TP1 + 1D·TP1", "2H·TP1", "1H·TP2"} and not swept.cannot_run
    chosen = best(points)
    assert chosen.goodput_per_gpu == max(p.goodput_per_gpu for p in points)
    out = tmp_path / "chosen.yaml"
    write_profile_file(base_path, chosen.result_profile, out)
    written = load_profile(out)
    assert written.pd.prefilling_min_instances == chosen.layout.prefill
    assert written.decode.tensor_parallel_size == chosen.layout.decode_tp
    svg = frontier_svg(points, chosen)
    assert svg.startswith("<svg") and chosen.layout.label in svg


def test_design_table_rows_read_as_documented() -> None:
    rows = {row.profile: load_profile(DESIGN_DIR / row.profile) for row in DOCUMENT_ROWS}
    gpus = {name: sum(i.gpu_count or 1 for i in profile.resolved_instances()) for name, profile in rows.items()}
    assert gpus == {"design-colocated.yaml": 16, "design-2x8.yaml": 16, "design-3x8.yaml": 24}
    assert not rows["design-colocated.yaml"].pd.enabled
    assert rows["design-3x8.yaml"].pd.decoding_min_instances == 2


def test_a_sim_profile_with_hardware_launches_modelled_sims(tmp_path: Path) -> None:
    from pdctl.cluster import plan_profile

    plan = plan_profile(write_profile(tmp_path, "enabled: true, routing_policy: always")).plan
    prefill = next(i for i in plan.instances if "--role" in i.argv and i.argv[i.argv.index("--role") + 1] == "prefill")
    argv = prefill.argv
    assert argv[argv.index("--hardware") + 1] == "h100-sxm"
    assert argv[argv.index("--architecture") + 1] == MODEL
    assert argv[argv.index("--max-num-batched-tokens") + 1] == "4096"  # the prefill instance's chunk size
    assert "--speed" not in argv  # drawn from the hardware profile's noise
    assert any("emulator" in note for note in plan.notes)
    path = write_profile(tmp_path, "enabled: false")
    path.write_text(path.read_text().replace("sim: {hardware: h100-sxm}", "sim: {hardware: h100-sxm, speed: 1.25}"))
    hybrid = plan_profile(path).plan.instances[0].argv
    assert hybrid[hybrid.index("--speed") + 1] == "1.25"
    assert parse_args(["--served-model-name", MODEL, "--hardware", "h100-sxm", "--speed", "1.25"]).speed == 1.25


def seventy_b_profile(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "seventy.yaml"
    path.write_text(
        "name: seventy\nmodel: {path: meta-llama/Llama-3.1-70B-Instruct" + extra + "}\n"
        "engine: {kind: sim, sim: {hardware: h100-sxm}}\nrouter: {slo: {ttft_ms: 2000, tpot_ms: 100}}\n"
        "pd: {enabled: true, routing_policy: always}\n"
        "prefill: {tensor_parallel_size: 8}\ndecode: {tensor_parallel_size: 8}\n"
    )
    return path


def test_a_70b_sweep_on_16_gpus_says_why_tp2_decode_cannot_run_and_fits_80_columns(tmp_path: Path) -> None:
    from rich.console import Console

    from pdctl.simulate.render import sweep_view

    requests = generate(WorkloadSpec(num_requests=20, input_tokens=200, output_tokens=20, request_rate=20.0))
    swept = sweep(load_profile(seventy_b_profile(tmp_path)), 16, requests, None)
    # 70B in bf16 is 65.7 GiB a GPU at TP 2; with 4 GiB of activations that is more than 0.85 of 79.2 GiB.
    tp2_decode = [c for c in swept.cannot_run if c.layout.decode_tp == 2 and c.layout.prefill]
    assert tp2_decode and all("decode TP 2 needs 69.7 GiB per GPU" in c.reason for c in tp2_decode)
    assert all(c.reason.startswith("does not fit: ") for c in swept.cannot_run)
    assert "decode.kv_cache_memory_fraction 0.85 gives it 67.3 of h100-sxm's 79.2 GiB" in tp2_decode[0].reason
    # Every layout either ran (with output) or says why not: no row of zeros.
    assert {p.layout for p in swept.points} | {c.layout for c in swept.cannot_run} == set(layouts(16))
    assert swept.points and all(p.result.metrics["completed"] == 20 for p in swept.points)
    assert not {p.layout.decode_tp for p in swept.points} & {1, 2}

    console = Console(width=80, record=True)
    console.print(sweep_view(swept, best(swept.points)))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    rows = [line for line in text.splitlines() if line.startswith("│ ")]
    for point in swept.points:  # each layout's name whole on one row
        assert sum(point.layout.label in row for row in rows) == 1
    assert "decode TP 2" in text and f"{len(swept.cannot_run)} of {len(layouts(16))} layouts cannot run" in text
    assert " 0% " not in text and "0.0 " not in text


def test_a_kv_cache_too_small_for_max_model_len_is_named(tmp_path: Path) -> None:
    from pdctl.simulate.design import Layout, layout_profile
    from pdctl.simulate.run import resolve, shortfalls

    requests = [SimRequest(0, 0.0, 100, 10)]
    four_tp4 = Layout(0, 4, 4, 4)
    fits = layout_profile(load_profile(seventy_b_profile(tmp_path)), four_tp4)
    assert shortfalls(fits, *resolve(fits, None, None), requests) == ()
    # At TP 4 a GPU keeps about 400k tokens of KV cache: vLLM would not start with a longer max_model_len.
    base = load_profile(seventy_b_profile(tmp_path, ", max_model_len: 1000000"))
    too_long = layout_profile(base, four_tp4)
    (short,) = shortfalls(too_long, *resolve(too_long, None, None), requests)
    assert short.instances == "hybrid TP 4"
    assert short.why.startswith("has KV cache for ") and short.why.endswith("model.max_model_len needs 1000000")
    assert short.fix.startswith("a smaller model.max_model_len")


def test_the_command_fails_naming_why_when_no_layout_can_run(tmp_path: Path) -> None:
    result = pdctl("simulate", str(seventy_b_profile(tmp_path)), "--sweep", "2", "--num-prompts", "5")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no layout of 2 GPUs can run this model and workload" in result.stderr
    assert "hybrid TP 2 needs 69.7 GiB per GPU" in result.stderr and "decode TP 1 needs 135.4 GiB" in result.stderr


CODE_ON_CPU = ("simulate", "profiles/code.yaml", "--hardware", "cpu-local", "--num-prompts", "200", "--seed", "3")


@pytest.mark.parametrize("as_json", [False, True])
def test_a_profile_that_cannot_run_on_the_hardware_says_so_before_simulating(as_json: bool) -> None:
    """The 8B model's weights alone are 15 GiB; cpu-local has about 1 GiB: once every request silently vanished
    (`completed: 0, failed: 0`), and the table crashed on the missing latencies."""
    result = pdctl(*CODE_ON_CPU, *(["--json"] if as_json else []))
    assert result.returncode == 2 and result.stdout == ""
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    assert "profile 'code' cannot run this workload on cpu-local" in result.stderr
    assert "decode TP 1 needs 15.0 GiB per GPU for weights and activations" in result.stderr
    assert "prefill TP 1 needs 15.0 GiB" in result.stderr and result.stderr.count("to fix: ") == 1


def stuck_on_cpu() -> ClusterSim:
    """The 8B model on cpu-local, which has no memory left for its KV cache: no engine can take a request in."""
    profile = ClusterProfile.model_validate({
        "name": "stuck", "model": {"path": MODEL}, "prefill": {"target_batch_size": 4},
        "pd": {"enabled": True, "routing_policy": "always", "prefilling_min_instances": 1, "decoding_min_instances": 1,
               "enable_dynamic_scaling": False},
    })  # fmt: skip
    return ClusterSim(profile, get_model(MODEL), get_hardware("cpu-local"))


def test_the_simulation_fails_what_it_cannot_serve_by_kind_and_drops_nothing() -> None:
    """Past simulate()'s check (ClusterSim alone, as cpufit runs it), a request no engine can take in ends as
    failed, by where it stopped: in an engine, held by the router (every instance full), or never sent."""
    requests = generate(WorkloadSpec(num_requests=12, input_tokens=64, output_tokens=4))
    open_loop = stuck_on_cpu()
    open_loop.run(requests)
    metrics = summarize(open_loop.records, 1.0)
    assert metrics["completed"] == 0 and metrics["failed"] == 12
    assert metrics["failures_by_kind"] == {"stalled_in_engine": 4, "held_by_router": 8}
    assert sorted(r.id for r in open_loop.records) == list(range(12))
    closed_loop = stuck_on_cpu()
    closed_loop.run(requests, max_concurrency=2)
    assert summarize(closed_loop.records, 1.0)["failures_by_kind"] == {"stalled_in_engine": 2, "not_sent": 10}


def test_a_result_without_latencies_prints_n_a_and_its_failures() -> None:
    from rich.console import Console

    from pdctl.simulate.render import result_table
    from pdctl.simulate.run import SimulationResult, cost_per_million

    records = [RequestRecord(i, 64, 4, 0.0, error_kind="stalled_in_engine") for i in range(3)]
    metrics = summarize(records, 1.0)
    cost = cost_per_million(2, 2.0, metrics["output_throughput"])
    result = SimulationResult("stuck", MODEL, "cpu-local", 2, metrics, {}, 0, 0.1, 0.0, cost, records)
    console = Console(width=100, record=True)
    console.print(result_table(result))
    text = console.export_text()
    assert "Failed requests" in text and "3 (stalled_in_engine 3)" in text
    assert "Median TTFT (ms)" in text and "n/a" in text
    # Standard JSON: no cost is null, not Infinity (which jq and JSON.parse refuse).
    assert json.loads(strictjson.dumps(result.as_dict()))["cost_per_m_output_tokens_usd"] is None


def test_strict_json_writes_figures_that_are_not_finite_as_null() -> None:
    data = {"cost": float("inf"), "rates": [1.5, float("nan"), -float("inf")], "nested": ({"ok": 2.0},)}
    text = strictjson.dumps(data, indent=2)
    assert json.loads(text, parse_constant=pytest.fail) == {"cost": None, "rates": [1.5, None, None],
                                                            "nested": [{"ok": 2.0}]}  # fmt: skip
    assert strictjson.dumps({"a": 1.0}) == json.dumps({"a": 1.0})


def test_a_profile_composing_cache_awares_pieces_simulates_as_cache_aware(tmp_path: Path) -> None:
    text = write_profile(tmp_path, "enabled: false", prefill=0, decode=3).read_text()
    composed = "{scorers: {outstanding_tokens: 1, kv_cache_usage: 0.5, running_sequences: 1, prefix_affinity: 2}}"
    spec = WorkloadSpec(num_requests=120, input_tokens=600, output_tokens=20, request_rate=40.0, prefix_groups=6,
                        prefix_tokens=400, seed=4)  # fmt: skip

    def run(strategy: str) -> list[tuple[int, float, int]]:
        path = tmp_path / "strategy.yaml"
        path.write_text(text.replace("router: {", f"router: {{routing_strategy: {strategy}, "))
        records = simulate(load_profile(path), generate(spec), seed=1).records
        return sorted((r.id, r.ttft, r.cached_tokens) for r in records)

    cache_aware = run("cache_aware")
    assert run(composed) == cache_aware
    cached = {
        name: sum(c for _, _, c in records) for name, records in (("ca", cache_aware), ("lb", run("load_balanced")))
    }
    assert cached["ca"] > cached["lb"]  # the prefix scorer is at work: alike is not a matter of a trivial workload


def test_requests_the_router_holds_are_each_answered_once() -> None:
    """200 requests at once on profiles/local.yaml's one decode instance: the router holds most of them until a
    slot frees. A step once started while the previous step's tokens were being delivered, and 90 requests that
    finished in it were answered twice (290 of 200)."""
    requests = generate(WorkloadSpec(num_requests=200, input_tokens=200, output_tokens=500, prefix_groups=4,
                                     prefix_tokens=100, seed=3))  # fmt: skip
    result = simulate(load_profile(PROFILES / "local.yaml"), requests, hardware="h100-sxm", seed=3)
    assert sorted(r.id for r in result.records) == list(range(200))
    assert result.metrics["completed"] == 200 and result.metrics["total_output_tokens"] == 100_000
    assert all(len(r.itls) == r.output_tokens - 1 for r in result.records)


def test_the_conditional_policy_shares_prompts_and_every_queue_drains() -> None:
    """profiles/local.yaml (the conditional policy) on cpu-local with four clients of 800-token prompts: the
    decode instance prefills some prompts itself, and when the last request is answered no instance counts a
    prompt still to prefill or in flight."""
    profile = load_profile(PROFILES / "local.yaml")
    assert profile.pd.routing_policy == "conditional"
    sim = ClusterSim(profile, get_model(profile.model.path), get_hardware("cpu-local"))
    sim.run(generate(WorkloadSpec(num_requests=40, input_tokens=800, output_tokens=32, seed=1)), max_concurrency=4)
    assert summarize(sim.records, 1.0)["completed"] == 40
    assert sim.decisions["PREFILLING"] > 0 and sim.decisions["DECODING"] > 0
    assert [(i.prefilling_tokens, i.in_flight_prompt_tokens, i.in_flight) for i in sim.pool.all()] == [(0, 0, 0)] * 2
