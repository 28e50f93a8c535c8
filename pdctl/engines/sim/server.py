"""The sim's HTTP server: vLLM's routes over the engine's parts, and the process that runs it."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import time
import uuid

from pydantic import ValidationError

from pdctl.auth import vllm_guarded
from pdctl.engines.sim.config import Job, SimConfig
from pdctl.engines.sim.endpoints import CHAT, COMPLETIONS, Endpoint, sse
from pdctl.engines.sim.kvstore import KV_PULL_PATH, KVStore
from pdctl.engines.sim.metrics import Metrics, engine_labels
from pdctl.engines.sim.scheduler import Scheduler
from pdctl.engines.sim.schemas import GenerationRequest, ModelCard, ModelList
from pdctl.httpserver import Handler, HttpError, HttpServer, Request, Response, StreamingResponse, json_response

log = logging.getLogger("pdctl.engines.sim")

DEFAULT_MAX_TOKENS = 16


class SimEngine:
    def __init__(self, config: SimConfig):
        self.config = config
        self.metrics = Metrics()
        self.server = HttpServer(
            vllm_guarded(self.handle, list(config.api_keys)), config.host, config.port, config.max_body_bytes
        )
        self._created = int(time.time())
        self._labels = engine_labels(config.model)
        self._kv = KVStore(config.kv_cache_blocks, self.metrics)
        self._scheduler = Scheduler(config, self.metrics)
        self._routes: dict[tuple[str, str], Handler] = {
            ("GET", "/health"): self._health,
            ("GET", "/v1/models"): self._models,
            ("GET", "/metrics"): self._metrics,
            ("POST", "/v1/completions"): functools.partial(self._generation, COMPLETIONS),
            ("POST", "/v1/chat/completions"): functools.partial(self._generation, CHAT),
            ("POST", KV_PULL_PATH): self._kv_pull,
        }

    @property
    def engine_id(self) -> str:
        return self._kv.engine_id

    async def start(self) -> None:
        self._scheduler.start()
        await self.server.start()

    async def stop(self) -> None:
        await self.server.stop()
        await self._scheduler.stop()

    async def handle(self, request: Request) -> Response | StreamingResponse:
        route = self._routes.get((request.method, request.path))
        if route is None:
            raise HttpError(404, f"{request.method} {request.path} is not served", "NotFoundError")
        return await route(request)

    async def _health(self, request: Request) -> Response:
        return Response(200)

    async def _models(self, request: Request) -> Response:
        card = ModelCard(id=self.config.model, created=self._created, root=self.config.model)
        return json_response(ModelList(data=[card]).model_dump())

    async def _metrics(self, request: Request) -> Response:
        load = self._scheduler.load(self._kv.held_blocks())
        text = self.metrics.render(self._labels, load, self.config.kv_cache_blocks)
        return Response(200, text.encode(), content_type="text/plain; version=0.0.4; charset=utf-8")

    async def _generation(self, endpoint: Endpoint, request: Request) -> Response | StreamingResponse:
        params = self._parse(request, endpoint.shape)
        job = self._job(endpoint.id_prefix, params)
        if params.stream:
            words = self._scheduler.words(job)
            return sse(endpoint.chunks(job, params, words, self.config.stream_interval))
        async with contextlib.aclosing(self._scheduler.words(job)) as words:
            text = "".join([word async for word in words])
        decoded_elsewhere = job.kv is not None and job.kv.do_remote_decode
        kv = self._kv.hold(job, self.config.host, self.server.port) if decoded_elsewhere else None
        return json_response(endpoint.whole(job, params, text, kv).model_dump())

    async def _kv_pull(self, request: Request) -> Response:
        """The decode sim reads a finished prefill's KV: the NIXL read, over HTTP. Once read, it is freed."""
        body = request.json()
        if not isinstance(body, dict):
            raise HttpError(400, "expected a JSON object", "BadRequestError")
        request_id = body.get("remote_request_id")
        held = self._kv.take(body.get("remote_engine_id"), request_id)
        if held is None:
            raise HttpError(404, f"no KV held for request {request_id!r} on engine {self.engine_id}", "NotFoundError")
        return json_response({"num_tokens": held.num_tokens, "prompt_digest": held.digest})

    def _parse(self, request: Request, shape: type[GenerationRequest]) -> GenerationRequest:
        try:
            params = shape.model_validate(request.json())
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(part) for part in error["loc"]) or "body"
            raise HttpError(400, f"{where}: {error['msg']}", "BadRequestError", param=where) from None
        if params.model != self.config.model:
            raise HttpError(404, f"The model `{params.model}` does not exist.", "NotFoundError", param="model")
        return params

    def _job(self, id_prefix: str, params: GenerationRequest) -> Job:
        # A hybrid instance has no KV connector, so, like vLLM without one, it ignores kv_transfer_params.
        kv = params.kv_transfer_params if self.config.role != "hybrid" else None
        max_tokens = params.output_limit() or DEFAULT_MAX_TOKENS
        return Job(f"{id_prefix}-{uuid.uuid4().hex}", params.prompt_text().encode(), max_tokens, params.priority, kv)


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
