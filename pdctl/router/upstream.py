"""A lean HTTP/1.1 client for the router's hop to the engines: keep-alive connections per engine, bodies
by Content-Length or chunked, nothing else. httpx costs far more CPU per request than the routing decision,
and the router sends two upstream requests for every PD-split one."""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict, deque
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit


class UpstreamError(Exception):
    """The engine could not be reached, or broke the exchange."""


_BROKEN = (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, OSError)


def _broken(error: Exception) -> UpstreamError:
    return UpstreamError(f"the engine broke the response: {type(error).__name__}")


class _Connection:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    def close(self) -> None:
        self.writer.close()


class UpstreamResponse:
    def __init__(
        self, pool: UpstreamPool, key: tuple[str, int], connection: _Connection, status: int, headers: dict[str, str]
    ):
        self._pool, self._key, self._connection = pool, key, connection
        self.status_code = status
        self.headers = headers
        self._done = False

    @property
    def _chunked(self) -> bool:
        return self.headers.get("transfer-encoding", "").lower() == "chunked"

    async def read(self) -> bytes:
        if self._chunked or "content-length" not in self.headers:
            return b"".join([chunk async for chunk in self.iter_raw()])
        # The common case, a whole answer by Content-Length, without an async generator around one read.
        try:
            body = await self._connection.reader.readexactly(int(self.headers["content-length"]))
        except _BROKEN as error:
            raise _broken(error) from None
        self._done = True
        return body

    async def iter_raw(self) -> AsyncIterator[bytes]:
        reader = self._connection.reader
        try:
            if self._chunked:
                while True:
                    size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
                    if size == 0:
                        while await reader.readuntil(b"\r\n") != b"\r\n":
                            pass  # a trailer field
                        break
                    chunk = await reader.readexactly(size + 2)
                    yield chunk[:-2]
            elif "content-length" in self.headers:
                yield await reader.readexactly(int(self.headers["content-length"]))
            else:
                yield await reader.read()  # until the engine closes
                self.headers["connection"] = "close"
        except _BROKEN as error:
            raise _broken(error) from None
        self._done = True

    async def aclose(self) -> None:
        """Return the connection for reuse if the body was read whole; close it otherwise (aborts upstream)."""
        if self._connection is None:
            return
        reusable = self._done and self.headers.get("connection", "").lower() != "close"
        self._pool._release(self._key, self._connection, reusable)
        self._connection = None  # type: ignore[assignment]


class UpstreamPool:
    def __init__(self, connect_timeout_s: float = 3.0, max_idle_per_engine: int = 256, api_key: str | None = None):
        """api_key: the engines' key (vLLM's --api-key), sent with every request."""
        self.connect_timeout_s = connect_timeout_s
        self.max_idle = max_idle_per_engine
        self._idle: defaultdict[tuple[str, int], deque[_Connection]] = defaultdict(deque)
        self._authorization = f"authorization: Bearer {api_key}\r\n" if api_key else ""

    async def post(self, url: str, body: dict[str, Any], first_byte_timeout_s: float) -> UpstreamResponse:
        """POST a JSON body; returns once the response head is in (the body is read by the caller)."""
        parts = urlsplit(url)
        key = (parts.hostname or "127.0.0.1", parts.port or 80)
        payload = json.dumps(body, separators=(",", ":")).encode()
        head = (
            f"POST {parts.path or '/'} HTTP/1.1\r\nhost: {key[0]}:{key[1]}\r\ncontent-type: application/json\r\n"
            f"{self._authorization}content-length: {len(payload)}\r\n\r\n"
        ).encode()
        for attempt in range(2):
            connection, reused = await self._acquire(key)
            try:
                connection.writer.write(head + payload)
                # asyncio.timeout, not wait_for: no task per request, so fewer trips through the event loop.
                async with asyncio.timeout(first_byte_timeout_s):
                    status, headers = await self._read_head(connection.reader)
                return UpstreamResponse(self, key, connection, status, headers)
            except TimeoutError:
                connection.close()
                raise UpstreamError(f"no response within {first_byte_timeout_s:g} s") from None
            except (OSError, asyncio.IncompleteReadError, ValueError) as error:
                connection.close()
                # A kept-alive connection the engine closed meanwhile: one fresh try, never a second send.
                if reused and attempt == 0:
                    continue
                raise UpstreamError(f"{type(error).__name__}: {error}") from None
            except BaseException:
                connection.close()
                raise
        raise UpstreamError("unreachable")

    async def _acquire(self, key: tuple[str, int]) -> tuple[_Connection, bool]:
        idle = self._idle[key]
        while idle:
            connection = idle.pop()
            if not connection.writer.is_closing() and not connection.reader.at_eof():
                return connection, True
            connection.close()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                reader, writer = await asyncio.open_connection(*key)
        except (OSError, TimeoutError) as error:
            raise UpstreamError(f"cannot connect to {key[0]}:{key[1]}: {type(error).__name__} {error}") from None
        return _Connection(reader, writer), False

    @staticmethod
    async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
        raw = await reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        return status, headers

    def _release(self, key: tuple[str, int], connection: _Connection, reusable: bool) -> None:
        idle = self._idle[key]
        if reusable and len(idle) < self.max_idle:
            idle.append(connection)
        else:
            connection.close()

    async def aclose(self) -> None:
        for idle in self._idle.values():
            while idle:
                idle.pop().close()
