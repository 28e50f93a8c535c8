"""What the router measures of the requests it serves: latency as the client sees it, tokens, phase,
instances, queueing, outcome and SLO attainment, since start and over the last minute.

The proxy calls one method when a request ends (and one per batch of streamed tokens); `DisabledRecorder`
keeps the same calls and records nothing, so the cost of collecting can be measured against not collecting
(benchmarks/metrics_overhead.py).
"""

from __future__ import annotations

import time
from bisect import bisect_left

from pdctl.metrics import (
    Clock,
    Counter,
    Key,
    Ledger,
    LedgerCounter,
    LedgerHistogram,
    Renderable,
    log_buckets,
    render_all,
)

# 5 us to 0.1 s: the 100 us target and the 10 ms troubleshooting threshold both fall inside.
DECISION_BUCKETS_S = log_buckets(5e-6, 0.1, 1.25)


def _by_phase(key: Key) -> Key:
    return key[:1]


# Events deferred before they are folded into the ledger: large enough that the ledger's rows stay cached over
# most of a batch, small enough that the request that folds it waits well under a millisecond.
FOLD_BATCH = 64

_STREAMED = "streamed"


class RouterMetrics:
    """Every figure of a request lands in one ledger row, keyed by (phase, outcome), once it ends: one call,
    one clock reading and one list append on the request's path; the ledger folds them in batches. The
    Prometheus families and the dashboard's windows are read from the rows."""

    def __init__(self, ttft_slo_s: float = 1.0, tpot_slo_s: float = 0.05, clock: Clock = time.monotonic):
        self.clock = clock
        self.started = clock()
        self.extra: list[Renderable] = []
        self.ttft_slo_s, self.tpot_slo_s = ttft_slo_s, tpot_slo_s
        ledger = self.ledger = Ledger(clock, self._fold)
        self._pending = ledger.pending
        self._requests, self._input, self._output, self._met_column, self._missed_column = (
            ledger.reserve(1) for _ in range(5)
        )
        self.requests = LedgerCounter(
            ledger,
            "pdctl_router_requests_total",
            "Requests answered, by phase and outcome.",
            ("phase", "outcome"),
            lambda key: ((key, self._requests),),
        )
        self.input_tokens = LedgerCounter(
            ledger,
            "pdctl_router_input_tokens_total",
            "Prompt tokens of answered requests.",
            ("phase",),
            lambda key: ((key[:1], self._input),),
        )
        self.output_tokens = LedgerCounter(
            ledger,
            "pdctl_router_output_tokens_total",
            "Output tokens of answered requests.",
            ("phase",),
            lambda key: ((key[:1], self._output),),
        )
        self.slo = LedgerCounter(
            ledger,
            "pdctl_router_slo_requests_total",
            "Successful requests by whether they met the profile's TTFT and TPOT targets.",
            ("result",),
            lambda key: ((("met",), self._met_column), (("missed",), self._missed_column)),
        )
        self.instance_requests = Counter(
            "pdctl_router_instance_requests_total", "Requests sent to each instance, by hop.", ("instance", "hop")
        )
        self.retries = Counter("pdctl_router_retries_total", "Upstream attempts retried, by hop.", ("hop",))
        self.fallbacks = Counter(
            "pdctl_router_fallbacks_total", "Requests served in another phase than decided.", ("reason",)
        )
        self.migrations = Counter(
            "pdctl_router_migrations_total",
            "Streams moved to another instance mid-stream, by why their engine was left.",
            ("reason",),
        )
        by_phase = {"labels": ("phase",), "label_of": _by_phase}
        self.ttft = LedgerHistogram(
            ledger, "pdctl_router_ttft_seconds", "Time to first token seen by the router.", **by_phase
        )
        self.tpot = LedgerHistogram(
            ledger, "pdctl_router_tpot_seconds", "Time per output token after the first.", **by_phase
        )
        self.itl = LedgerHistogram(ledger, "pdctl_router_itl_seconds", "Gap between streamed tokens.", **by_phase)
        self.e2e = LedgerHistogram(ledger, "pdctl_router_e2e_seconds", "Request latency end to end.", **by_phase)
        self.prefill = LedgerHistogram(
            ledger, "pdctl_router_prefill_hop_seconds", "Duration of the prefill hop, KV transfer parameters back."
        )
        self.queue = LedgerHistogram(ledger, "pdctl_router_queue_seconds", "Time spent waiting for a free instance.")
        self.decision = LedgerHistogram(
            ledger, "pdctl_router_decision_seconds", "Time to decide a request's route.", buckets=DECISION_BUCKETS_S
        )

    # ---- events (the proxy's hot path) ----------------------------------------------------------------------

    def retried(self, hop: str) -> None:
        self.retries.inc(hop)

    def fell_back(self, reason: str) -> None:
        self.fallbacks.inc(reason)

    def migrated(self, reason: str) -> None:
        self.migrations.inc(reason)

    def streamed(self, phase: str, gaps_s: list[float]) -> None:
        """Inter-token gaps of one stream, recorded together (the proxy collects them as chunks pass: one
        list append per chunk on the hot path instead of a histogram update)."""
        if gaps_s:
            self._defer((_STREAMED, int(self.clock()), phase, gaps_s))

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
        decision_s: float | None = None,
        queue_s: float | None = None,
        prefill_instance: str | None = None,
        prefill_s: float | None = None,
    ) -> None:
        """One request, answered or not: every figure the proxy measured of it, recorded at once."""
        self._defer(
            (
                int(self.clock()),
                phase,
                outcome,
                instance,
                e2e_s,
                ttft_s,
                tpot_s,
                input_tokens,
                output_tokens,
                decision_s,
                queue_s,
                prefill_instance,
                prefill_s,
            )
        )

    def _defer(self, event: tuple) -> None:
        pending = self._pending
        pending.append(event)
        if len(pending) >= FOLD_BATCH:
            self.ledger.flush()

    def _fold(self, events: list[tuple]) -> None:
        # This loop is most of what recording costs the router, so it is written out: every lookup that does not
        # change from one event to the next is made once per batch, and histogram updates are inlined (a call
        # each cost more than the update).
        row_of, itl, met = self.ledger.row, self.itl, self._met
        requests, inputs, outputs, met_column, missed_column = (
            self._requests, self._input, self._output, self._met_column, self._missed_column
        )  # fmt: skip
        decision, decision_buckets, decision_sum = self.decision.columns()
        queue, queue_buckets, queue_sum = self.queue.columns()
        prefill, prefill_buckets, prefill_sum = self.prefill.columns()
        e2e, e2e_buckets, e2e_sum = self.e2e.columns()
        sent = self.instance_requests.values
        for event in events:
            if event[0] is _STREAMED:
                _, second, phase, gaps_s = event
                itl.observe_each(row_of(second, (phase, "ok")), gaps_s)
                continue
            (second, phase, outcome, instance, e2e_s, ttft_s, tpot_s, input_tokens, output_tokens, decision_s,
             queue_s, prefill_instance, prefill_s) = event  # fmt: skip
            row = row_of(second, (phase, outcome))
            row[requests] += 1
            if decision_s is not None:
                row[decision + bisect_left(decision_buckets, decision_s)] += 1
                row[decision_sum] += decision_s
            if queue_s:
                row[queue + bisect_left(queue_buckets, queue_s)] += 1
                row[queue_sum] += queue_s
            elif queue_s is not None:
                row[queue] += 1  # no wait, the usual case: the first bucket
            if prefill_instance is not None:
                key = (prefill_instance, "prefill")
                sent[key] = sent.get(key, 0.0) + 1
                if prefill_s is not None:
                    row[prefill + bisect_left(prefill_buckets, prefill_s)] += 1
                    row[prefill_sum] += prefill_s
            if instance is not None:
                key = (instance, "decode")
                sent[key] = sent.get(key, 0.0) + 1
            if outcome != "ok":
                continue
            row[e2e + bisect_left(e2e_buckets, e2e_s)] += 1
            row[e2e_sum] += e2e_s
            if ttft_s is not None:
                self.ttft.observe(row, ttft_s)
            if tpot_s is not None:
                self.tpot.observe(row, tpot_s)
            row[inputs] += input_tokens
            row[outputs] += output_tokens
            row[met_column if met(e2e_s, ttft_s, tpot_s, output_tokens) else missed_column] += 1

    def _met(self, e2e_s: float, ttft_s: float | None, tpot_s: float | None, output_tokens: int) -> bool:
        if ttft_s is None:
            # Not streamed: the whole answer is due when a streamed client meeting both targets would have it.
            return e2e_s <= self.ttft_slo_s + self.tpot_slo_s * max(0, output_tokens - 1)
        return ttft_s <= self.ttft_slo_s and (tpot_s is None or tpot_s <= self.tpot_slo_s)

    # ---- reading --------------------------------------------------------------------------------------------

    def families(self) -> list[Renderable]:
        kinds = Counter | LedgerCounter | LedgerHistogram
        return [m for m in vars(self).values() if isinstance(m, kinds)] + self.extra

    def register(self, family: Renderable) -> None:
        """Lines of another part of the daemon (the scaler's) on the router's /metrics."""
        self.extra.append(family)

    def render(self) -> str:
        self.ledger.flush()  # the instance counts are folded with the rows
        return render_all(self.families())


class DisabledRecorder(RouterMetrics):
    """The same calls, nothing recorded: `router.metrics: false` in the profile."""

    def streamed(self, phase: str, gaps_s: list[float]) -> None:
        pass

    def finished(self, phase: str, outcome: str, instance: str | None, **_: float | str | None) -> None:
        pass
