"""Routing pieces in the style of llm-d's scheduler plugins: filters drop instances, scorers rate the rest
in [0, 1] (higher is better), a picker chooses. A strategy is a list of each.

Scorers and pickers are known by name (SCORERS, PICKERS), so a profile can compose a strategy of them with
weights (`Composition`). A named strategy is one class that registers itself, `class MyStrategy(Strategy,
name="mine")`, usually as a preset composition. That registration is the only place a strategy's name is
written: the profile, the router, the simulation and the manager read the registry."""

from __future__ import annotations

import difflib
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from operator import add
from typing import Annotated, Any, ClassVar, Protocol

from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from pdctl.errors import UnknownPolicy
from pdctl.routing.pool import Instance
from pdctl.routing.prefix import CHAR_BLOCK_ENDS, PrefixTable, covered

Tables = Callable[[str], PrefixTable]


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
    # The request's prefix hashes cost time on the hot path: they are computed only where a scorer reads them.
    reads_prefixes: ClassVar[bool]

    def scores(self, candidates: list[Instance], request: RoutingRequest) -> list[float]:
        """Each candidate's score in [0, 1], times the scorer's weight."""
        ...


class Picker(Protocol):
    reads_scores: ClassVar[bool]

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
    reads_prefixes: ClassVar[bool] = False

    def scores(self, candidates: list[Instance], request: RoutingRequest) -> list[float]:
        scale, weight = self.scale_tokens, self.weight
        return [weight * scale / (scale + instance.in_flight_prompt_tokens) for instance in candidates]


@dataclass(slots=True)
class RunningSequences:
    """Room left against the engine's --max-num-seqs."""

    weight: float = 1.0
    reads_prefixes: ClassVar[bool] = False

    def scores(self, candidates: list[Instance], request: RoutingRequest) -> list[float]:
        weight = self.weight
        return [weight * (1.0 - load) if (load := instance.load) < 1.0 else 0.0 for instance in candidates]


@dataclass(slots=True)
class KVCacheUsage:
    """Free KV cache (from the engine's vllm:kv_cache_usage_perc): less preemption ahead."""

    weight: float = 1.0
    reads_prefixes: ClassVar[bool] = False

    def scores(self, candidates: list[Instance], request: RoutingRequest) -> list[float]:
        weight = self.weight
        return [weight * (1.0 - used) if (used := instance.kv_usage) < 1.0 else 0.0 for instance in candidates]


@dataclass(slots=True)
class PrefixAffinity:
    """The share of the prompt's prefix this instance likely has cached."""

    tables: Tables
    weight: float = 1.0
    reads_prefixes: ClassVar[bool] = True

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
    """The highest score; ties broken at random so equal instances share the load (with no scorers, all tie)."""

    reads_scores: ClassVar[bool] = True

    def __init__(self, rng: random.Random | None = None):
        self._rng = rng or random.Random()

    def pick(self, candidates: list[Instance], scores: list[float]) -> Instance:
        if not scores:
            return candidates[int(self._rng.random() * len(candidates))]
        best = max(scores)
        if scores.count(best) == 1:
            return candidates[scores.index(best)]
        # Equal inputs sum to equal floats (every column is added in the same order), so ties are exact.
        tied = [candidate for candidate, score in zip(candidates, scores, strict=True) if score == best]
        return tied[int(self._rng.random() * len(tied))]


class RoundRobin:
    reads_scores: ClassVar[bool] = False

    def __init__(self, rng: random.Random | None = None):  # draws nothing: the signature is BestScore's
        self._counter = itertools.count()

    def pick(self, candidates: list[Instance], scores: list[float]) -> Instance:
        return candidates[next(self._counter) % len(candidates)]


# ---- compositions ----------------------------------------------------------------------------------------

# What a composition may name. A strategy adds its scorers' columns up in this order, whatever order a profile
# writes them in, so a composition routes exactly as the preset with the same scorers and weights.
SCORERS: dict[str, Callable[[Tables, float], Scorer]] = {
    "prefix_affinity": lambda tables, weight: PrefixAffinity(tables, weight),
    "outstanding_tokens": lambda tables, weight: OutstandingTokens(weight),
    "running_sequences": lambda tables, weight: RunningSequences(weight),
    "kv_cache_usage": lambda tables, weight: KVCacheUsage(weight),
}
PICKERS: dict[str, type[BestScore] | type[RoundRobin]] = {"best_score": BestScore, "round_robin": RoundRobin}


def unknown_name(kind: str, name: str, known: dict[str, Any]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    guess = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown {kind} {name!r}{guess}; known: {', '.join(known)}"


def _named(kind: str, known: dict[str, Any]) -> AfterValidator:
    def check(name: str) -> str:
        if name not in known:
            raise ValueError(unknown_name(kind, name, known))
        return name

    return AfterValidator(check)


class Composition(BaseModel):
    """A strategy written out: scorers by name with their weights, and a picker by name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scorers: dict[Annotated[str, _named("scorer", SCORERS)], Annotated[float, Field(gt=0)]] = Field(
        default_factory=dict, description="scorer name: weight; with none, best_score picks at random"
    )
    picker: Annotated[str, _named("picker", PICKERS)] = "best_score"

    @field_validator("scorers")
    @classmethod
    def _in_registry_order(cls, scorers: dict[str, float]) -> dict[str, float]:
        return {name: scorers[name] for name in SCORERS if name in scorers}

    @model_validator(mode="after")
    def _scores_are_read(self) -> Composition:
        if self.scorers and not PICKERS[self.picker].reads_scores:
            raise ValueError(f"picker {self.picker} ignores scores: leave out scorers, or pick one that reads them")
        return self

    @property
    def label(self) -> str:
        """One line: `prefix_affinity 2 + outstanding_tokens 1, best_score`."""
        scorers = " + ".join(f"{name} {weight:g}" for name, weight in self.scorers.items())
        return f"{scorers}, {self.picker}" if scorers else self.picker


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
    strategy is chosen by name. Its pieces are its `composition`, unless it overrides make_scorers or
    make_picker; a profile's own composition is built as a plain Strategy."""

    registry: ClassVar[dict[str, type[Strategy]]] = {}
    name: ClassVar[str]
    composition: Composition = Composition()

    def __init_subclass__(cls, name: str, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        cls.name = name
        Strategy.registry[name] = cls

    def __init__(self, tables: Tables, rng: random.Random | None = None, composition: Composition | None = None):
        if composition is not None:
            self.composition = composition
        self.label = self.name if composition is None else composition.label  # what /pdctl/stats shows
        self.filters: list[Filter] = [Healthy(), NotDraining(), CircuitClosed()]
        self.scorers = self.make_scorers(tables)
        self.picker = self.make_picker(rng)
        self.uses_prefixes = any(scorer.reads_prefixes for scorer in self.scorers)

    def make_scorers(self, tables: Tables) -> list[Scorer]:
        return [SCORERS[name](tables, weight) for name, weight in self.composition.scorers.items()]

    def make_picker(self, rng: random.Random | None) -> Picker:
        return PICKERS[self.composition.picker](rng)

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


# ---- the presets -----------------------------------------------------------------------------------------


class LoadBalanced(Strategy, name="load_balanced"):
    composition = Composition(scorers={"outstanding_tokens": 1.0, "running_sequences": 1.0, "kv_cache_usage": 0.5})


class RoundRobinStrategy(Strategy, name="round_robin"):
    composition = Composition(picker="round_robin")


class CacheAware(Strategy, name="cache_aware"):
    composition = Composition(scorers={"prefix_affinity": 2.0, **LoadBalanced.composition.scorers})


DEFAULT_STRATEGY = LoadBalanced.name


def unknown_strategy(name: str) -> str:
    return (
        f"{unknown_name('routing strategy', name, Strategy.registry)}; or compose one, {{scorers: {{NAME: WEIGHT}}, "
        f"picker: NAME}}, of the scorers {', '.join(SCORERS)} and the pickers {', '.join(PICKERS)}"
    )


def _registered(name: str) -> str:
    if name not in Strategy.registry:
        raise ValueError(unknown_strategy(name))
    return name


def _choice_kind(value: object) -> str | None:
    if isinstance(value, str):
        return "[name]"
    return "[composition]" if isinstance(value, dict | Composition) else None


# A strategy as a profile or a caller gives it: a registered name, or a composition. The tags are bracketed so
# that a profile error's field path leaves them out, as it leaves out pydantic's other union branches.
StrategyChoice = Annotated[
    Annotated[str, AfterValidator(_registered), Tag("[name]")] | Annotated[Composition, Tag("[composition]")],
    Discriminator(
        _choice_kind,
        custom_error_type="strategy_type",
        custom_error_message="write a strategy's name, or {scorers: {NAME: WEIGHT}, picker: NAME}",
    ),
]


def make_strategy(choice: str | Composition, tables: Tables, rng: random.Random | None = None) -> Strategy:
    if isinstance(choice, Composition):
        return Strategy(tables, rng, choice)
    if choice not in Strategy.registry:
        raise UnknownPolicy(unknown_strategy(choice))
    return Strategy.registry[choice](tables, rng)
