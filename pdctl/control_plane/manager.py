"""The design document's ControlPlaneManager: register instances (on this host or remote), start, submit
requests, read PDMetrics, stop.

The manager runs pdctl's router in-process over the registered instances: the same decisions, admission,
retries and metrics as the daemon, on an OpenAI-compatible endpoint of its own (`manager.url`). It lives on
an event loop in a background thread, so it is not tied to the caller's loop: the document calls
`asyncio.run(manager.start())` and later `asyncio.run(...submit...)` on a second loop, and both work.

Runtime changes to the configuration objects apply without a restart where the router reads them: the
routing policy and its thresholds, `enabled`, the prefill speed goal, the TTFT and TPOT targets. Pool
bounds and dynamic scaling are the daemon's scaler's to act on (the manager routes over the instances it
is given), and engine flags (`kv_cache_memory_fraction`, `kv_cache_storage`) take effect when an engine
restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Coroutine
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel

from pdctl import health
from pdctl.auth import bearer
from pdctl.control_plane.errors import (
    DuplicateRequest,
    InstanceUnreachable,
    MissingPrompt,
    NoInstances,
    NotRunning,
    UnknownPolicy,
    UnknownRequest,
)
from pdctl.control_plane.types import PDSeparationConfig
from pdctl.router.proxy import Router, RouterSettings
from pdctl.router.server import RouterService, assemble_router
from pdctl.router.tokens import TokenCounter
from pdctl.routing.pieces import DEFAULT_STRATEGY, Strategy
from pdctl.routing.pool import Instance
from pdctl.types import (
    DecodingConfig,
    ExecutionInstance,
    ExecutionInstanceType,
    PDMetrics,
    PrefillingConfig,
    RequestMetadata,
)

log = logging.getLogger("pdctl.control_plane")

SCHEDULING_POLICIES = ("slo_aware", "fifo")
HEALTH_INTERVAL_S = 2.0
KEPT_RESULTS = 10_000
T = TypeVar("T")


def _known_name(what: str, name: str, known: tuple[str, ...]) -> None:
    if name not in known:
        raise UnknownPolicy(f"unknown {what} {name!r}; known: {', '.join(known)}")


class RequestResult(BaseModel):
    """A submitted request's outcome, as the router served it."""

    request_id: str
    ok: bool
    text: str = ""
    phase: str | None = None
    prefill_instance: str | None = None
    decode_instance: str | None = None
    output_chunks: int = 0
    finish_reason: str | None = None
    ttft_ms: float | None = None
    e2e_ms: float | None = None
    error: str | None = None


@dataclass
class _Pending:
    chunks: asyncio.Queue[str | None] = field(default_factory=asyncio.Queue)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    result: RequestResult | None = None


class _LoopThread:
    """An event loop of the manager's own in a daemon thread; coroutines are run there from any caller."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="pdctl-control-plane", daemon=True)
        self.thread.start()

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    async def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Await a coroutine of the manager's loop from whatever loop the caller is on."""
        return await asyncio.wrap_future(self.submit(coroutine))

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


class Executor:
    """The instances the manager routes over, and its live PDMetrics."""

    def __init__(self, manager: ControlPlaneManager):
        self._manager = manager
        self.instances: dict[str, ExecutionInstance] = {}

    def register_instance(self, instance: ExecutionInstance) -> None:
        if self._manager._running:
            raise NotRunning("register instances before start(): a running manager's pool is fixed")
        self.instances[instance.instance_id] = instance

    @property
    def metrics(self) -> PDMetrics:
        """PDMetrics of the last minute (docs/observability.md, PDMetrics); zeros before start()."""
        return self._manager._pd_metrics()


class ControlPlaneManager:
    def __init__(
        self,
        scheduling_policy: str = "slo_aware",
        routing_strategy: str = DEFAULT_STRATEGY,
        pd_config: PDSeparationConfig | None = None,
        *,
        ttft_slo_ms: float = 1000.0,
        host: str = "127.0.0.1",
        port: int = 0,
        health_timeout_s: float = 5.0,
        instance_api_key: str | None = None,
    ):
        """instance_api_key: the key the instances ask for (vLLM's --api-key), sent with every request to them."""
        _known_name("scheduling_policy", scheduling_policy, SCHEDULING_POLICIES)
        _known_name("routing_strategy", routing_strategy, tuple(Strategy.registry))
        self.scheduling_policy = scheduling_policy
        self.routing_strategy = routing_strategy
        # The document's base example is PDSeparationConfig's defaults; pass the object to steer it at run time.
        self.pd_config = pd_config or PDSeparationConfig()
        self.ttft_slo_ms = ttft_slo_ms
        self.host, self.port = host, port
        self.health_timeout_s = health_timeout_s
        self.instance_api_key = instance_api_key
        self.executor = Executor(self)
        self.served_model: str | None = None
        self._running = False
        self._thread: _LoopThread | None = None
        self._service: RouterService | None = None
        self._client: httpx.AsyncClient | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._requests: set[asyncio.Task[None]] = set()
        self._pending: dict[str, _Pending] = {}

    # ---- lifecycle --------------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The manager's own OpenAI-compatible endpoint (any OpenAI client can use it while it runs)."""
        if self._service is None:
            raise NotRunning("the manager is not running: await manager.start() first")
        return f"http://{self.host}:{self._service.server.port}"

    @property
    def router(self) -> Router:
        if self._service is None:
            raise NotRunning("the manager is not running: await manager.start() first")
        return self._service.router

    async def start(self) -> None:
        """Health-check every registered instance, then serve. Raises InstanceUnreachable naming each
        instance that did not answer, and NoInstances with none registered."""
        if self._running:
            return
        if not self.executor.instances:
            raise NoInstances("register at least one instance (manager.executor.register_instance) before start()")
        self._thread = _LoopThread()
        try:
            await self._thread.run(self._start())
        except BaseException:
            self._thread.close()
            self._thread = None
            raise
        self._running = True

    async def stop(self) -> None:
        if self._thread is None:
            return
        self._running = False
        await self._thread.run(self._stop())
        self._thread.close()
        self._thread, self._service = None, None

    async def _start(self) -> None:
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(self.health_timeout_s), headers=bearer(self.instance_api_key), trust_env=False
        )
        try:
            served, failures = await self._probe_all()
            if failures:
                raise InstanceUnreachable(failures)
            self.served_model = self._one_model(served)
        except BaseException:
            await self._client.aclose()
            raise
        self._service = RouterService(self._router(), self.host, self.port)
        await self._service.start()
        self._tasks = [asyncio.create_task(self._watch())]
        log.info("control plane serving %d instances on %s", len(self.executor.instances), self.url)

    async def _stop(self) -> None:
        for task in [*self._tasks, *self._requests]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for pending in self._pending.values():
            if not pending.done.is_set():
                pending.chunks.put_nowait(None)
        if self._service is not None:
            await self._service.stop()
        if self._client is not None:
            await self._client.aclose()

    # ---- instances ---------------------------------------------------------------------------------------------

    @staticmethod
    def _base(instance: ExecutionInstance) -> str:
        host = f"[{instance.host}]" if ":" in instance.host else instance.host
        return f"http://{host}:{instance.port or 8000}"

    async def _probe_all(self) -> tuple[dict[str, list[str]], dict[str, str]]:
        """The models each instance serves, and why each that failed its health check did."""
        assert self._client is not None
        instances = list(self.executor.instances.values())
        verdicts = await asyncio.gather(*(health.check(self._client, self._base(i)) for i in instances))
        served: dict[str, list[str]] = {}
        failures: dict[str, str] = {}
        for instance, verdict in zip(instances, verdicts, strict=True):
            if verdict.healthy:
                served[instance.instance_id] = list(verdict.models)
            else:
                failures[instance.instance_id] = f"{self._base(instance)}: {verdict.why}"
        return served, failures

    def _one_model(self, served: dict[str, list[str]]) -> str:
        names = {models[0] for models in served.values() if models}
        if len(names) != 1:
            raise InstanceUnreachable({i: f"serves {m or 'no model'}" for i, m in served.items()} if names else
                                      {i: "serves no model" for i in served})  # fmt: skip
        name = names.pop()
        for instance in self.executor.instances.values():
            if instance.model_name and instance.model_name != name:
                log.warning("%s serves %r, not %r: requests use the served name", instance.instance_id, name,
                            instance.model_name)  # fmt: skip
        return name

    def _role_config(self, role: ExecutionInstanceType) -> PrefillingConfig | DecodingConfig | None:
        """The first registered instance's config of that role, shared with the router, so the document's
        `prefilling_config.target_throughput_tokens_per_sec = 800` reaches it."""
        for instance in self.executor.instances.values():
            if instance.instance_type is role:
                config = (
                    instance.prefilling_config if role is ExecutionInstanceType.PREFILLING else instance.decoding_config
                )
                if config is not None:
                    return config
        return None

    def _instances(self) -> list[Instance]:
        """The router's record of each registered instance, healthy: each just passed its health check."""
        instances = []
        for spec in self.executor.instances.values():
            config = spec.prefilling_config or spec.decoding_config
            max_seqs = getattr(config, "target_batch_size", None) or getattr(config, "max_parallel_requests", 256)
            instances.append(Instance(spec.instance_id, spec.instance_type, self._base(spec), max_seqs, healthy=True))
        return instances

    def _router(self) -> Router:
        prefill_tokens_per_s, tpot_ms = self._goals()
        return assemble_router(
            self._instances(),
            self.served_model or "",
            self.pd_config,
            routing_strategy=self.routing_strategy,
            scheduling_policy=self.scheduling_policy,
            ttft_slo_ms=self.ttft_slo_ms,
            tpot_slo_ms=tpot_ms,
            prefill_tokens_per_s=prefill_tokens_per_s,
            tokens=TokenCounter(),
            engine_key=self.instance_api_key,
        )

    def _goals(self) -> tuple[float, float]:
        """The prefill speed goal (prompt tokens/s) and the TPOT target (ms) the configuration objects hold now."""
        prefill = self._role_config(ExecutionInstanceType.PREFILLING) or self.pd_config.prefilling_config
        decode = self._role_config(ExecutionInstanceType.DECODING) or self.pd_config.decoding_config
        assert isinstance(prefill, PrefillingConfig) and isinstance(decode, DecodingConfig), "looked up by role"
        return prefill.target_throughput_tokens_per_sec, decode.target_latency_ms

    def _apply_role_configs(self, settings: RouterSettings) -> None:
        settings.default_prefill_tokens_per_s, settings.tpot_target_ms = self._goals()
        settings.ttft_slo_ms = self.ttft_slo_ms

    async def _watch(self) -> None:
        """Health of each instance, and the configuration objects' current values, every few seconds."""
        assert self._client is not None
        while True:
            await asyncio.sleep(HEALTH_INTERVAL_S)
            router = self.router
            self._apply_role_configs(router.settings)
            router.metrics.ttft_slo_s = router.settings.ttft_slo_ms / 1000
            router.metrics.tpot_slo_s = router.settings.tpot_target_ms / 1000
            for spec in self.executor.instances.values():
                instance = router.pool.by_id[spec.instance_id]
                healthy = (await health.check(self._client, self._base(spec), self.served_model)).healthy
                if healthy != instance.healthy:
                    log.warning("%s is %s", spec.instance_id, "healthy again" if healthy else "unhealthy")
                instance.healthy = healthy

    # ---- requests ------------------------------------------------------------------------------------------------

    async def submit_request(self, request: RequestMetadata) -> str:
        """Send a request through the router (streamed); returns its id at once. Read the outcome with
        `await manager.result(id)` or the text as it comes with `async for chunk in manager.stream(id)`."""
        thread = self._require_running()
        body = self._body(request)
        if request.request_id in self._pending:
            raise DuplicateRequest(f"request id {request.request_id!r} was already submitted")
        await thread.run(self._accept(request.request_id, body))
        return request.request_id

    def _body(self, request: RequestMetadata) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.served_model, "stream": True, "priority": int(request.priority)}
        prompt, messages = getattr(request, "prompt", None), getattr(request, "messages", None)
        if isinstance(prompt, str):
            body["prompt"] = prompt
        elif isinstance(messages, list):
            body["messages"] = messages
        else:
            raise MissingPrompt(f"request {request.request_id!r} has no prompt: set `request.prompt = ...` first")
        if request.max_tokens is not None:
            body["max_tokens"] = request.max_tokens
        if request.slo_deadline_ms is not None:
            body["slo_deadline_ms"] = request.slo_deadline_ms
        return body

    async def _accept(self, request_id: str, body: dict[str, Any]) -> None:
        self._forget_oldest()
        pending = self._pending[request_id] = _Pending()
        task = asyncio.create_task(self._serve(request_id, body, pending))
        self._requests.add(task)
        task.add_done_callback(self._requests.discard)

    def _forget_oldest(self) -> None:
        """Results are kept for the last KEPT_RESULTS requests, not forever."""
        finished = [rid for rid, pending in self._pending.items() if pending.done.is_set()]
        for request_id in finished[: max(0, len(self._pending) - KEPT_RESULTS + 1)]:
            del self._pending[request_id]

    async def _serve(self, request_id: str, body: dict[str, Any], pending: _Pending) -> None:
        assert self._client is not None
        chat = "messages" in body
        url = f"{self.url}/v1/{'chat/completions' if chat else 'completions'}"
        result = RequestResult(request_id=request_id, ok=False)
        began = time.monotonic()
        parts: list[str] = []
        try:
            async with self._client.stream("POST", url, json=body, timeout=httpx.Timeout(None, connect=5)) as reply:
                result.phase = reply.headers.get("x-pdctl-phase")
                result.prefill_instance = reply.headers.get("x-pdctl-prefill")
                result.decode_instance = reply.headers.get("x-pdctl-decode")
                if reply.status_code != 200:
                    result.error = f"HTTP {reply.status_code}: {(await reply.aread()).decode(errors='replace')}"
                else:
                    await self._read_events(reply, result, parts, pending, began)
        except httpx.HTTPError as error:
            result.error = f"{type(error).__name__}: {error}"
        result.text = "".join(parts)
        result.e2e_ms = (time.monotonic() - began) * 1000
        result.ok = result.error is None
        pending.result = result
        pending.chunks.put_nowait(None)
        pending.done.set()

    @staticmethod
    async def _read_events(reply: httpx.Response, result: RequestResult, parts: list[str], pending: _Pending,
                           began: float) -> None:  # fmt: skip
        async for line in reply.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                result.error = event["error"].get("message", "the stream broke")
                continue
            for choice in event.get("choices", []):
                text = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                if result.ttft_ms is None:
                    result.ttft_ms = (time.monotonic() - began) * 1000
                if text:
                    parts.append(text)
                    pending.chunks.put_nowait(text)
                result.output_chunks += 1
                result.finish_reason = choice.get("finish_reason") or result.finish_reason

    async def result(self, request_id: str, timeout_s: float | None = None) -> RequestResult:
        """Wait for a submitted request to finish (answered or failed: see `ok` and `error`)."""
        thread = self._require_running()
        pending = self._known(request_id)

        async def wait() -> RequestResult:
            await asyncio.wait_for(pending.done.wait(), timeout_s)
            assert pending.result is not None
            return pending.result

        return await thread.run(wait())

    async def stream(self, request_id: str) -> AsyncIterator[str]:
        """The text of a submitted request as it arrives (one consumer per request)."""
        thread = self._require_running()
        pending = self._known(request_id)
        while (chunk := await thread.run(pending.chunks.get())) is not None:
            yield chunk

    def _known(self, request_id: str) -> _Pending:
        pending = self._pending.get(request_id)
        if pending is None:
            raise UnknownRequest(f"no request {request_id!r} was submitted to this manager")
        return pending

    def _require_running(self) -> _LoopThread:
        if not self._running or self._thread is None:
            raise NotRunning("the manager is not running: await manager.start() first")
        return self._thread

    # ---- metrics ---------------------------------------------------------------------------------------------

    def _pd_metrics(self) -> PDMetrics:
        if not self._running or self._thread is None:
            return PDMetrics()

        async def read() -> PDMetrics:
            return self.router.stats().pd_metrics

        if threading.current_thread() is self._thread.thread:
            return self.router.stats().pd_metrics
        return self._thread.submit(read()).result(timeout=10)
