"""What a benchmark sends and when: prompts of given token lengths, shared prefixes, multi-turn conversations,
arrivals (Poisson, gamma bursts, closed loop) and recorded traces. Everything follows from the seed."""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pdctl.bench.tokens import PromptTokenizer
from pdctl.errors import UsageError

MOONCAKE_BLOCK_TOKENS = 512  # the published Mooncake traces hash prompts in blocks of 512 tokens


@dataclass(frozen=True)
class Scenario:
    """Token lengths drawn uniformly from [mean x (1 - ratio), mean x (1 + ratio)], as vllm bench does."""

    input_len: int
    output_len: int
    range_ratio: float
    turns: int = 1  # > 1: conversations; each turn's prompt is the whole history before it plus a new message
    summary: str = ""


SCENARIOS: dict[str, Scenario] = {
    "qa": Scenario(3000, 150, 1 / 3, summary="document QA: long input (2000-4000), short output (100-200)"),
    "chat": Scenario(
        100, 250, 0.5, turns=4, summary="chat: 4-turn conversations, 50-150 new tokens a turn, 125-375 out"
    ),
    "code": Scenario(800, 1000, 0.5, summary="code: medium input (400-1200), long output (500-1500)"),
}


@dataclass(slots=True)
class BenchRequest:
    index: int
    prompt: str
    input_tokens: int
    output_tokens: int
    arrival_s: float = 0.0  # offset from the start; requests go in this order
    priority: int | None = None
    deadline_ms: float | None = None
    after: int | None = None  # the previous turn of its conversation: sent once that one has finished


@dataclass
class Workload:
    requests: list[BenchRequest]
    description: str
    notes: list[str] = field(default_factory=list)
    timed: bool = False  # arrivals are set (rate or trace); else requests go as fast as concurrency allows


class WorkloadSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    scenario: str | None = None
    num_prompts: int = Field(100, gt=0)
    input_len: int | None = Field(None, gt=0)
    output_len: int | None = Field(None, gt=0)
    range_ratio: float | None = Field(None, ge=0, lt=1)
    prefix_groups: int = Field(0, ge=0)
    prefix_len: int = Field(0, ge=0)
    rate: float = Field(math.inf, gt=0)
    burstiness: float = Field(1.0, gt=0)
    priority_mix: dict[int, float] = {}
    deadline_ms: float | None = Field(None, gt=0)
    trace: Path | None = None
    trace_format: str = "auto"
    seed: int = 0
    max_model_len: int | None = None  # the server's, when it says: lengths are scaled down to fit


# ---- lengths and arrivals --------------------------------------------------------------------------------


def sample_length(rng: random.Random, mean: int, range_ratio: float) -> int:
    low, high = math.floor(mean * (1 - range_ratio)), math.ceil(mean * (1 + range_ratio))
    return max(1, rng.randint(low, high))


def arrival_offsets(rng: random.Random, count: int, rate: float, burstiness: float) -> list[float]:
    """vllm bench serve's schedule: gamma gaps (shape = burstiness, mean 1 / rate; burstiness 1 is Poisson),
    cumulated and rescaled so the last arrival is at count / rate."""
    if math.isinf(rate):
        return [0.0] * count
    theta = 1.0 / (rate * burstiness)
    offsets, now = [], 0.0
    for _ in range(count):
        now += rng.gammavariate(burstiness, theta)
        offsets.append(now)
    scale = (count / rate) / offsets[-1] if offsets[-1] > 0 else 1.0
    return [offset * scale for offset in offsets]


def parse_priority_mix(text: str) -> dict[int, float]:
    """`0:1,2:3`: priority 0 for a quarter of the requests, priority 2 for the rest."""
    mix: dict[int, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        priority, sep, weight = part.partition(":")
        try:
            mix[int(priority)] = float(weight) if sep else 1.0
        except ValueError:
            raise UsageError(f"--priority-mix {text!r}: write PRIORITY:WEIGHT pairs, e.g. 0:1,2:3") from None
    if mix and (min(mix.values()) < 0 or sum(mix.values()) <= 0):
        raise UsageError(f"--priority-mix {text!r}: weights must be positive")
    return mix


def parse_goodput(items: list[str]) -> dict[str, float]:
    """`ttft:500 tpot:50 e2el:2000` (milliseconds), vllm bench serve's --goodput."""
    slos: dict[str, float] = {}
    for item in items:
        for part in item.split():
            name, _, value = part.partition(":")
            if name not in ("ttft", "tpot", "e2el"):
                raise UsageError(f"--goodput {part!r}: the SLOs are ttft, tpot and e2el (NAME:MS)")
            try:
                slos[name] = float(value)
            except ValueError:
                raise UsageError(f"--goodput {part!r}: {value!r} is not a number of milliseconds") from None
            if slos[name] <= 0:
                raise UsageError(f"--goodput {part!r}: the SLO must be positive")
    return slos


# What the measurement itself sets: an --extra-body that changed them would measure another workload.
_OWN_BODY_FIELDS = ("model", "prompt", "max_tokens", "stream", "stream_options")


def parse_extra_body(text: str | None) -> dict[str, Any] | None:
    """`--extra-body '{"allowed_token_ids": [35, 36]}'`: fields merged into every request, as vllm bench serve's."""
    if not text:
        return None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as error:
        raise UsageError(f"--extra-body is not JSON: {error}") from None
    if not isinstance(body, dict):
        raise UsageError("--extra-body must be a JSON object")
    if taken := sorted(set(body) & set(_OWN_BODY_FIELDS)):
        raise UsageError(f"--extra-body cannot set {', '.join(taken)}: the workload sets them")
    return body


# ---- synthetic workloads ---------------------------------------------------------------------------------


def build(spec: WorkloadSpec, tokenizer: PromptTokenizer) -> Workload:
    if spec.trace is not None:
        workload = load_trace(spec.trace, spec.trace_format, tokenizer, spec.seed)
    elif spec.scenario is not None and spec.scenario not in SCENARIOS:
        raise UsageError(f"unknown scenario {spec.scenario!r}: choose one of {', '.join(SCENARIOS)}")
    else:
        workload = _synthetic(spec, tokenizer)
    _mix_priorities(workload.requests, spec, random.Random(spec.seed + 2))
    return workload


def _scenario_of(spec: WorkloadSpec) -> tuple[Scenario, str]:
    if spec.scenario is not None:
        preset = SCENARIOS[spec.scenario]
        return preset, f"scenario {spec.scenario}: {preset.summary}"
    scenario = Scenario(spec.input_len or 1024, spec.output_len or 128, spec.range_ratio or 0.0)
    ratio = f" (range ratio {scenario.range_ratio:g})" if scenario.range_ratio else ""
    return scenario, f"input {scenario.input_len} tokens, output {scenario.output_len}{ratio}"


def _fit_scale(scenario: Scenario, spec: WorkloadSpec) -> float:
    """How much to shrink every length so the longest possible request fits the server's context."""
    if spec.max_model_len is None:
        return 1.0
    high_in = math.ceil(scenario.input_len * (1 + scenario.range_ratio))
    high_out = math.ceil(scenario.output_len * (1 + scenario.range_ratio))
    longest = spec.prefix_len + scenario.turns * high_in + scenario.turns * high_out
    return min(1.0, (spec.max_model_len - 1) / longest)


def _synthetic(spec: WorkloadSpec, tokenizer: PromptTokenizer) -> Workload:
    scenario, description = _scenario_of(spec)
    notes: list[str] = []
    scale = _fit_scale(scenario, spec)
    if scale < 1.0:
        notes.append(
            f"lengths scaled by {scale:.2f} so every request fits the server's max_model_len {spec.max_model_len}"
        )
        scenario = Scenario(
            max(1, int(scenario.input_len * scale)),
            max(1, int(scenario.output_len * scale)),
            scenario.range_ratio,
            scenario.turns,
            scenario.summary,
        )
    text_rng, length_rng = random.Random(spec.seed), random.Random(spec.seed + 1)
    prefixes = [tokenizer.text(text_rng, spec.prefix_len) for _ in range(spec.prefix_groups)] if spec.prefix_len else []
    requests: list[BenchRequest] = []
    while len(requests) < spec.num_prompts:
        prefix = prefixes[len(requests) % len(prefixes)] if prefixes else ""
        history = prefix
        for turn in range(min(scenario.turns, spec.num_prompts - len(requests))):
            message = tokenizer.text(text_rng, sample_length(length_rng, scenario.input_len, scenario.range_ratio))
            output = sample_length(length_rng, scenario.output_len, scenario.range_ratio)
            prompt = history + (f"user: {message}\nassistant: " if scenario.turns > 1 else message)
            after = len(requests) - 1 if turn else None
            requests.append(BenchRequest(len(requests), prompt, tokenizer.count(prompt), output, after=after))
            # The next turn carries this one's answer; its text is synthetic, of the length asked for.
            history = prompt + tokenizer.text(text_rng, output) + "\n"
    if spec.prefix_groups and spec.prefix_len:
        description += f"; {spec.prefix_groups} shared prefixes of {spec.prefix_len} tokens"
    timed = not math.isinf(spec.rate)
    for request, offset in zip(
        requests, arrival_offsets(random.Random(spec.seed + 3), len(requests), spec.rate, spec.burstiness), strict=True
    ):
        request.arrival_s = offset
    return Workload(requests, description, notes, timed=timed)


def _mix_priorities(requests: list[BenchRequest], spec: WorkloadSpec, rng: random.Random) -> None:
    if spec.priority_mix:
        levels, weights = list(spec.priority_mix), list(spec.priority_mix.values())
        for request in requests:
            if request.priority is None:
                request.priority = rng.choices(levels, weights)[0]
    if spec.deadline_ms is not None:
        for request in requests:
            if request.deadline_ms is None:
                request.deadline_ms = spec.deadline_ms


# ---- traces ----------------------------------------------------------------------------------------------


class TraceRow(BaseModel):
    """pdctl's JSONL trace: one request a line."""

    model_config = ConfigDict(extra="forbid")

    arrival_s: float = Field(ge=0)
    prompt: str | None = None
    input_tokens: int | None = Field(None, gt=0)
    output_tokens: int = Field(gt=0)
    priority: int | None = None
    deadline_ms: float | None = Field(None, gt=0)


class MooncakeRow(BaseModel):
    """The published Mooncake trace format (timestamp in ms, hash_ids naming 512-token blocks)."""

    model_config = ConfigDict(extra="ignore")

    timestamp: float = Field(ge=0)
    input_length: int = Field(gt=0)
    output_length: int = Field(gt=0)
    hash_ids: list[int] = []


def _read_rows(path: Path) -> list[tuple[int, dict]]:
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        raise UsageError(f"cannot read the trace {path}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not a text file") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as error:
            raise UsageError(f"{path}:{number}: not JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(data, dict):
            raise UsageError(f"{path}:{number}: each line must be a JSON object")
        rows.append((number, data))
    if not rows:
        raise UsageError(f"{path}: the trace has no requests")
    return rows


def _validated(path: Path, number: int, shape: type[BaseModel], data: dict) -> BaseModel:
    try:
        return shape.model_validate(data)
    except ValidationError as error:
        problem = error.errors()[0]
        where = ".".join(str(p) for p in problem["loc"]) or "line"
        raise UsageError(f"{path}:{number}: {where}: {problem['msg']}") from None


def load_trace(path: Path, trace_format: str, tokenizer: PromptTokenizer, seed: int) -> Workload:
    rows = _read_rows(path)
    if trace_format == "auto":
        trace_format = "mooncake" if "input_length" in rows[0][1] else "jsonl"
    if trace_format not in ("jsonl", "mooncake"):
        raise UsageError(f"--trace-format {trace_format!r}: choose auto, jsonl or mooncake")
    rng = random.Random(seed)
    if trace_format == "mooncake":
        requests = _mooncake_requests(path, rows, tokenizer, seed)
    else:
        requests = []
        for number, data in rows:
            row = _validated(path, number, TraceRow, data)
            assert isinstance(row, TraceRow)
            if (row.prompt is None) == (row.input_tokens is None):
                raise UsageError(f"{path}:{number}: give either prompt or input_tokens")
            prompt = row.prompt if row.prompt is not None else tokenizer.text(rng, row.input_tokens or 0)
            requests.append(
                BenchRequest(
                    len(requests),
                    prompt,
                    tokenizer.count(prompt),
                    row.output_tokens,
                    row.arrival_s,
                    row.priority,
                    row.deadline_ms,
                )
            )
    requests.sort(key=lambda r: r.arrival_s)
    start = requests[0].arrival_s
    for index, request in enumerate(requests):
        request.index, request.arrival_s = index, request.arrival_s - start
    return Workload(requests, f"trace {path.name} ({trace_format}, {len(requests)} requests)", timed=True)


def _mooncake_requests(
    path: Path, rows: list[tuple[int, dict]], tokenizer: PromptTokenizer, seed: int
) -> list[BenchRequest]:
    """Equal hash ids give equal text, so prompts share prefixes exactly where the trace's did."""
    blocks: dict[int, str] = {}
    requests = []
    for number, data in rows:
        row = _validated(path, number, MooncakeRow, data)
        assert isinstance(row, MooncakeRow)
        parts = []
        for position, hash_id in enumerate(row.hash_ids):
            if hash_id not in blocks:
                size = min(MOONCAKE_BLOCK_TOKENS, row.input_length - position * MOONCAKE_BLOCK_TOKENS)
                blocks[hash_id] = tokenizer.text(random.Random(f"{seed}:{hash_id}"), max(1, size))
            parts.append(blocks[hash_id])
        missing = row.input_length - len(row.hash_ids) * MOONCAKE_BLOCK_TOKENS
        if missing > 0:
            parts.append(tokenizer.text(random.Random(f"{seed}:row:{number}"), missing))
        prompt = "".join(parts)
        requests.append(
            BenchRequest(len(requests), prompt, tokenizer.count(prompt), row.output_length, row.timestamp / 1000)
        )
    return requests
