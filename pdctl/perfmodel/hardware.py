"""Hardware profiles as data: what one GPU (or CPU) achieves, measured, with how, when and on which machine it
was measured, and how closely the model it times matches measurements it was not fitted to.

A profile is a JSON file: shipped under data/hardware/, written by `pdctl calibrate` under the user's hardware
directory (user_hardware_dir()), or any path. `pdctl calibrate` measures the machine it runs on (real vLLM CPU
runs, or a GPU's kernels) and fits the file; `benchmarks/fit_cpu_local.py` and `python -m
pdctl.perfmodel.calibrate` made the shipped ones."""

from __future__ import annotations

import json
import math
import os
import statistics
from bisect import bisect_left
from functools import cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pdctl.perfmodel.arch import DATA

HARDWARE_DIR = DATA / "hardware"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Machine(_Strict):
    """The machine a profile was measured on, as far as it is known (None: not recorded). Its timings hold there;
    pdctl.perfmodel.machine compares it with the machine a profile is used on."""

    cpu: str | None = None  # /proc/cpuinfo's model name
    # The instruction sets among machine.ISA_FLAGS the CPU has: vLLM's CPU kernels differ by them (AMX, AVX-512).
    cpu_flags: list[str] | None = None
    cores: int | None = None
    gpu: str | None = None  # None: the engine ran on the CPU
    gpus: int = 0
    driver: str | None = None
    cuda: str | None = None
    torch: str | None = None
    vllm: str | None = None
    source: str = "detected by pdctl calibrate"

    def describe(self) -> str:
        if self.gpu:
            return self.gpu + (f" (driver {self.driver})" if self.driver else "")
        flags = f" ({', '.join(self.cpu_flags)})" if self.cpu_flags else ""
        return (self.cpu or "a CPU not recorded") + flags


class Measured(_Strict):
    at: str
    how: str
    device: str
    notes: list[str] = Field(default_factory=list)
    machine: Machine | None = None


class FidelityFigure(_Strict):
    """One figure of a held-out measurement beside the model's."""

    run: str
    figure: str
    real: float
    modelled: float

    @property
    def error(self) -> float:
        return self.modelled / self.real - 1 if self.real else 0.0


class Fidelity(_Strict):
    """The profile's model against measurements of its own machine that its fit did not use, and, where the
    machine was measured twice, those measurements against each other: what no model can be held closer than."""

    figures_are: str  # what each figure is, for a sentence: "median figures of held-out real vLLM runs"
    bar: float = 0.10
    figures: list[FidelityFigure]
    real_against_real: list[FidelityFigure] = Field(default_factory=list)

    def within(self, bar: float | None = None) -> int:
        return sum(abs(f.error) <= (self.bar if bar is None else bar) for f in self.figures)

    def median_error(self) -> float:
        return statistics.median(abs(f.error) for f in self.figures) if self.figures else 0.0

    def floor(self) -> Fidelity | None:
        """Real against real, scored as the model is."""
        if not self.real_against_real:
            return None
        return Fidelity(figures_are="real against real", bar=self.bar, figures=self.real_against_real)

    def summary(self) -> str:
        line = (f"{self.within()}/{len(self.figures)} {self.figures_are} within {self.bar * 100:.0f} %, median |error| "
                f"{self.median_error() * 100:.1f} %")  # fmt: skip
        floor = self.floor()
        if floor:
            line += (f" (real against real: {floor.within()}/{len(floor.figures)}, median |error| "
                     f"{floor.median_error() * 100:.1f} %)")  # fmt: skip
        return line


class GemmCurve(_Strict):
    """Achieved FLOP/s and memory bandwidth of a bf16 GEMM by its token count M (both measured curves, not
    datasheet peaks): time = launch + max(FLOPs / flops_per_s(M), bytes x (1 + narrow_n / N) / bytes_per_s(M)).
    An output only N columns wide has few tiles to spread over the SMs, so its weights stream slower."""

    launch_s: float = Field(ge=0)
    narrow_n: float = Field(0.0, ge=0)
    tokens: list[int]
    flops_per_s: list[float]
    bytes_per_s: list[float]

    @model_validator(mode="after")
    def _same_length(self) -> GemmCurve:
        if not (len(self.tokens) == len(self.flops_per_s) == len(self.bytes_per_s)) or not self.tokens:
            raise ValueError("tokens, flops_per_s and bytes_per_s must be equally long and not empty")
        return self

    def rates(self, m: int) -> tuple[float, float]:
        """(FLOP/s, bytes/s) at m tokens, interpolated in log(m)."""
        tokens = self.tokens
        if m <= tokens[0]:
            return self.flops_per_s[0], self.bytes_per_s[0]
        if m >= tokens[-1]:
            return self.flops_per_s[-1], self.bytes_per_s[-1]
        i = bisect_left(tokens, m)
        lo, hi = tokens[i - 1], tokens[i]
        w = (math.log(m) - math.log(lo)) / (math.log(hi) - math.log(lo))
        f = self.flops_per_s[i - 1] * (1 - w) + self.flops_per_s[i] * w
        b = self.bytes_per_s[i - 1] * (1 - w) + self.bytes_per_s[i] * w
        return f, b

    def seconds(self, m: int, k: int, n: int, dtype_bytes: int) -> float:
        if m <= 0:
            return 0.0
        flops_per_s, bytes_per_s = self.rates(m)
        nbytes = (k * n + m * k + m * n) * dtype_bytes * (1 + self.narrow_n / n)
        return self.launch_s + max(2.0 * m * k * n / flops_per_s, nbytes / bytes_per_s)


class ParallelRate(_Strict):
    """A kernel whose rate grows with its independent work units until the device is full:
    time = fixed + work / min(rate, units x rate_per_unit)."""

    fixed_s: float = Field(ge=0)
    rate: float = Field(gt=0)
    rate_per_unit: float = Field(gt=0)

    def seconds(self, work: float, units: float) -> float:
        if work <= 0:
            return 0.0
        return self.fixed_s + work / min(self.rate, max(units, 1.0) * self.rate_per_unit)


class Attention(_Strict):
    decode: ParallelRate  # work: KV bytes read; units: sequences x KV heads
    prefill: ParallelRate  # work: attention FLOPs; units: query heads x 128-token query tiles


class Elementwise(_Strict):
    """Norms, RoPE, activation and residual adds of a layer: memory-bound, time = fixed + bytes / bytes_per_s."""

    fixed_s: float = Field(ge=0)
    bytes_per_s: float = Field(gt=0)


class Link(_Strict):
    """A collective or a transfer: time = latency + bytes / bytes_per_s (bus bandwidth for all-reduce)."""

    latency_s: float = Field(ge=0)
    bytes_per_s: float = Field(gt=0)
    source: str


class Overhead(_Strict):
    """Engine time outside the GPU kernels: scheduling, sampling, detokenising, Python."""

    per_step_s: float = Field(ge=0)
    per_seq_s: float = Field(0.0, ge=0)
    per_token_s: float = Field(0.0, ge=0)
    # More per decoding sequence in a step that also computes a prompt chunk (cpu-local: 1.1 ms, where a step
    # of decodes alone costs 0.3 ms per sequence).
    per_mixed_decode_s: float = Field(0.0, ge=0)
    # The API server's work on one arriving request before the scheduler sees it (parsing, tokenising, handing
    # over); it takes requests in one at a time.
    per_request_s: float = Field(0.0, ge=0)
    per_request_token_s: float = Field(0.0, ge=0)  # and per prompt token (tokenising)
    # The API server runs on the engine's own core (vLLM CPU on one core): its intake work while the engine steps
    # takes that time from the engine, so the step ends that much later, and the two share the core, so that
    # intake takes twice its time.
    shares_core: bool = False
    # The first step after the engine had nothing running ends this much later: the engine and API server
    # processes waking from idle (cpu-local: a lone request's first token comes 4 ms after what its prefill step
    # and intake account for, where a request joining running ones sees no such cost).
    idle_wake_s: float = Field(0.0, ge=0)
    # A step of a token count the engine has not run before costs this much more (cpu-local: the first request
    # of a prompt length new to the engine ran 4.3 ms slower than its repeats, likely the CPU GEMM library
    # building kernels for the new shape). Token counts up to max_num_seqs are taken as run: every decode batch
    # size, which an engine in service has run.
    new_shape_s: float = Field(0.0, ge=0)
    source: str

    def intake_s(self, prompt_tokens: int) -> float:
        return self.per_request_s + self.per_request_token_s * prompt_tokens


class Noise(_Strict):
    """How a step's time varies about the model's on this machine, in two parts, both measured. Without them a
    simulation puts all the steps of one batch shape at one time, and a median that falls among several such
    clumps (a wave of arrivals, decodes beside long prefills) lands on one clump's edge where the real one lies
    within a smooth spread.

    - `step_variance_s`: other work delaying the engine by small amounts that add up over a step, so the longer
      the step, the smaller its relative spread: a step the model puts at d seconds takes a Gamma-distributed
      time of mean d and variance step_variance_s x d (cpu-local: 0.83 ms, a 12 ms decode step varies by 26 %,
      a 250 ms prefill by 6 %). Fitted to the gaps' mean over their median, the rare long stalls included: E2E and
      throughput add the steps up.
    - `speed_sigma`: the machine's speed between one measurement and the next, one draw per engine, lognormal
      with median 1 (cpu-local: the same decode runs differ by 10 % from one measurement to the next)."""

    step_variance_s: float = Field(0.0, ge=0)
    speed_sigma: float = Field(0.0, ge=0)
    source: str = "none: every step takes the model's time"


class HardwareProfile(_Strict):
    name: str
    description: str
    measured: Measured
    memory_bytes: float = Field(gt=0)
    gemm: GemmCurve
    attention: Attention
    elementwise: Elementwise
    allreduce: Link
    pipeline: Link
    kv_transfer: Link
    overhead: Overhead
    noise: Noise = Noise()
    fidelity: Fidelity | None = None
    # Memory vLLM keeps for activations and CUDA graphs besides weights and KV cache, per GPU.
    activation_reserve_bytes: float = Field(0.0, ge=0)
    # vLLM's default --max-num-batched-tokens for the API server on this platform (GPU 8192, CPU 2048).
    default_max_num_batched_tokens: int = Field(8192, ge=1)


class UnknownHardware(KeyError):
    pass


def user_hardware_dir() -> Path:
    """Where `pdctl calibrate` writes named profiles: `$XDG_DATA_HOME/pdctl/hardware` (`~/.local/share/...`)."""
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home).expanduser() / "pdctl" / "hardware"


def shipped_hardware() -> list[str]:
    return sorted(path.stem for path in HARDWARE_DIR.glob("*.json"))


def known_hardware() -> list[str]:
    """Shipped profiles, then the user's (a user's profile of a shipped name is not reachable by that name)."""
    calibrated = sorted(path.stem for path in user_hardware_dir().glob("*.json"))
    return shipped_hardware() + [name for name in calibrated if name not in shipped_hardware()]


def hardware_path(name: str) -> Path:
    """A profile file by path, else a shipped profile by name, else one `pdctl calibrate` wrote."""
    if name.endswith(".json"):
        return Path(name)
    shipped = HARDWARE_DIR / f"{name}.json"
    return shipped if shipped.is_file() else user_hardware_dir() / f"{name}.json"


def get_hardware(name: str) -> HardwareProfile:
    path = hardware_path(name)
    if not path.is_file():
        raise UnknownHardware(f"unknown hardware profile {name!r}; known: {', '.join(known_hardware())} "
                              "(`pdctl calibrate NAME` measures this machine into a new one)")  # fmt: skip
    return _load(path.resolve(), path.stat().st_mtime_ns)


@cache
def _load(path: Path, _mtime_ns: int) -> HardwareProfile:
    """Read once per version of the file: a profile calibrated again under the same name is read again."""
    try:
        return HardwareProfile.model_validate(json.loads(path.read_text()))
    except (ValueError, ValidationError) as error:
        first = error.errors()[0] if isinstance(error, ValidationError) else None
        where = f" at {'.'.join(str(p) for p in first['loc'])}: {first['msg']}" if first else f": {error}"
        raise UnknownHardware(f"{path} is not a hardware profile{where}") from None
