"""What `pdctl simulate` sends: requests with arrival times and token counts. This is the seam for `pdctl
bench`'s generator: anything that yields SimRequest can drive the simulation."""

from __future__ import annotations

import random
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, model_validator


@dataclass(frozen=True, slots=True)
class SimRequest:
    id: int
    arrival_s: float  # ignored under a concurrency limit: a request goes when a slot frees
    input_tokens: int
    output_tokens: int
    prefix_group: int | None = None  # requests of one group share their first prefix_tokens tokens
    prefix_tokens: int = 0
    priority: int = 0


class WorkloadSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_requests: int = Field(1000, ge=1)
    input_tokens: int = Field(200, ge=1)
    output_tokens: int = Field(500, ge=1)
    # Lengths drawn uniformly in [n x (1 - r), n x (1 + r)], as vllm bench serve's random dataset range ratio.
    range_ratio: float = Field(0.0, ge=0, lt=1)
    request_rate: float = Field(float("inf"), gt=0, description="requests/s, Poisson arrivals; inf: all at once")
    max_concurrency: int | None = Field(None, ge=1)
    prefix_groups: int = Field(0, ge=0, description="0: no shared prefixes")
    prefix_tokens: int = Field(0, ge=0)
    seed: int = 0

    @model_validator(mode="after")
    def _prefix_fits(self) -> WorkloadSpec:
        if self.prefix_tokens > self.input_tokens * (1 - self.range_ratio):
            raise ValueError("prefix_tokens must be at most the shortest input")
        return self


def generate(spec: WorkloadSpec) -> list[SimRequest]:
    rng = random.Random(spec.seed)

    def length(n: int) -> int:
        low, high = int(n * (1 - spec.range_ratio)), int(n * (1 + spec.range_ratio))
        return max(1, rng.randint(low, high))

    requests, now = [], 0.0
    for i in range(spec.num_requests):
        if spec.request_rate != float("inf"):
            now += rng.expovariate(spec.request_rate)
        group = rng.randrange(spec.prefix_groups) if spec.prefix_groups else None
        prefix = spec.prefix_tokens if group is not None else 0
        requests.append(SimRequest(i, now, length(spec.input_tokens), length(spec.output_tokens), group, prefix))
    return requests
