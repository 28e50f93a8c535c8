"""Fit a hardware profile from the GPU measurements of `pdctl/perfmodel/measure_gpu.py` (`pdctl calibrate` on a
GPU host, or `benchmarks/measure_hardware.py`), and check it: predict every whole decoder layer the script
timed and report the error (the GPU fidelity check, recorded in the profile).

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
    Fidelity,
    FidelityFigure,
    GemmCurve,
    HardwareProfile,
    Link,
    Machine,
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

    @property
    def key(self) -> tuple[str, int, int, int, int]:
        return self.model, self.tp, self.prefill_tokens, self.batch, self.ctx

    @property
    def label(self) -> str:
        return f"{self.model} TP{self.tp}, prefill {self.prefill_tokens}, decode {self.batch} x {self.ctx}"


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


def machine_of(raw: dict[str, Any], vllm: str | None = None) -> Machine:
    """The machine a measurement names in its device info (the driver and CPU only since measure_gpu.py)."""
    info = raw["info"]
    unrecorded = [what for what, key in (("driver", "driver"), ("CPU", "cpu")) if key not in info]
    return Machine(cpu=info.get("cpu"), cores=info.get("cores"), gpu=info.get("name"), gpus=info.get("gpus", 0),
                   driver=info.get("driver"), cuda=info.get("cuda"), torch=info.get("torch"), vllm=vllm,
                   source=f"the device info of {raw['script']}'s output"
                   + (f" ({' and '.join(unrecorded)} not recorded then)" if unrecorded else ""))  # fmt: skip


def fit_profile(raw: dict[str, Any], name: str, description: str, links: dict[str, Link], overhead: Overhead,
                notes: list[str], vllm: str | None = None) -> HardwareProfile:  # fmt: skip
    """The profile fitted to one GPU's measurements, its machine and its fidelity (every whole decoder layer
    measured, which the fit does not use) recorded in it."""
    info = raw["info"]
    profile = HardwareProfile(
        name=name,
        description=description,
        measured=Measured(
            at=raw["measured_at"],
            how=f"{raw['script']} (torch {info['torch']}, CUDA {info.get('cuda')}, CUDA graphs, bf16), "
            "fitted by pdctl.perfmodel.calibrate",
            device=info.get("name", info["device"]),
            notes=notes,
            machine=machine_of(raw, vllm),
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
    return profile.model_copy(update={"fidelity": layer_fidelity(check_layers(raw["layers"], profile))})


def layer_fidelity(checks: list[LayerCheck], repeat: list[dict[str, Any]] | None = None) -> Fidelity:
    """The layer checks as a profile records them; with a repeat measurement of the same layers, those against
    the first."""
    again = {_layer_key(row): row["seconds"] for row in repeat or []}
    return Fidelity(
        figures_are="whole decoder-layer times measured in PyTorch",
        figures=[FidelityFigure(run=c.label, figure="layer_s", real=c.measured_s, modelled=c.predicted_s)
                 for c in checks],
        real_against_real=[FidelityFigure(run=c.label, figure="layer_s", real=c.measured_s, modelled=again[c.key])
                           for c in checks if c.key in again],
    )  # fmt: skip


def _layer_key(row: dict[str, Any]) -> tuple[str, int, int, int, int]:
    return row["model"], row["tp"], row["prefill_tokens"], row["batch"], row["ctx"]


def with_collectives(
    collectives: dict[str, Any], links: dict[str, Link], notes: list[str]
) -> tuple[dict[str, Link], list[str]]:
    """The all-reduce (and, where none is given, the pipeline link) from a measurement's NCCL section, if it has
    one; the links given otherwise."""
    nccl = collectives.get("nccl")
    if not nccl:
        return links, notes
    device = collectives["info"].get("name", "?")
    allreduce = fit_link(nccl["allreduce"], f"NCCL all-reduce on {nccl['world']}x {device}, "
                         f"measured {collectives['measured_at']}")  # fmt: skip
    p2p = nccl["p2p"]
    p2p_link = Link(latency_s=allreduce.latency_s, bytes_per_s=p2p["bytes"] / p2p["seconds"],
                    source=f"peer-to-peer copy on {device}")  # fmt: skip
    return {"pipeline": p2p_link, **links, "allreduce": allreduce}, notes


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
    parser.add_argument("--repeat", type=Path, help="a second measurement of the same layers: real against real")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    raw = _load(args.raw)
    links = {key: Link.model_validate(value) for key, value in _load(args.kv_transfer).items()}
    collectives = _load(args.collectives) if args.collectives else raw
    notes = []
    if args.collectives and collectives.get("nccl"):
        notes.append(f"all-reduce measured on {collectives['nccl']['world']}x {collectives['info'].get('name', '?')}, "
                     "not on this device")  # fmt: skip
    links, notes = with_collectives(collectives, links, notes)
    profile = fit_profile(raw, args.name, args.description, links, Overhead.model_validate(_load(args.overhead)), notes)
    checks = check_layers(raw["layers"], profile)
    if args.repeat:
        profile = profile.model_copy(update={"fidelity": layer_fidelity(checks, _load(args.repeat)["layers"])})
    print(render_checks(checks))
    if args.out:
        args.out.write_text(profile.model_dump_json(indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
