"""What request migration costs a stream that never fails: the router asks for token ids and keeps a ledger of
them (pdctl/router/migration.py), one scan and one substitution per event.

Two figures, side by side in one run:
1. The ledger alone: microseconds per event for vLLM's completions and chat events (as captured from vLLM
   0.32 with `return_token_ids`).
2. The whole router in one process (router, an engine that streams vLLM-shaped events at once, a raw-socket
   client): CPU time per streamed token with `router.max_migrations` 3 and 0, in interleaved rounds, and
   their ratio. The engine and client cost the same in both, so the difference is the ledger's.

    python benchmarks/migration_overhead.py [--rounds 5] [--streams 200] [--tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import timeit
from collections.abc import AsyncIterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pdctl.httpserver import HttpServer, Request, Response, StreamingResponse  # noqa: E402
from pdctl.router.migration import StreamLedger  # noqa: E402
from pdctl.router.proxy import Router, RouterSettings  # noqa: E402
from pdctl.router.tokens import TokenCounter, utf8_length  # noqa: E402
from pdctl.routing.pool import Instance, Pool  # noqa: E402
from pdctl.types import ExecutionInstanceType, PDSeparationConfig  # noqa: E402

COMPLETION_EVENT = (
    b'data: {"id":"cmpl-b5597e700699949a","object":"text_completion","created":1796581178,"model":"pdctl-tiny-llama",'
    b'"choices":[{"index":0,"text":"e","logprobs":null,"finish_reason":null,"stop_reason":null,'
    b'"prompt_token_ids":null,"token_ids":[104]}]}\n\n'
)
CHAT_EVENT = (
    b'data: {"id":"chatcmpl-b17bc675ef7b1d80","object":"chat.completion.chunk","created":1796581178,'
    b'"model":"pdctl-tiny-llama","choices":[{"index":0,"delta":{"content":"o"},"logprobs":null,'
    b'"finish_reason":null,"token_ids":[157]}]}\n\n'
)


def ledger_cost_us(event: bytes, chat: bool, number: int = 200_000) -> float:
    ledger = StreamLedger(chat=chat, show_ids=False)
    ledger.observe(event.replace(b'"prompt_token_ids":null', b'"prompt_token_ids":[1,2,3]'))
    return timeit.timeit(lambda: ledger.observe(event), number=number) / number * 1e6


class Engine:
    """Streams `tokens` events per request as fast as it can, token ids included when asked."""

    def __init__(self, tokens: int):
        self.tokens = tokens
        self.server = HttpServer(self.handle)

    async def handle(self, request: Request) -> Response | StreamingResponse:
        if request.path == "/health":
            return Response(200)
        show = bool(request.json().get("return_token_ids"))
        return StreamingResponse(chunks=self._events(show))

    async def _events(self, show: bool) -> AsyncIterator[bytes]:
        ids = b"[104]" if show else b"null"
        for index in range(self.tokens):
            finish = b'"length"' if index == self.tokens - 1 else b"null"
            yield (
                b'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"m","choices":[{"index":0,'
                b'"text":"e","logprobs":null,"finish_reason":' + finish + b',"stop_reason":null,'
                b'"prompt_token_ids":null,"token_ids":' + ids + b"}]}\n\n"
            )
            await asyncio.sleep(0)
        yield b"data: [DONE]\n\n"


async def one_stream(port: int) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = json.dumps({"prompt": "hello", "max_tokens": 64, "stream": True}).encode()
    writer.write(
        b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%b" % (len(body), body)
    )
    await reader.readuntil(b"\r\n\r\n")
    events = 0
    while size := int(await reader.readuntil(b"\r\n"), 16):
        events += (await reader.readexactly(size + 2)).count(b"data: ")
    while await reader.readuntil(b"\r\n") != b"\r\n":
        pass
    writer.close()
    return events


async def router_cpu_per_token_us(max_migrations: int, streams: int, tokens: int, engine_port: int) -> float:
    pd = PDSeparationConfig(prefilling_threshold_input_tokens=100_000)
    settings = RouterSettings("m", pd, max_migrations=max_migrations, record_metrics=True)
    instance = Instance("decode-0", ExecutionInstanceType.DECODING, f"http://127.0.0.1:{engine_port}", max_num_seqs=64)
    instance.healthy = True
    router = Router(settings, Pool([instance]), TokenCounter(utf8_length))
    server = HttpServer(router.handle)
    await server.start()
    try:
        started = time.process_time()
        for _ in range(streams // 8):
            counts = await asyncio.gather(*(one_stream(server.port) for _ in range(8)))
            assert all(count == tokens + 1 for count in counts), counts
        used = time.process_time() - started
    finally:
        await server.stop()
        await router.aclose()
    return used / (streams // 8 * 8 * tokens) * 1e6


async def whole_router(rounds: int, streams: int, tokens: int) -> dict[int, list[float]]:
    engine = Engine(tokens)
    await engine.server.start()
    figures: dict[int, list[float]] = {3: [], 0: []}
    try:
        for index in range(rounds):
            for migrations in (3, 0) if index % 2 == 0 else (0, 3):
                figures[migrations].append(
                    await router_cpu_per_token_us(migrations, streams, tokens, engine.server.port)
                )
    finally:
        await engine.server.stop()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    print("the ledger alone, per event:")
    print(f"  completions event  {ledger_cost_us(COMPLETION_EVENT, chat=False):.2f} us")
    print(f"  chat event         {ledger_cost_us(CHAT_EVENT, chat=True):.2f} us")
    figures = asyncio.run(whole_router(args.rounds, args.streams, args.tokens))
    on, off = statistics.median(figures[3]), statistics.median(figures[0])
    print(f"\nthe whole process (router + engine + client), CPU per streamed token, median of {args.rounds} rounds:")
    print(f"  max_migrations 3 (ledger on)   {on:.1f} us  (rounds {', '.join(f'{v:.1f}' for v in figures[3])})")
    print(f"  max_migrations 0 (ledger off)  {off:.1f} us  (rounds {', '.join(f'{v:.1f}' for v in figures[0])})")
    print(f"  ratio on/off {on / off:.3f}; the ledger adds {on - off:.1f} us a token")


if __name__ == "__main__":
    main()
