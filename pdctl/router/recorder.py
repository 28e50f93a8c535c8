"""What the router measures of the requests it serves: latency as the client sees it, tokens, phase,
instances, queueing, outcome and SLO attainment, since start and over the last minute.

The proxy calls one method per event; `DisabledRecorder` keeps the same calls and records nothing, so the
cost of collecting can be measured against not collecting (benchmarks/metrics_overhead.py).
"""

from __future__ import annotations

import time

from pdctl.metrics import Clock, Counter, Renderable, WindowedCounter, WindowedHistogram, log_buckets, render_all

# 5 us to 0.1 s: the 100 us target and the 10 ms troubleshooting threshold both fall inside.
DECISION_BUCKETS_S = log_buckets(5e-6, 0.1, 1.25)


class RouterMetrics:
    def __init__(self, ttft_slo_s: float = 1.0, tpot_slo_s: float = 0.05, clock: Clock = time.monotonic):
        self.clock = clock
        self.started = clock()
        self.extra: list[Renderable] = []
        self.ttft_slo_s, self.tpot_slo_s = ttft_slo_s, tpot_slo_s
        windowed = {"clock": clock}
        self.requests = WindowedCounter(
            "pdctl_router_requests_total", "Requests answered, by phase and outcome.", ("phase", "outcome"), **windowed
        )
        self.input_tokens = WindowedCounter(
            "pdctl_router_input_tokens_total", "Prompt tokens of answered requests.", ("phase",), **windowed
        )
        self.output_tokens = WindowedCounter(
            "pdctl_router_output_tokens_total", "Output tokens of answered requests.", ("phase",), **windowed
        )
        self.slo = WindowedCounter(
            "pdctl_router_slo_requests_total",
            "Successful requests by whether they met the profile's TTFT and TPOT targets.",
            ("result",),
            **windowed,
        )
        self.instance_requests = Counter(
            "pdctl_router_instance_requests_total", "Requests sent to each instance, by hop.", ("instance", "hop")
        )
        self.retries = Counter("pdctl_router_retries_total", "Upstream attempts retried, by hop.", ("hop",))
        self.fallbacks = Counter(
            "pdctl_router_fallbacks_total", "Requests served in another phase than decided.", ("reason",)
        )
        self.ttft = WindowedHistogram(
            "pdctl_router_ttft_seconds", "Time to first token seen by the router.", ("phase",), **windowed
        )
        self.tpot = WindowedHistogram(
            "pdctl_router_tpot_seconds", "Time per output token after the first.", ("phase",), **windowed
        )
        self.itl = WindowedHistogram("pdctl_router_itl_seconds", "Gap between streamed tokens.", ("phase",), **windowed)
        self.e2e = WindowedHistogram("pdctl_router_e2e_seconds", "Request latency end to end.", ("phase",), **windowed)
        self.prefill = WindowedHistogram(
            "pdctl_router_prefill_hop_seconds", "Duration of the prefill hop, KV transfer parameters back.", **windowed
        )
        self.queue = WindowedHistogram(
            "pdctl_router_queue_seconds", "Time spent waiting for a free instance.", **windowed
        )
        self.decision = WindowedHistogram(
            "pdctl_router_decision_seconds", "Time to decide a request's route.", (), DECISION_BUCKETS_S, **windowed
        )

    # ---- events (the proxy's hot path: a few additions each) ---------------------------------------------------

    def decided(self, seconds: float) -> None:
        self.decision.observe(seconds)

    def queued(self, seconds: float) -> None:
        self.queue.observe(seconds)

    def prefilled(self, instance: str, seconds: float) -> None:
        self.prefill.observe(seconds)
        self.instance_requests.inc(instance, "prefill")

    def retried(self, hop: str) -> None:
        self.retries.inc(hop)

    def fell_back(self, reason: str) -> None:
        self.fallbacks.inc(reason)

    def streamed(self, phase: str, gaps_s: list[float]) -> None:
        """Inter-token gaps of one stream, recorded together (the proxy collects them as chunks pass: one
        list append per chunk on the hot path instead of a histogram update)."""
        if gaps_s:
            self.itl.observe_each(gaps_s, phase)

    def finished(
        self,
        phase: str,
        outcome: str,
        instance: str | None,
        *,
        e2e_s: float,
        ttft_s: float | None = None,
        tpot_s: float | None = None,
        input_tokens: int = 0,
        output_tokens: int = 0,
    ) -> None:
        second = int(self.clock())  # one reading for the up to 7 windowed figures below
        self.requests.inc_at(second, phase, outcome)
        if instance is not None:
            self.instance_requests.inc(instance, "decode")
        if outcome != "ok":
            return
        self.e2e.observe_at(second, e2e_s, phase)
        if ttft_s is not None:
            self.ttft.observe_at(second, ttft_s, phase)
        if tpot_s is not None:
            self.tpot.observe_at(second, tpot_s, phase)
        self.input_tokens.inc_at(second, phase, amount=input_tokens)
        self.output_tokens.inc_at(second, phase, amount=output_tokens)
        self.slo.inc_at(second, "met" if self._met(e2e_s, ttft_s, tpot_s, output_tokens) else "missed")

    def _met(self, e2e_s: float, ttft_s: float | None, tpot_s: float | None, output_tokens: int) -> bool:
        if ttft_s is None:
            # Not streamed: the whole answer is due when a streamed client meeting both targets would have it.
            return e2e_s <= self.ttft_slo_s + self.tpot_slo_s * max(0, output_tokens - 1)
        return ttft_s <= self.ttft_slo_s and (tpot_s is None or tpot_s <= self.tpot_slo_s)

    # ---- reading --------------------------------------------------------------------------------------------

    def families(self) -> list[Renderable]:
        return [m for m in vars(self).values() if isinstance(m, Counter | WindowedHistogram)] + self.extra

    def register(self, family: Renderable) -> None:
        """Lines of another part of the daemon (the scaler's) on the router's /metrics."""
        self.extra.append(family)

    def render(self) -> str:
        return render_all(self.families())


class DisabledRecorder(RouterMetrics):
    """The same calls, nothing recorded: `router.metrics: false` in the profile."""

    def decided(self, seconds: float) -> None:
        pass

    def queued(self, seconds: float) -> None:
        pass

    def prefilled(self, instance: str, seconds: float) -> None:
        pass

    def streamed(self, phase: str, gaps_s: list[float]) -> None:
        pass

    def finished(self, phase: str, outcome: str, instance: str | None, **_: float | None) -> None:
        pass
