"""Timing a streamed answer by its tokens, not its events, for `pdctl route` and `pdctl bench`.

An engine may put several tokens in one server-sent event: vLLM's `--stream-interval`, its output collector
merging a request's tokens while the reader lags, a decode instance answering at once after a KV-cache hand-off.
Counting events then undercounts tokens and, when a whole answer comes in one event, reads TPOT as 0 ms.
Asked with `continuous_usage_stats`, vLLM (and pdctl's sim engine) puts the running `usage.completion_tokens`
in every event, so each event's tokens are what its count adds; without it each event counts one token and
the final usage corrects the total."""

from __future__ import annotations

STREAM_OPTIONS = {"include_usage": True, "continuous_usage_stats": True}


def tpot(span_s: float, output_tokens: int, first_event_tokens: int, token_events: int) -> float | None:
    """Time per output token after the first: the time from the first token event to the last, over the tokens
    that came after the first event. None where that cannot be known: a one-token answer, or every token in one
    event (the tokens of the first event were made before it arrived, at times the stream does not show)."""
    later = output_tokens - first_event_tokens
    if token_events < 2 or later < 1:
        return None
    return span_s / later
