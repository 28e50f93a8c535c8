"""Rich renderings of a benchmark: the progress line while it runs, the summary table, side-by-side runs."""

from __future__ import annotations

from typing import Any

from rich.console import Console, Group
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pdctl.bench import client
from pdctl.bench.report import LATENCY_METRICS, PERCENTILES
from pdctl.safetext import cell

_NAMES = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2EL"}


def progress_bar(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("running {task.fields[running]}  failed {task.fields[failed]}  {task.fields[tokens]} tok/s"),
        TimeElapsedColumn(),
        console=console,
        auto_refresh=False,  # refreshed from the event loop's tick: no thread competing with the load
    )


def progress_updater(bar: Progress, description: str, total: int):
    task = bar.add_task(description, total=total, running=0, failed=0, tokens="0")
    state = {"tokens": 0}

    def update(progress: client.Progress) -> None:
        rate = (progress.output_tokens - state["tokens"]) / client.TICK_S
        state["tokens"] = progress.output_tokens
        bar.update(
            task, completed=progress.done, running=progress.running, failed=progress.failed, tokens=f"{rate:.0f}"
        )
        bar.refresh()

    return update


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:  # not known (TPOT when every answer came in one event), which is not 0
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def summary_table(outcome_json: dict[str, Any], title: str) -> Group:
    rows = Table(title=cell(title), show_header=False, box=None, title_justify="left")
    rows.add_column(style="bold")
    rows.add_column(justify="right")
    add = rows.add_row
    add("Successful requests", _fmt(outcome_json["completed"]))
    failures = outcome_json.get("failures_by_kind") or {}
    kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(failures.items()))
    add("Failed requests", f"{outcome_json['failed']}" + (f" ({kinds})" if kinds else ""))
    if outcome_json.get("max_concurrency"):
        add("Maximum request concurrency", _fmt(outcome_json["max_concurrency"]))
    add("Benchmark duration (s)", _fmt(outcome_json["duration"]))
    add("Total input tokens", _fmt(outcome_json["total_input_tokens"]))
    add("Total generated tokens", _fmt(outcome_json["total_output_tokens"]))
    add("Request throughput (req/s)", _fmt(outcome_json["request_throughput"]))
    if outcome_json.get("request_goodput") is not None:
        slos = " ".join(f"{k}:{v:g}" for k, v in (outcome_json.get("goodput_slos_ms") or {}).items())
        add(cell(f"Request goodput (req/s) [{slos} ms]"), _fmt(outcome_json["request_goodput"]))
    add("Output token throughput (tok/s)", _fmt(outcome_json["output_throughput"]))
    add("Total token throughput (tok/s)", _fmt(outcome_json["total_token_throughput"]))
    latency = Table(box=None)
    latency.add_column("ms", style="bold")
    for column in ("mean", "median", *(f"p{p:g}" for p in PERCENTILES if p != 50)):
        latency.add_column(column, justify="right")
    for name in LATENCY_METRICS:
        cells = [outcome_json[f"mean_{name}_ms"], outcome_json[f"median_{name}_ms"]]
        cells += [outcome_json[f"p{p:g}_{name}_ms"] for p in PERCENTILES if p != 50]
        latency.add_row(_NAMES[name], *(_fmt(c) for c in cells))
    return Group(rows, latency, server_table(outcome_json.get("pdctl", {}).get("server", {})))


def server_table(server: dict[str, Any]) -> Table:
    table = Table(title="From the servers' /metrics over the run", show_header=False, box=None, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    split = server.get("phase_split")
    if split:
        parts = [f"{phase} {sum(outcomes.values()):g}" for phase, outcomes in sorted(split.items())]
        table.add_row("Router phase split", ", ".join(parts))
    if "router_queue_mean_ms" in server:
        table.add_row("Router queue time, mean (ms)", _fmt(server["router_queue_mean_ms"]))
    if "engine_queue_mean_ms" in server:
        table.add_row("Engine queue time, mean (ms)", _fmt(server["engine_queue_mean_ms"]))
    if "prefix_cache_hit_rate" in server:
        rate = server["prefix_cache_hit_rate"]
        table.add_row("Prefix cache hit rate", "n/a" if rate is None else f"{rate:.1%}")
    if "nixl_transfers" in server:
        table.add_row(
            "NIXL transfers",
            f"{server['nixl_transfers']:g}, {server['nixl_transfer_time_s'] * 1000:,.1f} ms, "
            f"{server['nixl_bytes_transferred'] / 2**20:,.1f} MiB",
        )
    if server.get("cost_per_million_output_tokens_usd") is not None:
        table.add_row(
            f"Cost per million output tokens ({server['devices']})",
            f"${server['cost_per_million_output_tokens_usd']:,.2f}",
        )
    if not table.rows:
        table.add_row("(the server exposes none of these figures)", "")
    return table


COMPARED = (
    ("request_throughput", "requests/s"),
    ("request_goodput", "goodput req/s"),
    ("output_throughput", "output tok/s"),
    ("median_ttft_ms", "TTFT median ms"),
    ("p99_ttft_ms", "TTFT p99 ms"),
    ("median_tpot_ms", "TPOT median ms"),
    ("p99_tpot_ms", "TPOT p99 ms"),
    ("p99_e2el_ms", "E2EL p99 ms"),
    ("failed", "failed"),
    ("cost", "$ per M output tok"),
)


def compared_value(run: dict[str, Any], key: str) -> Any:
    if key == "cost":
        return run.get("pdctl", {}).get("server", {}).get("cost_per_million_output_tokens_usd")
    return run.get(key)


def comparison_table(runs: list[tuple[str, dict[str, Any]]], title: str) -> Table:
    """Runs side by side; each column after the first has its ratio to the first."""
    table = Table(title=cell(f"{title}; ratios to {runs[0][0]}"), title_justify="left")
    table.add_column("metric", style="bold")
    for index, (name, _) in enumerate(runs):
        table.add_column(cell(name), justify="right")
        if index:
            table.add_column("ratio", justify="right")
    for key, label in COMPARED:
        base = compared_value(runs[0][1], key)
        cells = []
        for index, (_, run) in enumerate(runs):
            value = compared_value(run, key)
            cells.append(_fmt(value))
            if index:
                ratio = (
                    value / base if isinstance(value, int | float) and isinstance(base, int | float) and base else None
                )
                cells.append("n/a" if ratio is None else f"{ratio:.2f}x")
        table.add_row(label, *cells)
    return table
