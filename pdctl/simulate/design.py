"""The design document's performance table beside simulated figures, and the layout sweep.

The document's scenario: 1000 concurrent requests, 200 input and 500 output tokens. How its rows are read
(the document names no model or GPU for the table; its examples serve Llama-2-70B, so that on H100s):
- "无PD分离(混合)" (colocated): two hybrid instances at TP 8, 16 GPUs, the same GPUs as the 2x8 row.
- "PD分离(2x8GPU)": two 8-GPU nodes, one prefill instance and one decode instance, each TP 8.
- "PD分离(3x8GPU)": three 8-GPU nodes, one prefill instance and two decode instances, each TP 8.
Its "P99延迟" is read as P99 inter-token latency (an end-to-end latency of 500 tokens cannot be 85 to 380 ms).
GPU efficiency here: GPU-seconds spent in engine steps over GPU-seconds in the run (the document does not
define its own). Cost per million output tokens at the profile's $/GPU-hour."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pdctl.profile import ClusterProfile, load_profile
from pdctl.simulate.run import CannotRunError, Shortfall, SimulationResult, simulate
from pdctl.simulate.workload import SimRequest, WorkloadSpec, generate

DESIGN_DIR = Path(__file__).parent / "design"
DESIGN_WORKLOAD = WorkloadSpec(num_requests=1000, input_tokens=200, output_tokens=500)


@dataclass(frozen=True)
class DocumentRow:
    label: str
    profile: str
    throughput: float
    p99_ms: float
    gpu_efficiency: float
    cost_per_m: float


DOCUMENT_ROWS = (
    DocumentRow("no PD (colocated), 16 GPUs", "design-colocated.yaml", 8500, 380, 0.65, 2.50),
    DocumentRow("PD 2x8GPU: 1 prefill + 1 decode, TP 8", "design-2x8.yaml", 12800, 120, 0.88, 1.65),
    DocumentRow("PD 3x8GPU: 1 prefill + 2 decode, TP 8", "design-3x8.yaml", 14500, 85, 0.92, 1.82),
)


def design_table(hardware: str | None = None) -> list[tuple[DocumentRow, SimulationResult]]:
    requests = generate(DESIGN_WORKLOAD)
    return [
        (row, simulate(load_profile(DESIGN_DIR / row.profile), requests, hardware=hardware)) for row in DOCUMENT_ROWS
    ]


# -- the sweep ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    prefill: int
    decode: int
    prefill_tp: int
    decode_tp: int

    @property
    def gpus(self) -> int:
        return self.prefill * self.prefill_tp + self.decode * self.decode_tp

    @property
    def label(self) -> str:
        """Short, for a table in 80 columns: `2P·TP4 + 1D·TP8`; H for hybrid instances, `4H·TP4`."""
        if self.prefill == 0:
            return f"{self.decode}H·TP{self.decode_tp}"
        return f"{self.prefill}P·TP{self.prefill_tp} + {self.decode}D·TP{self.decode_tp}"


@dataclass
class SweepPoint:
    layout: Layout
    result: SimulationResult
    result_profile: ClusterProfile

    @property
    def goodput_per_gpu(self) -> float:
        """Output tokens per second per GPU of the requests that met both SLOs."""
        metrics = self.result.metrics
        return metrics["output_throughput"] * metrics.get("goodput_ratio", 0.0) / self.layout.gpus


@dataclass(frozen=True)
class CannotRun:
    layout: Layout
    shortfalls: tuple[Shortfall, ...]

    @property
    def reason(self) -> str:
        return "does not fit: " + "; ".join(str(shortfall) for shortfall in self.shortfalls)


@dataclass
class Sweep:
    points: list[SweepPoint]  # the layouts simulated
    cannot_run: list[CannotRun]

    def as_dict(self) -> dict[str, Any]:
        return {
            "layouts": [{"layout": p.layout.label, "goodput_per_gpu": p.goodput_per_gpu, **p.result.as_dict()}
                        for p in self.points],
            "cannot_run": [{"layout": c.layout.label, "gpus": c.layout.gpus, "reason": c.reason}
                           for c in self.cannot_run],
        }  # fmt: skip


def layouts(gpus: int, tps: tuple[int, ...] = (1, 2, 4, 8)) -> list[Layout]:
    """Every split of at most `gpus` GPUs into prefill and decode instances (and all-hybrid) that uses at least
    half of them, with one TP size per role."""
    found = []
    for prefill_tp, decode_tp in itertools.product(tps, tps):
        for prefill in range(0, gpus // prefill_tp + 1):
            decode = (gpus - prefill * prefill_tp) // decode_tp
            if decode < 1 or (prefill == 0 and prefill_tp != decode_tp):
                continue
            layout = Layout(prefill, decode, prefill_tp if prefill else decode_tp, decode_tp)
            if layout.gpus * 2 >= gpus:
                found.append(layout)
    return sorted(set(found), key=lambda x: (x.gpus, x.prefill, x.prefill_tp, x.decode_tp))


def layout_profile(base: ClusterProfile, layout: Layout) -> ClusterProfile:
    data = base.model_dump(mode="json", exclude_none=True)
    data.pop("instances", None)
    data["pd"] |= {"enabled": layout.prefill > 0, "prefilling_min_instances": layout.prefill,
                   "decoding_min_instances": layout.decode,
                   "prefilling_max_instances": max(layout.prefill, data["pd"].get("prefilling_max_instances", 0)),
                   "decoding_max_instances": max(layout.decode, data["pd"].get("decoding_max_instances", 0)),
                   "enable_dynamic_scaling": False}  # fmt: skip
    data["prefill"]["tensor_parallel_size"] = layout.prefill_tp
    data["decode"]["tensor_parallel_size"] = layout.decode_tp
    data["name"] = f"{base.name}-{layout.prefill}p{layout.prefill_tp}-{layout.decode}d{layout.decode_tp}"
    return ClusterProfile.model_validate(data)


def sweep(base: ClusterProfile, gpus: int, requests: list[SimRequest], max_concurrency: int | None,
          hardware: str | None = None) -> Sweep:  # fmt: skip
    """Every layout of `gpus` GPUs: simulated, or said why it cannot run."""
    found = Sweep([], [])
    for layout in layouts(gpus):
        candidate = layout_profile(base, layout)
        try:
            result = simulate(candidate, requests, max_concurrency, hardware=hardware)
        except CannotRunError as error:
            found.cannot_run.append(CannotRun(layout, error.shortfalls))
            continue
        found.points.append(SweepPoint(layout, result, candidate))
    return found


def best(points: list[SweepPoint]) -> SweepPoint:
    return max(points, key=lambda p: (p.goodput_per_gpu, -p.layout.gpus))


def frontier(points: list[SweepPoint]) -> list[SweepPoint]:
    """Pareto front of goodput per GPU against P99 TTFT: no other layout is better on both."""
    front = []
    for point in points:
        ttft = point.result.metrics["p99_ttft_ms"]
        dominated = any(
            other.goodput_per_gpu >= point.goodput_per_gpu
            and other.result.metrics["p99_ttft_ms"] <= ttft
            and (other.goodput_per_gpu, -other.result.metrics["p99_ttft_ms"]) != (point.goodput_per_gpu, -ttft)
            for other in points
        )
        if not dominated:
            front.append(point)
    return sorted(front, key=lambda p: p.result.metrics["p99_ttft_ms"])


def write_profile(base_path: Path, profile: ClusterProfile, out: Path) -> None:
    """The chosen layout as a profile file: the base profile's YAML with the pools and TP sizes replaced."""
    data: dict[str, Any] = yaml.safe_load(base_path.read_text()) or {}
    pd = profile.pd
    data.setdefault("pd", {}).update(
        enabled=pd.enabled,
        prefilling_min_instances=pd.prefilling_min_instances,
        decoding_min_instances=pd.decoding_min_instances,
        prefilling_max_instances=pd.prefilling_max_instances,
        decoding_max_instances=pd.decoding_max_instances,
        enable_dynamic_scaling=False,
    )
    data.setdefault("prefill", {})["tensor_parallel_size"] = profile.prefill.tensor_parallel_size
    data.setdefault("decode", {})["tensor_parallel_size"] = profile.decode.tensor_parallel_size
    data["name"] = profile.name
    header = "# Written by `pdctl simulate --sweep`: the layout with the highest simulated goodput per GPU.\n"
    out.write_text(header + yaml.safe_dump(data, sort_keys=False))


def frontier_svg(points: list[SweepPoint], chosen: SweepPoint) -> str:
    """A small scatter plot (no plotting library needed): goodput per GPU against P99 TTFT, front joined."""
    width, height, pad = 640, 400, 60
    xs = [p.result.metrics["p99_ttft_ms"] for p in points]
    ys = [p.goodput_per_gpu for p in points]
    x_max, y_max = max(xs) * 1.05 or 1.0, max(ys) * 1.1 or 1.0

    def pos(x: float, y: float) -> tuple[float, float]:
        return pad + x / x_max * (width - 2 * pad), height - pad - y / y_max * (height - 2 * pad)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="11">',
             f'<text x="{pad}" y="20">pdctl simulate --sweep (modelled): goodput per GPU vs P99 TTFT</text>',
             f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="black"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="black"/>',
             f'<text x="{width / 2}" y="{height - 20}">P99 TTFT (ms), 0 to {x_max:.0f}</text>',
             f'<text x="5" y="{pad - 10}">goodput tok/s/GPU, 0 to {y_max:.0f}</text>']  # fmt: skip
    front = frontier(points)
    line = " ".join(
        f"{x:.1f},{y:.1f}" for x, y in (pos(p.result.metrics["p99_ttft_ms"], p.goodput_per_gpu) for p in front)
    )
    parts.append(f'<polyline points="{line}" fill="none" stroke="steelblue"/>')
    for point in points:
        x, y = pos(point.result.metrics["p99_ttft_ms"], point.goodput_per_gpu)
        colour = "crimson" if point is chosen else ("steelblue" if point in front else "grey")
        parts.append(
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{colour}"><title>{point.layout.label}</title></circle>'
        )
        if point in front or point is chosen:
            parts.append(f'<text x="{x + 6:.1f}" y="{y - 6:.1f}">{point.layout.label}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
