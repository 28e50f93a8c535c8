"""Printing a simulation as `vllm bench serve` prints a run, marked as modelled."""

from __future__ import annotations

from rich.table import Table

from pdctl.simulate.run import SimulationResult

METRICS = (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
           ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency"))  # fmt: skip


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
    rows = [
        ("Successful requests", f"{m['completed']}"),
        ("Benchmark duration (s)", f"{m['duration']:.2f}"),
        ("Total input tokens", f"{m['total_input_tokens']}"),
        ("Total generated tokens", f"{m['total_output_tokens']}"),
        ("Request throughput (req/s)", f"{m['request_throughput']:.2f}"),
        ("Request goodput (req/s)", f"{m.get('request_goodput', 0.0):.2f}"),
        ("Output token throughput (tok/s)", f"{m['output_throughput']:.2f}"),
        ("Output token throughput per GPU (tok/s)", f"{m['output_throughput'] / max(1, result.gpus):.2f}"),
        ("Total token throughput (tok/s)", f"{m['total_token_throughput']:.2f}"),
    ]
    for key, title in METRICS:
        rows.append((f"[bold]{title}[/bold]", ""))
        for stat in ("mean", "median", "p90", "p99"):
            rows.append((f"{stat.capitalize() if stat in ('mean', 'median') else stat.upper()} {key.upper()} (ms)",
                         f"{m[f'{stat}_{key}_ms']:.2f}"))  # fmt: skip
    decisions = ", ".join(f"{phase} {count}" for phase, count in sorted(result.decisions.items()))
    rows += [("Routing decisions", decisions), ("Preemptions", str(result.preemptions)),
             ("Simulated in (s, wall)", f"{result.wall_s:.2f}")]  # fmt: skip
    for row in rows:
        table.add_row(*row)
    return table
