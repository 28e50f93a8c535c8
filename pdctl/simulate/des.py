"""The discrete-event simulation: every instance of a profile as an engine model, the daemon's routing pieces
and phase policies deciding where each request goes, all in virtual time (no processes, no HTTP).

A PD-split request is prefilled on a prefill instance (max_tokens 1, as the router sends it), its KV cache
moves to the decode instance (the hardware profile's link), and the decode instance computes the prompt's
last token again and generates, as vLLM's NixlConnector does. The router's view of each instance (in-flight
counts, running, waiting, KV usage) is updated as the events happen, where the daemon sees /metrics a scrape
interval late."""

from __future__ import annotations

import heapq
import itertools
import random
from collections import defaultdict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from pdctl.perfmodel.arch import ModelArch
from pdctl.perfmodel.hardware import HardwareProfile
from pdctl.perfmodel.scheduler import Engine, EngineConfig, EngineRequest
from pdctl.perfmodel.steptime import StepModel
from pdctl.profile import ClusterProfile
from pdctl.routing.phase import (
    PhaseDecision,
    PoolLoad,
    RequestFeatures,
    make_phase_policy,
    pool_load,
    with_availability,
)
from pdctl.routing.pieces import RoutingRequest, Selection, make_strategy
from pdctl.routing.pool import Instance, Pool
from pdctl.routing.prefix import PrefixTable, block_ends
from pdctl.simulate.report import RequestRecord
from pdctl.simulate.workload import SimRequest
from pdctl.types import ExecutionInstance
from pdctl.types import ExecutionInstanceType as Phase

# The router's first blocks are 128 characters; at about 4 characters a token that is 32 tokens.
ROUTER_BLOCK_ENDS = block_ends(32)


def engine_config(profile: ClusterProfile, instance: ExecutionInstance, hardware: HardwareProfile) -> EngineConfig:
    """The engine's batching knobs as pdctl's command builder gives them to vLLM."""
    policy = "priority" if profile.router.scheduling_policy == "slo_aware" else "fcfs"
    decode = instance.decoding_config or profile.decode
    common = {"enable_prefix_caching": decode.enable_prefix_caching, "eviction": profile.pd.kv_cache_eviction_policy,
              "policy": policy}  # fmt: skip
    if instance.instance_type is Phase.PREFILLING:
        prefill = instance.prefilling_config or profile.prefill
        return EngineConfig(
            max_num_seqs=prefill.target_batch_size,
            max_num_batched_tokens=prefill.max_chunk_size_tokens,
            enable_chunked_prefill=prefill.enable_chunked_prefill,
            gpu_memory_utilization=profile.pd.kv_cache_memory_fraction,
            **common,
        )
    return EngineConfig(
        max_num_seqs=decode.max_parallel_requests,
        max_num_batched_tokens=hardware.default_max_num_batched_tokens,
        gpu_memory_utilization=decode.kv_cache_memory_fraction,
        **common,
    )


@dataclass(eq=False)
class _Node:
    """One instance: the router's record of it and the engine model behind it."""

    record: Instance
    engine: Engine
    model: StepModel
    gpus: int = 1
    stepping: bool = False
    busy_s: float = 0.0  # time spent in steps


@dataclass(eq=False)
class _Flight:
    request: SimRequest
    record: RequestRecord
    blocks: list[int]
    engine_hashes: list[int]
    decode: _Node | None = None
    last_token_at: float = 0.0
    phase: Phase = Phase.DECODING
    tokens: int = 0


@dataclass(eq=False, slots=True)
class _Ticket:
    """What the simulation keeps on each engine request."""

    flight: _Flight
    node: _Node
    on_token: Callable[[EngineRequest], None]
    prefilling: int = 0  # prompt tokens in the node's prefill queue (Instance.prefilling_tokens) until a token

    def first_token(self, timed_at: float | None = None) -> None:
        self.node.record.prefill_answered(self.prefilling, timed_at)
        self.prefilling = 0


def _hashes(request: SimRequest, ends: Iterable[int]) -> list[int]:
    """Hashes of the prompt's full blocks, ending at `ends` (in tokens); a block within a prefix group's first
    prefix_tokens is shared across the group, so its hash stands for that prefix as a chained hash would."""
    shared = request.prefix_tokens if request.prefix_group is not None else 0
    hashes: list[int] = []
    for index, end in enumerate(ends):
        if end > request.input_tokens:
            break
        hashes.append(hash(("p", request.prefix_group, index) if end <= shared else ("r", request.id, index)))
    return hashes


class ClusterSim:
    def __init__(
        self,
        profile: ClusterProfile,
        arch: ModelArch,
        hardware: HardwareProfile,
        seed: int = 0,
        hop_s: float = 0.0,
        speed: float | None = None,
    ):
        """`seed` also seeds each engine's step noise (its own stream per instance); `speed` sets every engine's
        speed factor where a caller sweeps it (None: each engine draws its own from the hardware's noise)."""
        self.profile = profile
        # Latency of each hop from the router to an engine (HTTP and the router's own work): a request reaches an
        # engine this long after the router sends it, its first engine after it arrives and, split, its decode
        # instance after its prefill ends.
        self.hop_s = hop_s
        self.nodes: dict[str, _Node] = {}
        for index, spec in enumerate(profile.resolved_instances()):
            model = StepModel(arch, hardware, spec.tensor_parallel_size or 1, spec.pipeline_parallel_size or 1)
            config = replace(engine_config(profile, spec, hardware), seed=seed * 4096 + index, speed=speed)
            record = Instance(spec.instance_id, spec.instance_type, f"sim://{spec.instance_id}",
                              max_num_seqs=config.max_num_seqs, healthy=True)  # fmt: skip
            gpus = spec.gpu_count or 1
            self.nodes[record.id] = _Node(record, Engine(model, config), model, gpus)
        self.pool = Pool([node.record for node in self.nodes.values()])
        self.policy = make_phase_policy(profile.pd)
        self.tables: defaultdict[str, PrefixTable] = defaultdict(
            lambda: PrefixTable(eviction=profile.pd.kv_cache_eviction_policy)
        )
        self.strategy = make_strategy(profile.router.routing_strategy, self.tables.__getitem__, random.Random(seed))
        self.uses_prefixes = self.strategy.uses_prefixes or self.policy.uses_prefixes
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self._held: deque[_Flight] = deque()  # admitted by the router only when an instance has room
        self._open: dict[int, _Flight] = {}  # arrived and not yet answered, by request id
        self.records: list[RequestRecord] = []
        self.decisions: dict[str, int] = defaultdict(int)
        self._on_done: Callable[[], None] = lambda: None  # under a concurrency limit: send the next request

    # -- the event loop ---------------------------------------------------------------------------------------

    def at(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._events, (when, next(self._order), action))

    def run(self, requests: list[SimRequest], max_concurrency: int | None = None) -> float:
        """Simulate until no event is left, every request answered or failed; returns the virtual duration from
        the first arrival."""
        pending = deque(sorted(requests, key=lambda r: r.arrival_s))
        if max_concurrency is None:
            for request in pending:
                self.at(request.arrival_s, lambda r=request: self._arrive(r))
        else:

            def next_one() -> None:
                if pending:
                    request = pending.popleft()
                    self.at(max(self.now, request.arrival_s), lambda: self._arrive(request))

            self._on_done = next_one
            for _ in range(min(max_concurrency, len(pending))):
                next_one()
        start = min((r.arrival_s for r in requests), default=0.0)
        while self._events:
            self.now, _, action = heapq.heappop(self._events)
            action()
        self._fail_unanswered(requests)
        return self.now - start

    def _fail_unanswered(self, requests: list[SimRequest]) -> None:
        """With no event left, a request not answered never will be: it is failed, by where it stopped, never
        dropped. (simulate() refuses layouts that cannot serve a workload, so this marks a fault of the model.)"""
        for flight in self._open.values():
            flight.record.error_kind = "held_by_router" if flight in self._held else "stalled_in_engine"
            self.records.append(flight.record)
        seen = {record.id for record in self.records}
        self.records += [
            RequestRecord(r.id, r.input_tokens, r.output_tokens, r.arrival_s, error_kind="not_sent")
            for r in requests
            if r.id not in seen
        ]  # never sent: a closed-loop client's requests queued behind those

    # -- routing: the daemon's pieces, as Router.plan uses them -------------------------------------------------

    def _arrive(self, request: SimRequest) -> None:
        record = RequestRecord(request.id, request.input_tokens, request.output_tokens, self.now)
        blocks = _hashes(request, ROUTER_BLOCK_ENDS) if self.uses_prefixes else []
        block_size = next(iter(self.nodes.values())).engine.config.block_size
        flight = _Flight(
            request, record, blocks, _hashes(request, range(block_size, request.input_tokens + 1, block_size))
        )
        self._open[request.id] = flight
        if self._held or not self._route(flight):
            self._held.append(flight)  # the router's admission queue, in arrival order

    def plan(self, flight: _Flight) -> tuple[PhaseDecision, Selection | None, Selection | None]:
        request = flight.request
        routing = RoutingRequest(request.input_tokens, flight.blocks, self.now, request.input_tokens, ROUTER_BLOCK_ENDS)
        candidates = {role: self.strategy.candidates(self.pool.role(role), routing) for role in Phase}
        decode = self.strategy.pick_from(candidates[Phase.DECODING], routing)
        cached = routing.cached_tokens(decode.instance.id, self.tables[decode.instance.id]) if decode else 0
        features = RequestFeatures(request.input_tokens, float(request.output_tokens), cached)
        decision = self.policy.decide(features, self._load(decode, candidates[Phase.PREFILLING]))
        available = {role for role, kept in candidates.items() if kept}
        decision = with_availability(decision, self.profile.pd.enabled, available)
        prefill = None
        if decision.phase is Phase.HYBRID:
            hybrid = candidates[Phase.HYBRID] or [i for kept in candidates.values() for i in kept]
            decode = self.strategy.pick_from(hybrid, routing)
        elif decision.phase is Phase.PREFILLING:
            prefill = self.strategy.pick_from(candidates[Phase.PREFILLING], routing)
        return decision, prefill, decode

    def _load(self, decode: Selection | None, prefills: list[Instance]) -> PoolLoad:
        profile = self.profile
        return pool_load(
            decode.instance if decode else None,
            prefills,
            profile.prefill.target_throughput_tokens_per_sec,
            profile.router.slo.ttft_ms / 1000,
            profile.slo_tpot_ms / 1000,
        )

    def _route(self, flight: _Flight) -> bool:
        """Decide and send, or False when every candidate is full (the router holds the request)."""
        decision, prefill, decode = self.plan(flight)
        if decode is None:
            raise RuntimeError("no decode or hybrid instance in the profile")
        targets = [s.instance for s in (prefill, decode) if s is not None]
        if not all(t.in_flight < t.max_num_seqs for t in targets):
            return False
        self.decisions[decision.phase.value] += 1
        flight.phase = decision.phase
        flight.record.phase = decision.phase.value
        flight.decode = self.nodes[decode.instance.id]
        if prefill is not None:
            self._submit(self.nodes[prefill.instance.id], flight, prefill_only=True)
        else:
            self._submit(flight.decode, flight, prefill_only=False)
        return True

    # -- engines --------------------------------------------------------------------------------------------

    def _submit(
        self, node: _Node, flight: _Flight, prefill_only: bool, external: int = 0, ready_at: float = 0.0
    ) -> None:
        request = flight.request
        ready_at = max(ready_at, self.now + self.hop_s)
        node.record.in_flight += 1
        node.record.in_flight_prompt_tokens += request.input_tokens
        self.tables[node.record.id].record(flight.blocks)
        engine_request = EngineRequest(
            id=str(request.id),
            prompt_tokens=request.input_tokens,
            max_tokens=1 if prefill_only else request.output_tokens,
            arrival=self.now,
            priority=request.priority,
            block_hashes=flight.engine_hashes,
            external_tokens=external,
            ready_at=ready_at,
        )
        prefilling = 0 if external else request.input_tokens
        if prefilling:
            node.record.prefill_queued(prefilling, self.now)
        on_token = self._prefilled if prefill_only else self._token
        engine_request.tag = _Ticket(flight, node, on_token, prefilling)
        node.engine.add(engine_request)  # raises ready_at to when the instance's API server has taken it in
        if engine_request.ready_at > self.now:
            self.at(engine_request.ready_at, lambda: self._kick(node))
        self._kick(node)

    def _kick(self, node: _Node) -> None:
        if node.stepping or not node.engine.has_work():
            return
        result = node.engine.step(self.now)
        if result is None:
            return  # only requests whose KV is still arriving: their arrival kicks again
        node.stepping = True
        node.busy_s += result.seconds
        done = self.now + result.seconds

        def finished() -> None:
            # The step's tokens are all delivered before the next step starts: a token that frees a slot lets
            # the router send a held request here, and a step started then would run ahead of the tokens still
            # to deliver (a request finishing in it was then answered twice).
            for engine_request in result.tokens:
                engine_request.tag.on_token(engine_request)
            node.stepping = False
            self._scrape(node)
            self._kick(node)

        self.at(done, finished)

    def _scrape(self, node: _Node) -> None:
        engine = node.engine
        node.record.running = float(len(engine.running))
        node.record.waiting = float(engine.waiting)
        node.record.kv_usage = engine.pool.usage

    def _release(self, engine_request: EngineRequest) -> None:
        node: _Node = engine_request.tag.node
        node.record.in_flight -= 1
        node.record.in_flight_prompt_tokens -= engine_request.prompt_tokens
        while self._held and self._route(self._held[0]):
            self._held.popleft()

    def _prefilled(self, engine_request: EngineRequest) -> None:
        ticket: _Ticket = engine_request.tag
        ticket.first_token(timed_at=self.now)
        flight = ticket.flight
        self._release(engine_request)
        assert flight.decode is not None
        # The decode instance pulls the KV once the request has reached it and its API server has taken it in,
        # as the sim engine (and vLLM's scheduler, which starts the pull) does.
        model = flight.decode.model
        ready = (
            self.now
            + self.hop_s
            + model.hw.overhead.intake_s(flight.request.input_tokens)
            + model.kv_transfer_seconds(flight.request.input_tokens)
        )
        self._submit(flight.decode, flight, prefill_only=False, external=flight.request.input_tokens, ready_at=ready)

    def _token(self, engine_request: EngineRequest) -> None:
        ticket: _Ticket = engine_request.tag
        flight, record = ticket.flight, ticket.flight.record
        if ticket.prefilling:
            ticket.first_token()
        if flight.tokens == 0:
            record.ttft = self.now - record.arrival_s
        else:
            record.itls.append(self.now - flight.last_token_at)
        flight.tokens += 1
        flight.last_token_at = self.now
        if engine_request.finished:
            record.e2e = self.now - record.arrival_s
            record.cached_tokens = engine_request.cached_tokens
            record.preemptions = engine_request.preemptions
            self.records.append(record)
            del self._open[record.id]
            self._release(engine_request)
            self._on_done()

    def gpu_busy_fraction(self, duration_s: float) -> float:
        """GPU-seconds spent in engine steps over GPU-seconds available: what share of the cluster's GPU time
        did work (an instance's GPUs all work in each of its steps)."""
        total = sum(node.gpus for node in self.nodes.values()) * duration_s
        return sum(node.busy_s * node.gpus for node in self.nodes.values()) / total if total else 0.0
