"""What the scaler shows: the report it writes beside the cluster's state (read by `pdctl status`), its
Prometheus lines on the router's /metrics, and a rich rendering for the status view."""

from __future__ import annotations

import collections
import time
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, Field
from rich.console import Group
from rich.table import Table
from rich.text import Text

from pdctl.safetext import cell
from pdctl.scaling.policy import Decision

REPORT_FILE = "scaling.json"


class DecisionRecord(BaseModel):
    at: float = Field(description="wall-clock time of the decision")
    pool: str
    delta: int
    loop: str
    reason: str
    outcome: str = "in progress"


class PoolReport(BaseModel):
    pool: str
    mode: str = Field(description="auto, advisory, manual (set by `pdctl scale`) or off")
    current: int
    desired: int
    min: int
    max: int
    floor: int = 0
    action: str | None = None
    blocked: str | None = None
    signals: dict[str, float] = Field(default_factory=dict)


class ScalingReport(BaseModel):
    mode: str
    pools: list[PoolReport]
    decisions: list[DecisionRecord] = Field(default_factory=list)
    updated_at: float = Field(default_factory=time.time)


def read_report(cluster_path: Path) -> ScalingReport | None:
    """The running scaler's latest report, None before its first one (or from a pdctl without a scaler)."""
    try:
        return ScalingReport.model_validate_json((cluster_path / REPORT_FILE).read_bytes())
    except (FileNotFoundError, ValueError):
        return None


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


def _labels(**labels: str) -> str:
    return "{" + ",".join(f'{key}="{_escape(value)}"' for key, value in labels.items()) + "}"


class ScalerMetrics:
    """pdctl_scaler_* lines, rendered from the latest report; the router's /metrics renders this with its own."""

    def __init__(self) -> None:
        self.report: ScalingReport | None = None
        self.decisions: dict[tuple[str, str, str, str], int] = {}

    def count(self, record: DecisionRecord) -> None:
        direction = "out" if record.delta > 0 else "in"
        outcome = record.outcome.split(":", 1)[0].split(" ", 1)[0]
        key = (record.pool, direction, record.loop, outcome)
        self.decisions[key] = self.decisions.get(key, 0) + 1

    def render(self) -> Iterable[str]:
        report = self.report
        if report is None:
            return
        gauges = {
            "pdctl_scaler_instances": ("Instances in the pool (starting ones included, draining ones not).", "current"),
            "pdctl_scaler_desired_instances": ("Instances the scaler wants in the pool.", "desired"),
            "pdctl_scaler_min_instances": ("The pool's lower bound.", "min"),
            "pdctl_scaler_max_instances": ("The pool's upper bound.", "max"),
            "pdctl_scaler_floor_instances": ("The predictive loop's floor.", "floor"),
        }
        for name, (help_text, attribute) in gauges.items():
            yield f"# HELP {name} {help_text}"
            yield f"# TYPE {name} gauge"
            for pool in report.pools:
                yield f"{name}{_labels(pool=pool.pool)} {getattr(pool, attribute)}"
        yield "# HELP pdctl_scaler_pool_info Who sizes each pool: auto, advisory, manual or off."
        yield "# TYPE pdctl_scaler_pool_info gauge"
        for pool in report.pools:
            yield f"pdctl_scaler_pool_info{_labels(pool=pool.pool, mode=pool.mode)} 1"
        yield "# HELP pdctl_scaler_blocked 1 while the pool cannot grow (no free device), with the reason."
        yield "# TYPE pdctl_scaler_blocked gauge"
        for pool in report.pools:
            yield f"pdctl_scaler_blocked{_labels(pool=pool.pool, reason=pool.blocked or '')} {int(bool(pool.blocked))}"
        yield "# HELP pdctl_scaler_signal The figures each pool's decisions are made on."
        yield "# TYPE pdctl_scaler_signal gauge"
        for pool in report.pools:
            for signal, value in sorted(pool.signals.items()):
                yield f"pdctl_scaler_signal{_labels(pool=pool.pool, signal=signal)} {value}"
        yield "# HELP pdctl_scaler_decisions_total Scaling decisions, by pool, direction, loop and outcome."
        yield "# TYPE pdctl_scaler_decisions_total counter"
        for (pool, direction, loop, outcome), total in sorted(self.decisions.items()):
            labels = _labels(pool=pool, direction=direction, loop=loop, outcome=outcome)
            yield f"pdctl_scaler_decisions_total{labels} {total}"
        yield "# HELP pdctl_scaler_last_decision_timestamp_seconds The latest decision per pool, its reason a label."
        yield "# TYPE pdctl_scaler_last_decision_timestamp_seconds gauge"
        latest = {record.pool: record for record in report.decisions}
        for pool, record in sorted(latest.items()):
            labels = _labels(pool=pool, reason=record.reason, outcome=record.outcome)
            yield f"pdctl_scaler_last_decision_timestamp_seconds{labels} {record.at}"


class DecisionLog:
    """The latest decisions with their outcomes (what `status` shows), and every settled one counted by
    outcome (what /metrics shows)."""

    def __init__(self, keep: int = 20) -> None:
        self.records: collections.deque[DecisionRecord] = collections.deque(maxlen=keep)
        self.metrics = ScalerMetrics()

    def add(self, decision: Decision, outcome: str = "in progress") -> DecisionRecord:
        return self.note(str(decision.role), decision.reason, outcome, decision.delta, decision.loop)

    def note(self, pool: str, reason: str, outcome: str, delta: int = 0, loop: str = "manual") -> DecisionRecord:
        record = DecisionRecord(at=time.time(), pool=pool, delta=delta, loop=loop, reason=reason, outcome=outcome)
        self.records.append(record)
        return record

    def settle(self, record: DecisionRecord, outcome: str) -> None:
        record.outcome = outcome
        self.metrics.count(record)

    def for_action(self, catch_up: Decision) -> DecisionRecord:
        """The pool's latest decision still in progress, which an action now carries out; else the catch-up
        (the pool is not at the size it should be, and no decision is waiting for that), recorded."""
        for record in reversed(self.records):
            if record.pool == catch_up.role and record.outcome == "in progress":
                return record
        return self.add(catch_up)


def render_scaling(report: ScalingReport, now: float | None = None, last: int = 5) -> Group:
    """The status view's scaling section: each pool's sizes and state, then the latest decisions."""
    now = time.time() if now is None else now
    table = Table(title=f"scaling ({report.mode})", title_justify="left", expand=False)
    for column in ("pool", "mode", "current", "desired", "min", "max", "floor", "state"):
        table.add_column(column, justify="right" if column in ("current", "desired", "min", "max", "floor") else "left")
    for pool in report.pools:
        state = pool.blocked or pool.action or "steady"
        style = "red" if pool.blocked else ("yellow" if pool.action else "")
        table.add_row(
            pool.pool,
            pool.mode,
            str(pool.current),
            str(pool.desired),
            str(pool.min),
            str(pool.max),
            str(pool.floor),
            cell(state, style=style),
        )
    lines = [table]
    for record in report.decisions[-last:]:
        ago = max(0.0, now - record.at)
        lines.append(cell(f"  {ago:5.0f} s ago  {record.reason}  [{record.loop}; {record.outcome}]"))
    if not report.decisions:
        lines.append(Text("  no scaling decision yet"))
    return Group(*lines)
