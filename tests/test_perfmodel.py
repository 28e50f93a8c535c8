"""The engine performance model against hand-computed values, and the shipped H100 profile against the
measurements it was fitted from (the GPU fidelity bar) and a published vLLM figure."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

from pdctl.perfmodel.arch import get_model, tiny_model_config
from pdctl.perfmodel.calibrate import check_layers
from pdctl.perfmodel.hardware import (
    Attention,
    Elementwise,
    GemmCurve,
    HardwareProfile,
    Link,
    Measured,
    Noise,
    Overhead,
    ParallelRate,
    get_hardware,
)
from pdctl.perfmodel.kvcache import BlockPool, Holding
from pdctl.perfmodel.scheduler import Engine, EngineConfig, EngineRequest
from pdctl.perfmodel.steptime import BatchShape, StepModel

RESULTS = Path(__file__).parent.parent / "benchmarks" / "results"


def flat_hardware(**overrides: object) -> HardwareProfile:
    """Round numbers, so every step time below can be worked out by hand."""
    link = Link(latency_s=0.0, bytes_per_s=1e11, source="test")
    fields: dict[str, object] = {
        "name": "flat",
        "description": "test",
        "measured": Measured(at="never", how="by hand", device="none"),
        "memory_bytes": 80e9,
        "gemm": GemmCurve(launch_s=0.0, tokens=[1], flops_per_s=[1e15], bytes_per_s=[1e12]),
        "attention": Attention(
            decode=ParallelRate(fixed_s=0.0, rate=1e12, rate_per_unit=1e15),
            prefill=ParallelRate(fixed_s=0.0, rate=1e15, rate_per_unit=1e18),
        ),
        "elementwise": Elementwise(fixed_s=0.0, bytes_per_s=1e12),
        "allreduce": link,
        "pipeline": link,
        "kv_transfer": Link(latency_s=0.001, bytes_per_s=40e9, source="test"),
        "overhead": Overhead(per_step_s=0.0, source="test"),
    }
    return HardwareProfile(**(fields | overrides))


# -- architectures ----------------------------------------------------------------------------------------


def test_llama_2_70b_figures() -> None:
    arch = get_model("llama-2-70b")
    # 2 x 80 layers x 8 KV heads x 128 x 2 bytes = 320 KiB a token.
    assert arch.kv_bytes_per_token() == 327_680
    # 80 x 8192 x (10240 + 8192 + 57344 + 28672) + 2 x 32000 x 8192: the full SwiGLU MLP counted.
    assert arch.params == 68_975_329_280
    assert get_model("meta-llama/Llama-2-70b-hf") is arch


def test_tiny_model_is_pdctls_own() -> None:
    arch = get_model("builtin:tiny-llama")
    config = tiny_model_config()
    assert (arch.hidden_size, arch.num_hidden_layers, arch.num_key_value_heads) == (
        config["hidden_size"],
        config["num_hidden_layers"],
        config["num_key_value_heads"],
    )
    assert arch.dtype_bytes == 4


def test_tensor_parallel_shard_shapes() -> None:
    shard = get_model("llama-3.1-8b").shard(8)
    # 32 query heads / 8 = 4, 8 KV heads / 8 = 1: (4 + 2) x 128 = 768.
    assert shard == {"qkv": (4096, 768), "o": (512, 4096), "gate_up": (4096, 3584), "down": (1792, 4096)}


# -- step time --------------------------------------------------------------------------------------------


def test_gemm_is_the_larger_of_compute_and_memory_time() -> None:
    curve = GemmCurve(launch_s=2e-6, tokens=[1], flops_per_s=[1e15], bytes_per_s=[1e12])
    # m=1: bytes (8192^2 + 2 x 8192) x 2 = 134,250,496 -> 134.25 us; flops 134 MFLOP -> 0.13 us.
    assert curve.seconds(1, 8192, 8192, 2) == pytest.approx(2e-6 + 134_250_496 / 1e12)
    # m=8192: flops 2 x 8192^3 = 1.0995e12 -> 1.0995 ms, far above the 0.4 ms of bytes.
    assert curve.seconds(8192, 8192, 8192, 2) == pytest.approx(2e-6 + 2 * 8192**3 / 1e15)


def test_gemm_rates_interpolate_in_log_tokens() -> None:
    curve = GemmCurve(launch_s=0, tokens=[1, 100], flops_per_s=[1e12, 3e12], bytes_per_s=[2e12, 4e12])
    assert curve.rates(10) == pytest.approx((2e12, 3e12))
    assert curve.rates(1000) == (3e12, 4e12)


def test_decode_step_by_hand() -> None:
    arch = get_model("llama-3.1-8b")
    model = StepModel(arch, flat_hardware(), tp=1)
    shape = BatchShape()
    for _ in range(4):
        shape.add(1, 999)  # 4 sequences at 1000 tokens of context
    weights = sum(k * n for k, n in arch.shard(1).values())  # 218,103,808 per layer
    activations = sum(4 * (k + n) for k, n in arch.shard(1).values())
    linear = (weights + activations) * 2 / 1e12
    kv = 4 * 1000 * 8 * 128 * 2 * 2 / 1e12
    elementwise = 4 * 2 * (8 * 4096 + 2 * 6144 + 1.5 * 28672) / 1e12
    lm_head = (4096 * 128256 + 4 * (4096 + 128256)) * 2 / 1e12
    assert model.step_seconds(shape) == pytest.approx(32 * (linear + kv + elementwise) + lm_head)


def test_tensor_parallel_adds_two_all_reduces_a_layer() -> None:
    arch = get_model("llama-3.1-8b")
    hardware = flat_hardware(allreduce=Link(latency_s=1e-5, bytes_per_s=1e11, source="test"))
    model = StepModel(arch, hardware, tp=4)
    shape = BatchShape()
    shape.add(1, 99)
    # 1 token x 4096 x 2 bytes, ring factor 2 x 3 / 4.
    one = 1e-5 + 1.5 * 8192 / 1e11
    assert model.allreduce_seconds(1) == pytest.approx(one)
    # Against the same link without latency: 32 layers x 2 all-reduces x 10 us more.
    assert model.step_seconds(shape) - StepModel(arch, flat_hardware(), tp=4).step_seconds(shape) == pytest.approx(
        32 * 2 * 1e-5
    )


def test_kv_transfer_and_cache_size_by_hand() -> None:
    model = StepModel(get_model("llama-2-70b"), flat_hardware(), tp=8)
    # 200 tokens x 320 KiB = 65.5 MB over 40 GB/s, plus 1 ms.
    assert model.kv_transfer_seconds(200) == pytest.approx(0.001 + 200 * 327_680 / 40e9)
    per_gpu_weights = (68_451_041_280 / 8 + 2 * 32000 * 8192 / 8) * 2
    per_gpu_kv = 80 * 1 * 128 * 2 * 2
    assert model.kv_cache_tokens(0.9) == int((80e9 * 0.9 - per_gpu_weights) // per_gpu_kv)


# -- KV cache ---------------------------------------------------------------------------------------------


def test_prefix_cache_shares_blocks_and_stops_short_of_the_last_token() -> None:
    pool = BlockPool(10, block_size=16)
    first, second = Holding(), Holding()
    assert pool.grow(first, 48)
    pool.cache_prompt(first, [1, 2, 3])
    # 48 tokens: a hit may cover (48 - 1) // 16 = 2 blocks only.
    assert pool.match(second, [1, 2, 3], 48) == 32
    assert pool.free_blocks == 7
    pool.free(first)
    pool.free(second)
    assert pool.free_blocks == 10 and pool.usage == 0.0


@pytest.mark.parametrize(("eviction", "survivor"), [("lru", 2), ("lfu", 1)])
def test_eviction_order(eviction: str, survivor: int) -> None:
    pool = BlockPool(2, block_size=16, eviction=eviction)  # type: ignore[arg-type]
    for block_hash in (1, 2):
        holding = Holding()
        pool.grow(holding, 16)
        pool.cache_prompt(holding, [block_hash])
        pool.free(holding)
    for _ in range(3):  # block 1 is hit often, then block 2 is used last
        reader = Holding()
        pool.match(reader, [1], 17)
        pool.free(reader)
    reader = Holding()
    pool.match(reader, [2], 17)
    pool.free(reader)
    taker = Holding()
    assert pool.grow(taker, 16)  # evicts one cached block
    left = Holding()
    assert pool.match(left, [survivor], 17) == 16


# -- the scheduler ----------------------------------------------------------------------------------------


def tiny_engine(**config: object) -> Engine:
    return Engine(StepModel(get_model("llama-3.1-8b"), flat_hardware()), EngineConfig(**config))  # type: ignore[arg-type]


def run_steps(engine: Engine, limit: int = 1000, start: float = 0.0) -> list[list[tuple[str, int]]]:
    steps = []
    now = start
    for _ in range(limit):
        if not engine.has_work():
            break
        shape = engine.schedule(now)
        steps.append([(r.id, n) for r, n in engine._scheduled])
        now += engine.model.step_seconds(shape)
        engine.finish()
    return steps


def test_chunked_prefill_within_the_token_budget_and_running_first() -> None:
    engine = tiny_engine(max_num_batched_tokens=100, num_blocks=100)
    engine.add(EngineRequest("a", 250, 3))
    engine.add(EngineRequest("b", 30, 2))
    steps = run_steps(engine)
    # a's prompt in chunks of 100, 100, 50; b gets the 50 left over in step 3, then both decode.
    assert steps[:4] == [[("a", 100)], [("a", 100)], [("a", 50), ("b", 30)], [("a", 1), ("b", 1)]]
    assert steps[4:] == [[("a", 1)]]


def test_max_num_seqs_holds_the_rest_waiting() -> None:
    engine = tiny_engine(max_num_seqs=2, num_blocks=100)
    for name in "abc":
        engine.add(EngineRequest(name, 10, 2))
    steps = run_steps(engine)
    assert steps[0] == [("a", 10), ("b", 10)]
    assert ("c", 10) in steps[2]


def test_priority_policy_admits_by_priority_then_arrival() -> None:
    engine = tiny_engine(max_num_seqs=1, num_blocks=100, policy="priority")
    engine.add(EngineRequest("early-low", 10, 1, arrival=0.0, priority=5))
    engine.add(EngineRequest("early-urgent", 10, 1, arrival=1.0, priority=0))
    engine.add(EngineRequest("late-urgent", 10, 1, arrival=2.0, priority=0))
    order = [step[0][0] for step in run_steps(engine, start=2.0)]  # all three waiting
    assert order == ["early-urgent", "late-urgent", "early-low"]


def test_preemption_by_recompute_when_blocks_run_out() -> None:
    # 4 blocks of 16: two 30-token prompts fit (2 blocks each), their 33rd token does not.
    engine = tiny_engine(num_blocks=4)
    first, second = EngineRequest("a", 30, 5), EngineRequest("b", 30, 5)
    engine.add(first)
    engine.add(second)
    steps = run_steps(engine)
    assert engine.preemptions >= 1 and second.preemptions >= 1
    # b is recomputed from scratch, its output so far included: 30 prompt + what it had generated.
    recompute = [n for step in steps for r, n in step if r == "b" and n > 1]
    assert recompute[0] == 30 and recompute[1] > 30
    assert first.generated == second.generated == 5


def test_remote_kv_waits_until_it_arrives_then_computes_the_last_token() -> None:
    engine = tiny_engine(num_blocks=100)
    request = EngineRequest("d", 100, 2, external_tokens=100, ready_at=1.0)
    engine.add(request)
    assert engine.step(0.5) is None
    result = engine.step(1.0)
    assert result is not None and result.shape.tokens == 1 and result.tokens == [request]


def shared_core_engine() -> Engine:
    """An engine whose API server takes 2 ms (+ 1 us a prompt token) per request on the engine's own core, whose
    steps cost 10 ms, and whose first step after idle 3 ms more."""
    overhead = Overhead(per_step_s=0.010, per_request_s=0.002, per_request_token_s=1e-6, shares_core=True,
                        idle_wake_s=0.003, source="test")  # fmt: skip
    return Engine(StepModel(get_model("llama-3.1-8b"), flat_hardware(overhead=overhead)), EngineConfig())


def test_a_burst_is_taken_in_one_request_at_a_time_and_slows_the_step_it_overlaps() -> None:
    engine = shared_core_engine()
    requests = [EngineRequest(str(i), 1000, 4) for i in range(3)]
    for request in requests:
        engine.add(request)
    # 3 ms each (2 + 1000 x 0.001), one after another.
    assert [r.ready_at for r in requests] == pytest.approx([0.003, 0.006, 0.009])
    assert engine.step(0.0) is None  # nothing taken in yet
    first = engine.step(0.003)
    assert first is not None and first.shape.seqs == 1
    step_alone = engine.model.step_seconds(first.shape)
    # The other two's intake (6 ms) ran on the core during it, and it woke the idle engine.
    assert first.seconds == pytest.approx(step_alone + 0.006 + 0.003)
    second = engine.step(0.003 + first.seconds)
    assert second is not None and second.shape.seqs == 3
    assert second.seconds == pytest.approx(engine.model.step_seconds(second.shape))


def test_a_request_joining_a_running_engine_shares_the_core_with_it() -> None:
    engine = shared_core_engine()
    engine.add(EngineRequest("running", 10, 100))
    first = engine.step(0.003)
    assert first is not None
    joining = EngineRequest("joining", 1000, 4, arrival=0.004)
    engine.add(joining)
    # Twice its 3 ms while the engine steps on, and the engine's next step pays the 3 ms.
    assert joining.ready_at == pytest.approx(0.010)
    after = engine.step(0.003 + first.seconds)
    assert after is not None
    assert after.seconds == pytest.approx(engine.model.step_seconds(after.shape) + 0.003)


def test_a_step_of_a_token_count_not_run_before_costs_more_once() -> None:
    overhead = Overhead(per_step_s=0.010, new_shape_s=0.004, source="test")
    model = StepModel(get_model("llama-3.1-8b"), flat_hardware(overhead=overhead))
    engine = Engine(model, EngineConfig(max_num_seqs=16))  # 1 to 16 tokens: decode batch sizes, taken as run
    first, second = EngineRequest("a", 100, 3), EngineRequest("b", 100, 3, arrival=1.0)
    engine.add(first)
    prefill = engine.step(0.0)
    assert prefill is not None and prefill.seconds == pytest.approx(engine.model.step_seconds(prefill.shape) + 0.004)
    decode = engine.step(prefill.seconds)
    assert decode is not None and decode.seconds == pytest.approx(engine.model.step_seconds(decode.shape))
    engine.step(1.0)
    engine.add(second)
    again = engine.step(1.0)
    assert again is not None and again.shape.tokens == 100
    assert again.seconds == pytest.approx(engine.model.step_seconds(again.shape))


def test_decodes_beside_a_prompt_chunk_cost_more() -> None:
    def model(per_mixed_decode_s: float) -> StepModel:
        overhead = Overhead(per_step_s=0.010, per_seq_s=0.001, per_mixed_decode_s=per_mixed_decode_s, source="test")
        return StepModel(get_model("llama-3.1-8b"), flat_hardware(overhead=overhead))

    decodes, mixed = BatchShape(), BatchShape()
    for shape in (decodes, mixed):
        for _ in range(4):
            shape.add(1, 100)
    mixed.add(16, 0)
    plain, costly = model(0.0), model(0.002)
    assert costly.step_seconds(decodes) == plain.step_seconds(decodes)
    assert costly.step_seconds(mixed) == pytest.approx(plain.step_seconds(mixed) + 4 * 0.002)


def noisy_engine(per_step_s: float, noise: Noise, seed: int = 0, speed: float | None = None) -> Engine:
    model = StepModel(get_model("llama-3.1-8b"), flat_hardware(overhead=Overhead(per_step_s=per_step_s, source="test"),
                                                             noise=noise))  # fmt: skip
    return Engine(model, EngineConfig(seed=seed, speed=speed))


def decode_step_times(engine: Engine, steps: int) -> list[float]:
    engine.add(EngineRequest("long", 10, steps + 1))
    now, times = 0.0, []
    while (result := engine.step(now)) is not None and len(times) <= steps:
        times.append(result.seconds)
        now += result.seconds
    return times[1:]  # the decodes, after the prompt's step


def test_step_noise_keeps_the_mean_and_spreads_short_steps_more() -> None:
    """A step of d seconds takes a Gamma time of mean d and variance step_variance_s x d: the same absolute
    noise on a longer step is a smaller share of it."""
    noise = Noise(step_variance_s=0.001)
    for per_step in (0.010, 0.100):
        model_time = statistics.fmean(decode_step_times(noisy_engine(per_step, Noise()), 3000))
        times = decode_step_times(noisy_engine(per_step, noise), 3000)
        assert statistics.fmean(times) == pytest.approx(model_time, rel=0.02)
        assert statistics.variance(times) == pytest.approx(0.001 * model_time, rel=0.1)


def test_step_noise_repeats_with_its_seed() -> None:
    noise = Noise(step_variance_s=0.001, speed_sigma=0.1)
    assert decode_step_times(noisy_engine(0.01, noise, seed=1), 50) == decode_step_times(
        noisy_engine(0.01, noise, seed=1), 50
    )
    assert decode_step_times(noisy_engine(0.01, noise, seed=1), 50) != decode_step_times(
        noisy_engine(0.01, noise, seed=2), 50
    )


def test_an_engines_speed_scales_its_steps_and_is_drawn_lognormal() -> None:
    plain, slow = noisy_engine(0.01, Noise()), noisy_engine(0.01, Noise(), speed=1.25)
    assert decode_step_times(slow, 5) == pytest.approx([1.25 * t for t in decode_step_times(plain, 5)])
    speeds = [noisy_engine(0.01, Noise(speed_sigma=0.1), seed=seed).speed for seed in range(400)]
    assert statistics.median(speeds) == pytest.approx(1.0, abs=0.02)
    assert statistics.stdev(math.log(s) for s in speeds) == pytest.approx(0.1, rel=0.15)


# -- fidelity: the shipped profile against measurements ------------------------------------------------------


def test_h100_profile_predicts_measured_decoder_layers_within_the_bar() -> None:
    """The GPU bar: whole decoder layers timed in PyTorch on the H100 (stored by measure_hardware.py) against
    the profile's prediction. Fails when the model or the profile drifts."""
    raw = json.loads((RESULTS / "h100_raw.json").read_text())
    checks = check_layers(raw["layers"], get_hardware("h100-sxm"))
    errors = [abs(c.error) for c in checks]
    assert len(checks) == 44
    assert statistics.median(errors) < 0.07
    assert sum(e <= 0.10 for e in errors) >= 38
    assert max(errors) < 0.18


def test_h100_profile_against_published_vllm_decode_itl() -> None:
    """BLIS's validation data (vLLM 0.15.1, Llama-3.1-70B bf16, TP4 on H100): ITL 18.3 to 19.7 ms at moderate
    load (their concurrency is not in the figures we have). The model's decode step at 16 and 32 sequences of
    1.5k to 2k tokens lands within 15 % of that range (it predicts 20.3 and 21.2 ms: +3 to +16 %)."""
    model = StepModel(get_model("llama-3.1-70b"), get_hardware("h100-sxm"), tp=4)
    for batch, context in ((16, 1500), (32, 2000)):
        shape = BatchShape()
        for _ in range(batch):
            shape.add(1, context)
        assert 18.3e-3 * 0.85 <= model.step_seconds(shape) <= 19.7e-3 * 1.15
