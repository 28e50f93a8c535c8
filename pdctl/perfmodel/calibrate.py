"""Fit a hardware profile from `benchmarks/measure_hardware.py`'s output, and check it: predict every whole
decoder layer the script timed and report the error (the GPU fidelity check).

    python -m pdctl.perfmodel.calibrate RAW.json --name h100-sxm --out pdctl/perfmodel/data/hardware/h100-sxm.json

The fits are small grid searches in log space (no numpy needed): each minimises the squared log error, so a
10 us kernel weighs as much as a 10 ms one."""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from pdctl.perfmodel.steptime import BatchShape, StepModel, elementwise_bytes_per_token

LAUNCH_GRID = (0.0, 1e-6, 2e-6, 3e-6, 4e-6, 5e-6, 6e-6, 8e-6)
NARROW_GRID = (0.0, 256.0, 512.0, 1024.0, 2048.0)
GPU_MODELS = ("llama-2-70b", "llama-3.1-8b", "llama-3.1-70b")


def _sq_log_error(predicted: float, measured: float) -> float:
    return math.log(predicted / measured) ** 2


def layer_gemm_shapes() -> set[tuple[int, int]]:
    """The decoder-layer shapes of the shipped GPU models at TP 1 to 8: the curve is fitted on these, not on
    the LM heads, which run once a step and whose huge N would set the layers' bandwidth."""
    shapes: set[tuple[int, int]] = set()
    for name in GPU_MODELS:
        for tp in (1, 2, 4, 8):
            shapes.update(get_model(name).shard(tp).values())
    return shapes


def fit_gemm(rows: list[dict[str, Any]], dtype_bytes: int = 2) -> GemmCurve:
    by_m: dict[int, list[dict[str, Any]]] = defaultdict(list)
    shapes = layer_gemm_shapes()
    for row in rows:
        if (row["k"], row["n"]) in shapes:
            by_m[row["m"]].append(row)
    best: tuple[float, GemmCurve] | None = None
    for launch, narrow in itertools.product(LAUNCH_GRID, NARROW_GRID):
        flops_curve, bytes_curve, total = [], [], 0.0
        for m in sorted(by_m):
            work = [
                (2.0 * m * r["k"] * r["n"], (r["k"] * r["n"] + m * r["k"] + m * r["n"]) * dtype_bytes
                 * (1 + narrow / r["n"]), r["seconds"])
                for r in by_m[m]
            ]  # fmt: skip
            # Candidates: the rate each shape achieved; the best pair explains the group with least error.
            flops_options = sorted({f / max(t - launch, 1e-9) for f, _, t in work})
            bytes_options = sorted({b / max(t - launch, 1e-9) for _, b, t in work})
            err, f_best, b_best = min(
                (sum(_sq_log_error(launch + max(f / fr, b / br), t) for f, b, t in work), fr, br)
                for fr in flops_options
                for br in bytes_options
            )
            flops_curve.append(f_best)
            bytes_curve.append(b_best)
            total += err
        curve = GemmCurve(launch_s=launch, narrow_n=narrow, tokens=sorted(by_m), flops_per_s=flops_curve,
                          bytes_per_s=bytes_curve)  # fmt: skip
        if best is None or total < best[0]:
            best = (total, curve)
    assert best is not None
    return best[1]


def fit_parallel_rate(samples: list[tuple[float, float, float]]) -> ParallelRate:
    """samples: (work, units, seconds)."""
    fixed_options = sorted({t for _, _, t in samples})[:3] or [0.0]
    fixed_options = [0.0] + [f * s for f in fixed_options for s in (0.5, 0.8, 0.95)]
    best: tuple[float, ParallelRate] | None = None
    for fixed in fixed_options:
        rates = sorted(w / max(t - fixed, 1e-9) for w, _, t in samples)
        per_unit = sorted(w / max(t - fixed, 1e-9) / u for w, u, t in samples)
        rate_options = rates[-5:]
        unit_options = [per_unit[int(q * (len(per_unit) - 1))] for q in (0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9)]
        for rate, unit in itertools.product(rate_options, unit_options):
            candidate = ParallelRate(fixed_s=fixed, rate=rate, rate_per_unit=unit)
            err = sum(_sq_log_error(candidate.seconds(w, u), t) for w, u, t in samples)
            if best is None or err < best[0]:
                best = (err, candidate)
    assert best is not None
    return best[1]


def fit_attention(raw: dict[str, Any], dtype_bytes: int = 2) -> Attention:
    decode = [
        (r["batch"] * r["ctx"] * r["hkv"] * r["hd"] * 2 * dtype_bytes, r["batch"] * r["hkv"], r["seconds"])
        for r in raw["decode"]
    ]
    prefill = [
        (4.0 * r["hq"] * r["hd"] * r["chunk"] * r["chunk"] / 2, r["hq"] * math.ceil(r["chunk"] / 128), r["seconds"])
        for r in raw["prefill"]
    ]
    return Attention(decode=fit_parallel_rate(decode), prefill=fit_parallel_rate(prefill))


def fit_elementwise(layers: list[dict[str, Any]]) -> Elementwise:
    """fixed + bytes / bandwidth over the elementwise timings of the layer shapes, by squared log error (a
    least-squares line would let the large batches set the small ones' fixed cost)."""
    points = []
    for row in layers:
        arch = get_model(row["model"])
        shard = arch.shard(row["tp"])
        per_token = elementwise_bytes_per_token(arch.hidden_size, shard["qkv"][1], shard["gate_up"][1], 2)
        points.append(((row["prefill_tokens"] + row["batch"]) * per_token, row["elementwise_seconds"]))
    shortest = min(t for _, t in points)
    best: tuple[float, Elementwise] | None = None
    for fixed in (shortest * f for f in (0.0, 0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)):
        for rate in sorted({b / max(t - fixed, 1e-9) for b, t in points}):
            candidate = Elementwise(fixed_s=fixed, bytes_per_s=rate)
            err = sum(_sq_log_error(fixed + b / rate, t) for b, t in points)
            if best is None or err < best[0]:
                best = (err, candidate)
    assert best is not None
    return best[1]


def fit_link(rows: list[dict[str, Any]], source: str) -> Link:
    """latency from the smallest messages, bandwidth from the largest (bus bandwidth for all-reduce)."""
    latency = min(r["seconds"] for r in rows)
    largest = max(rows, key=lambda r: r["bytes"])
    return Link(latency_s=latency, bytes_per_s=largest["bus_bytes_per_s"], source=source)


@dataclass
class LayerCheck:
    model: str
    tp: int
    prefill_tokens: int
    batch: int
    ctx: int
    measured_s: float
    predicted_s: float

    @property
    def error(self) -> float:
        return self.predicted_s / self.measured_s - 1


def layer_shape(row: dict[str, Any]) -> BatchShape:
    shape = BatchShape()
    if row["prefill_tokens"]:
        shape.add(row["prefill_tokens"], 0)
    for _ in range(row["batch"]):
        shape.add(1, row["ctx"] - 1)
    return shape


def check_layers(layers: Iterable[dict[str, Any]], hardware: HardwareProfile) -> list[LayerCheck]:
    checks = []
    for row in layers:
        model = StepModel(get_model(row["model"]), hardware, tp=row["tp"])
        predicted = model.layer_seconds(layer_shape(row))
        checks.append(
            LayerCheck(
                row["model"], row["tp"], row["prefill_tokens"], row["batch"], row["ctx"], row["seconds"], predicted
            )
        )
    return checks


def fit_profile(raw: dict[str, Any], name: str, description: str, links: dict[str, Link], overhead: Overhead,
                notes: list[str]) -> HardwareProfile:  # fmt: skip
    info = raw["info"]
    return HardwareProfile(
        name=name,
        description=description,
        measured=Measured(
            at=raw["measured_at"],
            how=f"{raw['script']} (torch {info['torch']}, CUDA {info.get('cuda')}, CUDA graphs, bf16), "
            "fitted by pdctl.perfmodel.calibrate",
            device=info.get("name", info["device"]),
            notes=notes,
        ),
        memory_bytes=info.get("memory_bytes", 0) or 1,
        gemm=fit_gemm(raw["gemm"]),
        attention=fit_attention(raw["attention"]),
        elementwise=fit_elementwise(raw["layers"]),
        allreduce=links["allreduce"],
        pipeline=links["pipeline"],
        kv_transfer=links["kv_transfer"],
        overhead=overhead,
        activation_reserve_bytes=4 * 2**30,
    )


def render_checks(checks: list[LayerCheck]) -> str:
    lines = ["| model | TP | prefill tokens | decode batch | context | measured us | predicted us | error |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for c in checks:
        lines.append(
            f"| {c.model} | {c.tp} | {c.prefill_tokens} | {c.batch} | {c.ctx} | {c.measured_s * 1e6:.1f} "
            f"| {c.predicted_s * 1e6:.1f} | {c.error * 100:+.1f} % |"
        )
    errors = sorted(abs(c.error) for c in checks)
    lines.append("")
    lines.append(
        f"{len(checks)} layer shapes: median |error| {statistics.median(errors) * 100:.1f} %, "
        f"max {errors[-1] * 100:.1f} %, within 10 %: {sum(e <= 0.10 for e in errors)}/{len(errors)}"
    )
    return "\n".join(lines)


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pdctl.perfmodel.calibrate", description=__doc__.splitlines()[0])
    parser.add_argument("raw", type=Path, help="measure_hardware.py output (one GPU)")
    parser.add_argument("--collectives", type=Path, help="a measure_hardware.py output with an nccl section")
    parser.add_argument("--name", required=True)
    parser.add_argument("--description", default="")
    parser.add_argument(
        "--overhead", type=Path, required=True, help="JSON of the Overhead fields (not measurable there)"
    )
    parser.add_argument("--kv-transfer", type=Path, required=True, help="JSON of the kv_transfer and pipeline links")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    raw = _load(args.raw)
    notes = []
    links = {key: Link.model_validate(value) for key, value in _load(args.kv_transfer).items()}
    collectives = _load(args.collectives) if args.collectives else raw
    if collectives.get("nccl"):
        nccl = collectives["nccl"]
        device = collectives["info"].get("name", "?")
        links["allreduce"] = fit_link(nccl["allreduce"], f"NCCL all-reduce on {nccl['world']}x {device}, "
                                      f"measured {collectives['measured_at']}")  # fmt: skip
        p2p = nccl["p2p"]
        p2p_link = Link(latency_s=links["allreduce"].latency_s, bytes_per_s=p2p["bytes"] / p2p["seconds"],
                        source=f"peer-to-peer copy on {device}")  # fmt: skip
        links.setdefault("pipeline", p2p_link)
        notes.append(f"all-reduce measured on {nccl['world']}x {device}, not on this device")
    profile = fit_profile(raw, args.name, args.description, links, Overhead.model_validate(_load(args.overhead)), notes)
    checks = check_layers(raw["layers"], profile)
    print(render_checks(checks))
    if args.out:
        args.out.write_text(profile.model_dump_json(indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
