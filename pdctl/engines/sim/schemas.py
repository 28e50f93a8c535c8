"""The OpenAI shapes the sim reads and writes: requests lenient like vLLM's, responses in vLLM's field order."""

from __future__ import annotations

from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

FINGERPRINT = "pdctl-sim"

# -- requests: unknown fields are accepted, as vLLM accepts them -----------------------------------------


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class KVTransferParams(_Lenient):
    do_remote_decode: bool = False
    do_remote_prefill: bool = False
    remote_engine_id: str | None = None
    remote_request_id: str | None = None
    remote_host: str | None = None
    remote_port: int | None = None


class StreamOptions(_Lenient):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: usage (tokens generated so far) in every chunk


class GenerationRequest(_Lenient):
    """What /v1/completions and /v1/chat/completions both take; each says how its prompt and limit read."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    priority: int = 0
    kv_transfer_params: KVTransferParams | None = None

    def prompt_text(self) -> str:
        raise NotImplementedError

    def output_limit(self) -> int | None:
        return self.max_tokens

    def usage_at_end(self) -> bool:
        """A stream ends with a chunk of usage alone, and its other chunks carry `"usage": null`."""
        return bool(self.stream_options and self.stream_options.include_usage)

    def usage_in_every_chunk(self) -> bool:
        return bool(self.usage_at_end() and self.stream_options and self.stream_options.continuous_usage_stats)


class CompletionRequest(GenerationRequest):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class ContentPart(_Lenient):
    type: str
    text: str | None = None


class Message(_Lenient):
    role: str
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text or "" for part in self.content)
        return self.content or ""


class ChatCompletionRequest(GenerationRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def prompt_text(self) -> str:
        """The messages' contents, concatenated: the sim has no chat template."""
        return "".join(message.text() for message in self.messages)

    def output_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# -- responses: vLLM's; an overridden field keeps its base's place, so the bases fix the order ----------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = FINGERPRINT
    root: str
    parent: None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int
    prompt_tokens_details: None = None


ChoiceT = TypeVar("ChoiceT", bound=BaseModel)


class _Head(BaseModel):
    """The fields every response and stream chunk opens with; each kind fixes `object`."""

    id: str
    object: str
    created: int
    model: str


class GenerationResponse(_Head, Generic[ChoiceT]):
    choices: list[ChoiceT]
    service_tier: None = None
    system_fingerprint: str = FINGERPRINT
    usage: Usage


class GenerationChunk(_Head, Generic[ChoiceT]):
    system_fingerprint: str = FINGERPRINT
    choices: list[ChoiceT]
    usage: Usage | None = None


class CompletionStreamChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None = None
    stop_reason: None = None


class CompletionChoice(CompletionStreamChoice):
    prompt_logprobs: None = None


class CompletionResponse(GenerationResponse[CompletionChoice]):
    object: Literal["text_completion"] = "text_completion"
    kv_transfer_params: dict[str, Any] | None = None


class CompletionChunk(GenerationChunk[CompletionStreamChoice]):
    object: Literal["text_completion"] = "text_completion"


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    reasoning_content: None = None
    tool_calls: list[Any] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str | None = None
    stop_reason: None = None


class ChatCompletionResponse(GenerationResponse[ChatChoice]):
    object: Literal["chat.completion"] = "chat.completion"
    prompt_logprobs: None = None
    kv_transfer_params: dict[str, Any] | None = None


class ChatStreamChoice(BaseModel):
    index: int = 0
    delta: dict[str, str]
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionChunk(GenerationChunk[ChatStreamChoice]):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
