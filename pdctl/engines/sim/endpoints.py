"""/v1/completions and /v1/chat/completions: one flow, each endpoint saying only how its shapes differ.
A request is answered whole, or streamed as server-sent events in vLLM's chunks."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from pdctl.engines.sim.config import Job
from pdctl.engines.sim.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatStreamChoice,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamChoice,
    GenerationChunk,
    GenerationRequest,
    GenerationResponse,
    Usage,
)
from pdctl.httpserver import StreamingResponse


@dataclass(frozen=True)
class Endpoint:
    """A generation endpoint: its request shape, its ids' prefix, and the shapes of its answers."""

    shape: type[GenerationRequest]
    id_prefix: str
    response_type: type[GenerationResponse[Any]]
    choice: Callable[[str], BaseModel]  # the whole output's choice
    chunk_type: type[GenerationChunk[Any]]
    stream_choice: Callable[[str, str | None], BaseModel]  # (text, finish_reason)
    opening: tuple[BaseModel, ...] = ()  # the choices of a chunk sent before the first token

    def whole(self, job: Job, params: GenerationRequest, text: str, kv: dict[str, Any] | None) -> BaseModel:
        return self.response_type(id=job.id, created=int(time.time()), model=params.model,
                                  choices=[self.choice(text)], usage=_usage(job), kv_transfer_params=kv)  # fmt: skip

    async def chunks(
        self, job: Job, params: GenerationRequest, words: AsyncGenerator[str, None], interval: int
    ) -> AsyncGenerator[str, None]:
        """The stream's chunks as JSON; leaving early closes `words`, which aborts the request."""
        exclude = None if params.usage_at_end() else {"usage"}
        created = int(time.time())

        def chunk(choices: list[BaseModel], usage: Usage | None = None) -> str:
            message = self.chunk_type(id=job.id, created=created, model=params.model, choices=choices, usage=usage)
            return message.model_dump_json(exclude=None if usage else exclude)

        every_chunk = params.usage_in_every_chunk()
        events = _in_events(words, interval)
        async with contextlib.aclosing(words), contextlib.aclosing(events):
            if self.opening:
                yield chunk(list(self.opening))
            index = 0
            async for batch in events:
                index += len(batch)
                finish = "length" if index == job.max_tokens else None
                yield chunk([self.stream_choice("".join(batch), finish)], _usage(job, index) if every_chunk else None)
        if params.usage_at_end():
            yield chunk([], _usage(job))


COMPLETIONS = Endpoint(
    shape=CompletionRequest,
    id_prefix="cmpl",
    response_type=CompletionResponse,
    choice=lambda text: CompletionChoice(text=text, finish_reason="length"),
    chunk_type=CompletionChunk,
    stream_choice=lambda text, finish: CompletionStreamChoice(text=text, finish_reason=finish),
)
CHAT = Endpoint(
    shape=ChatCompletionRequest,
    id_prefix="chatcmpl",
    response_type=ChatCompletionResponse,
    choice=lambda text: ChatChoice(message=AssistantMessage(content=text), finish_reason="length"),
    chunk_type=ChatCompletionChunk,
    stream_choice=lambda text, finish: ChatStreamChoice(delta={"content": text}, finish_reason=finish),
    opening=(ChatStreamChoice(delta={"role": "assistant", "content": ""}),),
)


def _usage(job: Job, generated: int | None = None) -> Usage:
    prompt = len(job.tokens)
    completion = job.max_tokens if generated is None else generated
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def sse(events: AsyncGenerator[str, None]) -> StreamingResponse:
    return StreamingResponse(chunks=_sse_frames(events), headers={"cache-control": "no-cache"})


async def _sse_frames(events: AsyncGenerator[str, None]) -> AsyncGenerator[bytes, None]:
    async with contextlib.aclosing(events):
        async for event in events:
            yield f"data: {event}\n\n".encode()
    yield b"data: [DONE]\n\n"


async def _in_events(words: AsyncGenerator[str, None], interval: int) -> AsyncGenerator[list[str], None]:
    """The words as vLLM's --stream-interval sends tokens: the first alone, then `interval` at a time, the
    rest with the last."""
    batch: list[str] = []
    first = True
    async for word in words:
        batch.append(word)
        if first or len(batch) >= interval:
            yield batch
            batch, first = [], False
    if batch:
        yield batch
