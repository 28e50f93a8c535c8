"""pdctl.httpserver over real sockets: httpx for what clients send, raw sockets for what they must not."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest

from pdctl.httpserver import (
    HttpError,
    HttpServer,
    Request,
    Response,
    StreamingResponse,
    json_response,
)


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), timeout=10))


async def echo(request: Request) -> Response:
    return json_response(
        {
            "method": request.method,
            "path": request.path,
            "query": request.query,
            "headers": request.headers,
            "body": request.body.decode(),
        }
    )


async def exchange(port: int, raw: bytes, until: bytes = b"") -> bytes:
    """Sends raw bytes and reads until `until` appears or the server closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    received = b""
    while not until or until not in received:
        data = await reader.read(65536)
        if not data:
            break
        received += data
    writer.close()
    return received


def error_of(response: httpx.Response) -> dict[str, object]:
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"}
    return error


def test_request_fields_and_json_response() -> None:
    async def scenario() -> None:
        async with HttpServer(echo) as server, httpx.AsyncClient() as client:
            assert server.port > 0
            response = await client.post(
                f"http://127.0.0.1:{server.port}/v1/things?a=1&b=2", content=b"hello", headers={"X-Trace": "t1"}
            )
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        seen = response.json()
        assert (seen["method"], seen["path"], seen["query"], seen["body"]) == ("POST", "/v1/things", "a=1&b=2", "hello")
        assert seen["headers"]["x-trace"] == "t1"
        assert seen["headers"]["content-length"] == "5"

    run(scenario)


def test_keep_alive_and_pipelined_requests_share_one_connection() -> None:
    async def scenario() -> None:
        async with HttpServer(echo) as server:
            raw = b"GET /one HTTP/1.1\r\nHost: x\r\n\r\nPOST /two HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
            received = await exchange(server.port, raw, until=b'"body":"abc"')
        assert received.count(b"HTTP/1.1 200 OK") == 2
        assert b'"path":"/one"' in received and b'"path":"/two"' in received
        assert b"connection: close" not in received

    run(scenario)


def test_connection_close_is_honoured() -> None:
    async def scenario() -> None:
        async with HttpServer(echo) as server:
            received = await exchange(server.port, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert received.startswith(b"HTTP/1.1 200 OK")
        assert b"connection: close\r\n" in received

    run(scenario)


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"NONSENSE\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nContent-Length: ten\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", 411),
        (b"POST / HTTP/1.1\r\nContent-Length: 100\r\n\r\n" + b"x" * 100, 413),
        (b"GET / HTTP/1.1\r\nX-Big: " + b"y" * 70000 + b"\r\n\r\n", 431),
    ],
)
def test_bad_requests_get_json_errors_and_a_close(raw: bytes, status: int) -> None:
    async def scenario() -> None:
        async with HttpServer(echo, max_body_bytes=10) as server:
            received = await exchange(server.port, raw)
            # The server survives: the next connection is served.
            async with httpx.AsyncClient() as client:
                assert (await client.get(f"http://127.0.0.1:{server.port}/")).status_code == 200
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 %d " % status)
        assert b"connection: close" in head
        assert httpx.Response(status, content=body).json()["error"]["code"] == status

    run(scenario)


def test_oversized_body_is_refused_with_413_through_httpx() -> None:
    async def scenario() -> None:
        async with HttpServer(echo, max_body_bytes=1024) as server, httpx.AsyncClient() as client:
            response = await client.post(f"http://127.0.0.1:{server.port}/", content=b"z" * 200_000)
        assert response.status_code == 413
        assert error_of(response)["type"] == "invalid_request_error"

    run(scenario)


def test_expect_100_continue_gets_an_interim_response() -> None:
    async def scenario() -> None:
        async with HttpServer(echo) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"POST /e HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
            assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(b"ok")
            head = await reader.readuntil(b"\r\n\r\n")
            writer.close()
        assert head.startswith(b"HTTP/1.1 200 OK")

    run(scenario)


def test_handler_errors(caplog: pytest.LogCaptureFixture) -> None:
    async def handler(request: Request) -> Response:
        if request.path == "/boom":
            raise RuntimeError("secret internals")
        if request.path == "/refuse":
            raise HttpError(429, "slow down", "rate_limit_error")
        return json_response(request.json())

    async def scenario() -> None:
        async with HttpServer(handler) as server, httpx.AsyncClient() as client:
            url = f"http://127.0.0.1:{server.port}"
            boom = await client.get(f"{url}/boom")
            refused = await client.get(f"{url}/refuse")
            bad_json = await client.post(f"{url}/json", content=b"{nope")
            good_json = await client.post(f"{url}/json", json={"a": [1]})
        assert boom.status_code == 500
        assert error_of(boom)["type"] == "server_error"
        assert "secret" not in boom.text and "Traceback" not in boom.text
        assert (refused.status_code, error_of(refused)["message"], error_of(refused)["type"]) == (
            429,
            "slow down",
            "rate_limit_error",
        )
        assert bad_json.status_code == 400
        assert "not valid JSON" in str(error_of(bad_json)["message"])
        assert good_json.json() == {"a": [1]}

    with caplog.at_level(logging.ERROR, logger="pdctl.httpserver"):
        run(scenario)
    assert any("secret internals" in (record.exc_text or "") for record in caplog.records)


def test_streaming_response_is_chunked_in_order() -> None:
    async def events() -> AsyncIterator[bytes]:
        for i in range(5):
            yield b"data: %d\n\n" % i
            await asyncio.sleep(0)

    async def handler(request: Request) -> StreamingResponse:
        return StreamingResponse(chunks=events(), headers={"cache-control": "no-cache"})

    async def scenario() -> None:
        async with HttpServer(handler) as server, httpx.AsyncClient() as client:
            async with client.stream("GET", f"http://127.0.0.1:{server.port}/") as response:
                assert response.headers["transfer-encoding"] == "chunked"
                assert response.headers["content-type"] == "text/event-stream"
                assert response.headers["cache-control"] == "no-cache"
                body = b"".join([chunk async for chunk in response.aiter_bytes()])
            # The connection is still usable after the last chunk.
            assert (await client.get(f"http://127.0.0.1:{server.port}/")).status_code == 200
        assert body == b"".join(b"data: %d\n\n" % i for i in range(5))

    run(scenario)


def test_stream_for_http10_client_is_raw_and_closed() -> None:
    async def handler(request: Request) -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            yield b"one "
            yield b"two"

        return StreamingResponse(chunks=chunks(), content_type="text/plain")

    async def scenario() -> None:
        async with HttpServer(handler) as server:
            received = await exchange(server.port, b"GET / HTTP/1.0\r\n\r\n")
        head, _, body = received.partition(b"\r\n\r\n")
        assert b"transfer-encoding" not in head and b"connection: close" in head
        assert body == b"one two"

    run(scenario)


def test_client_disconnect_closes_the_stream_iterator() -> None:
    async def scenario() -> None:
        started, finished = asyncio.Event(), asyncio.Event()

        async def endless() -> AsyncIterator[bytes]:
            try:
                while True:
                    started.set()
                    yield b"data: tick\n\n"
                    await asyncio.sleep(0.01)
            finally:
                finished.set()

        async def handler(request: Request) -> StreamingResponse:
            return StreamingResponse(chunks=endless())

        async with HttpServer(handler) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET / HTTP/1.1\r\n\r\n")
            await reader.readuntil(b"tick")
            await started.wait()
            writer.close()
            await asyncio.wait_for(finished.wait(), timeout=2)

    run(scenario)


def test_client_disconnect_cancels_a_pending_handler() -> None:
    async def scenario() -> None:
        entered, cancelled = asyncio.Event(), asyncio.Event()

        async def handler(request: Request) -> Response:
            entered.set()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return Response(200)

        async with HttpServer(handler) as server:
            _, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET / HTTP/1.1\r\n\r\n")
            await entered.wait()
            writer.close()
            await asyncio.wait_for(cancelled.wait(), timeout=2)

    run(scenario)


def test_stop_closes_listener_and_open_connections() -> None:
    async def scenario() -> None:
        entered = asyncio.Event()

        async def handler(request: Request) -> Response:
            entered.set()
            await asyncio.sleep(30)
            return Response(200)

        server = HttpServer(handler)
        await server.start()
        port = server.port
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\n\r\n")
        await entered.wait()
        await server.stop()
        assert await asyncio.wait_for(reader.read(), timeout=2) == b""
        writer.close()
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)

    run(scenario)


def test_serve_forever_serves_until_cancelled() -> None:
    async def scenario() -> None:
        server = HttpServer(echo)
        task = asyncio.create_task(server.serve_forever())
        while server.port == 0:
            await asyncio.sleep(0.01)
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"http://127.0.0.1:{server.port}/x")).json()["path"] == "/x"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(scenario)
