"""A deterministic engine for the router's migration tests: vLLM's streamed completions and chat API with
`return_token_ids`, token ids as prompts, and faults on demand, served over a real socket.

Tokens are bytes (as the builtin model's tokenizer has them), and the next token is a function of every token
before it, prompt included, as greedy decoding is: a continuation from `prompt + generated` yields what the
engine would have. Tokens from 200 up are half a character: their text is held back and sent with the next
token's, as vLLM holds back an incomplete UTF-8 character.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from pdctl.httpserver import HttpServer, Request, Response, StreamingResponse, json_response

HALF = 200  # tokens from here on have no text of their own
_ids = itertools.count(1)


def next_token(context: list[int]) -> int:
    return (sum(context[-5:]) * 7 + len(context) * 13) % 190 + 33


def text_of(tokens: list[int]) -> str:
    return "".join(chr(t) if t < HALF else chr(t - 100) for t in tokens)


def chat_prompt(messages: list[dict[str, Any]]) -> list[int]:
    rendered = "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"
    return list(rendered.encode())


@dataclass
class Fault:
    after_tokens: int
    kind: str  # "die": the connection breaks; "stall": no token ever again; "error": an error event


class TokenEngine:
    """faults: shared by the engines of a test; the next stream on any of them takes the first."""

    def __init__(self, name: str, faults: list[Fault], token_interval_s: float = 0.002):
        self.name = name
        self.token_interval_s = token_interval_s
        self.faults = faults
        self.requests: list[dict[str, Any]] = []
        self.server = HttpServer(self.handle)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    async def handle(self, request: Request) -> Response | StreamingResponse:
        if request.path == "/health":
            return Response(200)
        body = request.json()
        self.requests.append(body)
        chat = request.path.endswith("chat/completions")
        prompt = chat_prompt(body["messages"]) if chat else _prompt_ids(body["prompt"])
        fault = self.faults.pop(0) if self.faults and body.get("stream") else None
        max_tokens = body.get("max_tokens") or 16
        if not body.get("stream"):
            tokens = _generate(prompt, max_tokens)
            return json_response({"choices": [{"index": 0, "text": text_of(tokens)}]})
        return StreamingResponse(chunks=self._stream(body, chat, prompt, max_tokens, fault))

    async def _stream(
        self, body: dict[str, Any], chat: bool, prompt: list[int], max_tokens: int, fault: Fault | None
    ) -> AsyncIterator[bytes]:
        head = {"id": f"{self.name}-{next(_ids)}", "created": 1700000000, "model": "token-model"}
        show = bool(body.get("return_token_ids"))
        if chat:
            first = {**head, "object": "chat.completion.chunk", "choices": [_chat_choice("", None, None, show)]}
            first["choices"][0]["delta"]["role"] = "assistant"
            first["prompt_token_ids"] = prompt if show else None
            yield _event(first)
        context, held = list(prompt), ""
        for produced in range(1, max_tokens + 1):
            if fault is not None and produced > fault.after_tokens:
                async for ending in _fault(fault):
                    yield ending
                return
            await asyncio.sleep(self.token_interval_s)
            token = next_token(context)
            context.append(token)
            finish = "length" if produced == max_tokens else None
            if token >= HALF:
                held += chr(token - 100)
                text = held if finish else ""
            else:
                text, held = held + chr(token), ""
            if chat:
                choice = _chat_choice(text, finish, [token], show)
                yield _event({**head, "object": "chat.completion.chunk", "choices": [choice]})
            else:
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish, "stop_reason": None}
                choice["prompt_token_ids"] = prompt if show and produced == 1 else None
                choice["token_ids"] = [token] if show else None
                yield _event({**head, "object": "text_completion", "choices": [choice]})
        usage = {
            "prompt_tokens": len(prompt),
            "total_tokens": len(prompt) + max_tokens,
            "completion_tokens": max_tokens,
        }
        if (body.get("stream_options") or {}).get("include_usage"):
            kind = "chat.completion.chunk" if chat else "text_completion"
            yield _event({**head, "object": kind, "choices": [], "usage": usage})
        yield b"data: [DONE]\n\n"


def _prompt_ids(prompt: str | list[int]) -> list[int]:
    return list(prompt) if isinstance(prompt, list) else list(prompt.encode())


def _generate(prompt: list[int], count: int) -> list[int]:
    context = list(prompt)
    for _ in range(count):
        context.append(next_token(context))
    return context[len(prompt) :]


def _chat_choice(text: str, finish: str | None, ids: list[int] | None, show: bool) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": finish}
    if finish is not None:
        choice["stop_reason"] = None  # as vLLM's last chat event has it
    if ids is not None:
        choice["token_ids"] = ids if show else None
    return choice


async def _fault(fault: Fault) -> AsyncIterator[bytes]:
    if fault.kind == "stall":
        await asyncio.sleep(3600)
    elif fault.kind == "error":
        error = {"error": {"message": "EngineCore encountered an issue", "type": "InternalServerError", "code": 500}}
        yield _event(error)
        yield b"data: [DONE]\n\n"
        return
    raise ConnectionResetError("the engine died")  # the server drops the connection without the last chunk
    yield b""  # an async generator


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"
