"""vllm bench serve's metrics, with its names and definitions, from the measured requests.

- completed / failed: requests with at least one token and a clean end / the rest (failures by kind).
- request_throughput = completed / duration; output_throughput = total output tokens / duration;
  total_token_throughput = (input + output tokens) / duration; duration is first send to last answer.
- TTFT: send to the first token event. E2EL: send to the last token event. Tokens, not events, are counted
  (pdctl.tokentiming): an event's tokens are what its running usage count adds. ITL, per token after the first
  event: the gap before a token event over the tokens it carried. TPOT (per request) = (E2EL - TTFT) / (output
  tokens - the first event's), where tokens came after the first event (vLLM's formula when each event
  carries one token).
- mean, median, std and percentiles (p90, p99...) as numpy computes them (linear interpolation); None (n/a)
  where no request gives the figure (TPOT when every answer came in one event), never 0.
- request_goodput = completed requests meeting every --goodput SLO / duration (TPOT counts as 0 for a
  one-token answer, as vLLM does).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from pdctl.bench.client import RequestResult
from pdctl.tokentiming import tpot

PERCENTILES = (50.0, 90.0, 99.0)
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")


def percentile(values: list[float], p: float) -> float:
    """numpy.percentile's default (linear) method; 0 for no values, as vllm bench reports."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _std(values: list[float]) -> float:
    if not values:
        return 0.0
    mean = _mean(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def tpot_of(result: RequestResult) -> float | None:
    return tpot(result.latency - result.ttft, result.output_tokens, result.first_event_tokens, result.token_events)


def _is_good(result: RequestResult, slos_ms: dict[str, float]) -> bool:
    measured = {"ttft": result.ttft, "tpot": tpot_of(result) or 0.0, "e2el": result.latency}
    return all(measured[name] * 1000 <= limit for name, limit in slos_ms.items())


def summarize(results: list[RequestResult], duration_s: float, goodput_slos_ms: dict[str, float]) -> dict[str, Any]:
    """The result dictionary: vllm bench serve's keys, plus failures by kind."""
    ok = [r for r in results if r.success]
    total_input = sum(r.prompt_tokens for r in ok)
    total_output = sum(r.output_tokens for r in ok)
    duration_s = max(duration_s, 1e-9)
    series = {
        "ttft": [r.ttft for r in ok],
        "tpot": [t for r in ok if (t := tpot_of(r)) is not None],
        "itl": [gap for r in ok for gap in r.itl],
        "e2el": [r.latency for r in ok],
    }
    summary: dict[str, Any] = {
        "duration": duration_s,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "failures_by_kind": dict(Counter(r.error_kind for r in results if not r.success)),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(ok) / duration_s,
        "request_goodput": sum(_is_good(r, goodput_slos_ms) for r in ok) / duration_s if goodput_slos_ms else None,
        "output_throughput": total_output / duration_s,
        "total_token_throughput": (total_input + total_output) / duration_s,
    }
    for name in LATENCY_METRICS:
        summary |= _latency_summary(name, series[name])
    summary["goodput_slos_ms"] = goodput_slos_ms or None
    summary["phases_seen"] = dict(Counter(r.phase for r in ok if r.phase))
    return summary


def _latency_summary(name: str, values: list[float]) -> dict[str, float | None]:
    keys = [f"mean_{name}_ms", f"median_{name}_ms", f"std_{name}_ms", *(f"p{p:g}_{name}_ms" for p in PERCENTILES)]
    if not values:
        return dict.fromkeys(keys)
    figures = [_mean(values), percentile(values, 50), _std(values), *(percentile(values, p) for p in PERCENTILES)]
    return {key: figure * 1000 for key, figure in zip(keys, figures, strict=True)}


def per_request(results: list[RequestResult]) -> dict[str, list[Any]]:
    """The per-request lists vllm bench serve writes beside the summary."""
    return {
        "input_lens": [r.prompt_tokens for r in results],
        "output_lens": [r.output_tokens if r.success else 0 for r in results],
        "ttfts": [r.ttft for r in results],
        "itls": [r.itl for r in results],
        "latencies": [r.latency for r in results],
        "start_times": [r.start for r in results],
        "errors": [r.error for r in results],
    }


def timeline(results: list[RequestResult], bucket_s: float = 1.0) -> dict[str, list[float]]:
    """Output tokens per second and requests in flight, per bucket from the first send (for plots)."""
    ok = [r for r in results if r.success]
    if not ok:
        return {"t": [], "output_tokens_per_s": [], "running": []}
    origin = min(r.start for r in results)
    end = max(r.start + r.latency for r in ok)
    buckets = int((end - origin) / bucket_s) + 1
    tokens, running = [0.0] * buckets, [0.0] * buckets
    for r in ok:
        moment = r.start + r.ttft
        stamps = [(moment, r.first_event_tokens)]  # the first event's tokens came at once, each later one alone
        for gap in r.itl:
            moment += gap
            stamps.append((moment, 1))
        for stamp, count in stamps:
            tokens[min(buckets - 1, int((stamp - origin) / bucket_s))] += count / bucket_s
        for b in range(int((r.start - origin) / bucket_s), int((r.start + r.latency - origin) / bucket_s) + 1):
            running[min(b, buckets - 1)] += 1
    return {"t": [i * bucket_s for i in range(buckets)], "output_tokens_per_s": tokens, "running": running}


def cost_per_million_output(devices: int, price_per_device_hour: float, duration_s: float, output_tokens: int):
    if not output_tokens or not devices:
        return None
    return devices * price_per_device_hour * duration_s / 3600 / (output_tokens / 1e6)
