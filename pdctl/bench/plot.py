"""Charts of a run: latency CDFs, output throughput and requests in flight over time, the phase split.

A .png is drawn with matplotlib when it is installed (it is not a dependency of pdctl); anything else, or a
.png without matplotlib, is one self-contained HTML file of inline SVG.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from pdctl.bench.client import RequestResult
from pdctl.bench.report import timeline, tpot_of
from pdctl.errors import UsageError

_W, _H, _PAD = 460, 260, 40


def _series(results: list[RequestResult]) -> dict[str, list[float]]:
    ok = [r for r in results if r.success]
    return {
        "TTFT (ms)": sorted(r.ttft * 1000 for r in ok),
        "TPOT (ms)": sorted(t * 1000 for r in ok if (t := tpot_of(r)) is not None),
        "E2EL (ms)": sorted(r.latency * 1000 for r in ok),
    }


def write(path: Path, data: dict[str, Any], results: list[RequestResult]) -> Path:
    if path.suffix == ".png":
        try:
            return _png(path, data, results)
        except ImportError:
            path = path.with_suffix(".html")
    try:
        path.write_text(_html(data, results))
    except OSError as error:
        raise UsageError(f"cannot write {path}: {error.strerror or error}") from None
    return path


def _png(path: Path, data: dict[str, Any], results: list[RequestResult]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(12, 8))
    for name, values in _series(results).items():
        axes[0][0].plot(values, [(i + 1) / len(values) for i in range(len(values))], label=name)
    axes[0][0].set(xscale="log", title="latency CDF", ylabel="share of requests")
    axes[0][0].legend()
    line = timeline(results)
    axes[0][1].plot(line["t"], line["output_tokens_per_s"])
    axes[0][1].set(title="output tokens/s", xlabel="s")
    axes[1][0].plot(line["t"], line["running"])
    axes[1][0].set(title="requests in flight", xlabel="s")
    split = _phase_counts(data)
    axes[1][1].bar(list(split), list(split.values()))
    axes[1][1].set(title="phase split (router)")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def _phase_counts(data: dict[str, Any]) -> dict[str, float]:
    split = data.get("pdctl", {}).get("server", {}).get("phase_split") or {}
    if split:
        return {phase: sum(outcomes.values()) for phase, outcomes in split.items()}
    return dict(data.get("phases_seen") or {})


def _polyline(xs: list[float], ys: list[float], x_max: float, y_max: float, colour: str) -> str:
    if not xs:
        return ""
    x_max, y_max = x_max or 1.0, y_max or 1.0
    points = " ".join(
        f"{_PAD + x / x_max * (_W - 2 * _PAD):.1f},{_H - _PAD - y / y_max * (_H - 2 * _PAD):.1f}"
        for x, y in zip(xs, ys, strict=True)
    )
    return f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{points}"/>'


def _chart(title: str, lines: list[tuple[str, list[float], list[float]]], x_label: str) -> str:
    x_max = max((max(xs) for _, xs, _ in lines if xs), default=1.0)
    y_max = max((max(ys) for _, _, ys in lines if ys), default=1.0)
    colours = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")
    body = [_polyline(xs, ys, x_max, y_max, colours[i % 4]) for i, (_, xs, ys) in enumerate(lines)]
    legend = [
        f'<text x="{_PAD + 110 * i}" y="16" fill="{colours[i % 4]}" font-size="12">{html.escape(name)}</text>'
        for i, (name, _, _) in enumerate(lines)
    ]
    axes = (
        f'<line x1="{_PAD}" y1="{_H - _PAD}" x2="{_W - _PAD}" y2="{_H - _PAD}" stroke="#444"/>'
        f'<line x1="{_PAD}" y1="{_PAD}" x2="{_PAD}" y2="{_H - _PAD}" stroke="#444"/>'
        f'<text x="{_W - _PAD}" y="{_H - 10}" font-size="11" text-anchor="end">{html.escape(x_label)} '
        f"(max {x_max:,.1f})</text>"
        f'<text x="{_PAD}" y="{_PAD - 6}" font-size="11">max {y_max:,.2f}</text>'
    )
    return (
        f'<figure><figcaption>{html.escape(title)}</figcaption><svg width="{_W}" height="{_H}" '
        f'xmlns="http://www.w3.org/2000/svg">{axes}{"".join(legend)}{"".join(body)}</svg></figure>'
    )


def _html(data: dict[str, Any], results: list[RequestResult]) -> str:
    cdf = [
        (name, values, [(i + 1) / len(values) for i in range(len(values))]) for name, values in _series(results).items()
    ]
    line = timeline(results)
    split = _phase_counts(data)
    bars = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{v:g}</td></tr>" for k, v in split.items())
    label = data.get("pdctl", {}).get("target", "")
    sim = " (sim engine: an emulator, not vLLM)" if data.get("pdctl", {}).get("sim") else ""
    return (
        "<!doctype html><meta charset='utf-8'><title>pdctl bench</title>"
        "<style>body{font-family:sans-serif} figure{display:inline-block;margin:8px}</style>"
        f"<h1>pdctl bench: {html.escape(str(label))}{sim}</h1>"
        f"<p>{data['completed']} completed, {data['failed']} failed in {data['duration']:.2f} s; "
        f"{data['output_throughput']:,.1f} output tok/s</p>"
        + _chart("latency CDF", cdf, "ms")
        + _chart("output tokens/s over time", [("tok/s", line["t"], line["output_tokens_per_s"])], "s")
        + _chart("requests in flight over time", [("running", line["t"], line["running"])], "s")
        + f"<h2>phase split</h2><table>{bars or '<tr><td>not a pdctl router</td></tr>'}</table>"
    )
