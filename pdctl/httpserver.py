"""A small asyncio HTTP/1.1 server for pdctl's own endpoints: the sim engine, and the router's hot path.

It is an `asyncio.Protocol`, not streams, so a client that goes away is noticed at once (`connection_lost`)
and the request it was waiting for is cancelled, streaming or not: upstream work never outlives its client.
One task per connection serves its requests in turn (keep-alive); bodies need a Content-Length.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, cast

from pdctl import strictjson

log = logging.getLogger("pdctl.httpserver")

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
MAX_HEAD_BYTES = 64 * 1024
# Above this much unread input a connection stops reading until its request needs more: pipelined or
# garbage input cannot grow memory without bound.
_READ_HIGH_WATER = 256 * 1024
# After refusing a request whose body is still arriving, input is drained this long before closing: closing
# with unread input makes the kernel send a reset, which can destroy the error response in flight.
_LINGER_S = 2.0
# Bursts of hundreds of new connections (benchmarks, a router's clients) must not overflow the accept queue:
# a dropped SYN costs the client a full second.
_BACKLOG = 2048
_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode("latin-1") for s in HTTPStatus}


class HttpError(Exception):
    """Answered as an OpenAI-style JSON error. Handlers raise it to refuse a request; the server raises it
    for requests it cannot parse."""

    def __init__(
        self,
        status: int,
        message: str,
        error_type: str = "invalid_request_error",
        code: int | str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ):
        super().__init__(message)
        self.headers = headers
        self.status = status
        self.message = message
        self.error_type = error_type
        self.code = status if code is None else code
        self.param = param

    def response(self) -> Response:
        error = {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}
        return json_response({"error": error}, status=self.status, headers=self.headers)


class InvalidJSON(HttpError):
    """The request body is not JSON: a 400 when a handler lets it through."""

    def __init__(self, detail: str):
        super().__init__(400, f"the request body is not valid JSON: {detail}")


@dataclass(slots=True)
class Request:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    version: str = "HTTP/1.1"

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except (ValueError, RecursionError) as exc:
            raise InvalidJSON(str(exc)) from None


@dataclass(slots=True)
class Response:
    status: int = 200
    body: bytes = b""
    headers: Mapping[str, str] | None = None
    content_type: str = "text/plain; charset=utf-8"


@dataclass(slots=True, kw_only=True)
class StreamingResponse:
    """Sent with chunked transfer encoding, one HTTP chunk per item, as each is produced."""

    status: int = 200
    headers: Mapping[str, str] | None = None
    content_type: str = "text/event-stream"
    chunks: AsyncIterator[bytes]
    # Fields known only once the body is sent (HTTP/1.1 trailers, announced in a `trailer` header).
    trailers: Callable[[], Mapping[str, str]] | None = None


Handler = Callable[[Request], Awaitable[Response | StreamingResponse]]


def json_response(obj: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    body = strictjson.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
    return Response(status, body, headers, "application/json")


def error_response(status: int, message: str, error_type: str = "invalid_request_error") -> Response:
    return HttpError(status, message, error_type).response()


class HttpServer:
    def __init__(
        self,
        handler: Handler,
        host: str = "127.0.0.1",
        port: int = 0,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        tls: ssl.SSLContext | None = None,
    ):
        self.handler = handler
        self.host = host
        self.max_body_bytes = max_body_bytes
        self.tls = tls
        self._port = port
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()

    @property
    def port(self) -> int:
        """The bound port once started (the one the system chose when asked for 0)."""
        if self._server is None or not self._server.sockets:
            return self._port
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), self.host, self._port, backlog=_BACKLOG, ssl=self.tls
        )

    async def stop(self) -> None:
        """Stop listening and drop every open connection, cancelling the requests in flight."""
        if self._server is not None:
            self._server.close()
        tasks = [task for connection in list(self._connections) if (task := connection.abort()) is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def serve_forever(self) -> None:
        if self._server is None:
            await self.start()
        assert self._server is not None
        try:
            await self._server.serve_forever()
        finally:
            await self.stop()

    async def __aenter__(self) -> HttpServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


class _Connection(asyncio.Protocol):
    def __init__(self, server: HttpServer):
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._task: asyncio.Task[None] | None = None
        self._buffer = bytearray()
        self._eof = False
        self._data_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._reading_paused = False
        self._writing_paused = False
        self._discarding = False

    # -- protocol callbacks -------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport; not an asyncio.Transport subclass under every event loop (uvloop's is not).
        self._transport = cast(asyncio.Transport, transport)
        self._server._connections.add(self)
        self._task = self._loop.create_task(self._serve())

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            return
        self._buffer += data
        if self._data_waiter is not None:
            _wake(self._data_waiter)
        elif len(self._buffer) > _READ_HIGH_WATER and not self._reading_paused:
            self._pause_reading()

    def eof_received(self) -> bool:
        # HTTP clients do not half-close: an EOF means the client is gone, so the connection closes (False).
        self._eof = True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._server._connections.discard(self)
        if self._task is not None and not self._task.done():
            self._task.cancel()

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._drain_waiter is not None:
            _wake(self._drain_waiter)

    def abort(self) -> asyncio.Task[None] | None:
        if self._transport is not None:
            self._transport.abort()
        if self._task is not None and not self._task.done():
            self._task.cancel()
        return self._task

    # -- the connection's task ----------------------------------------------------------------------------

    async def _serve(self) -> None:
        transport = self._transport
        assert transport is not None
        try:
            keep_alive = True
            while keep_alive:
                try:
                    request = await self._read_request()
                except HttpError as error:
                    self._refuse(error)
                    return
                if request is None:
                    break
                keep_alive = await self._respond(request)
        except Exception:
            log.exception("connection from %s failed", transport.get_extra_info("peername"))
        transport.close()

    async def _respond(self, request: Request) -> bool:
        """Answers one request; whether the connection stays open."""
        keep_alive = _keeps_alive(request)
        try:
            response = await self._server.handler(request)
        except HttpError as error:
            response = error.response()
        except Exception:
            log.exception("handler failed on %s %s", request.method, request.path)
            response = error_response(500, "internal server error", "server_error")
        if isinstance(response, StreamingResponse):
            return await self._stream(response, keep_alive, chunked=request.version == "HTTP/1.1")
        self._write(response, keep_alive)
        await self._drain()
        return keep_alive

    def _write(self, response: Response, keep_alive: bool) -> None:
        assert self._transport is not None
        framing = b"content-length: %d\r\n" % len(response.body)
        head = _head(response.status, response.content_type, response.headers, framing, keep_alive)
        self._transport.write(head + response.body)

    async def _stream(self, response: StreamingResponse, keep_alive: bool, chunked: bool) -> bool:
        """Sends a streaming response; HTTP/1.0 clients, which know no chunked encoding, get the bytes raw and
        a close at the end."""
        transport = self._transport
        assert transport is not None
        keep_alive = keep_alive and chunked
        framing = b"transfer-encoding: chunked\r\n" if chunked else b""
        transport.write(_head(response.status, response.content_type, response.headers, framing, keep_alive))
        chunks = response.chunks
        try:
            async for chunk in chunks:
                if chunk:  # an empty chunk would end the body
                    transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
                    await self._drain()
        except Exception:
            # The status line is gone already: closing without the last chunk tells the client it failed.
            log.exception("stream failed mid-response")
            return False
        finally:
            # Closes the generator when the client went away (cancellation), so upstream work stops too.
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()
        if chunked:
            fields = response.trailers() if response.trailers is not None else {}
            transport.write(b"0\r\n" + b"".join(f"{k}: {v}\r\n".encode() for k, v in fields.items()) + b"\r\n")
        return keep_alive

    def _refuse(self, error: HttpError) -> None:
        """Answers a request that could not be read, then drains and closes (see _LINGER_S)."""
        transport = self._transport
        assert transport is not None
        self._write(error.response(), keep_alive=False)
        self._discarding = True
        self._buffer.clear()
        if self._reading_paused:
            transport.resume_reading()
        if transport.can_write_eof():
            transport.write_eof()
        self._loop.call_later(_LINGER_S, transport.close)

    # -- reading ------------------------------------------------------------------------------------------

    async def _read_request(self) -> Request | None:
        """The next request, or None when the client has gone."""
        end = await self._read_head()
        if end < 0:
            return None
        method, target, version, headers = _parse_head(bytes(self._buffer[:end]))
        del self._buffer[: end + 4]
        length = _body_length(headers, self._server.max_body_bytes)
        if length > len(self._buffer) and headers.get("expect", "").lower() == "100-continue":
            assert self._transport is not None
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        while len(self._buffer) < length:
            if not await self._wait_for_data():
                return None
        body = bytes(self._buffer[:length])
        del self._buffer[:length]
        path, _, query = target.partition("?")
        return Request(method, path, query, headers, body, version)

    async def _read_head(self) -> int:
        """The offset of the blank line that ends the head in the buffer; -1 when the client has gone."""
        start = 0
        while (end := self._buffer.find(b"\r\n\r\n", start)) < 0 and len(self._buffer) <= MAX_HEAD_BYTES:
            start = max(0, len(self._buffer) - 3)
            if not await self._wait_for_data():
                return -1
        if end < 0 or end > MAX_HEAD_BYTES:
            raise HttpError(431, f"the request head is over {MAX_HEAD_BYTES} bytes")
        return end

    async def _wait_for_data(self) -> bool:
        if self._eof:
            return False
        if self._reading_paused:
            assert self._transport is not None
            self._reading_paused = False
            self._transport.resume_reading()
        self._data_waiter = self._loop.create_future()
        try:
            await self._data_waiter
        finally:
            self._data_waiter = None
        return True

    def _pause_reading(self) -> None:
        assert self._transport is not None
        self._reading_paused = True
        self._transport.pause_reading()

    async def _drain(self) -> None:
        if not self._writing_paused:
            return
        self._drain_waiter = self._loop.create_future()
        try:
            await self._drain_waiter
        finally:
            self._drain_waiter = None


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _parse_head(head: bytes) -> tuple[str, str, str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if (
        len(parts) != 3
        or not (parts[0].isascii() and parts[0].isalpha())
        or not parts[1].startswith("/")
        or parts[2] not in ("HTTP/1.1", "HTTP/1.0")
    ):
        raise HttpError(400, "malformed request line")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or " " in name or "\t" in name:
            raise HttpError(400, "malformed request header")
        key = name.lower()
        value = value.strip(" \t")
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return parts[0], parts[1], parts[2], headers


def _body_length(headers: dict[str, str], limit: int) -> int:
    if "transfer-encoding" in headers:
        raise HttpError(411, "chunked request bodies are not supported: send a Content-Length")
    raw = headers.get("content-length")
    if raw is None:
        return 0
    if not (raw.isascii() and raw.isdigit()):
        raise HttpError(400, "invalid Content-Length")
    length = int(raw)
    if length > limit:
        raise HttpError(413, f"the request body of {length} bytes is over the limit of {limit} bytes")
    return length


def _keeps_alive(request: Request) -> bool:
    connection = request.headers.get("connection", "").lower()
    if request.version == "HTTP/1.1":
        return "close" not in connection
    return "keep-alive" in connection


def _head(status: int, content_type: str, headers: Mapping[str, str] | None, framing: bytes, keep_alive: bool) -> bytes:
    status_line = _STATUS_LINES.get(status) or b"HTTP/1.1 %d \r\n" % status
    parts = [status_line, b"content-type: ", content_type.encode("latin-1"), b"\r\n", framing]
    if not keep_alive:
        parts.append(b"connection: close\r\n")
    if headers:
        parts.extend(f"{name}: {value}\r\n".encode("latin-1") for name, value in headers.items())
    parts.append(b"\r\n")
    return b"".join(parts)
