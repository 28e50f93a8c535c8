"""A minimal stand-in for PD engines, for benchmarks that measure the router alone: it answers a prefill
hop (a request with `do_remote_decode`) with `kv_transfer_params`, any other completion with a fixed 4-token
answer, and /health, /v1/models and an empty /metrics, over raw keep-alive HTTP/1.1 on uvloop. It costs a few
tens of microseconds a request, so a router in front of it is the bottleneck, where sim engines (Python
processes that emulate vLLM) are heavy enough to take turns with it and make requests/s jitter.

Not an engine: nothing is computed, no KV moves. `pdctl`'s own tests and end-to-end runs use the real engine or
`engine: sim`; this only serves benchmarks/metrics_overhead.py.

    python benchmarks/responder.py PORT [PORT ...]
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from pathlib import Path
from typing import cast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pdctl.router.server import use_fast_event_loop

_LENGTH = re.compile(rb"content-length:\s*(\d+)", re.IGNORECASE)
_PROMPT_TOKENS = 200


def _response(body: bytes, content_type: bytes = b"application/json") -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: " + content_type + b"\r\ncontent-length: " + str(len(body)).encode()
        + b"\r\n\r\n" + body
    )  # fmt: skip


def _completion(text: str, tokens: int, **extra: object) -> bytes:
    usage = {"prompt_tokens": _PROMPT_TOKENS, "completion_tokens": tokens, "total_tokens": _PROMPT_TOKENS + tokens}
    choice = {"index": 0, "text": text, "finish_reason": "length", "logprobs": None}
    answer = {"id": "cmpl-responder", "object": "text_completion", "created": 0, "model": "sim-model",
              "choices": [choice], "usage": usage, **extra}  # fmt: skip
    return _response(json.dumps(answer).encode())


PREFILLED = _completion("a", 1, kv_transfer_params={
    "do_remote_prefill": True, "do_remote_decode": False, "remote_block_ids": [0], "remote_engine_id": "responder",
    "remote_host": "127.0.0.1", "remote_port": 1, "tp_size": 1,
})  # fmt: skip
DECODED = _completion(" a a a a", 4)
MODELS = _response(json.dumps({"object": "list", "data": [{"id": "sim-model", "object": "model"}]}).encode())
HEALTH = _response(b"")
METRICS = _response(b"", b"text/plain; version=0.0.4")


def answer(head: bytes, body: bytes) -> bytes:
    if head.startswith(b"GET"):
        path = head.split(b" ", 2)[1]
        return MODELS if path.startswith(b"/v1/models") else METRICS if path.startswith(b"/metrics") else HEALTH
    return PREFILLED if b"do_remote_decode" in body else DECODED


class Responder(asyncio.Protocol):
    def __init__(self) -> None:
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = bytes(self.buffer[:end])
            length = _LENGTH.search(head)
            total = end + 4 + (int(length.group(1)) if length else 0)
            if len(self.buffer) < total:
                return
            body = bytes(self.buffer[end + 4 : total])
            del self.buffer[:total]
            assert self.transport is not None
            self.transport.write(answer(head, body))


async def serve(ports: list[int]) -> None:
    loop = asyncio.get_running_loop()
    for port in ports:
        await loop.create_server(Responder, "127.0.0.1", port)
    await asyncio.Event().wait()


def main() -> None:
    use_fast_event_loop()
    asyncio.run(serve([int(port) for port in sys.argv[1:]]))


if __name__ == "__main__":
    main()
