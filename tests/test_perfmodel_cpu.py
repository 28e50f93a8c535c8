"""cpu-local: the fit recovers a known engine's overheads and noise from runs shaped like the real ones, and the
simulation agrees with the held-out real vLLM runs within the bar."""

from __future__ import annotations

import json
import statistics
from typing import Any

import pytest

from pdctl.perfmodel.hardware import Noise, Overhead
from pdctl.simulate import cpufit

KNOWN = Overhead(per_step_s=0.010, per_seq_s=0.0005, per_token_s=0.00005, per_mixed_decode_s=0.002,
                 per_request_s=0.004, per_request_token_s=0.000006, shares_core=True, idle_wake_s=0.005,
                 new_shape_s=0.004, source="test")  # fmt: skip
KNOWN_PER_CONTEXT_TOKEN_S = 5e-7
KNOWN_PER_ATTENTION_WORK_S = 1e-7


def synthetic_calibration() -> dict[str, Any]:
    """Calibration runs of the same shape as benchmarks/fit_cpu_local.py records, made by the model with KNOWN."""
    known = cpufit.CpuFit(KNOWN, KNOWN_PER_CONTEXT_TOKEN_S, KNOWN_PER_ATTENTION_WORK_S)
    return {name: {"max_concurrency": concurrency, "requests": cpufit.simulated_run(known, name)}
            for name, (_, concurrency) in cpufit.CALIBRATION.items()}  # fmt: skip


def test_fit_recovers_a_known_engines_overheads() -> None:
    fit = cpufit.fit_cpu(synthetic_calibration())
    fitted = fit.overhead
    assert fit.decode_s_per_context_token == pytest.approx(KNOWN_PER_CONTEXT_TOKEN_S, rel=0.15)
    assert fit.prefill_s_per_attention_work == pytest.approx(KNOWN_PER_ATTENTION_WORK_S, rel=0.15)
    assert fitted.per_step_s == pytest.approx(KNOWN.per_step_s, rel=0.15)
    # The API server's intake (per request and per prompt token) apart from the engine's own per-token cost and
    # the wake from idle: told apart only by the requests that arrive among others.
    assert fitted.per_request_s == pytest.approx(KNOWN.per_request_s, rel=0.15)
    assert fitted.per_request_token_s == pytest.approx(KNOWN.per_request_token_s, rel=0.25)
    assert fitted.per_token_s == pytest.approx(KNOWN.per_token_s, rel=0.15)
    assert fitted.idle_wake_s == pytest.approx(KNOWN.idle_wake_s, rel=0.15)
    assert fitted.per_mixed_decode_s == pytest.approx(KNOWN.per_mixed_decode_s, rel=0.15)
    assert fitted.new_shape_s == pytest.approx(KNOWN.new_shape_s, rel=0.15)


def test_fit_recovers_a_known_machines_step_noise() -> None:
    """Eight measurements' decode runs by an engine with known noise, each at its own speed: the lone decode's
    mean over its median gives the step variance back, the spread of the runs' medians the speed's."""
    known = Noise(step_variance_s=0.0008, speed_sigma=0.1)
    fit = cpufit.CpuFit(KNOWN, KNOWN_PER_CONTEXT_TOKEN_S, KNOWN_PER_ATTENTION_WORK_S, known)
    decode_runs = [f"decode-b{b}" for b in cpufit.DECODE_BATCHES]
    measurements = [{"calibration": {name: {"requests": cpufit.simulated_run(fit, name, seed, speed)}
                                     for name in decode_runs}}
                    for seed, speed in enumerate(cpufit.replica_speeds(known, 8))]  # fmt: skip
    fitted = cpufit.fit_noise(measurements)
    assert fitted.step_variance_s == pytest.approx(known.step_variance_s, rel=0.2)
    assert fitted.speed_sigma == pytest.approx(known.speed_sigma, rel=0.2)


def test_the_fitted_step_keeps_the_stalls_that_e2e_and_throughput_add_up() -> None:
    """A lone decode whose steps take 4 ms but stall to 12 ms one time in twenty: the model's step, as fit_cpu
    centres it (the median gap plus a third of the step variance), is the gaps' mean, stalls included."""
    gaps = ([0.004] * 19 + [0.012]) * 3
    record = {"itls": gaps, "tokens_at": list(range(1, len(gaps) + 2))}
    measurement = {"calibration": {f"decode-b{b}": {"requests": [record] * 4} for b in cpufit.DECODE_BATCHES}}
    noise = cpufit.fit_noise([measurement])
    assert 0.004 + noise.step_variance_s / 3 == pytest.approx(statistics.fmean(gaps))


@pytest.fixture(scope="module")
def runs() -> dict[str, Any]:
    return json.loads(cpufit.RUNS_PATH.read_text())


def test_simulation_agrees_with_held_out_real_vllm_runs(runs: dict[str, Any]) -> None:
    """The CPU bar: median TTFT, ITL, E2E and output throughput of every validation run within 10 % of real
    vLLM's, all measurements pooled (the validation runs are not in the fit)."""
    comparisons = cpufit.compare_runs(runs)
    assert len(comparisons) == len(cpufit.VALIDATION)
    misses = [(c.run, key, round(c.error(key), 3)) for c in comparisons for key in cpufit.HEADLINE
              if abs(c.error(key)) > cpufit.BAR]  # fmt: skip
    assert not misses


def test_fitted_on_half_the_measurements_it_predicts_the_other_half_as_they_predict_each_other(
    runs: dict[str, Any],
) -> None:
    """Out of sample: the profile fitted to the first six measurements, checked against the last six, has as many
    median figures within 10 % as the first six real measurements have against the last six."""
    predicted, real = cpufit.held_out(runs)
    assert cpufit.within(predicted) >= cpufit.within(real)


def test_real_vllm_is_compared_with_itself(runs: dict[str, Any]) -> None:
    """Several measurements are stored, and the odd ones pooled against the even ones pooled are what compare
    prints as the noise floor."""
    floor = cpufit.noise_floor(runs)
    assert len(runs["measurements"]) >= 4 and len(floor) == len(cpufit.VALIDATION)
    odd = cpufit.pooled({"measurements": runs["measurements"][0::2]}, "validation")
    assert all(len(c.real) == len(c.sim) and c.real != c.sim for c in floor)
    assert all(len(odd[c.run]["requests"]) == len(cpufit.VALIDATION[c.run][0]) * len(runs["measurements"][0::2])
               for c in floor)  # fmt: skip


def test_a_chunks_gap_is_shared_by_the_tokens_it_carried() -> None:
    # Chunks at 2, 4 and 5 generated tokens: the first held one token back, the second carried two.
    record = {"ttft": 0.05, "itls": [0.02, 0.012], "tokens_at": [2, 4, 5]}
    assert cpufit.token_itls(record) == [0.01, 0.01, 0.012]
    assert cpufit.first_token_ttft(record) == pytest.approx(0.04)  # one median gap before the first chunk
    assert cpufit.first_token_ttft({"ttft": 0.05, "itls": [0.01], "tokens_at": [1, 2]}) == 0.05
