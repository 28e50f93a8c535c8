"""Metric primitives: counters, and a ledger of per-second rows that counter and fixed-bucket histogram
families are read from, since start (for Prometheus) and over the last minute (for the 10 s and 60 s windows
the dashboard shows).

Fixed buckets make percentiles a constant-time, constant-memory estimate (no sorting of samples), the same
way Prometheus computes histogram_quantile. An event costs one row lookup and a few additions into one row,
so recording stays cheap on the router's hot path.
"""

from __future__ import annotations

import operator
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

Clock = Callable[[], float]
Key = tuple[str, ...]
Row = list[float]


def log_buckets(low: float, high: float, ratio: float) -> tuple[float, ...]:
    """Bounds growing by `ratio` from low to at least high, to three significant digits: a percentile read
    from them is off by less than the ratio's step, at any scale."""
    bounds = []
    bound = low
    while bound < high * ratio:
        bounds.append(float(f"{bound:.3g}"))
        bound *= ratio
    return tuple(bounds)


# 0.5 ms to 2 min in steps of 25 %: 56 buckets.
LATENCY_BUCKETS_S = log_buckets(0.0005, 120.0, 1.25)
HORIZON_S = 60


def histogram_quantile(bounds: Sequence[float], counts: Sequence[float], q: float) -> float | None:
    """The q-th quantile of bucket counts (one per bound, then the overflow bucket), interpolated linearly
    inside the bucket that holds it, as Prometheus's histogram_quantile does. None without observations."""
    total = sum(counts)
    if not total:
        return None
    rank = q * total
    seen = 0.0
    for index, count in enumerate(counts):
        if count and seen + count >= rank:
            if index >= len(bounds):
                return bounds[-1]  # the overflow bucket has no upper bound: report the largest known one
            low = bounds[index - 1] if index else 0.0
            return low + (bounds[index] - low) * (rank - seen) / count
        seen += count
    return bounds[-1]


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{v}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def window_span(clock: Clock, started: float, seconds: float) -> float:
    """The time a window of `seconds` whole one-second slots (the current, partial one included) covers now,
    and no more than the time since recording started."""
    now = clock()
    return max(1e-9, min(now - started, seconds - 1 + now % 1))


class Counter:
    def __init__(self, name: str, help_text: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.labels = name, help_text, labels
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, *label_values: str, amount: float = 1.0) -> None:
        self.values[label_values] = self.values.get(label_values, 0.0) + amount

    def total(self) -> float:
        return sum(self.values.values())

    def render(self) -> Iterable[str]:
        return _render_counter(self.name, self.help, self.labels, self.values)


def _render_counter(name: str, help_text: str, labels: tuple[str, ...], values: dict[Key, float]) -> Iterable[str]:
    yield f"# HELP {name} {help_text}"
    yield f"# TYPE {name} counter"
    for label_values, total in sorted(values.items()):
        yield f"{name}{_labels(labels, label_values)} {total}"


class Ledger:
    """Rows of float columns by label values: one row set per second of the clock over the last HORIZON_S
    seconds, and their totals since start.

    An event finds its row (a list of floats) with one dict lookup and adds into its columns; totals since start
    are folded from a second's rows once, when the clock leaves it, not per event.

    Events can also be deferred: `pending` holds them as tuples until `fold` takes them, in batches (the owner
    calls `flush`) and before any read. Inside a loaded router a request's own work has pushed the rows out of
    the CPU's caches by the time it ends, and there one event folded alone cost 3 times what it costs in a
    batch, where the rows stay cached from one event to the next."""

    def __init__(self, clock: Clock = time.monotonic, fold: Callable[[list[tuple]], None] | None = None):
        self.clock = clock
        self.width = 0
        self._seconds = [-1] * HORIZON_S
        self._slots: list[dict[Key, Row]] = [{} for _ in range(HORIZON_S)]
        self._closed: dict[Key, Row] = {}
        self.second, self.rows = -1, self._slots[0]
        self.pending: list[tuple] = []
        self._fold = fold

    def flush(self) -> None:
        """Fold the deferred events, oldest first."""
        if self.pending and self._fold is not None:
            self._fold(self.pending)
            self.pending.clear()

    def reserve(self, columns: int) -> int:
        """`columns` more columns in every row; returns the first one's index. Only before the first row."""
        if self.rows or self._closed:
            raise RuntimeError("columns are reserved before anything is recorded")
        first, self.width = self.width, self.width + columns
        return first

    def row(self, second: int, key: Key) -> Row:
        """The row of `key` in `second`, a reading of this ledger's clock that the caller took (one reading serves
        every figure of an event). A second before the current one, from a caller that read the clock before an
        await, counts in the current one: it has been folded already."""
        if second > self.second:
            self._move_to(second)
        row = self.rows.get(key)
        if row is None:
            row = self.rows[key] = [0.0] * self.width
        return row

    def _move_to(self, second: int) -> None:
        _add_rows(self._closed, self.rows.items())
        index = second % HORIZON_S
        self._seconds[index] = second
        self._slots[index] = self.rows = {}
        self.second = second

    def totals(self) -> dict[Key, Row]:
        """Every row since start, by key."""
        self.flush()
        return _add_rows(_add_rows({}, self._closed.items()), self.rows.items())

    def window(self, seconds: int) -> dict[Key, Row]:
        """The rows of the last `seconds` seconds, the current (partial) one included, added by key."""
        self.flush()
        now = int(self.clock())
        totals: dict[Key, Row] = {}
        for second, rows in zip(self._seconds, self._slots, strict=True):
            if now - seconds < second <= now:
                _add_rows(totals, rows.items())
        return totals

    def by_second(self, seconds: int) -> list[dict[Key, Row]]:
        """The rows of each whole second before the current one, oldest first; empty where nothing was recorded."""
        self.flush()
        now = int(self.clock())
        found = dict(zip(self._seconds, self._slots, strict=True))
        return [found.get(second, {}) for second in range(now - seconds, now)]


def _add_rows(into: dict[Key, Row], rows: Iterable[tuple[Key, Row]]) -> dict[Key, Row]:
    for key, row in rows:
        total = into.get(key)
        into[key] = list(row) if total is None else list(map(operator.add, total, row))
    return into


class LedgerCounter:
    """A counter family read from ledger columns: `terms` maps a row's key to the (label values, column) pairs
    the row adds to."""

    def __init__(
        self,
        ledger: Ledger,
        name: str,
        help_text: str,
        labels: tuple[str, ...],
        terms: Callable[[Key], Iterable[tuple[Key, int]]],
    ):
        self.ledger, self.name, self.help, self.labels, self.terms = ledger, name, help_text, labels, terms

    def values_of(self, rows: dict[Key, Row]) -> dict[Key, float]:
        values: dict[Key, float] = {}
        for key, row in rows.items():
            for labels, column in self.terms(key):
                values[labels] = values.get(labels, 0.0) + row[column]
        return values

    @property
    def values(self) -> dict[Key, float]:
        """Since start, by label values."""
        return self.values_of(self.ledger.totals())

    def window(self, seconds: int) -> dict[Key, float]:
        """The last `seconds` seconds, by label values."""
        return self.values_of(self.ledger.window(seconds))

    def per_second(self, seconds: int = HORIZON_S) -> list[float]:
        """Whole seconds before the current one, oldest first: the sum over every label of each."""
        return [sum(self.values_of(rows).values()) for rows in self.ledger.by_second(seconds)]

    def render(self) -> Iterable[str]:
        return _render_counter(self.name, self.help, self.labels, self.values)


class LedgerHistogram:
    """A fixed-bucket histogram family in ledger columns: a count per bucket (the overflow last), then the sum.
    `label_of` maps a row's key to the histogram's label values. Series read from it are bucket counts, sum and
    count, the shape `summarize` and `histogram_quantile` take."""

    def __init__(
        self,
        ledger: Ledger,
        name: str,
        help_text: str,
        labels: tuple[str, ...] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS_S,
        label_of: Callable[[Key], Key] = lambda key: (),
    ):
        self.ledger, self.name, self.help, self.labels, self.label_of = ledger, name, help_text, labels, label_of
        self.buckets = tuple(buckets)
        self.first = ledger.reserve(len(self.buckets) + 2)
        self.sum_column = self.first + len(self.buckets) + 1

    def columns(self) -> tuple[int, tuple[float, ...], int]:
        """The first bucket's column, the bucket bounds and the sum's column: for a caller that writes
        observations of many events inline."""
        return self.first, self.buckets, self.sum_column

    def observe(self, row: Row, value: float) -> None:
        row[self.first + bisect_left(self.buckets, value)] += 1
        row[self.sum_column] += value

    def observe_each(self, row: Row, values: list[float]) -> None:
        """`observe` of every value into one row: the inter-token gaps of a stream, recorded together."""
        buckets, first = self.buckets, self.first
        for value in values:
            row[first + bisect_left(buckets, value)] += 1
        row[self.sum_column] += sum(values)

    def series_of(self, rows: dict[Key, Row]) -> dict[Key, list[float]]:
        found: dict[Key, list[float]] = {}
        for key, row in rows.items():
            mine = row[self.first : self.sum_column + 1]
            labels = self.label_of(key)
            series = found.get(labels)
            found[labels] = mine if series is None else [a + b for a, b in zip(series, mine, strict=True)]
        for series in found.values():
            series.append(sum(series[:-1]))
        return found

    def merged_of(self, rows: dict[Key, Row]) -> list[float]:
        """Every label's series summed."""
        merged = [0.0] * (len(self.buckets) + 3)
        for series in self.series_of(rows).values():
            merged = [a + b for a, b in zip(merged, series, strict=True)]
        return merged

    def merged(self) -> list[float]:
        """The whole histogram since start."""
        return self.merged_of(self.ledger.totals())

    def window(self, seconds: int) -> list[float]:
        """Bucket counts, sum and count of the last `seconds` seconds."""
        return self.merged_of(self.ledger.window(seconds))

    def quantile(self, q: float, *label_values: str) -> float | None:
        series = self.series_of(self.ledger.totals()).get(label_values)
        return histogram_quantile(self.buckets, series[:-2], q) if series else None

    def per_second_quantile(self, q: float, seconds: int = HORIZON_S) -> list[float | None]:
        """The q-th quantile of each whole second before the current one, oldest first."""
        return [
            histogram_quantile(self.buckets, self.merged_of(rows)[:-2], q) for rows in self.ledger.by_second(seconds)
        ]

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        for values, series in sorted(self.series_of(self.ledger.totals()).items()):
            cumulative = 0.0
            for bound, count in zip((*self.buckets, float("inf")), series, strict=False):
                cumulative += count
                le = 'le="+Inf"' if bound == float("inf") else f'le="{bound!r}"'
                yield f"{self.name}_bucket{_labels(self.labels, values, le)} {cumulative}"
            yield f"{self.name}_sum{_labels(self.labels, values)} {series[-2]}"
            yield f"{self.name}_count{_labels(self.labels, values)} {series[-1]}"


def summarize(buckets: Sequence[float], series: Sequence[float]) -> dict[str, float | None]:
    """Mean and p50/p90/p99 of one histogram series (bucket counts, sum, count)."""
    counts, total, count = series[:-2], series[-2], series[-1]
    return {
        "count": count,
        "mean": total / count if count else None,
        "p50": histogram_quantile(buckets, counts, 0.5),
        "p90": histogram_quantile(buckets, counts, 0.9),
        "p99": histogram_quantile(buckets, counts, 0.99),
    }


class Renderable(Protocol):
    def render(self) -> Iterable[str]: ...


def render_all(metrics: Iterable[Renderable]) -> str:
    lines: list[str] = []
    for metric in metrics:
        lines.extend(metric.render())
    return "\n".join(lines) + "\n"
