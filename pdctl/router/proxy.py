"""The router's request path: parse, decide the phase, pick instances, proxy (two hops for PD), retry.

Nothing is lost: a request is answered, retried on another instance, served in another phase, or failed
with an OpenAI-style error; a client that goes away cancels its upstream requests, so vLLM aborts them.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pdctl import tokentiming
from pdctl.engines.adapter import DEFAULT_ENGINE, engine_adapter
from pdctl.httpserver import HttpError, Request, Response, StreamingResponse, json_response
from pdctl.procs import Activity
from pdctl.router import requests
from pdctl.router import stats as cluster_stats
from pdctl.router.admission import Admission, DeadlineExceeded
from pdctl.router.migration import MIGRATIONS_TRAILER, StreamLedger, error_message, why_not_migratable
from pdctl.router.pd_routing import PDRoutingStrategy
from pdctl.router.recorder import DisabledRecorder, RouterMetrics
from pdctl.router.scrape import EngineTelemetry
from pdctl.router.tokens import TokenCounter, utf8_length
from pdctl.router.upstream import UpstreamError, UpstreamPool, UpstreamResponse
from pdctl.routing.phase import PhaseDecision, PoolLoad, RequestFeatures, instances_for_phase, pool_load
from pdctl.routing.pieces import DEFAULT_STRATEGY, Composition, RoutingRequest, Selection, make_strategy
from pdctl.routing.pool import Instance, Pool
from pdctl.routing.prefix import PrefixTable, block_hashes
from pdctl.types import ExecutionInstanceType as Phase
from pdctl.types import PDSeparationConfig

log = logging.getLogger("pdctl.router")

# An engine that computes but moves no token may only be crowded off the CPU (few cores, an instance loading
# beside it): restarting it would crowd the others more. Its streams wait up to this many stall timeouts
# (bounded: an engine hung in a spinning loop computes too).
STARVED_LIMIT_FACTOR = 3


def _warm_prompt(prefill: str, decode: str) -> str:
    """Long enough to fill a few KV blocks with any tokenizer, so the warm-up moves a KV cache; new each time, so
    that neither engine finds it in its prefix cache and the warm-up takes the path a user's prompt takes (a
    decode instance's partial prefix hit on a remote prompt is a path no user request needs warmed)."""
    return f"pdctl warms the KV path {prefill} -> {decode} ({uuid.uuid4().hex}). " * 3


_USAGE_PROMPT = re.compile(rb'"prompt_tokens":\s*(\d+)')
_USAGE_COMPLETION = re.compile(rb'"completion_tokens":\s*(\d+)')


@dataclass
class RouterSettings:
    served_model_name: str
    pd: PDSeparationConfig
    routing_strategy: str | Composition = DEFAULT_STRATEGY
    scheduling_policy: str = "slo_aware"
    ttft_slo_ms: float = 1000.0
    tpot_target_ms: float = 50.0
    default_prefill_tokens_per_s: float = 1000.0
    prefill_timeout_s: float = 30.0
    connect_timeout_s: float = 3.0
    first_byte_timeout_s: float = 600.0
    max_queue_wait_s: float = 30.0
    record_metrics: bool = True
    # A stream that had its first token and then none for this long is stalled (an engine stopped while its
    # API server still answers /health): moved to another instance, its instance reported (on_stall). So is
    # an instance with requests in flight whose engine made no progress for this long.
    stall_timeout_s: float = 10.0
    # How many times one stream may move to another instance when its engine fails or stalls (0: never).
    max_migrations: int = 3
    # The cluster's engines' own key (vLLM's --api-key), sent with every request to them.
    engine_api_key: str | None = None
    # The engines' kind (engine.kind): its adapter names the metrics scraped and the PD hand-off's field.
    engine: str = DEFAULT_ENGINE
    # router.warm_kv_paths (on in a profile): make each prefill/decode pair's NIXL handshake as an instance becomes
    # healthy. Off for a router built in code, whose tests count the requests its engines see.
    warm_kv_paths: bool = False


@dataclass
class Route:
    """One request's decision: what `pdctl route` explains and the proxy carries out."""

    request_id: str
    decision: PhaseDecision
    routing: RoutingRequest
    expected_output_tokens: float
    decode: Selection | None
    prefill: Selection | None = None
    decision_s: float = 0.0  # the time plan() took
    queue_s: float = 0.0  # the time waited for a free instance after it

    @property
    def input_tokens(self) -> int:
        return self.routing.input_tokens

    def explain(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "phase": self.decision.phase.value,
            "reason": self.decision.reason,
            "figures": self.decision.figures,
            "input_tokens": self.input_tokens,
            "expected_output_tokens": round(self.expected_output_tokens, 1),
            "prefill": _explain_selection(self.prefill),
            "decode": _explain_selection(self.decode),
        }


def _explain_selection(selection: Selection | None) -> dict[str, Any] | None:
    if selection is None:
        return None
    scores = {instance: round(score, 4) for instance, score in selection.scores.items()}
    return {"instance": selection.instance.id, "url": selection.instance.url, "scores": scores}


# A long stream's gaps reach the windowed ITL figures every this many tokens, not only at its end.
_GAPS_BATCH = 64
_ROLES = tuple(Phase)  # iterating the enum class itself is slow on the hot path
# Seconds a client is told to wait when no instance can serve: about one health-check round of the supervisor.
NO_INSTANCE_RETRY_AFTER_S = 2
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # vLLM's (and OpenAI's) when a completions request names none


class NoInstance(HttpError):
    def __init__(self, what: str, retry_after_s: int):
        # Retry-After: a client that honours it comes back once the supervisor may have an instance up again,
        # instead of turning the router's instant refusals into a tight loop.
        super().__init__(
            503,
            f"no healthy {what} instance can take the request",
            "ServiceUnavailableError",
            headers={"retry-after": str(retry_after_s)},
        )


class Router:
    def __init__(self, settings: RouterSettings, pool: Pool, counter: TokenCounter):
        self.settings = settings
        self.pool = pool
        self.counter = counter
        recorder = RouterMetrics if settings.record_metrics else DisabledRecorder
        self.metrics = recorder(settings.ttft_slo_ms / 1000, settings.tpot_target_ms / 1000)
        engine = engine_adapter(settings.engine)
        self.telemetry = EngineTelemetry(metrics=engine.metrics)
        # Resolved once here: every PD request reads them.
        self.kv_field = engine.handoff.request_field
        self.prefill_params = engine.handoff.prefill_params
        self.context = cluster_stats.StatsContext()
        self.tables: defaultdict[str, PrefixTable] = defaultdict(
            lambda: PrefixTable(eviction=settings.pd.kv_cache_eviction_policy)
        )
        self.strategy = make_strategy(settings.routing_strategy, self.tables.__getitem__)
        self.apply_pd(settings.pd)
        self.admission = Admission(settings.scheduling_policy == "slo_aware", settings.max_queue_wait_s)
        self.avg_output_tokens = 128.0
        self._ids = itertools.count(1)
        self.upstream = UpstreamPool(settings.connect_timeout_s, api_key=settings.engine_api_key)
        # Told of each answered request (exchange, TTFT s, TPOT s, output tokens): the scaler's latency window.
        self.on_complete: Callable[[Exchange, float | None, float | None, int], None] = lambda *_: None
        # Streams between their first token and their end, for the stall watch; told of a stalled instance.
        self.streams: set[_Stream] = set()
        self.on_stall: Callable[[str, str], None] = lambda instance_id, why: None
        # What an instance's processes do (the supervisor samples them); None where it cannot see them.
        self.engine_activity: Callable[[str], Awaitable[Activity | None]] = _activity_unknown
        self._starved: set[str] = set()  # instances whose stall verdict waits: they compute
        self._warm_pairs: set[tuple[str, str]] = set()  # (prefill, decode) whose NIXL handshake is made
        self._busy_since: dict[str, float] = {}  # instance id -> since when it has had requests in flight

    def stalled_streams(self, now: float) -> list[_Stream]:
        """Streams with no chunk for stall_timeout_s since their last, or for twice that since a move began
        them (a continuation prefills what was generated first, on an engine that may be busy; a new request's
        first token may wait behind a long prefill, and only its instance's progress tells)."""
        limit = self.settings.stall_timeout_s
        return [
            s
            for s in self.streams
            if not s.stalled and (s.first or s.moved) and now - s.last_at > (limit if s.first else 2 * limit)
        ]

    def stalled_instances(self, now: float) -> list[Instance]:
        """Instances with requests in flight for stall_timeout_s whose engine made no progress (no prompt or
        output token) in that time while its /metrics answered: work queued or running there does not move.
        Called once a second: it also notes since when each instance has had requests in flight (an engine
        idle before them made no progress either, and that is no stall)."""
        limit = self.settings.stall_timeout_s
        busy = self._busy_since
        for instance in self.pool.all():
            if instance.in_flight > 0:
                busy.setdefault(instance.id, now)
            else:
                busy.pop(instance.id, None)
        return [
            instance
            for instance in self.pool.all()
            if instance.healthy
            and now - busy.get(instance.id, now) >= limit
            and instance.circuit_open_until <= now  # reported already: the supervisor is restarting it
            and self.telemetry.no_progress(instance.id, limit)
        ]

    async def watch_stalls(self, interval_s: float = 1.0) -> None:
        """Move streams that get no token for stall_timeout_s, and report their instances: its process runs and
        its /health answers, so nothing else would notice, and the client would wait for ever."""
        limit = self.settings.stall_timeout_s
        while True:
            await asyncio.sleep(interval_s)
            now = time.monotonic()
            suspects: _Suspects = {}
            for stream in self.stalled_streams(now):
                why = f"a stream got no token for {limit:g} s"
                _note_suspect(suspects, stream.instance, now - stream.last_at, why)
            for instance in self.stalled_instances(now):
                why = f"its engine made no progress for {limit:g} s with requests in flight"
                _note_suspect(suspects, instance, now - self._busy_since[instance.id], why)
            for instance, waited_s, why in suspects.values():
                if await self._stalled_for_sure(instance, waited_s):
                    await self._report_stalled(instance, why)
            self._starved &= suspects.keys()

    async def _stalled_for_sure(self, instance: Instance, waited_s: float) -> bool:
        """Unless its engine computes (then it is slow, not stalled) and has not waited past the bound."""
        bound_s = STARVED_LIMIT_FACTOR * self.settings.stall_timeout_s
        if waited_s >= bound_s:
            return True
        activity = await self.engine_activity(instance.id)
        if activity is None or not activity.working:
            return True
        if instance.id not in self._starved:
            self._starved.add(instance.id)
            log.warning(
                "%s moved no token for %.0f s but its engine computes (%.0f%% of a core): crowded off the CPU, "
                "not stalled; its streams wait up to %.0f s",
                instance.id, waited_s, 100 * activity.cores, bound_s,
            )  # fmt: skip
        return False

    async def _report_stalled(self, instance: Instance, why: str) -> None:
        """Stop sending work to a stalled instance, end its streams (each moves elsewhere), report it."""
        instance.record_failure(threshold=1)  # no new request there until it is restarted
        log.warning("%s stalled: %s; moving its streams", instance.id, why)
        self.on_stall(instance.id, why)
        for stream in [s for s in self.streams if s.instance is instance and not s.stalled]:
            stream.stalled = True
            await stream.upstream.aclose()

    async def warm_kv_path(self, instance_id: str) -> None:
        """Move one small KV cache between a newly healthy instance and each healthy instance of the other PD
        role: the first transfer between two engines makes their NIXL handshake (about 0.6 s on the CPU), and
        it is paid here, not by a user's first request. A failure only means the first request pays it."""
        instance = self.pool.by_id.get(instance_id)
        if instance is None or not self.settings.warm_kv_paths or not self.settings.pd.enabled:
            return
        other = {Phase.PREFILLING: Phase.DECODING, Phase.DECODING: Phase.PREFILLING}.get(instance.role)
        if other is None:
            return
        for peer in [p for p in self.pool.role(other) if p.healthy]:
            prefill, decode = (instance, peer) if instance.role is Phase.PREFILLING else (peer, instance)
            pair = (prefill.id, decode.id)
            if pair in self._warm_pairs:  # both became healthy at once: the other's warm-up has it
                continue
            self._warm_pairs.add(pair)
            try:
                await self._transfer_once(prefill, decode)
            except (UpstreamError, ValueError, TimeoutError) as error:
                self._warm_pairs.discard(pair)
                log.info("warming the KV path %s -> %s: %s", prefill.id, decode.id, error)

    def forget_kv_paths(self, instance_id: str) -> None:
        """The instance is down: restarted, it makes new handshakes, so its paths are warmed again."""
        self._warm_pairs = {pair for pair in self._warm_pairs if instance_id not in pair}

    async def _transfer_once(self, prefill: Instance, decode: Instance) -> None:
        body = {
            "model": self.settings.served_model_name,
            "prompt": _warm_prompt(prefill.id, decode.id),
            "max_tokens": 1,
        }
        timeout_s = self.settings.prefill_timeout_s
        status, content = await self.fetch(
            prefill.url + "/v1/completions", {**body, self.kv_field: dict(self.prefill_params)}, timeout_s
        )
        params = json.loads(content).get(self.kv_field) if status == 200 else None
        if not isinstance(params, dict):
            raise ValueError(f"{prefill.id} answered {status} without {self.kv_field}")
        status, _ = await self.fetch(decode.url + "/v1/completions", {**body, self.kv_field: params}, timeout_s)
        if status != 200:
            raise ValueError(f"{decode.id} answered {status}")
        log.info("KV path %s -> %s warmed: their NIXL handshake is done", prefill.id, decode.id)

    async def aclose(self) -> None:
        await self.upstream.aclose()

    async def fetch(self, url: str, body: dict[str, Any], timeout_s: float) -> tuple[int, bytes]:
        """POST and read the whole answer within timeout_s."""

        try:
            # asyncio.timeout, not wait_for: no task of its own, so no extra trips through the event loop.
            async with asyncio.timeout(timeout_s):
                response = await self.upstream.post(url, body, timeout_s)
                try:
                    return response.status_code, await response.read()
                finally:
                    await response.aclose()
        except TimeoutError:
            raise UpstreamError(f"no complete answer within {timeout_s:g} s") from None

    # ---- HTTP entry point --------------------------------------------------------------------------------

    async def handle(self, request: Request) -> Response | StreamingResponse:
        path = request.path
        if request.method == "POST" and path in ("/v1/completions", "/v1/chat/completions"):
            return await self.serve(request, chat=path.endswith("chat/completions"))
        if request.method == "GET" and path == "/health":
            return self.health()
        if request.method == "GET" and path == "/v1/models":
            return json_response(
                {
                    "object": "list",
                    "data": [{"id": self.settings.served_model_name, "object": "model", "owned_by": "pdctl"}],
                }
            )
        if request.method == "GET" and path == "/metrics":
            text = self.metrics.render() + cluster_stats.exposition(self.stats())
            return Response(200, text.encode(), None, "text/plain; version=0.0.4")
        if request.method == "GET" and path == "/pdctl/stats":
            return Response(200, self.stats().model_dump_json().encode(), None, "application/json")
        if request.method == "POST" and path == "/pdctl/route":
            body = request.json()
            chat = isinstance(body, dict) and "messages" in body
            parsed = requests.parse(body, request.headers, chat, self.settings.served_model_name)
            return json_response(self.plan(parsed).explain())
        raise HttpError(404, f"{request.method} {path} is not served here", "NotFoundError")

    def stats(self) -> cluster_stats.ClusterStats:
        settings = self.settings
        return cluster_stats.build(
            self.metrics, self.pool, self.telemetry, self.context, settings.pd, self.strategy.label
        )

    def health(self) -> Response:
        paths = self._working_paths()
        status = 200 if paths else 503
        return json_response({"status": "ok" if paths else "no working path", "paths": paths}, status=status)

    def _working_paths(self) -> list[str]:
        healthy = {role for role in Phase if any(i.healthy for i in self.pool.role(role))}
        paths = []
        if Phase.DECODING in healthy:
            paths.append("decode")
            if Phase.PREFILLING in healthy:
                paths.append("prefill->decode")
        if Phase.HYBRID in healthy:
            paths.append("hybrid")
        if not paths and Phase.PREFILLING in healthy:
            paths.append("prefill (whole requests: no decode instance)")
        return paths

    # ---- deciding --------------------------------------------------------------------------------------------

    def apply_pd(self, pd: PDSeparationConfig) -> None:
        """Route by this PD config (kept, not copied) from the next request on."""
        self.settings.pd = pd
        self.pd_routing = PDRoutingStrategy(pd, self.counter)
        self.pd_routing.policy  # noqa: B018 - built now: an unknown name fails here, not at the first request

    @property
    def _uses_prefixes(self) -> bool:
        """Prefix hashes cost time on the hot path: only where a piece or the phase policy reads them. Asked
        per request: the design document's API changes the policy by assigning to the config the router holds."""
        return self.strategy.uses_prefixes or self.pd_routing.policy.uses_prefixes

    def plan(self, parsed: requests.ParsedRequest) -> Route:
        started = time.perf_counter()
        now = time.monotonic()
        input_tokens = self.counter.count(parsed.text)
        expected_output = float(parsed.max_tokens) if parsed.max_tokens else self.avg_output_tokens
        blocks = block_hashes(parsed.text) if self._uses_prefixes else []
        routing = RoutingRequest(input_tokens, blocks, now, len(parsed.text))
        # Filter each pool once; every later step reads these lists.
        candidates = {role: self.strategy.candidates(self.pool.role(role), routing) for role in _ROLES}
        decode = self.strategy.pick_from(candidates[Phase.DECODING], routing)
        cached = routing.cached_tokens(decode.instance.id, self.tables[decode.instance.id]) if decode else 0
        features = RequestFeatures(input_tokens, expected_output, cached)
        available = [role for role, kept in candidates.items() if kept]
        decision = self.pd_routing.decide(features, self._load(decode, candidates[Phase.PREFILLING]), available)
        route = Route(f"pdctl-{next(self._ids)}", decision, routing, expected_output, decode)
        if decision.phase is Phase.HYBRID:
            route.decode = self.strategy.pick_from(instances_for_phase(Phase.HYBRID, candidates), routing)
        elif decision.phase is Phase.PREFILLING:
            route.prefill = self.strategy.pick_from(candidates[Phase.PREFILLING], routing)
        route.decision_s = time.perf_counter() - started
        return route

    def _load(self, decode: Selection | None, prefills: list[Instance]) -> PoolLoad:
        settings = self.settings
        return pool_load(
            decode.instance if decode else None,
            prefills,
            settings.default_prefill_tokens_per_s,
            settings.ttft_slo_ms / 1000,
            settings.tpot_target_ms / 1000,
        )

    # ---- serving ---------------------------------------------------------------------------------------------

    async def serve(self, request: Request, chat: bool) -> Response | StreamingResponse:
        arrived = time.monotonic()
        parsed = requests.parse(request.json(), request.headers, chat, self.settings.served_model_name)
        body = self._upstream_body(parsed)
        deadline_at = arrived + parsed.deadline_ms / 1000 if parsed.deadline_ms else None
        route = await self._admit(parsed, deadline_at)
        path = "/v1/chat/completions" if chat else "/v1/completions"
        exchange = Exchange(self, route, parsed, body, path, arrived)
        if parsed.stream and self.settings.max_migrations and why_not_migratable(body, chat) is None:
            exchange.ledger = StreamLedger(chat, show_ids=bool(body.get("return_token_ids")))
            body["return_token_ids"] = True  # what a continuation is built from
        return await exchange.run()

    def _upstream_body(self, parsed: requests.ParsedRequest) -> dict[str, Any]:
        body = {k: v for k, v in parsed.body.items() if k not in requests.OWN_FIELDS}
        if self.settings.scheduling_policy == "slo_aware":
            body["priority"] = parsed.priority
        else:
            body.pop("priority", None)  # engines under fcfs refuse a priority
        return body

    async def _admit(self, parsed: requests.ParsedRequest, deadline_at: float | None) -> Route:
        """Decide, and wait by priority and deadline while every candidate is full."""
        waited_since = time.monotonic()
        while True:
            route = self.plan(parsed)
            targets = [s.instance for s in (route.prefill, route.decode) if s is not None]
            if route.decode is None:
                raise NoInstance("decode, hybrid or prefill", NO_INSTANCE_RETRY_AFTER_S)
            if all(t.in_flight < t.max_num_seqs for t in targets):
                route.queue_s = time.monotonic() - waited_since
                return route
            if deadline_at is not None and time.monotonic() >= deadline_at:
                raise _too_late(0.0)
            try:
                await self.admission.wait(parsed.priority, deadline_at)
            except DeadlineExceeded as exceeded:
                raise _too_late(exceeded.waited_s) from None

    def record_output(self, tokens: int) -> None:
        if tokens > 0:
            self.avg_output_tokens = 0.9 * self.avg_output_tokens + 0.1 * tokens


def _too_late(waited_s: float) -> HttpError:
    retry_after = str(max(1, round(waited_s)))
    message = "the request's deadline cannot be met: every instance is busy"
    return HttpError(429, message, "RateLimitError", headers={"retry-after": retry_after})


class Exchange:
    """One request's trip through the cluster, with its retries and fallbacks."""

    def __init__(
        self,
        router: Router,
        route: Route,
        parsed: requests.ParsedRequest,
        body: dict[str, Any],
        path: str,
        arrived: float,
    ):
        self.router = router
        self.route = route
        self.parsed = parsed
        self.body = body
        self.path = path
        self.arrived = arrived
        self.phase = route.decision.phase
        self.tried: set[str] = set()
        self.prefill_instance: Instance | None = None
        self.prefill_s: float | None = None
        self.ledger: StreamLedger | None = None  # streams that can move to another instance mid-stream

    def headers(self, decode: Instance) -> dict[str, str]:
        headers = {
            "x-pdctl-request-id": self.route.request_id,
            "x-pdctl-phase": self.phase.value,
            "x-pdctl-decode": decode.id,
        }
        if self.prefill_instance is not None:
            headers["x-pdctl-prefill"] = self.prefill_instance.id
        return headers

    async def run(self) -> Response | StreamingResponse:
        decode_body = self.body
        if self.phase is Phase.PREFILLING:
            params = await self._prefill()
            if params is None:
                self.phase = Phase.DECODING
                self.router.metrics.fell_back("prefill_failed")
            else:
                decode_body = {**self.body, self.router.kv_field: params}
        return await self._decode(decode_body)

    # ---- prefill hop ---------------------------------------------------------------------------------------

    async def _prefill(self) -> dict[str, Any] | None:
        """The prefill hop, retried once on another prefill instance; None means serve without it."""
        router = self.router
        selection = self.route.prefill
        body = {**self.body, "max_tokens": 1, "stream": False, router.kv_field: dict(router.prefill_params)}
        for key in ("stream_options", "min_tokens"):
            body.pop(key, None)
        if "max_completion_tokens" in body:
            body["max_completion_tokens"] = 1
        for attempt in range(2):
            if selection is None:
                return None
            instance = selection.instance
            self.tried.add(instance.id)
            started = time.monotonic()
            try:
                with _in_flight(instance, self.route.input_tokens) as slot:
                    status, content = await router.fetch(
                        instance.url + self.path, body, router.settings.prefill_timeout_s
                    )
                    if status == 200:
                        slot.first_token(timed_at=time.monotonic())
                if status == 200:
                    params = json.loads(content).get(router.kv_field)
                    instance.record_success()
                    self.prefill_s = time.monotonic() - started
                    router.tables[instance.id].record(self.route.routing.prefix_blocks)
                    self.prefill_instance = instance
                    return params if isinstance(params, dict) else None
                if status < 500:
                    return None  # the engine refused the request itself: the decode instance will say why
                log.warning("%s: prefill on %s answered %d", self.route.request_id, instance.id, status)
            except (UpstreamError, ValueError, AttributeError) as error:
                log.warning(
                    "%s: prefill on %s failed: %s", self.route.request_id, instance.id, error or type(error).__name__
                )
            finally:
                router.admission.release()
            instance.record_failure()
            if attempt == 0:
                router.metrics.retried("prefill")
                selection = self._another(Phase.PREFILLING)
        return None

    def _another(self, role: Phase) -> Selection | None:
        routing = self.route.routing
        routing.now = time.monotonic()
        remaining = [i for i in self.router.pool.role(role) if i.id not in self.tried]
        return self.router.strategy.select(remaining, routing)

    # ---- decode hop ----------------------------------------------------------------------------------------

    async def _decode(self, body: dict[str, Any]) -> Response | StreamingResponse:
        router = self.router
        selection = self.route.decode
        role = Phase.HYBRID if self.phase is Phase.HYBRID and router.pool.role(Phase.HYBRID) else Phase.DECODING
        if selection is not None and selection.instance.draining:  # chosen before a scale-in began draining it
            selection = self._another(role) or selection
        last_error = "no instance"
        for attempt in range(2):
            if selection is None:
                break
            instance = selection.instance
            self.tried.add(instance.id)
            outcome = await self._attempt(instance, body)
            if not isinstance(outcome, str):
                return outcome
            last_error = outcome
            instance.record_failure()
            if attempt == 0:
                router.metrics.retried("decode")
                selection = self._another(role)
                if router.kv_field in body and selection is not None:
                    # The KV blocks may have been pulled or freed: the retry prefills itself.
                    body = {k: v for k, v in body.items() if k != router.kv_field}
                    self.phase = Phase.DECODING
        self._record("failed", None, e2e_s=time.monotonic() - self.arrived)
        raise HttpError(502, f"every attempt failed: {last_error}", "BadGatewayError")

    async def _attempt(self, instance: Instance, body: dict[str, Any]) -> Response | StreamingResponse | str:
        """One try on one instance: a response, or why it failed before any byte reached the client."""
        router = self.router
        kv_source = self.prefill_instance if router.kv_field in body else None
        slot = _in_flight(instance, self.route.input_tokens, kv_source)
        slot.__enter__()
        try:
            upstream = await router.upstream.post(instance.url + self.path, body, router.settings.first_byte_timeout_s)
        except UpstreamError as error:
            slot.__exit__(None, None, None)
            router.admission.release()
            return f"{instance.id}: {type(error).__name__} {error}"
        if upstream.status_code >= 500:
            await upstream.aclose()
            slot.__exit__(None, None, None)
            router.admission.release()
            return f"{instance.id} answered {upstream.status_code}"
        instance.record_success()
        router.tables[instance.id].record(self.route.routing.prefix_blocks)
        if self.parsed.stream and upstream.status_code == 200:
            headers, ledger = self.headers(instance), self.ledger
            if ledger is not None:
                headers["trailer"] = MIGRATIONS_TRAILER
            chunks = self._relay(upstream, slot, instance)
            trailers = ledger.trailers if ledger is not None else None
            return StreamingResponse(status=200, headers=headers, chunks=chunks, trailers=trailers)
        try:
            content = await upstream.read()
        except UpstreamError as error:
            return f"{instance.id}: {type(error).__name__} {error}"
        finally:
            await upstream.aclose()
            slot.__exit__(None, None, None)
            router.admission.release()
        self._finish_plain(upstream.status_code, content, instance)
        return Response(
            upstream.status_code,
            content,
            self.headers(instance),
            upstream.headers.get("content-type", "application/json"),
        )

    def _finish_plain(self, status: int, content: bytes, instance: Instance) -> None:
        router = self.router
        elapsed = time.monotonic() - self.arrived
        outcome = "ok" if status == 200 else f"http_{status}"
        input_tokens, output_tokens = self.route.input_tokens, 0
        if status == 200:
            # The usage figures only: parsing the whole answer again would cost more than the routing decision.
            prompt, completion = _USAGE_PROMPT.search(content), _USAGE_COMPLETION.search(content)
            if prompt:
                input_tokens = int(prompt.group(1))
                router.counter.observe(utf8_length(self.parsed.text), input_tokens)
            if completion:
                output_tokens = int(completion.group(1))
                router.record_output(output_tokens)
        # Not streamed, the whole answer is the first byte the client sees: no TTFT or TPOT of its own.
        self._record(outcome, instance, e2e_s=elapsed, input_tokens=input_tokens, output_tokens=output_tokens)
        if status == 200:
            router.on_complete(self, None, None, output_tokens)

    def _record(
        self,
        outcome: str,
        decode: Instance | None,
        e2e_s: float,
        ttft_s: float | None = None,
        tpot_s: float | None = None,
        input_tokens: int = 0,
        output_tokens: int = 0,
    ) -> None:
        """The request's every figure, to the recorder at once: see RouterMetrics.finished. Named one by one, not
        passed on as **kwargs: that would build a dict per request on the router's hot path."""
        prefill, route = self.prefill_instance, self.route
        self.router.metrics.finished(
            self.phase.value,
            outcome,
            decode.id if decode is not None else None,
            e2e_s=e2e_s,
            ttft_s=ttft_s,
            tpot_s=tpot_s,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            decision_s=route.decision_s,
            queue_s=route.queue_s,
            prefill_instance=prefill.id if prefill is not None else None,
            prefill_s=self.prefill_s,
        )

    async def _relay(self, upstream: UpstreamResponse, slot: _Slot, instance: Instance) -> AsyncIterator[bytes]:
        """Pass the engine's server-sent events through. If the engine fails or stalls mid-stream, the stream
        moves to another instance (see migration.py); if it cannot, it ends with an OpenAI-style error event."""
        router = self.router
        timing = _Timing(router, self.phase.value)
        outcome = "ok"
        try:
            continuing = False
            while True:
                leg = _Stream(self.route.request_id, instance, upstream, slot, continuing)
                async for chunk in self._leg(leg, timing):
                    yield chunk
                if leg.failure is None:
                    break
                log.warning("%s: %s", self.route.request_id, leg.failure)
                await upstream.aclose()
                slot.__exit__(None, None, None)
                if not leg.stalled:
                    instance.record_failure()
                moved = await self._migrate(instance, "stalled" if leg.stalled else "failed")
                if moved is None:
                    outcome = "broken"
                    yield _error_event(leg.failure)
                    break
                if isinstance(moved, bytes):  # every token had reached the client: only the end was missing
                    yield moved
                    break
                upstream, slot, instance = moved
                continuing = True
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "cancelled"  # the client went away: closing upstream makes vLLM abort the request
            raise
        finally:
            await upstream.aclose()
            slot.__exit__(None, None, None)
            router.admission.release()
            timing.flush()
            self._finish_stream(outcome, timing, instance)

    async def _leg(self, leg: _Stream, timing: _Timing) -> AsyncIterator[bytes]:
        """One upstream response's events, to the client; leg.failure says why it ended early, if it did."""
        router, ledger, instance = self.router, self.ledger, leg.instance
        router.streams.add(leg)  # from the response head on: a stalled engine may never send a token
        try:
            async for chunk in leg.upstream.iter_raw():
                leg.last_at = now = time.monotonic()
                leg.first = True
                known = len(ledger.ids) if ledger is not None else 0
                if ledger is not None:
                    chunk = ledger.observe(chunk)
                    if ledger.failed_event is not None:
                        why = error_message(ledger.failed_event)
                        leg.failure = f"the engine {instance.id} sent an error mid-stream: {why}"
                        return
                    if not chunk:
                        continue
                if ledger is not None and ledger.prompt_ids is not None:
                    tokens = len(ledger.ids) - known
                else:  # an engine that sends no token ids: one token an event that has a choice
                    tokens = chunk.count(b"data: {") - chunk.count(b'"choices":[]')
                timing.seen(tokens, now)
                if tokens and leg.prefilling is not None:
                    leg.prefilling.first_token()
                    leg.prefilling = None
                yield chunk
            if ledger is not None and not ledger.done:
                leg.failure = f"the engine {instance.id} ended the stream before its end"
            if leg.stalled:
                leg.failure = _stalled(instance, router)
        except UpstreamError as error:
            leg.failure = (
                _stalled(instance, router)
                if leg.stalled
                else f"the engine {instance.id} failed mid-stream: {type(error).__name__}"
            )
        finally:
            router.streams.discard(leg)

    async def _migrate(self, failed: Instance, reason: str) -> tuple[UpstreamResponse, _Slot, Instance] | bytes | None:
        """Continue the stream on another instance: its upstream response, slot and instance; the closing events
        when nothing is left to generate; None when it cannot move (no ledger, its limit reached, nowhere)."""
        ledger, router = self.ledger, self.router
        if ledger is None or ledger.migrations >= router.settings.max_migrations:
            return None
        if ledger.can_continue:
            max_tokens = self.parsed.max_tokens
            if max_tokens is None and not self.parsed.chat:
                max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS
            body = ledger.continuation(self.body, max_tokens, router.kv_field)
            if body is None:
                return ledger.closing_events()
            path = "/v1/completions"
        elif ledger.first_event is None:  # no event reached the client: the request starts again, whole
            ledger.restart()
            body = {k: v for k, v in self.body.items() if k != router.kv_field}
            path = self.path
        else:
            return None
        failed_ids = {failed.id}
        while (target := self._migration_target(failed_ids)) is not None:
            slot = _in_flight(target, self.route.input_tokens + ledger.committed).__enter__()
            try:
                upstream = await router.upstream.post(target.url + path, body, router.settings.first_byte_timeout_s)
            except UpstreamError as error:
                upstream, why = None, f"{type(error).__name__} {error}"
            else:
                why = f"answered {upstream.status_code}"
                if upstream.status_code == 200:
                    router.metrics.migrated(reason)
                    log.warning("%s: moved from %s to %s", self.route.request_id, failed.id, target.id)
                    return upstream, slot, target
                await upstream.aclose()
            slot.__exit__(None, None, None)
            log.warning("%s: moving to %s failed: %s", self.route.request_id, target.id, why)
            target.record_failure()
            failed_ids.add(target.id)
        return None

    def _migration_target(self, excluded: set[str]) -> Instance | None:
        """Another instance that generates (decode or hybrid), else a prefill instance serving the whole
        request (as when no decode instance is healthy)."""
        routing = self.route.routing
        routing.now = time.monotonic()
        for role in (Phase.DECODING, Phase.HYBRID, Phase.PREFILLING):
            remaining = [i for i in self.router.pool.role(role) if i.id not in excluded]
            selection = self.router.strategy.select(remaining, routing)
            if selection is not None:
                return selection.instance
        return None

    def _finish_stream(self, outcome: str, timing: _Timing, instance: Instance) -> None:
        """Tokens are counted from the engine's token ids where it sent them (a chunk may carry several), else
        one an event."""
        router = self.router
        end = time.monotonic()
        ttft = tpot = None
        tokens = timing.tokens
        if timing.first_at is not None:
            ttft = timing.first_at - self.arrived
            tpot = timing.tpot(tokens)
            router.record_output(tokens)
        self._record(
            outcome,
            instance,
            e2e_s=end - self.arrived,
            ttft_s=ttft,
            tpot_s=tpot,
            input_tokens=self.route.input_tokens,
            output_tokens=tokens,
        )
        if ttft is not None:
            router.on_complete(self, ttft, tpot, tokens)


def _stalled(instance: Instance, router: Router) -> str:
    return f"the engine {instance.id} stalled mid-stream: no token for {router.settings.stall_timeout_s:g} s"


def _error_event(message: str) -> bytes:
    payload = {"error": {"message": message, "type": "ServiceUnavailableError", "code": 503}}
    return b"data: " + json.dumps(payload).encode() + b"\n\ndata: [DONE]\n\n"


async def _activity_unknown(instance_id: str) -> Activity | None:
    return None


_Suspects = dict[str, tuple[Instance, float, str]]  # instance id -> (instance, its wait in s, why)


def _note_suspect(suspects: _Suspects, instance: Instance, waited_s: float, why: str) -> None:
    """One verdict per instance a round: the longest wait among its stalled streams and its own."""
    known = suspects.get(instance.id)
    if known is None or waited_s > known[1]:
        suspects[instance.id] = (instance, waited_s, why)


class _Stream:
    """One upstream response of a stream, as the stall watch looks at it: whether and when its last chunk came,
    how to end it; and why it ended early, if it did."""

    __slots__ = ("failure", "first", "instance", "last_at", "moved", "prefilling", "request_id", "stalled", "upstream")

    def __init__(
        self, request_id: str, instance: Instance, upstream: UpstreamResponse, slot: _Slot, moved: bool = False
    ):
        self.request_id, self.instance, self.upstream = request_id, instance, upstream
        self.prefilling: _Slot | None = slot  # in its instance's prefill queue until the first token
        self.last_at = time.monotonic()
        self.first = False  # a chunk came
        self.moved = moved  # a continuation elsewhere: watched from its start
        self.stalled = False
        self.failure: str | None = None


class _Timing:
    """A stream's first-token time and its tokens' inter-token gaps, across the instances it moves to. Gaps are
    recorded in batches; tokens arriving together in one chunk share its gap."""

    __slots__ = ("first_at", "first_tokens", "gaps", "last_at", "phase", "router", "token_chunks", "tokens")

    def __init__(self, router: Router, phase: str):
        self.router, self.phase = router, phase
        self.first_at: float | None = None
        self.last_at = 0.0
        self.tokens = 0
        self.first_tokens = 0  # tokens in the first chunk that had any
        self.token_chunks = 0
        self.gaps: list[float] = []

    def seen(self, tokens: int, now: float) -> None:
        if not tokens:
            return
        gaps = self.gaps
        if self.first_at is None:
            self.first_at, self.first_tokens = now, tokens
        elif tokens == 1:
            gaps.append(now - self.last_at)
        else:
            gaps.extend([(now - self.last_at) / tokens] * tokens)
        if len(gaps) >= _GAPS_BATCH:
            self.flush()
        self.last_at = now
        self.tokens += tokens
        self.token_chunks += 1

    def tpot(self, output_tokens: int) -> float | None:
        """Time per output token after the first chunk's: None where it cannot be known (one token, or all of
        them in one chunk), never 0."""
        span = self.last_at - (self.first_at or 0.0)
        return tokentiming.tpot(span, output_tokens, self.first_tokens, self.token_chunks)

    def flush(self) -> None:
        self.router.metrics.streamed(self.phase, self.gaps)
        self.gaps = []


class _Slot:
    """Counts a request against an instance while it is there; exits once, whatever path ends it. A decode
    request carrying a prefill instance's KV parameters also holds that instance (kv_pending) until it ends. A
    request the instance prefills itself is in its prefill queue (prefilling_tokens) until its first token."""

    __slots__ = ("_done", "_instance", "_kv_source", "_prefilling", "_tokens")

    def __init__(self, instance: Instance, tokens: int, kv_source: Instance | None = None):
        self._instance, self._tokens, self._kv_source, self._done = instance, tokens, kv_source, False
        self._prefilling = 0 if kv_source is not None else tokens

    def __enter__(self) -> _Slot:
        instance = self._instance
        instance.in_flight += 1
        instance.in_flight_prompt_tokens += self._tokens
        if self._prefilling:
            instance.prefill_queued(self._prefilling, time.monotonic())
        if self._kv_source is not None:
            self._kv_source.kv_pending += 1
        return self

    def first_token(self, timed_at: float | None = None) -> None:
        self._instance.prefill_answered(self._prefilling, timed_at)
        self._prefilling = 0

    def __exit__(self, *_: object) -> None:
        if not self._done:
            self._done = True
            if self._prefilling:
                self.first_token()
            self._instance.in_flight -= 1
            self._instance.in_flight_prompt_tokens -= self._tokens
            if self._kv_source is not None:
                self._kv_source.kv_pending -= 1


def _in_flight(instance: Instance, tokens: int, kv_source: Instance | None = None) -> _Slot:
    return _Slot(instance, tokens, kv_source)
