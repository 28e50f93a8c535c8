"""The router's own Prometheus metrics: counters and fixed-bucket histograms, rendered as text.

Fixed buckets make percentiles a constant-time, constant-memory estimate (no sorting of samples), the
same way Prometheus itself computes histogram_quantile.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{v}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class Counter:
    def __init__(self, name: str, help_text: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.labels = name, help_text, labels
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, *label_values: str, amount: float = 1.0) -> None:
        self.values[label_values] = self.values.get(label_values, 0.0) + amount

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} counter"
        for values, total in sorted(self.values.items()):
            yield f"{self.name}{_labels(self.labels, values)} {total}"


class Histogram:
    def __init__(self, name: str, help_text: str, labels: tuple[str, ...] = (), buckets=LATENCY_BUCKETS_S):
        self.name, self.help, self.labels = name, help_text, labels
        self.buckets = tuple(buckets)
        self.series: dict[tuple[str, ...], list[float]] = {}  # bucket counts..., then sum, then count

    def observe(self, value: float, *label_values: str) -> None:
        series = self.series.get(label_values)
        if series is None:
            series = self.series[label_values] = [0.0] * (len(self.buckets) + 3)
        series[bisect.bisect_left(self.buckets, value)] += 1
        series[-2] += value
        series[-1] += 1

    def quantile(self, q: float, *label_values: str) -> float | None:
        """Linear interpolation inside the bucket holding the q-th observation, as histogram_quantile does."""
        series = self.series.get(label_values)
        if not series or not series[-1]:
            return None
        rank = q * series[-1]
        seen = 0.0
        for index, count in enumerate(series[: len(self.buckets) + 1]):
            if seen + count >= rank and count:
                low = self.buckets[index - 1] if index else 0.0
                high = self.buckets[index] if index < len(self.buckets) else self.buckets[-1]
                return low + (high - low) * (rank - seen) / count
            seen += count
        return self.buckets[-1]

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


class RouterMetrics:
    def __init__(self) -> None:
        self.requests = Counter(
            "pdctl_router_requests_total", "Requests answered, by phase and outcome.", ("phase", "outcome")
        )
        self.retries = Counter("pdctl_router_retries_total", "Upstream attempts retried, by hop.", ("hop",))
        self.fallbacks = Counter(
            "pdctl_router_fallbacks_total", "Requests served in another phase than decided.", ("reason",)
        )
        self.ttft = Histogram("pdctl_router_ttft_seconds", "Time to first token seen by the router.", ("phase",))
        self.tpot = Histogram("pdctl_router_tpot_seconds", "Time per output token after the first.", ("phase",))
        self.e2e = Histogram("pdctl_router_e2e_seconds", "Request latency end to end.", ("phase",))
        self.prefill = Histogram("pdctl_router_prefill_hop_seconds", "Duration of the prefill hop.", ())
        self.queue = Histogram("pdctl_router_queue_seconds", "Time spent waiting for a free instance.", ())
        self.decision = Histogram(
            "pdctl_router_decision_seconds",
            "Time to decide a request's route.",
            (),
            buckets=(1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3),
        )

    def render(self) -> str:
        lines: list[str] = []
        for metric in vars(self).values():
            lines.extend(metric.render())
        return "\n".join(lines) + "\n"
