"""A vLLM-v1-like engine in virtual time: the scheduler, the KV cache, and the step model.

Each step, as vLLM v1's scheduler builds it: running requests first, in order, each taking the tokens it needs
(a prompt chunk, or one decode token) from the step's token budget (max_num_batched_tokens); a running request
that cannot get KV blocks preempts the lowest-priority running request (the last one under fcfs), which frees
its blocks and is recomputed from scratch later; then, if nothing was preempted, waiting requests in policy
order (fcfs, or priority then arrival) while fewer than max_num_seqs run and budget is left, each first
matching its prompt against the prefix cache. A request whose KV cache is still arriving from a prefill
instance waits (WAITING_FOR_REMOTE_KVS)."""

from __future__ import annotations

import heapq
import itertools
import math
import random
from dataclasses import dataclass, field
from typing import Any, Literal

from pdctl.perfmodel.kvcache import BlockPool, Eviction, Holding
from pdctl.perfmodel.steptime import BatchShape, StepModel


@dataclass(frozen=True, slots=True)
class EngineConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    eviction: Eviction = "lru"
    policy: Literal["fcfs", "priority"] = "fcfs"
    block_size: int = 16
    num_blocks: int | None = None  # from the memory fraction when unset
    gpu_memory_utilization: float = 0.9
    seed: int = 0  # the hardware's step noise (HardwareProfile.noise): the same seed, the same run
    speed: float | None = None  # the engine's speed factor; None draws it from the noise's speed_sigma


@dataclass(eq=False, slots=True)
class EngineRequest:
    id: str
    prompt_tokens: int
    max_tokens: int
    arrival: float = 0.0
    priority: int = 0
    block_hashes: list[int] = field(default_factory=list)
    external_tokens: int = 0  # prompt tokens whose KV comes from a prefill instance
    ready_at: float = 0.0  # when that KV has arrived
    computed: int = 0
    generated: int = 0
    cached_tokens: int = 0
    preemptions: int = 0
    holding: Holding = field(default_factory=Holding)
    finished: bool = False
    tag: Any = None  # the caller's own bookkeeping

    @property
    def known_tokens(self) -> int:
        return self.prompt_tokens + self.generated


@dataclass(slots=True)
class StepResult:
    seconds: float
    shape: BatchShape
    tokens: list[EngineRequest]  # requests that produced one output token this step
    finished: list[EngineRequest]


class Engine:
    def __init__(self, model: StepModel, config: EngineConfig):
        self.model, self.config = model, config
        blocks = config.num_blocks
        if blocks is None:
            blocks = model.kv_cache_tokens(config.gpu_memory_utilization) // config.block_size
        self.pool = BlockPool(blocks, config.block_size, config.eviction, config.enable_prefix_caching)
        self.running: list[EngineRequest] = []
        self._waiting: list[tuple[int, float, int, EngineRequest]] = []
        self._order = itertools.count()
        self.preemptions = 0
        self._scheduled: list[tuple[EngineRequest, int]] = []
        noise = model.hw.noise
        self._rng = random.Random(config.seed)
        self._step_variance_s = noise.step_variance_s
        self.speed = config.speed if config.speed is not None else math.exp(self._rng.gauss(0.0, noise.speed_sigma))
        self._shapes_run = set(range(1, config.max_num_seqs + 1))  # token counts of steps run (Overhead.new_shape_s)
        # The API server takes requests in one at a time (one process: parsing, tokenising, handing over), each
        # for Overhead.intake_s; it is free again at _intake_free_at. Where it shares the engine's core
        # (Overhead.shares_core), its time while the engine steps delays the engine: _stolen_s is that time not
        # yet added to a step, and intake time up to _charged_until has been counted.
        self._intake_free_at = 0.0
        self._charged_until = 0.0
        self._stolen_s = 0.0

    # -- queue ----------------------------------------------------------------------------------------------

    def add(self, request: EngineRequest) -> None:
        """Queue a request that reached the API server at request.arrival: the scheduler sees it once the API
        server has taken it in (request.ready_at is raised to that time)."""
        overhead = self.model.hw.overhead
        start = max(request.arrival, self._intake_free_at)
        intake = overhead.intake_s(request.prompt_tokens)
        if overhead.shares_core and self.running:
            # The engine steps on: the two share the core, the intake takes twice its time, and the engine loses
            # it (the step under way has its end set, so the next one pays).
            self._intake_free_at = start + 2 * intake
            self._stolen_s += intake
            self._charged_until = max(self._charged_until, self._intake_free_at)
        else:
            self._intake_free_at = start + intake
        request.ready_at = max(request.ready_at, self._intake_free_at)
        self._push(request, next(self._order))

    def _charge(self, start: float, end: float) -> None:
        start = max(start, self._charged_until)
        if end > start:
            self._stolen_s += end - start
            self._charged_until = end

    def _push(self, request: EngineRequest, order: int) -> None:
        priority = request.priority if self.config.policy == "priority" else 0
        key = request.arrival if self.config.policy == "priority" else 0.0
        heapq.heappush(self._waiting, (priority, key, order, request))

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def has_work(self) -> bool:
        return bool(self.running or self._waiting)

    def next_ready_at(self) -> float | None:
        """When a request waiting only for its remote KV becomes schedulable (None when none waits so)."""
        times = [entry[3].ready_at for entry in self._waiting]
        return min(times) if times else None

    # -- one step -------------------------------------------------------------------------------------------

    def schedule(self, now: float) -> BatchShape:
        budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[EngineRequest, int]] = []
        preempted = False
        index = 0
        block_size = self.pool.block_size
        running = self.running
        while index < len(running) and budget > 0:
            request = running[index]
            new = request.prompt_tokens + request.generated - request.computed
            if new > budget:
                new = budget
            target = request.computed + new
            # The common decode case: the blocks held already cover the next token.
            if target <= request.holding.blocks * block_size:
                scheduled.append((request, new))
                budget -= new
                index += 1
                continue
            while not self.pool.grow(request.holding, target):
                victim = self._victim()
                victim_index = self.running.index(victim)
                self._preempt(victim)
                preempted = True
                if victim_index < index:  # already scheduled this step: give its tokens back
                    index -= 1
                    budget += next(n for r, n in scheduled if r is victim)
                    scheduled = [(r, n) for r, n in scheduled if r is not victim]
                if victim is request:
                    break
            else:
                scheduled.append((request, new))
                budget -= new
                index += 1
        if not preempted:
            self._admit(now, budget, scheduled)
        self._scheduled = scheduled
        return _shape(scheduled)

    def _admit(self, now: float, budget: int, scheduled: list[tuple[EngineRequest, int]]) -> None:
        skipped = []
        config = self.config
        while self._waiting and len(self.running) < config.max_num_seqs and budget > 0:
            entry = heapq.heappop(self._waiting)
            request = entry[3]
            if request.ready_at > now:
                skipped.append(entry)
                continue
            if request.computed == 0 and not request.holding.blocks:
                request.cached_tokens = self.pool.match(request.holding, request.block_hashes, request.prompt_tokens)
                request.computed = max(request.cached_tokens, min(request.external_tokens, request.known_tokens - 1))
            new = request.known_tokens - request.computed
            if new > budget and not config.enable_chunked_prefill:
                self._unmatch(request)
                skipped.append(entry)
                break
            new = min(new, budget)
            if not self.pool.grow(request.holding, request.computed + new):
                self._unmatch(request)
                skipped.append(entry)
                break
            self.running.append(request)
            scheduled.append((request, new))
            budget -= new
        for entry in skipped:
            heapq.heappush(self._waiting, entry)

    def _unmatch(self, request: EngineRequest) -> None:
        self.pool.free(request.holding)
        request.computed, request.cached_tokens = 0, 0

    def _victim(self) -> EngineRequest:
        if self.config.policy == "priority":
            return max(self.running, key=lambda r: (r.priority, r.arrival))
        return self.running[-1]

    def _preempt(self, request: EngineRequest) -> None:
        """Recompute: drop its KV and queue it again; its output so far becomes part of what is recomputed."""
        self.running.remove(request)
        self.pool.free(request.holding)
        request.computed = 0
        request.external_tokens = 0
        request.preemptions += 1
        self.preemptions += 1
        self._push(request, -next(self._order))  # ahead of later arrivals, as vLLM's prepend

    def finish(self) -> tuple[list[EngineRequest], list[EngineRequest]]:
        """Apply the scheduled step's results: requests that caught up sample one token."""
        tokens, finished = [], []
        for request, new in self._scheduled:
            computed = request.computed
            prompt = request.prompt_tokens
            request.computed = computed + new
            if computed < prompt <= computed + new:
                self.pool.cache_prompt(request.holding, request.block_hashes)
            if computed + new < prompt + request.generated:
                continue  # a prompt chunk: no token yet
            request.generated += 1
            tokens.append(request)
            if request.generated >= request.max_tokens:
                request.finished = True
                self.pool.free(request.holding)
                finished.append(request)
        if finished:
            self.running = [r for r in self.running if not r.finished]
        self._scheduled = []
        return tokens, finished

    def step(self, now: float) -> StepResult | None:
        """Schedule and run one step from `now`; None when nothing can run now."""
        was_idle = not self.running
        shape = self.schedule(now)
        if shape.tokens == 0:
            return None
        overhead = self.model.hw.overhead
        if overhead.shares_core:
            self._charge(now, self._intake_free_at)  # intake still under way as the step begins
        seconds = self.model.step_seconds(shape) + self._stolen_s + (overhead.idle_wake_s if was_idle else 0.0)
        if shape.tokens not in self._shapes_run:
            self._shapes_run.add(shape.tokens)
            seconds += overhead.new_shape_s
        self._stolen_s = 0.0
        tokens, finished = self.finish()
        return StepResult(self._noisy(seconds), shape, tokens, finished)

    def _noisy(self, seconds: float) -> float:
        """The step's time on this machine: the model's, at this engine's speed, give or take the small delays
        that add up over it (HardwareProfile.noise)."""
        seconds *= self.speed
        variance = self._step_variance_s
        return self._rng.gammavariate(seconds / variance, variance) if variance else seconds

    def abort(self, request: EngineRequest) -> None:
        if request in self.running:
            self.running.remove(request)
        else:
            self._waiting = [entry for entry in self._waiting if entry[3] is not request]
            heapq.heapify(self._waiting)
        self.pool.free(request.holding)
        request.finished = True


def _shape(scheduled: list[tuple[EngineRequest, int]]) -> BatchShape:
    shape = BatchShape()
    decode_seqs = decode_context = 0
    for request, new in scheduled:
        computed = request.computed
        if new == 1 and computed > 0:
            decode_seqs += 1
            decode_context += computed + 1
        else:
            shape.add(new, computed)
    shape.tokens += decode_seqs
    shape.seqs += decode_seqs
    shape.decode_seqs += decode_seqs
    shape.decode_context += decode_context
    return shape
