"""`pdctl route`: ask the router how it would route a prompt, then send it and time the answer."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from pdctl.errors import ClusterError


@dataclass
class RouteResult:
    request_id: str | None
    phase: str | None
    prefill: str | None
    decode: str | None
    text: str = ""
    chunks: int = 0
    ttft_s: float | None = None
    total_s: float = 0.0
    usage: dict[str, Any] = field(default_factory=dict)

    @property
    def tpot_s(self) -> float | None:
        tokens = self.usage.get("completion_tokens") or self.chunks
        if self.ttft_s is None or tokens < 2:
            return None
        return (self.total_s - self.ttft_s) / (tokens - 1)


def completion_body(model: str, prompt: str, max_tokens: int, priority: int | None, deadline_ms: float | None) -> dict:
    body: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True}
    body["stream_options"] = {"include_usage": True}
    if priority is not None:
        body["priority"] = priority
    if deadline_ms is not None:
        body["slo_deadline_ms"] = deadline_ms
    return body


def explain(router_url: str, body: dict) -> dict[str, Any]:
    try:
        response = httpx.post(f"{router_url}/pdctl/route", json=body, timeout=10, trust_env=False)
    except httpx.HTTPError as error:
        raise ClusterError(f"the router at {router_url} does not answer: {error}") from None
    if response.status_code != 200:
        raise ClusterError(f"the router refused the request: {_error_text(response)}")
    return response.json()


def send(router_url: str, body: dict, on_text: Callable[[str], None]) -> RouteResult:
    started = time.monotonic()
    try:
        with httpx.stream(
            "POST", f"{router_url}/v1/completions", json=body, timeout=httpx.Timeout(600, connect=5), trust_env=False
        ) as response:
            if response.status_code != 200:
                response.read()
                raise ClusterError(f"the router answered {response.status_code}: {_error_text(response)}")
            result = RouteResult(
                request_id=response.headers.get("x-pdctl-request-id"),
                phase=response.headers.get("x-pdctl-phase"),
                prefill=response.headers.get("x-pdctl-prefill"),
                decode=response.headers.get("x-pdctl-decode"),
            )
            for line in response.iter_lines():
                _take_event(line, result, started, on_text)
    except httpx.HTTPError as error:
        raise ClusterError(f"the request through {router_url} failed: {error}") from None
    result.total_s = time.monotonic() - started
    return result


def _take_event(line: str, result: RouteResult, started: float, on_text: Callable[[str], None]) -> None:
    if not line.startswith("data: ") or line == "data: [DONE]":
        return
    event = json.loads(line[6:])
    if "error" in event:
        raise ClusterError(f"the stream ended with an error: {event['error'].get('message')}")
    if event.get("usage"):
        result.usage = event["usage"]
    for choice in event.get("choices") or []:
        text = choice.get("text") or ""
        if result.ttft_s is None:
            result.ttft_s = time.monotonic() - started
        result.chunks += 1
        result.text += text
        on_text(text)


def _error_text(response: httpx.Response) -> str:
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response.text[:200]
