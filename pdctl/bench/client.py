"""The load generator: streamed completions over keep-alive HTTP/1.1 connections, timed as vllm bench serve
times them, from one asyncio process.

Each connection is an asyncio.Protocol that parses the response as bytes arrive (head, chunked body, SSE
events) and stamps every event with the time of the read that brought it: no task, stream reader or HTTP
library sits between the socket and the clock, which is what lets one process drive thousands of streams a
second (httpx costs several times more CPU per request; see benchmarks/bench_client.py).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from pdctl.auth import Access
from pdctl.bench.workload import BenchRequest
from pdctl.tokentiming import STREAM_OPTIONS

TICK_S = 0.25
# A quote inside generated text is escaped, so these byte patterns only match the event's own keys.
_COMPLETION_TOKENS = re.compile(rb'"completion_tokens": ?(\d+)')
_PROMPT_TOKENS = re.compile(rb'"prompt_tokens": ?(\d+)')


def _token_only(data: bytes) -> bool:
    """A token event and nothing else: read without decoding the JSON (its usage, if any, by the patterns)."""
    return (b'"choices":[{' in data or b'"choices": [{' in data) and b'"error"' not in data


def _number(pattern: re.Pattern[bytes], data: bytes) -> int | None:
    match = pattern.search(data)
    return None if match is None else int(match[1])


@dataclass(slots=True)
class RequestResult:
    """One request as measured: times in seconds from its own start (perf_counter)."""

    index: int
    start: float = 0.0
    success: bool = False
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)  # one gap per token after the first token event
    latency: float = 0.0  # to the last token, as vllm bench serve measures it
    prompt_tokens: int = 0
    output_tokens: int = 0  # usage.completion_tokens, else the tokens the token events carried
    token_events: int = 0
    first_event_tokens: int = 0
    error_kind: str | None = None  # http_STATUS, timeout, disconnect, connect, stream_error, no_tokens
    error: str = ""
    phase: str | None = None  # x-pdctl-phase, when the server is pdctl's router
    usage_output_tokens: int | None = None


class _Exchange(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time."""

    def __init__(self, on_lost: Callable[[_Exchange], None]):
        self.transport: asyncio.Transport | None = None
        self._on_lost = on_lost
        self.closed = False
        self._reset(None, None)

    def _reset(self, result: RequestResult | None, done: asyncio.Future[None] | None) -> None:
        self.result, self.done = result, done
        self._buffer = b""
        self._status = 0
        self._headers: dict[str, str] = {}
        self._chunked = False
        self._remaining = -1  # body bytes left when the length is known
        self._chunk_left = -1  # bytes left of the current chunk, -1 between chunks
        self._events = b""
        self._body_error = b""
        self._last_token = 0.0
        self._usage_count = 0  # the latest running usage.completion_tokens of the stream
        self.got_bytes = False
        self.reusable = False

    def send(self, payload: bytes, result: RequestResult, done: asyncio.Future[None]) -> None:
        self._reset(result, done)
        assert self.transport is not None
        result.start = time.perf_counter()
        self._last_token = result.start
        self.transport.write(payload)

    # ---- asyncio callbacks ------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._on_lost(self)
        if self.result is not None and self._status and not self._chunked and self._remaining < 0:
            self._complete()  # a body delimited by the end of the connection
        self._fail("disconnect", f"the server closed the connection{f': {exc}' if exc else ''}")

    def data_received(self, data: bytes) -> None:
        if self.result is None:
            return
        self.got_bytes = True
        now = time.perf_counter()
        try:
            if not self._status:
                # lstrip: the previous response's final CRLF may come in a later read than its last chunk.
                self._buffer = (self._buffer + data).lstrip(b"\r\n")
                end = self._buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                self._read_head(self._buffer[:end])
                data, self._buffer = self._buffer[end + 4 :], b""
            self._read_body(data, now)
        except (ValueError, IndexError) as error:
            self._fail("disconnect", f"malformed response: {error}")

    # ---- parsing ----------------------------------------------------------------------------------------

    def _read_head(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        self._status = int(lines[0].split(" ", 2)[1])
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self._headers[name.strip().lower()] = value.strip()
        self._chunked = self._headers.get("transfer-encoding", "").lower() == "chunked"
        if not self._chunked:
            self._remaining = int(self._headers.get("content-length", "-1"))
        assert self.result is not None
        self.result.phase = self._headers.get("x-pdctl-phase")

    def _read_body(self, data: bytes, now: float) -> None:
        if not self._chunked:
            self._payload(data, now)
            if self._remaining >= 0:
                self._remaining -= len(data)
                if self._remaining <= 0 and self.result is not None:
                    self._complete()
            return
        buffer, position, pieces, last = self._buffer + data, 0, [], False
        while True:
            if self._chunk_left < 0:
                end = buffer.find(b"\r\n", position)
                if end < 0:
                    break
                self._chunk_left = int(buffer[position:end].split(b";", 1)[0], 16)
                position = end + 2
                if self._chunk_left == 0:
                    last = True
                    break
            if len(buffer) - position < self._chunk_left + 2:
                break
            pieces.append(buffer[position : position + self._chunk_left])
            position += self._chunk_left + 2
            self._chunk_left = -1
        self._buffer = buffer[position:]
        # Everything one read brought is parsed at once: the events share its timestamp anyway.
        if pieces:
            self._payload(b"".join(pieces), now)
        if last and self.result is not None:
            self._complete()

    def _payload(self, data: bytes, now: float) -> None:
        if self._status != 200:
            self._body_error += data
            return
        self._events += data
        if b"\n\n" not in self._events:
            return
        *events, self._events = self._events.split(b"\n\n")
        counts: list[int] = []
        for event in events:
            if event.startswith(b"data:") and b"\n" not in event and _token_only(event):
                counted = _COMPLETION_TOKENS.search(event)
                if counted is None:
                    counts.append(1)
                    continue
                completion = int(counted[1])
                self._usage(_number(_PROMPT_TOKENS, event), completion)
                counts.append(self._count(completion))
                continue
            if counts:  # in order: the tokens before this other event first
                self._tokens(now, counts)
                counts = []
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    self._event(line[5:].strip(), now)
        if counts:
            self._tokens(now, counts)

    def _event(self, data: bytes, now: float) -> None:
        result = self.result
        if result is None or data == b"[DONE]":
            return
        message: dict[str, Any] = json.loads(data)
        if "error" in message:
            error = message["error"]
            self._fail("stream_error", str(error.get("message") if isinstance(error, dict) else error))
            return
        usage = message.get("usage") or {}
        self._usage(usage.get("prompt_tokens"), usage.get("completion_tokens"))
        if message.get("choices"):
            self._tokens(now, [self._count(usage.get("completion_tokens"))])

    def _usage(self, prompt_tokens: int | None, completion_tokens: int | None) -> None:
        result = self.result
        if result is None:  # an earlier event of the read ended the request
            return
        result.prompt_tokens = prompt_tokens or result.prompt_tokens
        if completion_tokens is not None:
            result.usage_output_tokens = completion_tokens

    def _count(self, completion_tokens: int | None) -> int:
        """The tokens one token event carried: what its running count adds, else (no count) one."""
        if completion_tokens is None:
            return 1
        added, self._usage_count = completion_tokens - self._usage_count, completion_tokens
        return added

    def _tokens(self, now: float, counts: list[int]) -> None:
        """Token events that arrived in one read, with the tokens each carried. The gap since the previous token
        is the first event's, spread evenly over its tokens (ITL per token); the read's later events come 0 s
        after it. An event that carried no new token (a finish reason alone) is not a token event."""
        result = self.result
        if result is None:
            return
        gap = now - self._last_token
        for count in counts:
            if count <= 0:
                continue
            if not result.token_events:
                result.ttft = now - result.start
                result.first_event_tokens = count
            else:
                result.itl.extend([gap / count] * count)
            gap = 0.0
            result.token_events += 1
            result.output_tokens += count
            self._last_token = now

    # ---- outcomes ---------------------------------------------------------------------------------------

    def _complete(self) -> None:
        result = self.result
        assert result is not None
        self.reusable = self._headers.get("connection", "").lower() != "close"
        if self._status != 200:
            self._fail(f"http_{self._status}", _error_message(self._body_error), closing=False)
            return
        if not result.token_events:
            self._fail("no_tokens", "the stream ended without a token", closing=False)
            return
        result.success = True
        result.latency = self._last_token - result.start
        self._finish()

    def _fail(self, kind: str, message: str, closing: bool = True) -> None:
        result = self.result
        if result is None:
            return
        result.success, result.error_kind, result.error = False, kind, message
        if closing:
            self.reusable = False
        self._finish()

    def _finish(self) -> None:
        done = self.done
        self.result = self.done = None
        if done is not None and not done.done():
            done.set_result(None)

    def abort(self, kind: str, message: str) -> None:
        self._fail(kind, message)
        if self.transport is not None:
            self.transport.close()


def _error_message(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["message"])[:300]
    except (ValueError, KeyError, TypeError):
        return body.decode(errors="replace")[:300]


class StreamClient:
    """POSTs streamed completions to one server over a pool of keep-alive connections."""

    def __init__(self, server: Access, timeout_s: float = 600.0):
        parts = urlsplit(server.url.rstrip("/"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{server.url}: only http:// and https:// URLs are supported")
        self.host, self.port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
        self.path = (parts.path or "") + "/v1/completions"
        self.tls = server.tls
        self._authorization = "".join(f"{name}: {value}\r\n" for name, value in server.headers.items())
        self.timeout_s = timeout_s
        self._idle: deque[_Exchange] = deque()
        self._all: set[_Exchange] = set()

    def payload(self, body: dict[str, Any]) -> bytes:
        data = json.dumps(body, separators=(",", ":")).encode()
        head = (
            f"POST {self.path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\ncontent-type: application/json\r\n"
            f"{self._authorization}accept: text/event-stream\r\ncontent-length: {len(data)}\r\n\r\n"
        )
        return head.encode() + data

    async def send(self, payload: bytes, result: RequestResult) -> RequestResult:
        for attempt in range(2):
            exchange, reused = await self._acquire(result)
            if exchange is None:
                return result
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            exchange.send(payload, result, done)
            timer = asyncio.get_running_loop().call_later(
                self.timeout_s, exchange.abort, "timeout", f"no answer within {self.timeout_s:g} s"
            )
            try:
                await done
            finally:
                timer.cancel()
            # A kept-alive connection the server had closed meanwhile: one fresh try, never a second send.
            if reused and attempt == 0 and result.error_kind == "disconnect" and not exchange.got_bytes:
                result.error_kind, result.error = None, ""
                continue
            self._release(exchange)
            break
        return result

    async def _acquire(self, result: RequestResult) -> tuple[_Exchange | None, bool]:
        while self._idle:
            exchange = self._idle.pop()
            if not exchange.closed:
                return exchange, True
        loop = asyncio.get_running_loop()
        try:
            _, protocol = await loop.create_connection(
                lambda: _Exchange(self._forget), self.host, self.port, ssl=self.tls
            )
        except OSError as error:
            result.start = time.perf_counter()
            result.error_kind, result.error = "connect", f"cannot connect to {self.host}:{self.port}: {error}"
            return None, False
        self._all.add(protocol)
        return protocol, False

    def _release(self, exchange: _Exchange) -> None:
        if exchange.reusable and not exchange.closed:
            self._idle.append(exchange)
        elif exchange.transport is not None:
            exchange.transport.close()

    def _forget(self, exchange: _Exchange) -> None:
        self._all.discard(exchange)

    def close(self) -> None:
        for exchange in list(self._all):
            if exchange.transport is not None:
                exchange.transport.close()
        self._idle.clear()


# ---- running a workload ------------------------------------------------------------------------------------


@dataclass
class Progress:
    total: int
    sent: int = 0
    done: int = 0
    failed: int = 0
    running: int = 0
    output_tokens: int = 0


def request_body(model: str, request: BenchRequest, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "prompt": request.prompt,
        "max_tokens": request.output_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": dict(STREAM_OPTIONS),
    }
    if request.priority is not None:
        body["priority"] = request.priority
    if request.deadline_ms is not None:
        body["slo_deadline_ms"] = request.deadline_ms
    return body | (extra or {})


async def run_workload(
    client: StreamClient,
    model: str,
    requests: list[BenchRequest],
    concurrency: int | None,
    timed: bool,
    on_tick: Callable[[Progress], None] | None = None,
    extra_body: dict[str, Any] | None = None,
) -> tuple[list[RequestResult], float]:
    """Sends every request (at its arrival time when timed, at most `concurrency` at once when given) and
    returns the results in request order and the duration from the first send to the last answer."""
    # Built before the clock starts.
    payloads = [client.payload(request_body(model, r, extra_body)) for r in requests]
    results = [RequestResult(r.index, prompt_tokens=r.input_tokens) for r in requests]
    finished = {r.after: asyncio.Event() for r in requests if r.after is not None}
    progress = Progress(len(requests))
    limit = asyncio.Semaphore(concurrency) if concurrency else None

    async def one(index: int) -> None:
        request = requests[index]
        if request.after is not None:
            await finished[request.after].wait()
        progress.sent += 1
        progress.running += 1
        result = await client.send(payloads[index], results[index])
        progress.running -= 1
        progress.done += 1
        progress.failed += not result.success
        progress.output_tokens += result.output_tokens
        if index in finished:
            finished[index].set()

    async def limited(index: int) -> None:
        if limit is None:
            await one(index)
            return
        after = requests[index].after
        if after is not None:  # before taking a slot: a waiting turn must not hold one its predecessor needs
            await finished[after].wait()
        async with limit:
            await one(index)

    ticker = asyncio.create_task(_tick(progress, on_tick)) if on_tick else None
    started = time.perf_counter()
    try:
        if timed or concurrency is None:
            await _open_loop(requests, limited, started)
        else:
            await _closed_loop(len(requests), concurrency, one)
    finally:
        duration = time.perf_counter() - started
        if ticker is not None:
            ticker.cancel()
            on_tick(progress)  # type: ignore[misc]
    for result in results:
        if result.usage_output_tokens:
            result.output_tokens = result.usage_output_tokens
    return results, duration


async def _open_loop(requests: list[BenchRequest], limited: Callable[[int], Any], started: float) -> None:
    tasks = []
    for request in requests:
        delay = started + request.arrival_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(limited(request.index)))
    await asyncio.gather(*tasks)


async def _closed_loop(count: int, concurrency: int, one: Callable[[int], Any]) -> None:
    queue = iter(range(count))

    async def worker() -> None:
        for index in queue:
            await one(index)

    await asyncio.gather(*(worker() for _ in range(min(concurrency, count))))


async def _tick(progress: Progress, on_tick: Callable[[Progress], None]) -> None:
    while True:
        on_tick(progress)
        await asyncio.sleep(TICK_S)
