"""Printing a simulation as `vllm bench serve` prints a run, marked as modelled."""

from __future__ import annotations

from collections import Counter

from rich.console import Group
from rich.table import Table

from pdctl.simulate.design import DocumentRow, Sweep, SweepPoint
from pdctl.simulate.run import Shortfall, SimulationResult

METRICS = (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
           ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency"))  # fmt: skip


def _num(value: float | None, spec: str = ".2f") -> str:
    """A figure, or n/a where no request gives it (a latency when none completed), which is not 0."""
    return "n/a" if value is None else format(value, spec)


def result_table(result: SimulationResult) -> Table:
    m = result.metrics
    table = Table(
        title=f"pdctl simulate (modelled, not measured): {result.profile}, {result.model} on {result.gpus}x "
        f"{result.hardware}",
        show_header=False,
        title_justify="left",
    )
    table.add_column("metric")
    table.add_column("value", justify="right")
    if result.hardware_fidelity:
        table.caption, table.caption_justify = f"hardware {result.hardware_fidelity['summary']}", "left"
    rows = [("Successful requests", f"{m['completed']}")]
    if m["failed"]:
        kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(m["failures_by_kind"].items()))
        rows.append(("Failed requests", f"{m['failed']} ({kinds})"))
    rows += [
        ("Benchmark duration (s)", f"{m['duration']:.2f}"),
        ("Total input tokens", f"{m['total_input_tokens']}"),
        ("Total generated tokens", f"{m['total_output_tokens']}"),
        ("Request throughput (req/s)", f"{m['request_throughput']:.2f}"),
        ("Request goodput (req/s)", _num(m.get("request_goodput"))),
        ("Output token throughput (tok/s)", f"{m['output_throughput']:.2f}"),
        ("Output token throughput per GPU (tok/s)", f"{m['output_throughput'] / max(1, result.gpus):.2f}"),
        ("Total token throughput (tok/s)", f"{m['total_token_throughput']:.2f}"),
    ]
    for key, title in METRICS:
        rows.append((f"[bold]{title}[/bold]", ""))
        for stat in ("mean", "median", "p90", "p99"):
            rows.append((f"{stat.capitalize() if stat in ('mean', 'median') else stat.upper()} {key.upper()} (ms)",
                         _num(m[f"{stat}_{key}_ms"])))  # fmt: skip
    decisions = ", ".join(f"{phase} {count}" for phase, count in sorted(result.decisions.items()))
    rows += [("Routing decisions", decisions), ("Preemptions", str(result.preemptions)),
             ("Simulated in (s, wall)", f"{result.wall_s:.2f}")]  # fmt: skip
    for row in rows:
        table.add_row(*row)
    return table


def design_table_view(rows: list[tuple[DocumentRow, SimulationResult]]) -> Table:
    table = Table(title="The design document's table beside pdctl simulate (modelled: Llama-2-70B, h100-sxm)",
                  title_justify="left")  # fmt: skip
    for column in ("configuration", "GPUs", "output tok/s doc | sim", "P99 ITL ms doc | sim", "P99 TTFT ms sim",
                   "GPU efficiency doc | sim", "$/M tokens doc | sim"):  # fmt: skip
        table.add_column(column, justify="left" if column == "configuration" else "right")
    for doc, sim in rows:
        m = sim.metrics
        table.add_row(
            doc.label,
            str(sim.gpus),
            f"{doc.throughput:.0f} | {m['output_throughput']:.0f}",
            f"{doc.p99_ms:.0f} | {_num(m['p99_itl_ms'], '.0f')}",
            _num(m["p99_ttft_ms"], ".0f"),
            f"{doc.gpu_efficiency:.0%} | {sim.gpu_efficiency:.0%}",
            f"{doc.cost_per_m:.2f} | {_num(sim.cost_per_m_output_tokens_usd)}",
        )
    return table


def sweep_view(sweep: Sweep, chosen: SweepPoint) -> Group:
    """The layouts simulated, best goodput per GPU first, then those that cannot run and why: 80 columns wide
    (a layout's name never wraps; headers and reasons do)."""
    table = Table(title="pdctl simulate --sweep (modelled): layouts by goodput per GPU", title_justify="left",
                  caption="P prefill, D decode, H hybrid instances; TP tensor-parallel size; * chosen",
                  caption_justify="left")  # fmt: skip
    table.add_column("layout", no_wrap=True)
    for column in ("GPUs", "goodput tok/s/GPU", "output tok/s", "SLO met", "P99 TTFT ms", "P99 ITL ms"):
        table.add_column(column, justify="right")
    for point in sorted(sweep.points, key=lambda p: -p.goodput_per_gpu):
        m = point.result.metrics
        table.add_row(point.layout.label + (" *" if point is chosen else ""), str(point.layout.gpus),
                      f"{point.goodput_per_gpu:.1f}", f"{m['output_throughput']:.0f}",
                      f"{m.get('goodput_ratio', 0):.0%}", _num(m["p99_ttft_ms"], ".0f"), _num(m["p99_itl_ms"], ".1f"),
                      style="bold" if point is chosen else None)  # fmt: skip
    if not sweep.cannot_run:
        return Group(table)
    return Group(table, _cannot_run_table(sweep))


def _cannot_run_table(sweep: Sweep) -> Table:
    """The layouts that cannot run, one row for each kind of instance that does not fit and the number of
    layouts that have it (many layouts fail the same way; `--json` gives each its reasons)."""
    counts: Counter[Shortfall] = Counter(s for item in sweep.cannot_run for s in item.shortfalls)
    total = len(sweep.points) + len(sweep.cannot_run)
    table = Table(title=f"{len(sweep.cannot_run)} of {total} layouts cannot run (--json names each)",
                  title_justify="left", show_lines=True)  # fmt: skip
    table.add_column("instances", no_wrap=True)
    table.add_column("layouts", justify="right")
    table.add_column("why they do not fit", ratio=1)
    for shortfall, count in sorted(counts.items(), key=lambda item: item[0].instances):
        table.add_row(shortfall.instances, str(count), shortfall.why)
    return table
