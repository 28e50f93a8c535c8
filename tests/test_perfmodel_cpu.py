"""cpu-local: the fit recovers a known engine's overheads from runs shaped like the real ones, and (once real
vLLM runs are stored) the simulation agrees with the held-out real runs within the bar."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pdctl.perfmodel import cpufit
from pdctl.perfmodel.hardware import Measured, Overhead
from pdctl.simulate.run import simulate
from pdctl.simulate.workload import SimRequest

KNOWN = Overhead(per_step_s=0.012, per_seq_s=0.0008, per_token_s=0.00002, per_request_s=0.004, source="test")


def synthetic_calibration(tmp_path: Path) -> dict[str, Any]:
    """Calibration runs of the same shape as benchmarks/fit_cpu_local.py records, made by the model with KNOWN."""
    hardware = tmp_path / "known.json"
    hardware.write_text(cpufit.cpu_profile(KNOWN, Measured(at="now", how="synthetic", device="none")).model_dump_json())
    calibration = {}
    for name, (lengths, concurrency) in cpufit.CALIBRATION.items():
        requests = [SimRequest(i, 0.0, n, out) for i, (n, out) in enumerate(lengths)]
        result = simulate(cpufit.local_profile(), requests, concurrency, hardware=str(hardware))
        records = [{"input_tokens": r.input_tokens, "ttft": r.ttft, "itls": r.itls} for r in result.records]
        calibration[name] = {"max_concurrency": concurrency, "requests": records}
    return calibration


def test_fit_recovers_a_known_engines_overheads(tmp_path: Path) -> None:
    fitted = cpufit.fit_overhead(synthetic_calibration(tmp_path))
    assert fitted.per_token_s == pytest.approx(KNOWN.per_token_s, rel=0.15)
    assert fitted.per_step_s == pytest.approx(KNOWN.per_step_s, rel=0.15)
    assert fitted.per_step_s + fitted.per_seq_s + fitted.per_request_s == pytest.approx(
        KNOWN.per_step_s + KNOWN.per_seq_s + KNOWN.per_request_s, rel=0.15
    )


@pytest.mark.xfail(
    strict=True,
    reason="remeasured on a quiet machine (12:25): 24 of 48 median figures within 10 %, median errors 8.5 to "
    "13 %; ITL at the ends of the batch range and TTFT under 12 streams still miss: see "
    "benchmarks/results/cpu_local_fidelity.md",
)
def test_simulation_agrees_with_held_out_real_vllm_runs() -> None:
    """The CPU bar: median TTFT, ITL, E2E and output throughput of every validation run within 10 %."""
    comparisons = cpufit.compare_runs(json.loads(cpufit.RUNS_PATH.read_text()))
    assert len(comparisons) == len(cpufit.VALIDATION)
    misses = [(c.run, key, round(c.error(key), 3)) for c in comparisons for key in cpufit.HEADLINE
              if abs(c.error(key)) > cpufit.BAR]  # fmt: skip
    assert not misses
