"""`pdctl status` and `pdctl status --watch`: the cluster on one screen, from the supervisor's view of the
processes and the router's figures (`/pdctl/stats`).

Laid out for an 80x24 terminal; where the terminal cannot redraw in place (not a terminal, TERM=dumb) the
watch prints a plain-text snapshot each refresh instead of a live view.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import httpx
from pydantic import BaseModel
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from pdctl import lifecycle
from pdctl.auth import Access
from pdctl.engines.adapter import engine_adapter
from pdctl.errors import ClusterError
from pdctl.lifecycle import InstanceReport, StatusReport
from pdctl.router.stats import ClusterStats, FaultStats, InstanceStats, WindowStats
from pdctl.safetext import cell, printable
from pdctl.scaling.report import render_scaling
from pdctl.state import ClusterDir

BLOCKS = "▁▂▃▄▅▆▇█"
ASCII_RAMP = "_.-=+*#@"
ROLE_SHORT = {"PREFILLING": "prefill", "DECODING": "decode", "HYBRID": "hybrid"}
PHASE_STYLE = {
    "healthy": "green",
    "attached": "green",
    "failed": "red",
    "dead": "red",
    "blocked": "red",
    "backoff": "yellow",
}


class Snapshot(BaseModel):
    """What `pdctl status --json` prints: the processes, and the router's figures when it answers."""

    status: StatusReport
    stats: ClusterStats | None = None
    stats_error: str | None = None


def fetch_stats(router: Access, timeout_s: float = 2.0) -> ClusterStats:
    response = httpx.get(
        f"{router.url}/pdctl/stats", headers=router.headers, timeout=timeout_s, verify=router.verify, trust_env=False
    )
    if response.status_code == 401:  # router.metrics_need_key
        raise ClusterError(router.refused())
    response.raise_for_status()
    return ClusterStats.model_validate_json(response.content)


def collect(cluster_dir: ClusterDir, api_key: str | None = None) -> Snapshot:
    report = lifecycle.status(cluster_dir)
    if report.daemon_pid is None:
        return Snapshot(status=report, stats_error="the daemon is not running")
    try:
        return Snapshot(status=report, stats=fetch_stats(lifecycle.router_access(cluster_dir, report.router, api_key)))
    except ClusterError as error:
        return Snapshot(status=report, stats_error=str(error))
    except (httpx.HTTPError, ValueError) as error:
        return Snapshot(status=report, stats_error=f"the router at {report.router} did not answer: {error}")


# ---- figures as short text ------------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    if abs(value) >= 10_000:
        return f"{value / 1000:.0f}k"
    return f"{value:.{digits}f}"


def _ms(value: float | None) -> str:
    if value is None:  # no request gave it (TPOT of one-token answers, say): not known, which is not 0
        return "n/a"
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 1 else f"{value:.2f}"


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def _bytes(value: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000:
            return f"{value:.0f} {unit}"
        value /= 1000
    return f"{value:.0f} TB"


def _uptime(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    return f"{seconds}s" if seconds < 120 else f"{seconds // 60}m" if seconds < 7200 else f"{seconds // 3600}h"


def sparkline(values: Sequence[float | None], width: int = 30, ascii_only: bool = False) -> str:
    """The last `width` values scaled to the largest; a gap where there is no value."""
    ramp = ASCII_RAMP if ascii_only else BLOCKS
    shown = list(values)[-width:]
    top = max((v for v in shown if v is not None), default=0.0)
    if top <= 0:
        return "".join(" " if v is None else ramp[0] for v in shown)
    return "".join(" " if v is None else ramp[min(len(ramp) - 1, int(v / top * (len(ramp) - 1)))] for v in shown)


# ---- the screen -----------------------------------------------------------------------------------------------


def _header(report: StatusReport, stats: ClusterStats | None) -> Text:
    text = Text(f"{report.cluster}", style="bold")
    text.append(f" {report.phase}", style="green" if report.phase == "ready" else "yellow")
    emulates = engine_adapter(report.engine).emulates
    engine = f"{report.engine} emulator, not {emulates}" if emulates else report.engine
    text.append(printable(f"  {engine}  {report.router.removeprefix('http://')}"))
    if stats is not None:
        text.append(f"  up {_uptime(stats.uptime_s)}  {stats.routing_policy}/{stats.routing_strategy}")
    return text


def _traffic(stats: ClusterStats) -> Table:
    table = _table("window", "req/s", "out tok/s", "in tok/s", "SLO met", "goodput/s", "failed")
    for name, window in stats.windows.items():
        table.add_row(
            name,
            _num(window.requests_per_s, 2),
            _num(window.output_tokens_per_s, 1),
            _num(window.input_tokens_per_s, 1),
            _share(window.slo_attainment),
            _num(window.goodput_per_s, 2),
            str(window.failed),
        )
    return table


def _latency(window: WindowStats) -> Table:
    columns = {"TTFT": window.ttft, "TPOT": window.tpot, "ITL": window.itl, "E2E": window.e2e,
               "queue": window.queue, "prefill": window.prefill_hop, "decide": window.decision}  # fmt: skip
    table = _table("ms, 60 s", *columns)
    for stat in ("p50", "p90", "p99", "mean"):
        table.add_row(stat, *(_ms(getattr(latency, f"{stat}_ms")) for latency in columns.values()))
    return table


def _summary(stats: ClusterStats) -> Text:
    total = stats.windows["total"]
    routed = sum(total.split.values())
    split = "  ".join(
        f"{ROLE_SHORT.get(phase, phase)} {count} ({count / routed:.0%})" if routed else f"{ROLE_SHORT[phase]} 0"
        for phase, count in total.split.items()
    )
    text = Text(f"routed  {split}\n")
    text.append(f"KV-cache hit rate {_share(stats.kv_cache_hit_rate)}   ")
    nixl = stats.nixl
    text.append(f"NIXL {nixl['transfers']:.0f} transfers, {_bytes(nixl['bytes'])}, {nixl['seconds'] * 1000:.0f} ms\n")
    if stats.faults.any:
        text.append(_faults(stats.faults) + "\n", style="yellow")
    cost = stats.cost
    text.append(f"cost ${_num(cost.usd_per_million_output_tokens, 2)}/M out tokens at ${cost.gpu_hour_usd:g}/h")
    if cost.optimization_percent is None:
        text.append("  vs colocated: not measured (bench --compare)", style="dim")
    else:
        text.append(f"  vs colocated: {cost.optimization_percent:+.1f} % (measured)")
    return text


def _faults(faults: FaultStats) -> str:
    """One line: what the router did about failing instances (by reason), e.g. `moved 2 streams (failed 1,
    stalled 1)`: streams moved mid-stream, attempts retried, requests served in another phase."""
    parts = []
    for what, counts in (
        ("moved {} streams", faults.migrations),
        ("retried {}", faults.retries),
        ("fell back {}", faults.fallbacks),
    ):
        if counts:
            reasons = ", ".join(f"{reason} {count:.0f}" for reason, count in sorted(counts.items()))
            parts.append(f"{what.format(f'{sum(counts.values()):.0f}')} ({reasons})")
    return "faults  " + "  ".join(parts)


def _instances(report: StatusReport, stats: ClusterStats | None) -> Table:
    on_nodes = any(instance.node for instance in report.instances)
    columns = ("instance", *(("node",) if on_nodes else ()), "role", "state", "run", "wait", "KV", "hit", "tok/s")
    table = _table(*columns, "busy", "GPU", "rst")
    figures: dict[str, InstanceStats] = {i.id: i for i in stats.instances} if stats else {}
    for instance in report.instances:
        one = figures.get(instance.id)
        state = Text(instance.phase, style=PHASE_STYLE.get(instance.phase, "cyan"))
        table.add_row(
            instance.id,
            *((cell(instance.node or "-"),) if on_nodes else ()),
            ROLE_SHORT.get(instance.role, instance.role),
            state,
            *_load_cells(one),
            _gpu(instance, one),
            str(instance.restarts),
        )
    return table


def _instance_messages(report: StatusReport) -> list[Text]:
    """Why an instance is not serving (blocked, backing off, failed), one line each."""
    return [
        cell(f"{i.id}: {i.message}", style=PHASE_STYLE.get(i.phase, "yellow"))
        for i in report.instances
        if i.message and i.phase not in ("healthy", "attached")
    ]


def _load_cells(one: InstanceStats | None) -> list[str]:
    if one is None:
        return ["-"] * 6
    rate = one.prompt_tokens_per_s + one.generation_tokens_per_s
    return [_num(one.running), _num(one.waiting), _share(one.kv_usage), _share(one.prefix_hit_rate),
            _num(rate), _share(one.busy_share)]  # fmt: skip


def _gpu(instance: InstanceReport, one: InstanceStats | None) -> str:
    if one is not None and one.gpu is not None and one.gpu.utilization_percent is not None:
        return f"{one.gpu.utilization_percent:.0f}%"
    if instance.gpu_use:
        return f"{sum(use.memory_mib for use in instance.gpu_use) / 1024:.0f}G"
    return "-"


def _trend(stats: ClusterStats, ascii_only: bool) -> Text:
    trend = stats.trend
    lines = (
        ("req/s", trend.requests_per_s, max(trend.requests_per_s, default=0)),
        ("out tok/s", trend.output_tokens_per_s, max(trend.output_tokens_per_s, default=0)),
        ("TTFT p50 ms", trend.ttft_p50_ms, max((v for v in trend.ttft_p50_ms if v is not None), default=0)),
    )
    text = Text()
    for index, (label, values, top) in enumerate(lines):
        text.append(f"{label:>12} ")
        text.append(sparkline(values, 40, ascii_only), style="cyan")
        text.append(f" max {_num(top, 1)}" + ("\n" if index < len(lines) - 1 else ""))
    return text


def _hints(stats: ClusterStats) -> Text:
    return Text("\n".join(printable(hint.brief) for hint in stats.hints), style="bold yellow")


def _table(*columns: str) -> Table:
    table = Table(box=None, padding=(0, 1, 0, 0), show_edge=False, header_style="bold")
    for index, column in enumerate(columns):
        table.add_column(column, justify="left" if index == 0 else "right", no_wrap=True)
    return table


def render(snapshot: Snapshot, trend: bool = False, ascii_only: bool = False) -> RenderableType:
    stats = snapshot.stats
    parts: list[RenderableType] = [_header(snapshot.status, stats)]
    if stats is None:
        parts.append(cell(f"no figures: {snapshot.stats_error}", style="yellow"))
    else:
        parts += [_traffic(stats), _latency(stats.windows["60s"]), _summary(stats)]
    parts.append(_instances(snapshot.status, stats))
    parts += _instance_messages(snapshot.status)
    if stats is not None and trend:
        parts.append(_trend(stats, ascii_only))
    if stats is not None and stats.hints:
        parts.append(_hints(stats))
    if snapshot.status.scaling is not None:
        parts.append(render_scaling(snapshot.status.scaling))
    return Group(*parts)


def watch(
    cluster_dir: ClusterDir,
    console: Console,
    refresh_s: float = 1.0,
    iterations: int | None = None,
    collect_snapshot: Callable[[ClusterDir], Snapshot] = collect,
) -> None:
    """Redraw every refresh_s until Ctrl-C (or `iterations` refreshes, for tests)."""
    live = console.is_terminal and not console.is_dumb_terminal
    ascii_only = not (console.encoding or "").lower().startswith("utf")
    count = 0
    try:
        if not live:
            while iterations is None or count < iterations:
                console.print(render(collect_snapshot(cluster_dir), trend=True, ascii_only=True))
                console.print("-" * min(console.width, 80))
                count += 1
                time.sleep(refresh_s)
            return
        with Live(console=console, auto_refresh=False, screen=False, transient=False) as view:
            while iterations is None or count < iterations:
                view.update(render(collect_snapshot(cluster_dir), trend=True, ascii_only=ascii_only), refresh=True)
                count += 1
                time.sleep(refresh_s)
    except KeyboardInterrupt:
        return
