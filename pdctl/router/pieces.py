"""Routing pieces in the style of llm-d's scheduler plugins: filters drop instances, scorers rate the rest
in [0, 1] (higher is better), a picker chooses. A strategy is a list of each, and a new strategy is one class
that registers itself by name: `class MyStrategy(Strategy, name="mine")`."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from operator import add
from typing import Any, ClassVar, Protocol

from pdctl.errors import UnknownPolicy
from pdctl.router.pool import Instance
from pdctl.router.prefix import CHAR_BLOCK_ENDS, PrefixTable, covered


@dataclass(slots=True)
class RoutingRequest:
    """What pieces may read of a request."""

    input_tokens: int
    prefix_blocks: list[int] = field(default_factory=list)
    now: float = 0.0
    # The prompt's length in the units of prefix_ends (characters for the daemon, tokens for simulate).
    prefix_length: int = 0
    prefix_ends: tuple[int, ...] = CHAR_BLOCK_ENDS
    # Filled by PrefixAffinity while scoring: instance id -> matched leading blocks.
    prefix_matches: dict[str, int] = field(default_factory=dict)

    def cached_share(self, matched_blocks: int) -> float:
        """The share of the prompt that `matched_blocks` leading blocks hold."""
        return covered(matched_blocks, self.prefix_ends, self.prefix_length)

    def cached_tokens(self, instance_id: str, table: PrefixTable) -> int:
        """The prompt tokens the instance likely holds in its prefix cache."""
        if not self.prefix_blocks:
            return 0
        matched = self.prefix_matches.get(instance_id)  # the prefix scorer, where there is one, matched already
        if matched is None:
            matched = table.match(self.prefix_blocks)
        return min(self.input_tokens, round(self.input_tokens * self.cached_share(matched)))


class Filter(Protocol):
    def filter(self, instances: list[Instance], request: RoutingRequest) -> list[Instance]: ...


class Scorer(Protocol):
    weight: float

    def scores(self, candidates: list[Instance], request: RoutingRequest) -> list[float]:
        """Each candidate's score in [0, 1], times the scorer's weight."""
        ...


class Picker(Protocol):
    def pick(self, candidates: list[Instance], scores: list[float]) -> Instance: ...


# Pieces take the whole list, as llm-d's plugins take every pod: one call and one comprehension per piece, not a
# call per instance and piece, on the routing decision's hot path.

# ---- filters ---------------------------------------------------------------------------------------------


class Healthy:
    def filter(self, instances: list[Instance], request: RoutingRequest) -> list[Instance]:
        return [instance for instance in instances if instance.healthy]


class NotDraining:
    def filter(self, instances: list[Instance], request: RoutingRequest) -> list[Instance]:
        return [instance for instance in instances if not instance.draining]


class CircuitClosed:
    def filter(self, instances: list[Instance], request: RoutingRequest) -> list[Instance]:
        now = request.now
        return [instance for instance in instances if now >= instance.circuit_open_until]


# ---- scorers ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class OutstandingTokens:
    """Fewer prompt tokens in flight here: shorter queue ahead of this request's prefill."""

    weight: float = 1.0
    scale_tokens: float = 2048.0

    def scores(self, candidates: list[Instance], request: RoutingRequest) -> list[float]:
        scale, weight = self.scale_tokens, self.weight
        return [weight * scale / (scale + instance.in_flight_prompt_tokens) for instance in candidates]


@dataclass(slots=True)
class RunningSequences:
    """Room left against the engine's --max-num-seqs."""

    weight: float = 1.0

    def scores(self, candidates: list[Instance], request: RoutingRequest) -> list[float]:
        weight = self.weight
        return [weight * (1.0 - load) if (load := instance.load) < 1.0 else 0.0 for instance in candidates]


@dataclass(slots=True)
class KVCacheUsage:
    """Free KV cache (from the engine's vllm:kv_cache_usage_perc): less preemption ahead."""

    weight: float = 0.5

    def scores(self, candidates: list[Instance], request: RoutingRequest) -> list[float]:
        weight = self.weight
        return [weight * (1.0 - used) if (used := instance.kv_usage) < 1.0 else 0.0 for instance in candidates]


@dataclass(slots=True)
class PrefixAffinity:
    """The share of the prompt's prefix this instance likely has cached."""

    tables: Callable[[str], PrefixTable]
    weight: float = 2.0

    def scores(self, candidates: list[Instance], request: RoutingRequest) -> list[float]:
        blocks = request.prefix_blocks
        if not blocks or not request.prefix_length:
            return [0.0] * len(candidates)
        tables, matches, ends = self.tables, request.prefix_matches, request.prefix_ends
        per_unit = self.weight / request.prefix_length
        column: list[float] = []
        for instance in candidates:
            matched = matches[instance.id] = tables(instance.id).match(blocks)
            column.append(ends[matched - 1] * per_unit if matched else 0.0)  # covered(), inlined: the hot path
        return column


# ---- pickers ---------------------------------------------------------------------------------------------


class BestScore:
    """The highest score; ties broken at random so equal instances share the load."""

    def __init__(self, rng: random.Random | None = None):
        self._rng = rng or random.Random()

    def pick(self, candidates: list[Instance], scores: list[float]) -> Instance:
        best = max(scores)
        if scores.count(best) == 1:
            return candidates[scores.index(best)]
        # Equal inputs sum to equal floats (every column is added in the same order), so ties are exact.
        tied = [candidate for candidate, score in zip(candidates, scores, strict=True) if score == best]
        return tied[int(self._rng.random() * len(tied))]


class RoundRobin:
    def __init__(self) -> None:
        self._counter = itertools.count()

    def pick(self, candidates: list[Instance], scores: list[float]) -> Instance:
        return candidates[next(self._counter) % len(candidates)]


# ---- strategies ------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Selection:
    instance: Instance
    candidates: list[Instance]
    values: list[float]

    @property
    def scores(self) -> dict[str, float]:
        """Each candidate's total score (none for a strategy without scorers), built only when explained."""
        return {candidate.id: value for candidate, value in zip(self.candidates, self.values, strict=False)}


class Strategy:
    """Filters, scorers and a picker. A subclass names itself (`name=`) and is then known everywhere a
    strategy is chosen by name: the router, the simulation and the manager."""

    registry: ClassVar[dict[str, type[Strategy]]] = {}
    name: ClassVar[str]
    # Whether a scorer reads the request's prefix hashes: they are computed only for strategies that do.
    uses_prefixes: ClassVar[bool] = False

    def __init_subclass__(cls, name: str, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        cls.name = name
        Strategy.registry[name] = cls

    def __init__(self, tables: Callable[[str], PrefixTable], rng: random.Random | None = None):
        self.filters: list[Filter] = [Healthy(), NotDraining(), CircuitClosed()]
        self.scorers = self.make_scorers(tables)
        self.picker = self.make_picker(rng)

    def make_scorers(self, tables: Callable[[str], PrefixTable]) -> list[Scorer]:
        return []

    def make_picker(self, rng: random.Random | None) -> Picker:
        return BestScore(rng)

    def candidates(self, instances: list[Instance], request: RoutingRequest) -> list[Instance]:
        kept = instances
        for piece in self.filters:
            kept = piece.filter(kept, request)
        return kept

    def select(self, instances: list[Instance], request: RoutingRequest) -> Selection | None:
        return self.pick_from(self.candidates(instances, request), request)

    def pick_from(self, candidates: list[Instance], request: RoutingRequest) -> Selection | None:
        """Score and pick among instances the filters already kept."""
        if not candidates:
            return None
        if not self.scorers:
            return Selection(self.picker.pick(candidates, []), candidates, [])
        # Column by column, summed in scorer order as a row-wise loop would.
        scores: list[float] = []
        for scorer in self.scorers:
            column = scorer.scores(candidates, request)
            scores = list(map(add, scores, column)) if scores else column
        return Selection(self.picker.pick(candidates, scores), candidates, scores)


class LoadBalanced(Strategy, name="load_balanced"):
    def make_scorers(self, tables: Callable[[str], PrefixTable]) -> list[Scorer]:
        return [OutstandingTokens(), RunningSequences(), KVCacheUsage()]


class RoundRobinStrategy(Strategy, name="round_robin"):
    def make_picker(self, rng: random.Random | None) -> Picker:
        return RoundRobin()


class CacheAware(Strategy, name="cache_aware"):
    uses_prefixes = True

    def make_scorers(self, tables: Callable[[str], PrefixTable]) -> list[Scorer]:
        return [PrefixAffinity(tables), OutstandingTokens(), RunningSequences(), KVCacheUsage()]


def make_strategy(name: str, tables: Callable[[str], PrefixTable], rng: random.Random | None = None) -> Strategy:
    if name not in Strategy.registry:
        raise UnknownPolicy(f"unknown routing_strategy {name!r}; known: {', '.join(Strategy.registry)}")
    return Strategy.registry[name](tables, rng)
