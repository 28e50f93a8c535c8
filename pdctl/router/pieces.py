"""Routing pieces in the style of llm-d's scheduler plugins: filters drop instances, scorers rate the rest
in [0, 1] (higher is better), a picker chooses. A strategy is a list of each; a new policy is a new small
class here and a line in STRATEGIES."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from operator import add
from typing import Protocol

from pdctl.control_plane.errors import UnknownPolicy
from pdctl.router.pool import Instance
from pdctl.router.prefix import PrefixTable


@dataclass(slots=True)
class RoutingRequest:
    """What pieces may read of a request."""

    input_tokens: int
    prefix_blocks: list[int] = field(default_factory=list)
    now: float = 0.0
    # Filled by PrefixAffinity while scoring: instance id -> matched leading blocks.
    prefix_matches: dict[str, int] = field(default_factory=dict)


class Filter(Protocol):
    def keep(self, instance: Instance, request: RoutingRequest) -> bool: ...


class Scorer(Protocol):
    weight: float

    def score(self, instance: Instance, request: RoutingRequest) -> float: ...


class Picker(Protocol):
    def pick(self, candidates: list[Instance], scores: list[float]) -> Instance: ...


# ---- filters ---------------------------------------------------------------------------------------------


class Healthy:
    def keep(self, instance: Instance, request: RoutingRequest) -> bool:
        return instance.healthy


class NotDraining:
    def keep(self, instance: Instance, request: RoutingRequest) -> bool:
        return not instance.draining


class CircuitClosed:
    def keep(self, instance: Instance, request: RoutingRequest) -> bool:
        return instance.circuit_closed(request.now)


# ---- scorers ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class OutstandingTokens:
    """Fewer prompt tokens in flight here: shorter queue ahead of this request's prefill."""

    weight: float = 1.0
    scale_tokens: float = 2048.0

    def score(self, instance: Instance, request: RoutingRequest) -> float:
        return 1.0 / (1.0 + instance.in_flight_prompt_tokens / self.scale_tokens)


@dataclass(slots=True)
class RunningSequences:
    """Room left against the engine's --max-num-seqs."""

    weight: float = 1.0

    def score(self, instance: Instance, request: RoutingRequest) -> float:
        return max(0.0, 1.0 - instance.load)


@dataclass(slots=True)
class KVCacheUsage:
    """Free KV cache (from the engine's vllm:kv_cache_usage_perc): less preemption ahead."""

    weight: float = 0.5

    def score(self, instance: Instance, request: RoutingRequest) -> float:
        return max(0.0, 1.0 - instance.kv_usage)


@dataclass(slots=True)
class PrefixAffinity:
    """The share of the prompt's prefix this instance likely has cached."""

    tables: Callable[[str], PrefixTable]
    weight: float = 2.0

    def score(self, instance: Instance, request: RoutingRequest) -> float:
        if not request.prefix_blocks:
            return 0.0
        matched = self.tables(instance.id).match(request.prefix_blocks)
        request.prefix_matches[instance.id] = matched
        return matched / len(request.prefix_blocks)


# ---- pickers ---------------------------------------------------------------------------------------------


class BestScore:
    """The highest score; ties broken at random so equal instances share the load."""

    def __init__(self, rng: random.Random | None = None):
        self._rng = rng or random.Random()

    def pick(self, candidates: list[Instance], scores: list[float]) -> Instance:
        best = max(scores)
        tied = [c for c, s in zip(candidates, scores, strict=True) if s >= best - 1e-9]
        return tied[0] if len(tied) == 1 else tied[int(self._rng.random() * len(tied))]


class RoundRobin:
    def __init__(self) -> None:
        self._counter = itertools.count()

    def pick(self, candidates: list[Instance], scores: list[float]) -> Instance:
        return candidates[next(self._counter) % len(candidates)]


# ---- strategies ------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Selection:
    instance: Instance
    scores: dict[str, float]


class Strategy:
    def __init__(self, name: str, filters: list[Filter], scorers: list[Scorer], picker: Picker):
        self.name = name
        self.filters = filters
        self.scorers = scorers
        self.picker = picker

    def candidates(self, instances: list[Instance], request: RoutingRequest) -> list[Instance]:
        # One comprehension per filter: the decision's hot path, where a call per instance and filter counts.
        kept = instances
        for piece in self.filters:
            keep = piece.keep
            kept = [instance for instance in kept if keep(instance, request)]
        return kept

    def select(self, instances: list[Instance], request: RoutingRequest) -> Selection | None:
        return self.pick_from(self.candidates(instances, request), request)

    def pick_from(self, candidates: list[Instance], request: RoutingRequest) -> Selection | None:
        """Score and pick among instances the filters already kept."""
        if not candidates:
            return None
        if not self.scorers:
            return Selection(self.picker.pick(candidates, [0.0] * len(candidates)), {})
        # Column by column (one comprehension per scorer), summed in scorer order as a row-wise loop would.
        scores: list[float] = []
        for scorer in self.scorers:
            weight, score = scorer.weight, scorer.score
            column = [weight * score(candidate, request) for candidate in candidates]
            scores = list(map(add, scores, column)) if scores else column
        chosen = self.picker.pick(candidates, scores)
        return Selection(chosen, {candidate.id: value for candidate, value in zip(candidates, scores, strict=True)})


def _filters() -> list[Filter]:
    return [Healthy(), NotDraining(), CircuitClosed()]


def make_strategy(name: str, tables: Callable[[str], PrefixTable], rng: random.Random | None = None) -> Strategy:
    factories: dict[str, Callable[[], Strategy]] = {
        "load_balanced": lambda: Strategy(
            name, _filters(), [OutstandingTokens(), RunningSequences(), KVCacheUsage()], BestScore(rng)
        ),
        "round_robin": lambda: Strategy(name, _filters(), [], RoundRobin()),
        "cache_aware": lambda: Strategy(
            name,
            _filters(),
            [PrefixAffinity(tables), OutstandingTokens(), RunningSequences(), KVCacheUsage()],
            BestScore(rng),
        ),
    }
    if name not in factories:
        raise UnknownPolicy(f"unknown routing_strategy {name!r}; known: {', '.join(factories)}")
    return factories[name]()


STRATEGIES = ("load_balanced", "round_robin", "cache_aware")
