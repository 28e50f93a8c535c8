"""`engine: sim`: an emulator of vLLM's OpenAI server, for clusters of many instances in tests and benchmarks.

It is never the real thing and says so: every response carries `"system_fingerprint": "pdctl-sim"`, /metrics
opens with a `# pdctl-sim` line, and the log's first line names it. It emulates what pdctl relies on: the
OpenAI endpoints (plain and streamed, in vLLM's shapes), vLLM's metric names, a prefix cache,
--max-num-seqs admission with vLLM's priority order, --api-key (or VLLM_API_KEY) guarding /v1 as vLLM's
does, and the NixlConnector's two-hop flow, where the decode sim "reads the KV cache" of the prefill sim by
pulling it over HTTP (unguarded, as NIXL's side channel is).

Tokens are prompt bytes, as with the builtin model's byte-level tokenizer; output tokens are words derived
from a hash of the prompt. Compute is slept: per prompt token computed, then per output token; or, with
--hardware, as pdctl's engine model times each step of vLLM's scheduler (pdctl.perfmodel).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import heapq
import itertools
import logging
import os
import random
import signal
import time
import uuid
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pdctl.auth import VLLM_KEY_ENV, vllm_guarded
from pdctl.httpserver import (
    DEFAULT_MAX_BODY_BYTES,
    Handler,
    HttpError,
    HttpServer,
    Request,
    Response,
    StreamingResponse,
    json_response,
)

if TYPE_CHECKING:
    import httpx

    from pdctl.perfmodel.live import LiveEngine

log = logging.getLogger("pdctl.engines.sim")

FINGERPRINT = "pdctl-sim"
BLOCK_SIZE = 16
DEFAULT_MAX_TOKENS = 16
# The sim holds no tensors; transfers are sized as if each token's K and V took this much.
KV_BYTES_PER_TOKEN = 4096
# vLLM's VLLM_NIXL_ABORT_REQUEST_TIMEOUT: a prefill instance frees KV that no decode instance read by then.
KV_HOLD_S = 480.0
KV_PULL_PATH = "/_sim/kv_pull"
# vLLM's NixlPromMetrics buckets.
XFER_TIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 5.0)
XFER_BYTES_BUCKETS = tuple(float(2 ** (10 + i)) for i in range(1, 25, 2))
WORDS = (
    "the", "a", "of", "and", "to", "in", "is", "it", "on", "for", "as", "at", "by", "we", "an", "or",
    "sky", "sea", "sun", "tree", "road", "city", "song", "rain", "fire", "stone", "light", "wind",
    "blue", "green", "quiet", "bright",
)  # fmt: skip

Role = Literal["prefill", "decode", "hybrid"]


# -- request shapes: lenient like vLLM's (unknown fields are accepted) --------------------------------------


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


class _GenerationRequest(_Lenient):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    priority: int = 0
    kv_transfer_params: KVTransferParams | None = None


class CompletionRequest(_GenerationRequest):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class ContentPart(_Lenient):
    type: str
    text: str | None = None


class Message(_Lenient):
    role: str
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(_GenerationRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def prompt_text(self) -> str:
        """The messages' contents, concatenated: the sim has no chat template."""
        return "".join(_content_text(message.content) for message in self.messages)


def _content_text(content: str | list[ContentPart] | None) -> str:
    if isinstance(content, list):
        return "".join(part.text or "" for part in content)
    return content or ""


# -- response shapes: vLLM's ------------------------------------------------------------------------------


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


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None = None
    stop_reason: None = None
    prompt_logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    service_tier: None = None
    system_fingerprint: str = FINGERPRINT
    usage: Usage
    kv_transfer_params: dict[str, Any] | None = None


class CompletionStreamChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None = None
    stop_reason: None = None


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str = FINGERPRINT
    choices: list[CompletionStreamChoice]
    usage: Usage | None = None


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


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    service_tier: None = None
    system_fingerprint: str = FINGERPRINT
    usage: Usage
    prompt_logprobs: None = None
    kv_transfer_params: dict[str, Any] | None = None


class ChatStreamChoice(BaseModel):
    index: int = 0
    delta: dict[str, str]
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str = FINGERPRINT
    choices: list[ChatStreamChoice]
    usage: Usage | None = None


_RequestT = TypeVar("_RequestT", bound=_GenerationRequest)


# -- the engine's parts -----------------------------------------------------------------------------------


def block_hashes(tokens: bytes) -> list[bytes]:
    """One hash per full block, each chained over the prompt so far, as vLLM keys its prefix cache."""
    hashes: list[bytes] = []
    parent = b""
    for start in range(0, len(tokens) - BLOCK_SIZE + 1, BLOCK_SIZE):
        parent = hashlib.blake2b(parent + tokens[start : start + BLOCK_SIZE], digest_size=16).digest()
        hashes.append(parent)
    return hashes


def prompt_digest(tokens: bytes) -> str:
    return hashlib.blake2b(tokens, digest_size=16).hexdigest()


def output_words(tokens: bytes, count: int) -> list[str]:
    """The same prompt gives the same words on every instance, so a split request matches a whole one."""
    rng = random.Random(int.from_bytes(hashlib.blake2b(tokens, digest_size=8).digest()))
    return [" " + rng.choice(WORDS) for _ in range(count)]


def _blocks(tokens: int) -> int:
    return -(-tokens // BLOCK_SIZE)


class PrefixCache:
    """vLLM's automatic prefix caching in miniature: block hashes, least recently used evicted first."""

    def __init__(self, capacity_blocks: int):
        self.capacity = capacity_blocks
        self._blocks: OrderedDict[bytes, None] = OrderedDict()

    def match(self, hashes: list[bytes]) -> int:
        """How many leading blocks are cached; those become the most recently used."""
        hits = 0
        for block in hashes:
            if block not in self._blocks:
                break
            self._blocks.move_to_end(block)
            hits += 1
        return hits

    def insert(self, hashes: list[bytes]) -> None:
        for block in hashes:
            self._blocks[block] = None
            self._blocks.move_to_end(block)
        while len(self._blocks) > self.capacity:
            self._blocks.popitem(last=False)


class Admission:
    """At most `limit` requests run; the others wait, lowest `priority` first (vLLM's priority scheduling),
    in arrival order among equals."""

    def __init__(self, limit: int):
        self._free = limit
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._arrivals = itertools.count()

    async def acquire(self, priority: int) -> None:
        if self._free and not self._waiters:
            self._free -= 1
            return
        entry = (priority, next(self._arrivals), asyncio.get_running_loop().create_future())
        heapq.heappush(self._waiters, entry)
        try:
            await entry[2]
        except asyncio.CancelledError:
            if entry[2].done() and not entry[2].cancelled():
                self.release()  # granted a slot, but gone before taking it
            else:
                self._waiters.remove(entry)
                heapq.heapify(self._waiters)
            raise

    def release(self) -> None:
        while self._waiters:
            waiter = heapq.heappop(self._waiters)[2]
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1


class Histogram:
    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        index = bisect_left(self.bounds, value)
        if index < len(self.bounds):
            self.counts[index] += 1

    def samples(self, labels: str) -> Iterator[tuple[str, str, float]]:
        cumulative = 0
        for bound, count in zip(self.bounds, self.counts, strict=True):
            cumulative += count
            yield "_bucket", f'{labels},le="{bound}"', cumulative
        yield "_bucket", f'{labels},le="+Inf"', self.count
        yield "_count", labels, self.count
        yield "_sum", labels, self.sum


# (name, help, Metrics attribute, label of a labelled counter's keys)
COUNTERS = (
    ("vllm:prefix_cache_queries_total", "Prefix cache queries, in terms of number of queried tokens.",
     "prefix_cache_queries", None),
    ("vllm:prefix_cache_hits_total", "Prefix cache hits, in terms of number of cached tokens.",
     "prefix_cache_hits", None),
    ("vllm:prompt_tokens_total", "Number of prefill tokens processed.", "prompt_tokens", None),
    ("vllm:prompt_tokens_by_source_total", "Number of prompt tokens by source.", "prompt_tokens_by_source",
     "source"),
    ("vllm:prompt_tokens_cached_total", "Number of cached prompt tokens (local + external).",
     "prompt_tokens_cached", None),
    ("vllm:generation_tokens_total", "Number of generation tokens processed.", "generation_tokens", None),
    ("vllm:num_preemptions_total", "Cumulative number of preemption from the engine.", "preemptions", None),
    ("vllm:request_success_total", "Count of successfully processed requests.", "request_success",
     "finished_reason"),
    ("vllm:nixl_num_failed_transfers_total", "Number of failed NIXL KV Cache transfers.",
     "nixl_failed_transfers", None),
    ("vllm:nixl_num_kv_expired_reqs_total", "Number of requests that had their KV expire.",
     "nixl_expired_requests", None),
)  # fmt: skip
HISTOGRAMS = (
    ("vllm:nixl_xfer_time_seconds", "Histogram of transfer duration for NIXL KV Cache transfers.",
     "nixl_xfer_time"),
    ("vllm:nixl_bytes_transferred", "Histogram of bytes transferred per NIXL KV Cache transfers.", "nixl_bytes"),
)  # fmt: skip


@dataclass
class Metrics:
    """vLLM's counters and histograms; gauges are read from the engine when rendered."""

    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    prompt_tokens_by_source: dict[str, int] = field(
        default_factory=lambda: {"local_compute": 0, "local_cache_hit": 0, "external_kv_transfer": 0}
    )
    request_success: dict[str, int] = field(default_factory=lambda: {"stop": 0, "length": 0, "abort": 0})
    # The sim admits by --max-num-seqs alone and never runs out of blocks mid-request, so it never preempts.
    preemptions: int = 0
    nixl_xfer_time: Histogram = field(default_factory=lambda: Histogram(XFER_TIME_BUCKETS))
    nixl_bytes: Histogram = field(default_factory=lambda: Histogram(XFER_BYTES_BUCKETS))
    nixl_failed_transfers: int = 0
    nixl_expired_requests: int = 0

    @property
    def prompt_tokens_cached(self) -> int:
        return self.prompt_tokens_by_source["local_cache_hit"] + self.prompt_tokens_by_source["external_kv_transfer"]

    def count_prompt(self, tokens: int, cache_hit: int, external: int) -> None:
        self.prefix_cache_queries += tokens
        self.prefix_cache_hits += cache_hit
        self.prompt_tokens += tokens
        self.prompt_tokens_by_source["local_cache_hit"] += cache_hit
        self.prompt_tokens_by_source["external_kv_transfer"] += external
        self.prompt_tokens_by_source["local_compute"] += tokens - cache_hit - external

    def render(self, labels: str, gauges: dict[str, tuple[str, float]], cache_blocks: int) -> str:
        """Prometheus text format, as vLLM's /metrics writes it (labels: model_name, engine)."""
        lines = ["# pdctl-sim: emulated by engine: sim, not measured on vLLM"]
        for name, (doc, value) in gauges.items():
            _family(lines, name, "gauge", doc, [("", labels, value)])
        cache_labels = f'block_size="{BLOCK_SIZE}",engine="0",num_gpu_blocks="{cache_blocks}"'
        _family(lines, "vllm:cache_config_info", "gauge", "Information of the LLMEngine CacheConfig",
                [("", cache_labels, 1)])  # fmt: skip
        for name, doc, attribute, key_label in COUNTERS:
            value = getattr(self, attribute)
            samples = (
                [("", f'{labels},{key_label}="{key}"', count) for key, count in value.items()]
                if key_label
                else [("", labels, value)]
            )
            _family(lines, name, "counter", doc, samples)
        for name, doc, attribute in HISTOGRAMS:
            _family(lines, name, "histogram", doc, getattr(self, attribute).samples(labels))
        return "\n".join(lines) + "\n"


def _family(lines: list[str], name: str, kind: str, doc: str, samples: Iterable[tuple[str, str, float]]) -> None:
    lines.append(f"# HELP {name} {doc}")
    lines.append(f"# TYPE {name} {kind}")
    lines.extend(f"{name}{suffix}{{{labels}}} {float(value)!r}" for suffix, labels, value in samples)


def _label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


@dataclass(frozen=True)
class SimConfig:
    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    role: Role = "hybrid"
    prefill_ms_per_token: float = 0.05
    decode_ms_per_token: float = 10.0
    startup_delay_s: float = 0.0
    max_num_seqs: int = 256
    kv_cache_blocks: int = 4096
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # Set: pdctl's engine model times every step (vLLM's scheduler, the batch's shape on this hardware).
    hardware: str | None = None
    architecture: str | None = None
    tensor_parallel_size: int = 1
    max_num_batched_tokens: int | None = None  # the hardware profile's vLLM default when unset
    scheduling_policy: Literal["fcfs", "priority"] = "fcfs"
    speed: float | None = None  # steps take this many times the model's time; drawn from its noise when unset
    api_keys: tuple[str, ...] = ()  # none: no key asked
    stream_interval: int = 1  # vLLM's --stream-interval: tokens a stream event carries after the first


@dataclass
class _Job:
    """One generation request, as the engine sees it."""

    id: str
    tokens: bytes
    max_tokens: int
    priority: int
    kv: KVTransferParams | None


@dataclass
class _HeldKV:
    """A finished prefill's blocks, kept for the decode instance that will read them."""

    digest: str
    num_tokens: int
    blocks: int
    since: float


# -- the engine -------------------------------------------------------------------------------------------


def _live_engine(config: SimConfig) -> LiveEngine:
    """The engine model for this instance (imported only when a hardware profile asks for it)."""
    from pdctl.perfmodel.arch import get_model
    from pdctl.perfmodel.hardware import get_hardware
    from pdctl.perfmodel.live import LiveEngine as Live
    from pdctl.perfmodel.scheduler import Engine, EngineConfig
    from pdctl.perfmodel.steptime import StepModel

    assert config.hardware is not None
    hardware = get_hardware(config.hardware)
    model = StepModel(get_model(config.architecture or config.model), hardware, tp=config.tensor_parallel_size)
    budget = config.max_num_batched_tokens or hardware.default_max_num_batched_tokens
    # Seeded by the port: the instances' step noise differs, and a run repeats.
    engine_config = EngineConfig(max_num_seqs=config.max_num_seqs, max_num_batched_tokens=budget,
                                 policy=config.scheduling_policy, block_size=BLOCK_SIZE,
                                 seed=config.port, speed=config.speed)  # fmt: skip
    return Live(Engine(model, engine_config))


class SimEngine:
    def __init__(self, config: SimConfig):
        self.config = config
        self.engine_id = str(uuid.uuid4())
        self.metrics = Metrics()
        self.server = HttpServer(
            vllm_guarded(self.handle, list(config.api_keys)), config.host, config.port, config.max_body_bytes
        )
        self._created = int(time.time())
        self._labels = f'model_name="{_label_value(config.model)}",engine="0"'
        self._cache = PrefixCache(config.kv_cache_blocks)
        self._admission = Admission(config.max_num_seqs)
        # Made on the first KV read: importing httpx is a third of a sim's start-up, and only decode sims read.
        self._http: httpx.AsyncClient | None = None
        self._held: dict[str, _HeldKV] = {}
        self._live = _live_engine(config) if config.hardware else None
        self._next_block = 0
        self._running = 0
        self._waiting = 0
        self._blocks_in_use = 0
        self._routes: dict[tuple[str, str], Handler] = {
            ("GET", "/health"): self._health,
            ("GET", "/v1/models"): self._models,
            ("GET", "/metrics"): self._metrics,
            ("POST", "/v1/completions"): self._completions,
            ("POST", "/v1/chat/completions"): self._chat_completions,
            ("POST", KV_PULL_PATH): self._kv_pull,
        }

    async def start(self) -> None:
        if self._live is not None:
            self._live.start()
        await self.server.start()

    async def stop(self) -> None:
        await self.server.stop()
        if self._live is not None:
            await self._live.stop()
        if self._http is not None:
            await self._http.aclose()

    async def handle(self, request: Request) -> Response | StreamingResponse:
        route = self._routes.get((request.method, request.path))
        if route is None:
            raise HttpError(404, f"{request.method} {request.path} is not served", "NotFoundError")
        return await route(request)

    # -- endpoints ----------------------------------------------------------------------------------------

    async def _health(self, request: Request) -> Response:
        return Response(200)

    async def _models(self, request: Request) -> Response:
        card = ModelCard(id=self.config.model, created=self._created, root=self.config.model)
        return json_response(ModelList(data=[card]).model_dump())

    async def _metrics(self, request: Request) -> Response:
        self._expire_held_kv()
        held = sum(kv.blocks for kv in self._held.values())
        usage = min(1.0, (self._blocks_in_use + held) / self.config.kv_cache_blocks)
        running, waiting = self._running, self._waiting
        if self._live is not None:
            engine = self._live.engine
            running, waiting, usage = len(engine.running), engine.waiting, engine.pool.usage
        gauges = {
            "vllm:num_requests_running": ("Number of requests in model execution batches.", running),
            "vllm:num_requests_waiting": ("Number of requests waiting to be processed.", waiting),
            "vllm:kv_cache_usage_perc": ("KV-cache usage. 1 means 100 percent usage.", usage),
        }
        text = self.metrics.render(self._labels, gauges, self.config.kv_cache_blocks)
        return Response(200, text.encode(), content_type="text/plain; version=0.0.4; charset=utf-8")

    async def _completions(self, request: Request) -> Response | StreamingResponse:
        params = self._parse(request, CompletionRequest)
        job = self._job("cmpl", params.prompt_text(), params.max_tokens, params)
        if params.stream:
            return _sse(self._completion_chunks(job, params))
        text, kv = await self._generate_all(job)
        choice = CompletionChoice(text=text, finish_reason="length")
        response = CompletionResponse(
            id=job.id,
            created=int(time.time()),
            model=params.model,
            choices=[choice],
            usage=_usage(job),
            kv_transfer_params=kv,
        )
        return json_response(response.model_dump())

    async def _chat_completions(self, request: Request) -> Response | StreamingResponse:
        params = self._parse(request, ChatCompletionRequest)
        job = self._job("chatcmpl", params.prompt_text(), params.max_completion_tokens or params.max_tokens, params)
        if params.stream:
            return _sse(self._chat_chunks(job, params))
        text, kv = await self._generate_all(job)
        choice = ChatChoice(message=AssistantMessage(content=text), finish_reason="length")
        response = ChatCompletionResponse(
            id=job.id,
            created=int(time.time()),
            model=params.model,
            choices=[choice],
            usage=_usage(job),
            kv_transfer_params=kv,
        )
        return json_response(response.model_dump())

    async def _kv_pull(self, request: Request) -> Response:
        """The decode sim reads a finished prefill's KV: the NIXL read, over HTTP. Once read, it is freed."""
        body = request.json()
        if not isinstance(body, dict):
            raise HttpError(400, "expected a JSON object", "BadRequestError")
        request_id = body.get("remote_request_id")
        if body.get("remote_engine_id") != self.engine_id or request_id not in self._held:
            raise HttpError(404, f"no KV held for request {request_id!r} on engine {self.engine_id}", "NotFoundError")
        held = self._held.pop(request_id)
        return json_response({"num_tokens": held.num_tokens, "prompt_digest": held.digest})

    # -- generation ---------------------------------------------------------------------------------------

    def _parse(self, request: Request, shape: type[_RequestT]) -> _RequestT:
        try:
            params = shape.model_validate(request.json())
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(part) for part in error["loc"]) or "body"
            raise HttpError(400, f"{where}: {error['msg']}", "BadRequestError", param=where) from None
        if params.model != self.config.model:
            raise HttpError(404, f"The model `{params.model}` does not exist.", "NotFoundError", param="model")
        return params

    def _job(self, kind: str, prompt: str, max_tokens: int | None, params: _GenerationRequest) -> _Job:
        # A hybrid instance has no KV connector, so, like vLLM without one, it ignores kv_transfer_params.
        kv = params.kv_transfer_params if self.config.role != "hybrid" else None
        max_tokens = max_tokens or DEFAULT_MAX_TOKENS
        return _Job(f"{kind}-{uuid.uuid4().hex}", prompt.encode(), max_tokens, params.priority, kv)

    async def _generate_all(self, job: _Job) -> tuple[str, dict[str, Any] | None]:
        async with contextlib.aclosing(self._generate(job)) as words:
            text = "".join([word async for word in words])
        kv = self._hold_kv(job) if job.kv is not None and job.kv.do_remote_decode else None
        return text, kv

    async def _generate(self, job: _Job) -> AsyncGenerator[str, None]:
        """The request's output words as they are produced; closing it early aborts the request."""
        if self._live is not None:
            async for word in self._generate_modelled(job, self._live):
                yield word
            return
        hashes = block_hashes(job.tokens)
        # vLLM always computes a prompt's last token, so a cache hit stops short of it.
        cache_hit = self._cache.match(hashes[: (len(job.tokens) - 1) // BLOCK_SIZE]) * BLOCK_SIZE
        self._waiting += 1
        try:
            external = await self._read_remote_kv(job, cache_hit)
            await self._admission.acquire(job.priority)
        finally:
            self._waiting -= 1
        blocks = _blocks(len(job.tokens) + job.max_tokens)
        self._running += 1
        self._blocks_in_use += blocks
        finish_reason = "abort"
        try:
            self.metrics.count_prompt(len(job.tokens), cache_hit, external)
            computed = len(job.tokens) - cache_hit - external
            await asyncio.sleep(computed * self.config.prefill_ms_per_token / 1000)
            self._cache.insert(hashes)
            for word in output_words(job.tokens, job.max_tokens):
                await asyncio.sleep(self.config.decode_ms_per_token / 1000)
                self.metrics.generation_tokens += 1
                yield word
            finish_reason = "length"
        finally:
            self._running -= 1
            self._blocks_in_use -= blocks
            self._admission.release()
            self.metrics.request_success[finish_reason] += 1

    async def _generate_modelled(self, job: _Job, live: LiveEngine) -> AsyncGenerator[str, None]:
        """The engine model decides when each token is ready: vLLM's scheduler over every request here."""
        from pdctl.perfmodel.scheduler import EngineRequest

        external = await self._read_remote_kv(job, 0)
        if external:
            await asyncio.sleep(live.engine.model.kv_transfer_seconds(external))
        hashes = [hash(block) for block in block_hashes(job.tokens)]
        request = EngineRequest(job.id, len(job.tokens), job.max_tokens, priority=job.priority, block_hashes=hashes,
                                external_tokens=external)  # fmt: skip
        tokens = live.submit(request)  # the model's API server takes it in before the scheduler sees it
        finish_reason = "abort"
        try:
            for index, word in enumerate(output_words(job.tokens, job.max_tokens)):
                await tokens.get()
                if index == 0:
                    self.metrics.count_prompt(len(job.tokens), request.cached_tokens, external)
                self.metrics.generation_tokens += 1
                yield word
            finish_reason = "length"
        finally:
            live.abort(request)
            self.metrics.request_success[finish_reason] += 1

    async def _read_remote_kv(self, job: _Job, cache_hit: int) -> int:
        """Prompt tokens whose KV came from the prefill instance; 0 when it could not be read, and then the
        prompt is computed here (vLLM's fallback)."""
        kv = job.kv
        if kv is None or not kv.do_remote_prefill:
            return 0
        if not (kv.remote_host and kv.remote_port and kv.remote_request_id):
            return self._transfer_failed(job, "kv_transfer_params do not say where it is")
        import httpx

        if self._http is None:
            self._http = httpx.AsyncClient(timeout=httpx.Timeout(10.0, connect=2.0))
        started = time.perf_counter()
        try:
            response = await self._http.post(
                f"http://{kv.remote_host}:{kv.remote_port}{KV_PULL_PATH}",
                json={"remote_engine_id": kv.remote_engine_id, "remote_request_id": kv.remote_request_id},
            )
            response.raise_for_status()
            held = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            return self._transfer_failed(job, f"could not read it: {exc!r}")
        if held.get("prompt_digest") != prompt_digest(job.tokens):
            return self._transfer_failed(job, "it is another prompt's")
        external = len(job.tokens) - cache_hit
        self.metrics.nixl_xfer_time.observe(time.perf_counter() - started)
        self.metrics.nixl_bytes.observe(external * KV_BYTES_PER_TOKEN)
        return external

    def _transfer_failed(self, job: _Job, why: str) -> int:
        self.metrics.nixl_failed_transfers += 1
        log.warning(
            "request %s: KV of remote request %s not transferred (%s); recomputing the prompt here",
            job.id,
            job.kv.remote_request_id if job.kv else None,
            why,
        )
        return 0

    def _hold_kv(self, job: _Job) -> dict[str, Any]:
        """Keeps a finished prefill's blocks for the decode instance; the response tells it where they are."""
        self._expire_held_kv()
        blocks = _blocks(len(job.tokens))
        block_ids = [(self._next_block + i) % self.config.kv_cache_blocks for i in range(blocks)]
        self._next_block = (self._next_block + blocks) % self.config.kv_cache_blocks
        self._held[job.id] = _HeldKV(prompt_digest(job.tokens), len(job.tokens), blocks, time.monotonic())
        return {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_block_ids": [block_ids],
            "remote_engine_id": self.engine_id,
            "remote_request_id": job.id,
            "remote_host": self.config.host,
            "remote_port": self.server.port,
            "tp_size": 1,
            "remote_num_tokens": len(job.tokens),
        }

    def _expire_held_kv(self) -> None:
        deadline = time.monotonic() - KV_HOLD_S
        # Held in arrival order, so the expired ones are at the front.
        expired = list(itertools.takewhile(lambda request_id: self._held[request_id].since < deadline, self._held))
        for request_id in expired:
            del self._held[request_id]
        self.metrics.nixl_expired_requests += len(expired)

    # -- streaming ----------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _events(self, job: _Job) -> AsyncIterator[AsyncGenerator[list[str], None]]:
        """The request's words grouped into stream events; leaving early aborts the request."""
        words = self._generate(job)
        events = _in_events(words, self.config.stream_interval)
        async with contextlib.aclosing(words), contextlib.aclosing(events):
            yield events

    async def _completion_chunks(self, job: _Job, params: CompletionRequest) -> AsyncGenerator[str, None]:
        include_usage = bool(params.stream_options and params.stream_options.include_usage)
        exclude = None if include_usage else {"usage"}
        created = int(time.time())
        every_chunk = _chunk_usage(params)
        async with self._events(job) as events:
            index = 0
            async for words in events:
                index += len(words)
                choice = CompletionStreamChoice(text="".join(words), finish_reason=_finish(index, job))
                chunk = CompletionChunk(id=job.id, created=created, model=params.model, choices=[choice],
                                        usage=_usage(job, index) if every_chunk else None)  # fmt: skip
                yield chunk.model_dump_json(exclude=exclude)
        if include_usage:
            last = CompletionChunk(id=job.id, created=created, model=params.model, choices=[], usage=_usage(job))
            yield last.model_dump_json()

    async def _chat_chunks(self, job: _Job, params: ChatCompletionRequest) -> AsyncGenerator[str, None]:
        include_usage = bool(params.stream_options and params.stream_options.include_usage)
        exclude = None if include_usage else {"usage"}
        created = int(time.time())

        def chunk(choices: list[ChatStreamChoice], usage: Usage | None = None) -> str:
            message = ChatCompletionChunk(id=job.id, created=created, model=params.model, choices=choices, usage=usage)
            return message.model_dump_json(exclude=None if usage else exclude)

        every_chunk = _chunk_usage(params)
        async with self._events(job) as events:
            yield chunk([ChatStreamChoice(delta={"role": "assistant", "content": ""})])
            index = 0
            async for words in events:
                index += len(words)
                yield chunk([ChatStreamChoice(delta={"content": "".join(words)}, finish_reason=_finish(index, job))],
                            _usage(job, index) if every_chunk else None)  # fmt: skip
        if include_usage:
            yield chunk([], _usage(job))


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


def _finish(index: int, job: _Job) -> str | None:
    return "length" if index == job.max_tokens else None


def _chunk_usage(params: _GenerationRequest) -> bool:
    options = params.stream_options
    return bool(options and options.include_usage and options.continuous_usage_stats)


def _usage(job: _Job, generated: int | None = None) -> Usage:
    prompt = len(job.tokens)
    completion = job.max_tokens if generated is None else generated
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _sse(events: AsyncGenerator[str, None]) -> StreamingResponse:
    return StreamingResponse(chunks=_sse_frames(events), headers={"cache-control": "no-cache"})


async def _sse_frames(events: AsyncGenerator[str, None]) -> AsyncGenerator[bytes, None]:
    async with contextlib.aclosing(events):
        async for event in events:
            yield f"data: {event}\n\n".encode()
    yield b"data: [DONE]\n\n"


# -- the process ------------------------------------------------------------------------------------------


async def serve(config: SimConfig) -> None:
    """Runs until SIGTERM or SIGINT. Like vLLM, it does not listen before it is "loaded" (the start-up delay)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    log.info(
        "pdctl sim engine (emulator, not vLLM): role=%s starting, listening in %g s",
        config.role,
        config.startup_delay_s,
    )
    if config.startup_delay_s > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), config.startup_delay_s)
    if stop.is_set():
        return
    engine = SimEngine(config)
    await engine.start()
    log.info(
        "pdctl sim engine (emulator, not vLLM): role=%s model=%s listening on http://%s:%d",
        config.role,
        config.model,
        config.host,
        engine.server.port,
    )
    try:
        await stop.wait()
    finally:
        await engine.stop()


def parse_args(argv: list[str] | None = None) -> SimConfig:
    parser = argparse.ArgumentParser(prog="python -m pdctl.engines.sim", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", required=True)
    parser.add_argument("--role", choices=["prefill", "decode", "hybrid"], default="hybrid")
    parser.add_argument("--prefill-ms-per-token", type=float, default=0.05)
    parser.add_argument("--decode-ms-per-token", type=float, default=10.0)
    parser.add_argument("--startup-delay-s", type=float, default=0.0)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--kv-cache-blocks", type=int, default=4096)
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    parser.add_argument("--hardware", help="a hardware profile: time steps with pdctl's engine model")
    parser.add_argument("--architecture", help="the model architecture the engine model computes")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--max-num-batched-tokens", type=int)
    parser.add_argument("--scheduling-policy", choices=["fcfs", "priority"], default="fcfs")
    parser.add_argument("--speed", type=float, help="steps take this many times the model's time")
    parser.add_argument("--api-key", nargs="+", help="keys /v1 asks for, as vLLM's (default $VLLM_API_KEY)")
    parser.add_argument("--stream-interval", type=_positive, default=1, help="as vLLM's: tokens per stream event")
    # Unknown arguments are an error (exit 2), as they are to vLLM.
    args = parser.parse_args(argv)
    if args.hardware:
        _check_model_args(parser, args)
    return SimConfig(
        model=args.served_model_name,
        host=args.host,
        port=args.port,
        role=args.role,
        prefill_ms_per_token=args.prefill_ms_per_token,
        decode_ms_per_token=args.decode_ms_per_token,
        startup_delay_s=args.startup_delay_s,
        max_num_seqs=args.max_num_seqs,
        kv_cache_blocks=args.kv_cache_blocks,
        max_body_bytes=args.max_body_bytes,
        hardware=args.hardware,
        architecture=args.architecture,
        tensor_parallel_size=args.tensor_parallel_size,
        max_num_batched_tokens=args.max_num_batched_tokens,
        scheduling_policy=args.scheduling_policy,
        speed=args.speed,
        stream_interval=args.stream_interval,
        # As vLLM: the flag, else the environment; an empty key is none.
        api_keys=tuple(key for key in (args.api_key or [os.environ.get(VLLM_KEY_ENV)]) if key),
    )


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be 1 or more")
    return number


def _check_model_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from pdctl.perfmodel.arch import UnknownModel, get_model
    from pdctl.perfmodel.hardware import UnknownHardware, get_hardware

    try:
        get_hardware(args.hardware)
        get_model(args.architecture or args.served_model_name)
    except (UnknownHardware, UnknownModel) as error:
        parser.error(error.args[0])


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every request at INFO: the KV reads would drown the engine's own lines.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    asyncio.run(serve(parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
