"""Request migration: a stream whose engine fails or stalls mid-stream goes on on another instance, from what the
client already has, so the client sees one stream with no token lost or repeated.

The router asks the engines for token ids (vLLM's `return_token_ids`) and keeps, per stream, the prompt's ids
and the ids of every token whose text has reached the client (a token whose text the engine still holds back,
an incomplete UTF-8 character, is not counted: it is generated again). The continuation is a completions
request for `prompt ids + those ids` with the remaining `max_tokens`, for chat requests too (the chat template
is already in the prompt ids), so at temperature 0 it yields the tokens the failed engine would have. Its
events are rewritten into the original stream's shape: its id, its creation time, chat deltas for a chat
request, usage counted from the original prompt.

Kept cheap on the hot path: a stream that never fails costs one regular-expression scan per event and a
substitution that hides the ids from a client that did not ask for them.
"""

from __future__ import annotations

import json
import re
from typing import Any

_PROMPT_IDS = re.compile(rb'"prompt_token_ids":\[([0-9, ]*)\]')
_TOKEN_IDS = re.compile(rb'"token_ids":\[([0-9, ]*)\]')
_HIDDEN_PROMPT_IDS = b'"prompt_token_ids":null'
_HIDDEN_TOKEN_IDS = b'"token_ids":null'
_EVENT_END = b"\n\n"
DONE_EVENT = b"data: [DONE]\n\n"
_DONE = b"data: [DONE]"
_ERROR_EVENT = b'data: {"error"'
MIGRATIONS_TRAILER = "x-pdctl-migrations"

# Fields that change what the tokens mean or how they are reported, where a continuation cannot promise the
# same stream: several choices, echoed prompts, log-probabilities, tools, structured output.
_BLOCKERS = (
    "echo",
    "logprobs",
    "top_logprobs",
    "prompt_logprobs",
    "tools",
    "functions",
    "response_format",
    "structured_outputs",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
)
# Chat fields that a completions request does not take: the chat template is already in the prompt's ids.
_CHAT_ONLY = (
    "messages",
    "tool_choice",
    "parallel_tool_calls",
    "chat_template",
    "chat_template_kwargs",
    "add_generation_prompt",
    "continue_final_message",
    "documents",
    "mm_processor_kwargs",
    "max_completion_tokens",
    "reasoning_effort",
    "include_reasoning",
    "user",
)


def why_not_migratable(body: dict[str, Any], chat: bool) -> str | None:
    """None when a stream of this request can be continued elsewhere, else why not."""
    if not body.get("stream"):
        return "not streamed (a failed request is retried whole instead)"
    if (body.get("n") or 1) > 1 or (body.get("best_of") or 1) > 1:
        return "several choices"
    if not chat and not isinstance(body.get("prompt"), str):
        prompt = body.get("prompt")
        if not (isinstance(prompt, list) and all(isinstance(p, int) for p in prompt)):
            return "several prompts"
    blocker = next((field for field in _BLOCKERS if body.get(field)), None)
    return f"'{blocker}' is set" if blocker else None


class StreamLedger:
    """What one stream has sent its client, in tokens, and how to continue it."""

    __slots__ = (
        "_base_tokens",
        "_continuing",
        "_head",
        "_resent",
        "chat",
        "committed",
        "done",
        "failed_event",
        "finished",
        "first_event",
        "ids",
        "migrations",
        "prompt_ids",
        "show_ids",
    )

    def __init__(self, chat: bool, show_ids: bool):
        self.chat = chat
        self.show_ids = show_ids  # the client asked for return_token_ids itself
        self.prompt_ids: list[int] | None = None
        self.ids: list[int] = []
        self.committed = 0  # ids whose text the client has
        self.finished = False  # an event carried a finish_reason
        self.done = False  # [DONE] went through
        self.failed_event: bytes | None = None  # an error event the engine sent instead of tokens
        # The first event, whose id, created and model a continuation's events take: parsed only if one comes.
        self.first_event: bytes | None = None
        self._head: dict[str, Any] = {}
        self.migrations = 0
        self._base_tokens = 0  # tokens the client had when the current continuation began
        self._continuing = False
        self._resent = 0  # tokens the continuation generates again whose (empty) events the client had

    # ---- the stream as it passes --------------------------------------------------------------------------

    def observe(self, chunk: bytes) -> bytes:
        """Take note of one upstream chunk; returns what the client gets (empty when nothing)."""
        if self._continuing:
            return b"".join(self._rewrite(event) for event in _events(chunk))
        if chunk.count(b"data: ") > 1:
            return b"".join(self._original(event) for event in _events(chunk))
        return self._original(chunk)

    def _end_of_stream(self, event: bytes) -> bytes | None:
        """What the client gets of an error event (nothing: the stream moves) or of [DONE]; None for others."""
        if event.startswith(_ERROR_EVENT):
            self.failed_event = event
            return b""
        if event.startswith(_DONE):
            self.done = True
            return event
        return None

    def _original(self, event: bytes) -> bytes:
        if (end := self._end_of_stream(event)) is not None:
            return end
        if self.first_event is None and event.startswith(b"data: {"):
            self.first_event = event
        found = _TOKEN_IDS.search(event)
        if found is not None:
            self._count(found.group(1), event)
        prompt = _PROMPT_IDS.search(event) if self.prompt_ids is None else None
        if prompt is not None:
            self.prompt_ids = _ints(prompt.group(1))
            if not self.show_ids:
                event = _PROMPT_IDS.sub(_HIDDEN_PROMPT_IDS, event, count=1)
                found = _TOKEN_IDS.search(event)
        if self.show_ids or found is None:
            return event
        start, end = found.span()  # cut, not sub(): no second search on the hot path
        return event[:start] + _HIDDEN_TOKEN_IDS + event[end:]

    def _count(self, ids: bytes, event: bytes) -> None:
        if ids:
            if b"," in ids:
                self.ids.extend(_ints(ids))
            else:
                self.ids.append(int(ids))
        if b'"finish_reason":null' not in event:
            self.finished = True
            self.committed = len(self.ids)
        elif _has_text(event):
            self.committed = len(self.ids)

    def trailers(self) -> dict[str, str]:
        """Sent after the stream's last chunk: how many times it moved."""
        return {MIGRATIONS_TRAILER: str(self.migrations)}

    # ---- continuing -----------------------------------------------------------------------------------------

    @property
    def can_continue(self) -> bool:
        return self.prompt_ids is not None and self.first_event is not None and not self.done

    def continuation(self, body: dict[str, Any], max_tokens: int | None, kv_field: str) -> dict[str, Any] | None:
        """The completions request that continues this stream (None: nothing is left to generate). The tokens
        whose text the client does not have yet are dropped: the continuation generates them again. kv_field:
        the engine's KV hand-off field, never sent on: the continuation prefills on its own instance."""
        assert self.prompt_ids is not None and self.first_event is not None
        self._head = _head_of(self.first_event) or {}
        self._resent = len(self.ids) - self.committed
        del self.ids[self.committed :]
        remaining = None if max_tokens is None else max_tokens - self.committed
        if self.finished or remaining == 0:
            return None
        continued = {k: v for k, v in body.items() if k not in _CHAT_ONLY and k != kv_field}
        continued.update(prompt=self.prompt_ids + self.ids, max_tokens=remaining, return_token_ids=True)
        if isinstance(body.get("min_tokens"), int):
            continued["min_tokens"] = max(0, body["min_tokens"] - self.committed)
        self._continuing = True
        self._base_tokens = self.committed
        self.failed_event = None
        self.migrations += 1
        return continued

    def restart(self) -> None:
        """The request starts again whole elsewhere: the new stream is judged on its own events, not on the error
        event that ended the last one (which would end the new one at its first chunk, that chunk lost)."""
        self.failed_event = None
        self.migrations += 1

    def closing_events(self) -> bytes:
        """The end of a stream whose every token the client already has (the engine failed after its last token,
        before its finish event)."""
        choice: dict[str, Any] = {"index": 0, "finish_reason": "length"}
        choice.update({"delta": {}} if self.chat else {"text": ""})
        return _data(self._shape({"choices": [choice]})) + DONE_EVENT

    def _rewrite(self, event: bytes) -> bytes:
        """One event of a continuation (a completions stream) in the original stream's shape."""
        if (end := self._end_of_stream(event)) is not None:
            return end
        if not event.startswith(b"data: {"):
            return event
        data = json.loads(event[6:])
        choices = [shaped for choice in data.get("choices", []) if (shaped := self._choice(choice)) is not None]
        if data.get("choices") and not choices:
            return b""
        shaped = self._shape({"choices": choices})
        if data.get("usage"):
            shaped["usage"] = self._usage(data["usage"])
        if data.get("system_fingerprint"):
            shaped["system_fingerprint"] = data["system_fingerprint"]
        return _data(shaped)

    def _choice(self, choice: dict[str, Any]) -> dict[str, Any] | None:
        """One choice in the original shape; None for a token generated again whose event the client had."""
        ids = choice.get("token_ids") or []
        self.ids.extend(ids)
        text = choice.get("text") or ""
        finish = choice.get("finish_reason")
        if finish is not None:
            self.finished = True
        if text or self.finished:
            self.committed = len(self.ids)
        if self._resent:
            repeated = min(self._resent, len(ids))
            self._resent -= repeated
            ids = ids[repeated:]
            if not ids and not text and finish is None:
                return None
        shown_ids = ids if self.show_ids else None
        if not self.chat:
            return {**choice, "prompt_token_ids": None, "token_ids": shown_ids}
        shaped: dict[str, Any] = {
            "index": choice.get("index", 0),
            "delta": {"content": text},
            "logprobs": None,
            "finish_reason": finish,
        }
        if finish is not None:
            shaped["stop_reason"] = choice.get("stop_reason")
        shaped["token_ids"] = shown_ids
        return shaped

    def _usage(self, usage: dict[str, Any]) -> dict[str, Any]:
        prompt = len(self.prompt_ids or ())
        completion = self._base_tokens + int(usage.get("completion_tokens") or 0)
        return {"prompt_tokens": prompt, "total_tokens": prompt + completion, "completion_tokens": completion}

    def _shape(self, fields: dict[str, Any]) -> dict[str, Any]:
        head = self._head
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {
            "id": head.get("id"),
            "object": kind,
            "created": head.get("created"),
            "model": head.get("model"),
            **fields,
        }


def error_message(event: bytes) -> str:
    """The message of an engine's error event, for the log and the client's error event."""
    try:
        return str(json.loads(event[6:])["error"]["message"])[:300]
    except (ValueError, KeyError, TypeError):
        return event[:300].decode(errors="replace")


def _events(chunk: bytes) -> list[bytes]:
    parts = chunk.split(_EVENT_END)
    return [part + _EVENT_END for part in parts if part]


def _ints(raw: bytes) -> list[int]:
    return [int(x) for x in raw.split(b",")] if raw.strip() else []


def _has_text(event: bytes) -> bool:
    for key in (b'"text":"', b'"content":"'):
        at = event.find(key)
        if at >= 0:
            return event[at + len(key) : at + len(key) + 1] != b'"'
    return False


def _head_of(event: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(event[6:])
    except ValueError:
        return None
    return {key: data.get(key) for key in ("id", "created", "model")} if isinstance(data, dict) else None


def _data(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode() + _EVENT_END
