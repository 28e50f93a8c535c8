"""What the router knows of each instance: a small mutable record per instance, updated by the supervisor's
health, the metrics scrape and the router's own in-flight counts; policies read it, never fetch."""

from __future__ import annotations

import time
from dataclasses import dataclass

from pdctl.types import ExecutionInstanceType


def instance_load(in_flight: float, running: float, waiting: float, max_num_seqs: int) -> float:
    """Sequences running or queued on an instance against what its engine runs at once (above 1 while requests
    queue): what the router picks by, the scaler's busy slots, and the scaling benchmark's model all read this.
    The router's own count and the engine's scraped one differ by a scrape interval: the larger one counts."""
    # Conditional expressions, not max(): the router reads this per candidate on the routing decision's hot path.
    queued = running + waiting
    return (in_flight if in_flight > queued else queued) / (max_num_seqs or 1)


@dataclass(slots=True, eq=False)
class Instance:
    id: str
    role: ExecutionInstanceType
    url: str
    max_num_seqs: int = 256
    healthy: bool = False
    draining: bool = False
    # Circuit breaker: after consecutive failures the instance gets no traffic until this time.
    circuit_open_until: float = 0.0
    consecutive_failures: int = 0
    # The router's own view, exact and immediate.
    in_flight: int = 0
    in_flight_prompt_tokens: int = 0
    # Prompt tokens this instance computes itself and has not yet answered with a first token: the prefill
    # queue a new prompt waits behind. A decode request that brings its KV cache adds none.
    prefilling_tokens: int = 0
    # The engine's view, from its /metrics (a scrape interval old).
    running: float = 0.0
    waiting: float = 0.0
    kv_usage: float = 0.0
    # Measured prompt tokens per second of prefill on this instance (EWMA), for TTFT estimates.
    prefill_tokens_per_s: float = 0.0
    # When the prefill queue last went from empty to busy, and the prompt tokens answered since: the speed
    # sample. A prompt's own time would count the prompts it waited behind (or was batched with) as slowness.
    prefill_busy_since: float = 0.0
    prefill_busy_tokens: int = 0
    # Decode requests still to read this prefill instance's KV cache: it must not stop while any remain.
    kv_pending: int = 0

    @property
    def load(self) -> float:
        return instance_load(self.in_flight, self.running, self.waiting, self.max_num_seqs)

    def prefill_queued(self, tokens: int, now: float) -> None:
        if not self.prefilling_tokens:
            self.prefill_busy_since, self.prefill_busy_tokens = now, 0
        self.prefilling_tokens += tokens

    def prefill_answered(self, tokens: int, timed_at: float | None = None) -> None:
        """A prompt out of the prefill queue; timed_at (its first token's time) moves the speed towards the busy
        period's. Only the prefill hop is timed: a decode instance's first tokens wait on its decode steps."""
        self.prefilling_tokens -= tokens
        if timed_at is None:
            return
        self.prefill_busy_tokens += tokens
        seconds = timed_at - self.prefill_busy_since
        if seconds > 0:
            speed = self.prefill_busy_tokens / seconds
            self.prefill_tokens_per_s = (
                speed if not self.prefill_tokens_per_s else 0.8 * self.prefill_tokens_per_s + 0.2 * speed
            )

    def record_success(self) -> None:
        self.consecutive_failures = 0

    def record_failure(self, threshold: int = 3, open_s: float = 5.0) -> None:
        self.consecutive_failures += 1
        if self.consecutive_failures >= threshold:
            self.circuit_open_until = time.monotonic() + open_s


class Pool:
    """Every instance of the cluster by role, the lists built once, so the hot path reads prebuilt lists."""

    def __init__(self, instances: list[Instance]):
        self.by_id = {instance.id: instance for instance in instances}
        self._by_role: dict[ExecutionInstanceType, list[Instance]] = {}
        self._rebuild()

    def _rebuild(self) -> None:
        self._by_role = {role: [] for role in ExecutionInstanceType}
        for instance in self.by_id.values():
            self._by_role[instance.role].append(instance)

    def add(self, instance: Instance) -> None:
        self.by_id[instance.id] = instance
        self._rebuild()

    def remove(self, instance_id: str) -> None:
        self.by_id.pop(instance_id, None)
        self._rebuild()

    def role(self, role: ExecutionInstanceType) -> list[Instance]:
        return self._by_role[role]

    def all(self) -> list[Instance]:
        return list(self.by_id.values())
