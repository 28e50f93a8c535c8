"""`pdctl route`: ask the router how it would route a prompt, then send it and time the answer."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from pdctl.auth import Access
from pdctl.errors import ClusterError
from pdctl.tokentiming import STREAM_OPTIONS, tpot


@dataclass
class RouteResult:
    """One request as `pdctl route` timed it: seconds from the send, tokens as the engine counted them."""

    request_id: str | None
    phase: str | None
    prefill: str | None
    decode: str | None
    text: str = ""
    token_events: int = 0
    tokens: int = 0  # what the token events carried (pdctl.tokentiming)
    first_event_tokens: int = 0
    ttft_s: float | None = None
    last_token_s: float | None = None
    total_s: float = 0.0
    usage: dict[str, Any] = field(default_factory=dict)

    @property
    def output_tokens(self) -> int:
        return self.usage.get("completion_tokens") or self.tokens

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.last_token_s is None:
            return None
        return tpot(self.last_token_s - self.ttft_s, self.output_tokens, self.first_event_tokens, self.token_events)

    def as_json(self) -> dict[str, Any]:
        return {**vars(self), "output_tokens": self.output_tokens, "tpot_s": self.tpot_s}


def completion_body(model: str, prompt: str, max_tokens: int, priority: int | None, deadline_ms: float | None) -> dict:
    body: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True}
    body["stream_options"] = dict(STREAM_OPTIONS)
    if priority is not None:
        body["priority"] = priority
    if deadline_ms is not None:
        body["slo_deadline_ms"] = deadline_ms
    return body


def explain(router: Access, body: dict) -> dict[str, Any]:
    try:
        response = httpx.post(
            f"{router.url}/pdctl/route",
            json=body,
            headers=router.headers,
            timeout=10,
            verify=router.verify,
            trust_env=False,
        )
    except httpx.HTTPError as error:
        raise ClusterError(f"the router at {router.url} does not answer: {error}") from None
    if response.status_code != 200:
        raise ClusterError(f"the router refused the request: {_error_text(router, response)}")
    return response.json()


def send(router: Access, body: dict, on_text: Callable[[str], None]) -> RouteResult:
    started = time.monotonic()
    try:
        with httpx.stream(
            "POST",
            f"{router.url}/v1/completions",
            json=body,
            headers=router.headers,
            timeout=httpx.Timeout(600, connect=5),
            verify=router.verify,
            trust_env=False,
        ) as response:
            if response.status_code != 200:
                response.read()
                raise ClusterError(f"the router answered {response.status_code}: {_error_text(router, response)}")
            result = RouteResult(
                request_id=response.headers.get("x-pdctl-request-id"),
                phase=response.headers.get("x-pdctl-phase"),
                prefill=response.headers.get("x-pdctl-prefill"),
                decode=response.headers.get("x-pdctl-decode"),
            )
            for line in response.iter_lines():
                _take_event(line, result, started, on_text)
    except httpx.HTTPError as error:
        raise ClusterError(f"the request through {router.url} failed: {error}") from None
    result.total_s = time.monotonic() - started
    return result


def _take_event(line: str, result: RouteResult, started: float, on_text: Callable[[str], None]) -> None:
    if not line.startswith("data: ") or line == "data: [DONE]":
        return
    event = json.loads(line[6:])
    if "error" in event:
        raise ClusterError(f"the stream ended with an error: {event['error'].get('message')}")
    usage = event.get("usage") or {}
    if usage:
        result.usage = usage
    choices = event.get("choices") or []
    if not choices:  # the final usage event
        return
    text = "".join(choice.get("text") or "" for choice in choices)
    result.text += text
    on_text(text)
    counted = usage.get("completion_tokens")
    added = 1 if counted is None else counted - result.tokens
    if added <= 0:  # a finish reason alone
        return
    now = time.monotonic() - started
    if not result.token_events:
        result.ttft_s, result.first_event_tokens = now, added
    result.last_token_s = now
    result.token_events += 1
    result.tokens += added


def _error_text(router: Access, response: httpx.Response) -> str:
    if response.status_code == 401:
        return router.refused()
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response.text[:200]
