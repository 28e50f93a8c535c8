"""Metric primitives: counters and fixed-bucket histograms, kept since start (for Prometheus) and per second
over the last minute (for the 10 s and 60 s windows the dashboard shows).

Fixed buckets make percentiles a constant-time, constant-memory estimate (no sorting of samples), the same
way Prometheus computes histogram_quantile. The per-second ring costs one slot lookup per observation and
one allocation per second, so recording stays cheap on the router's hot path.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

Clock = Callable[[], float]


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


class _SecondRing:
    """The last HORIZON_S seconds, one slot per second of the clock; a slot is reset when its second comes round."""

    def __init__(self, clock: Clock, make_slot: Callable[[], object]):
        self.clock = clock
        self._make_slot = make_slot
        self._seconds = [-1] * HORIZON_S
        self._slots: list[object] = [make_slot() for _ in range(HORIZON_S)]
        # The slot of the second last written: most writes land in it, found with one comparison.
        self.second, self.slot = -1, self._slots[0]

    def current(self) -> object:
        return self.at(int(self.clock()))

    def at(self, second: int) -> object:
        """The slot of `second`, a reading of this ring's clock that the caller took: one reading serves every
        metric an event updates (on some virtual machines a clock reading is a system call)."""
        if second != self.second:
            self._move_to(second)
        return self.slot

    def _move_to(self, second: int) -> None:
        index = second % HORIZON_S
        if self._seconds[index] != second:
            self._seconds[index] = second
            self._slots[index] = self._make_slot()
        self.second, self.slot = second, self._slots[index]

    def last(self, seconds: int) -> list[object]:
        """Slots of the last `seconds` seconds, the current (partial) one included."""
        now = int(self.clock())
        return [slot for second, slot in zip(self._seconds, self._slots, strict=True) if now - seconds < second <= now]

    def by_second(self, seconds: int) -> list[object | None]:
        """One entry per whole second before the current one, oldest first; None where nothing was recorded."""
        now = int(self.clock())
        found = {second: slot for second, slot in zip(self._seconds, self._slots, strict=True)}
        return [found.get(second) for second in range(now - seconds, now)]


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
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} counter"
        for values, total in sorted(self.values.items()):
            yield f"{self.name}{_labels(self.labels, values)} {total}"


class WindowedCounter(Counter):
    """A counter that also keeps its per-second increments, by label values, for the last minute."""

    def __init__(self, name: str, help_text: str, labels: tuple[str, ...] = (), clock: Clock = time.monotonic):
        super().__init__(name, help_text, labels)
        self._ring = _SecondRing(clock, dict)

    def inc(self, *label_values: str, amount: float = 1.0) -> None:
        self.inc_at(int(self._ring.clock()), *label_values, amount=amount)

    def inc_at(self, second: int, *label_values: str, amount: float = 1.0) -> None:
        """`inc` in the given second of the clock (see _SecondRing.at)."""
        self.values[label_values] = self.values.get(label_values, 0.0) + amount
        slot: dict[tuple[str, ...], float] = self._ring.at(second)  # type: ignore[assignment]
        slot[label_values] = slot.get(label_values, 0.0) + amount

    def window(self, seconds: int) -> dict[tuple[str, ...], float]:
        """Increments of the last `seconds` seconds, by label values."""
        totals: dict[tuple[str, ...], float] = {}
        for slot in self._ring.last(seconds):
            for key, amount in slot.items():  # type: ignore[attr-defined]
                totals[key] = totals.get(key, 0.0) + amount
        return totals

    def per_second(self, seconds: int = HORIZON_S) -> list[float]:
        """Whole seconds before the current one, oldest first: the sum over every label of each."""
        return [sum(slot.values()) if slot else 0.0 for slot in self._ring.by_second(seconds)]  # type: ignore[attr-defined]


class Histogram:
    def __init__(self, name: str, help_text: str, labels: tuple[str, ...] = (), buckets=LATENCY_BUCKETS_S):
        self.name, self.help, self.labels = name, help_text, labels
        self.buckets = tuple(buckets)
        self.series: dict[tuple[str, ...], list[float]] = {}  # bucket counts (with overflow), then sum, then count

    def _new_series(self) -> list[float]:
        return [0.0] * (len(self.buckets) + 3)

    def observe(self, value: float, *label_values: str, count: int = 1) -> None:
        series = self.series.get(label_values)
        if series is None:
            series = self.series[label_values] = self._new_series()
        _add(series, bisect.bisect_left(self.buckets, value), value, count)

    def merged(self) -> list[float]:
        """Every label's series summed: the whole histogram since start."""
        return _merge(self._new_series(), self.series.values())

    def quantile(self, q: float, *label_values: str) -> float | None:
        series = self.series.get(label_values)
        return histogram_quantile(self.buckets, series[:-2], q) if series else None

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        for values, series in sorted(self.series.items()):
            cumulative = 0.0
            for bound, count in zip((*self.buckets, float("inf")), series, strict=False):
                cumulative += count
                le = 'le="+Inf"' if bound == float("inf") else f'le="{bound!r}"'
                yield f"{self.name}_bucket{_labels(self.labels, values, le)} {cumulative}"
            yield f"{self.name}_sum{_labels(self.labels, values)} {series[-2]}"
            yield f"{self.name}_count{_labels(self.labels, values)} {series[-1]}"


def _add(series: list[float], index: int, value: float, count: int) -> None:
    series[index] += count
    series[-2] += value * count
    series[-1] += count


def _merge(into: list[float], series: Iterable[object]) -> list[float]:
    for one in series:
        for index, amount in enumerate(one):  # type: ignore[attr-defined]
            into[index] += amount
    return into


class WindowedHistogram(Histogram):
    """A histogram that also keeps per-second bucket counts (all label values together) for the last minute."""

    def __init__(
        self,
        name: str,
        help_text: str,
        labels: tuple[str, ...] = (),
        buckets=LATENCY_BUCKETS_S,
        clock: Clock = time.monotonic,
    ):
        super().__init__(name, help_text, labels, buckets)
        self._ring = _SecondRing(clock, self._new_series)

    def observe(self, value: float, *label_values: str, count: int = 1) -> None:
        self.observe_at(int(self._ring.clock()), value, *label_values, count=count)

    def observe_at(self, second: int, value: float, *label_values: str, count: int = 1) -> None:
        """`observe` in the given second of the clock (see _SecondRing.at)."""
        index = bisect.bisect_left(self.buckets, value)
        series = self.series.get(label_values)
        if series is None:
            series = self.series[label_values] = self._new_series()
        slot: list[float] = self._ring.at(second)  # type: ignore[assignment]
        weighted = value * count
        # Written out rather than two _add calls: this runs several times for every request the router serves.
        series[index] += count
        series[-2] += weighted
        series[-1] += count
        slot[index] += count
        slot[-2] += weighted
        slot[-1] += count

    def observe_each(self, values: list[float], *label_values: str) -> None:
        """`observe` of every value, at the cost of one series and one slot lookup for all of them: the
        inter-token gaps of a stream, recorded together."""
        series = self.series.get(label_values)
        if series is None:
            series = self.series[label_values] = self._new_series()
        slot: list[float] = self._ring.current()  # type: ignore[assignment]
        buckets = self.buckets
        for value in values:
            index = bisect.bisect_left(buckets, value)
            series[index] += 1
            slot[index] += 1
        total, count = sum(values), len(values)
        series[-2] += total
        series[-1] += count
        slot[-2] += total
        slot[-1] += count

    def window(self, seconds: int) -> list[float]:
        """Bucket counts, sum and count of the last `seconds` seconds."""
        return _merge(self._new_series(), self._ring.last(seconds))

    def per_second_quantile(self, q: float, seconds: int = HORIZON_S) -> list[float | None]:
        """The q-th quantile of each whole second before the current one, oldest first."""
        return [
            histogram_quantile(self.buckets, slot[:-2], q) if slot else None  # type: ignore[index]
            for slot in self._ring.by_second(seconds)
        ]


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
