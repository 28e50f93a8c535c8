"""A/B runs: one workload on several layouts or routing policies of the same devices (each brought up in
turn through pdctl.lifecycle and stopped after), and sweeps of load that find the knee."""

from __future__ import annotations

import copy
import json
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import yaml
from rich.console import Console

from pdctl import lifecycle
from pdctl.bench.report import tpot_of
from pdctl.bench.run import BenchOutcome, Target, target_of_cluster
from pdctl.bench.workload import WorkloadSpec
from pdctl.cluster import plan_profile
from pdctl.cost import CostComparison, save_comparison
from pdctl.errors import ClusterError, UsageError
from pdctl.plan import Plan
from pdctl.routing.phase import PhasePolicy
from pdctl.state import ClusterDir


@dataclass
class RunSettings:
    spec: WorkloadSpec
    concurrency: int | None
    goodput: dict[str, float]
    timeout_s: float
    tokenizer: str | None
    # Fields merged into every request body (vllm bench serve's --extra-body).
    extra_body: dict[str, Any] | None = None


Runner = Callable[[Target, RunSettings], BenchOutcome]
T = TypeVar("T")
Transform = Callable[[dict[str, Any], Plan], dict[str, Any]]


def _pd(data: dict[str, Any], plan: Plan) -> dict[str, Any]:
    return data


def _colocated(data: dict[str, Any], plan: Plan) -> dict[str, Any]:
    """Every instance HYBRID, one for each of the PD layout's, with the same devices and parallelism."""
    data.setdefault("pd", {})["enabled"] = False
    instances = []
    for index, planned in enumerate(plan.instances):
        spec: dict[str, Any] = {
            "id": f"hybrid-{index}",
            "type": "HYBRID",
            "tensor_parallel_size": planned.tensor_parallel_size,
            "pipeline_parallel_size": planned.pipeline_parallel_size,
        }
        if planned.gpus:
            spec["gpu_count"] = len(planned.gpus)
        instances.append(spec)
    data["instances"] = instances
    return data


LAYOUTS: list[tuple[str, Transform]] = [("pd", _pd), ("colocated", _colocated)]


def policy_variants(text: str) -> list[tuple[str, Transform]]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in names if p not in PhasePolicy.registry]
    if unknown or not names:
        raise UsageError(f"--policies {text!r}: choose among {', '.join(PhasePolicy.registry)}")

    def setting(policy: str) -> Transform:
        def transform(data: dict[str, Any], plan: Plan) -> dict[str, Any]:
            data.setdefault("pd", {})["routing_policy"] = policy
            return data

        return transform

    return [(name, setting(name)) for name in names]


def _raw_profile(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    model = data.get("model", {})
    # The variant is written elsewhere: a relative model path must still point where the profile meant.
    if isinstance(model, dict) and str(model.get("path", "")).startswith(("./", "../")):
        model["path"] = str((path.parent / model["path"]).resolve())
    return data


def run_variants(
    profile: Path, variants: list[tuple[str, Transform]], settings: RunSettings, root: Path, run: Runner, log: Console
) -> list[tuple[str, dict[str, Any]]]:
    return [
        (name, outcome.as_json({"layout": name, "profile": data}))
        for name, data, outcome in each_variant(profile, variants, root, lambda target: run(target, settings), log)
    ]


def each_variant(
    profile: Path, variants: list[tuple[str, Transform]], root: Path, run: Callable[[Target], T], log: Console
) -> Iterator[tuple[str, dict[str, Any], T]]:
    """Each variant of the profile brought up in turn, `run` against it, and stopped: (name, profile, result)."""
    base_plan = plan_profile(profile).plan  # validates the profile before anything starts
    raw = _raw_profile(profile)
    with tempfile.TemporaryDirectory(prefix="pdctl-bench-") as scratch:
        for name, transform in variants:
            data = transform(copy.deepcopy(raw), base_plan)
            data["name"] = f"{base_plan.cluster}-{name}"
            path = Path(scratch) / f"{data['name']}.yaml"
            path.write_text(yaml.safe_dump(data, sort_keys=False))
            yield name, data, _bring_up_and_run(path, root, run, log)


def _bring_up_and_run(path: Path, root: Path, run: Callable[[Target], T], log: Console) -> T:
    planned = plan_profile(path)
    cluster_dir = ClusterDir(root, planned.profile.name)
    roles = ", ".join(f"{i.id} {i.role.value}" for i in planned.plan.instances)
    log.print(f"bringing up {planned.profile.name}: {roles}")
    began = time.monotonic()
    started = lifecycle.start(planned, cluster_dir)
    try:
        failures = lifecycle.wait_ready(started, lambda state: None)
        if failures:
            raise ClusterError(
                f"{planned.profile.name} did not start: "
                + "; ".join(f"{f.id}: {f.message} (log {f.log_path})" for f in failures)
            )
        log.print(f"{planned.profile.name} is up in {time.monotonic() - began:.0f} s")
        return run(target_of_cluster(cluster_dir))
    finally:
        lifecycle.down(cluster_dir)


# ---- sweeps ----------------------------------------------------------------------------------------------


def parse_sweep(text: str) -> tuple[str, list[float]]:
    kind, _, values = text.partition(":")
    try:
        loads = [float(v) for v in values.split(",") if v.strip()]
    except ValueError:
        loads = []
    if kind not in ("rate", "concurrency") or not loads or min(loads) <= 0:
        raise UsageError(f"--sweep {text!r}: write rate:1,2,4 or concurrency:1,8,64 (positive loads)")
    return kind, sorted(loads)


def attainment(outcome: BenchOutcome, slos: dict[str, float]) -> float:
    """Share of all sent requests that completed within every SLO."""
    results = outcome.results
    good = 0
    for r in results:
        measured = {"ttft": r.ttft, "tpot": tpot_of(r) or 0.0, "e2el": r.latency}
        good += r.success and all(measured[k] * 1000 <= v for k, v in slos.items())
    return good / len(results) if results else 0.0


def run_sweep(
    target: Target, sweep: tuple[str, list[float]], settings: RunSettings, needed: float, run: Runner
) -> tuple[list[tuple[str, dict[str, Any]]], dict[str, Any] | None]:
    """Each load in turn; the knee is the highest load, before the first that misses, whose requests meet the
    --goodput SLOs at least `needed` of the time (no SLOs: that complete at least `needed` of the time)."""
    kind, loads = sweep
    runs: list[tuple[str, dict[str, Any]]] = []
    knee: dict[str, Any] | None = None
    passing = True
    for load in loads:
        if kind == "rate":
            current = replace(settings, spec=settings.spec.model_copy(update={"rate": load}))
        else:
            current = replace(settings, concurrency=int(load))
        outcome = run(target, current)
        share = attainment(outcome, settings.goodput)
        data = outcome.as_json({"sweep": {kind: load, "slo_attainment": share}})
        runs.append((f"{kind} {load:g}", data))
        passing = passing and share >= needed
        if passing:
            knee = {
                kind: load,
                "slo_attainment": share,
                "request_goodput": data["request_goodput"],
                "output_throughput": data["output_throughput"],
            }
    return runs, knee


def knee_text(knee: dict[str, Any] | None, slos: dict[str, float]) -> str:
    what = "within " + " ".join(f"{k}:{v:g} ms" for k, v in slos.items()) if slos else "completed"
    if knee is None:
        return f"no load passed (requests {what}): the knee is below the lowest load swept"
    load = next(f"{k} {v:g}" for k, v in knee.items() if k in ("rate", "concurrency"))
    return (
        f"knee: {load} ({knee['slo_attainment']:.0%} of requests {what}; {knee['output_throughput']:,.1f} output tok/s)"
    )


# ---- the measured cost comparison status shows ---------------------------------------------------------------


def record_cost_comparison(
    profile: Path, runs: list[tuple[str, dict[str, Any]]], settings: RunSettings, state_root: Path
) -> Path | None:
    """Store the PD and colocated throughputs of one --compare run, so `pdctl status` and PDMetrics can say
    what PD saves per token on these devices: measured, never estimated."""
    by_layout = dict(runs)
    pd, colocated = by_layout.get("pd"), by_layout.get("colocated")
    if not pd or not colocated or not pd.get("output_throughput") or not colocated.get("output_throughput"):
        return None
    planned = plan_profile(profile)
    workload = settings.spec.model_dump(exclude_defaults=True, mode="json")
    if settings.concurrency:
        workload["concurrency"] = settings.concurrency
    comparison = CostComparison(
        profile=planned.profile.name,
        measured_at=datetime.now(UTC),
        workload=json.dumps(workload, sort_keys=True),
        engine=planned.plan.engine,
        devices=sum(len(i.gpus) or 1 for i in planned.plan.instances),
        gpu_hour_usd=planned.profile.cost.gpu_hour_usd,
        pd_output_tokens_per_s=pd["output_throughput"],
        colocated_output_tokens_per_s=colocated["output_throughput"],
    )
    return save_comparison(state_root, comparison)
