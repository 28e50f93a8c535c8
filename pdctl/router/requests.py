"""Reading an OpenAI request body: only the fields routing needs are typed; everything else passes through
untouched (vLLM's extra fields included)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pdctl.httpserver import HttpError
from pdctl.types import RequestPriority

PRIORITY_NAMES = {p.name.lower(): int(p) for p in RequestPriority}
# Fields pdctl reads and removes: the engines do not know them.
OWN_FIELDS = ("slo_deadline_ms",)


@dataclass(slots=True)
class ParsedRequest:
    body: dict[str, Any]
    chat: bool
    text: str  # what the prompt's tokens are counted from
    max_tokens: int | None
    stream: bool
    priority: int
    deadline_ms: float | None


def _invalid(message: str, param: str | None = None) -> HttpError:
    return HttpError(400, message, "BadRequestError", param=param)


def prompt_text(body: dict[str, Any], chat: bool) -> str:
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _invalid("'messages' must be a non-empty list", "messages")
        parts: list[str] = []
        for message in messages:
            if not isinstance(message, dict):
                raise _invalid("each message must be an object with 'role' and 'content'", "messages")
            content = message.get("content")
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):
                parts.extend(p.get("text", "") for p in content if isinstance(p, dict))
        return "\n".join(parts)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return "\n".join(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        return "x" * len(prompt)  # token ids: one byte per token keeps the count right for the estimate
    raise _invalid("'prompt' must be a string, a list of strings or a list of token ids", "prompt")


def _optional_int(body: dict[str, Any], name: str, minimum: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _invalid(f"'{name}' must be an integer >= {minimum}", name)
    return value


def _priority(body: dict[str, Any], headers: dict[str, str]) -> int:
    raw: Any = headers.get("x-pdctl-priority", body.get("priority", int(RequestPriority.NORMAL)))
    if isinstance(raw, str):
        raw = PRIORITY_NAMES.get(raw.strip().lower(), raw.strip())
        try:
            raw = int(raw)
        except ValueError:
            raise _invalid(f"priority must be an integer or one of {', '.join(PRIORITY_NAMES)}", "priority") from None
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise _invalid("priority must be an integer", "priority")
    return raw


def _deadline(body: dict[str, Any], headers: dict[str, str]) -> float | None:
    raw: Any = headers.get("x-pdctl-deadline-ms", body.get("slo_deadline_ms"))
    if raw is None:
        return None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise _invalid("slo_deadline_ms must be a number of milliseconds", "slo_deadline_ms") from None
    if value <= 0:
        raise _invalid("slo_deadline_ms must be positive", "slo_deadline_ms")
    return value


def parse(body: Any, headers: dict[str, str], chat: bool, served_model: str) -> ParsedRequest:
    if not isinstance(body, dict):
        raise _invalid("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != served_model:
        raise HttpError(404, f"The model `{model}` does not exist.", "NotFoundError", param="model")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _invalid("'stream' must be true or false", "stream")
    max_tokens = _optional_int(body, "max_tokens", 1)
    if chat and max_tokens is None:
        max_tokens = _optional_int(body, "max_completion_tokens", 1)
    return ParsedRequest(
        body=body,
        chat=chat,
        text=prompt_text(body, chat),
        max_tokens=max_tokens,
        stream=stream,
        priority=_priority(body, headers),
        deadline_ms=_deadline(body, headers),
    )
