"""The engines pdctl runs, one adapter each: what pdctl must know of an engine to plan, start, watch and route to it.

An adapter names itself (`class SglangEngine(EngineAdapter, name="sglang")`), as routing strategies do, and is
then a valid `engine.kind` everywhere: the profile, the plan, the launchers, the router. pdctl's own adapters are
the modules named `*_adapter.py` in this package, loaded at the first lookup, so a new engine is one new module.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from pdctl.errors import UnknownEngine

if TYPE_CHECKING:
    from pdctl.engines.commands import EngineCommand, InstanceContext, LaunchPrefix
    from pdctl.placement import DeviceMode
    from pdctl.profile import ClusterProfile

# The engine of a profile that names none.
DEFAULT_ENGINE = "vllm"


@dataclass(frozen=True)
class EngineMetrics:
    """The samples of an engine's /metrics the router reads, each named by the field of
    `pdctl.router.scrape.EngineSample` it fills."""

    samples: Mapping[str, str]
    # A prompt-token counter labelled `source` (computed, a local cache hit, transferred), and the field of each
    # source; none where the engine does not split its prompt tokens.
    by_source: str | None = None
    sources: Mapping[str, str] = field(default_factory=dict)

    @functools.cached_property
    def names(self) -> tuple[str, ...]:
        """Every sample name read: the scrape parses only the lines that start with one."""
        return (*self.samples, self.by_source) if self.by_source else tuple(self.samples)


@dataclass(frozen=True)
class Handoff:
    """How a prefill instance hands a request's KV cache to a decode instance: the request field that carries
    the transfer parameters (the prefill instance answers with the same field, for the decode hop), and its
    value on the prefill hop."""

    request_field: str
    prefill_params: Mapping[str, Any]


class EngineRuntime(Protocol):
    """An engine's own environment, installed apart from pdctl's."""

    # What a node without the engine's program should do.
    missing_fix: str

    def default_python(self, device: DeviceMode) -> Path:
        """The environment's python where the profile names none (engine.python)."""
        ...

    def launch_prefix(self, python: Path) -> LaunchPrefix: ...

    def check(self, python: Path | None) -> None:
        """Raise EngineRuntimeMissing, naming the fix, where the environment is not there."""
        ...


class EngineAdapter:
    """One engine. A subclass names itself (`name=`) and says what differs from engine to engine."""

    registry: ClassVar[dict[str, type[EngineAdapter]]] = {}
    name: ClassVar[str]
    metrics: ClassVar[EngineMetrics]
    handoff: ClassVar[Handoff]
    # Log lines that say the engine died inside while its API server lives on: the supervisor restarts it.
    fatal_markers: ClassVar[tuple[str, ...]] = ()
    # None: the engine runs in pdctl's own interpreter and reads no model files, so there is nothing to check.
    runtime: ClassVar[EngineRuntime | None] = None
    # False: it takes no GPUs or cores of its own (an emulator), so nothing is placed for it.
    uses_devices: ClassVar[bool] = True
    # The engine an emulator imitates: every output about a cluster of it says so.
    emulates: ClassVar[str | None] = None

    def __init_subclass__(cls, name: str, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        cls.name = name
        EngineAdapter.registry[name] = cls

    def command(self, profile: ClusterProfile, ctx: InstanceContext, prefix: LaunchPrefix) -> EngineCommand:
        """The argv and environment that start one instance; `prefix` is the runtime's launch prefix."""
        raise NotImplementedError

    @property
    def disclaimer(self) -> str | None:
        """What outputs add for an emulator: `sim engine: an emulator, not vLLM`."""
        return f"{self.name} engine: an emulator, not {self.emulates}" if self.emulates else None


def engine_adapter(kind: str) -> EngineAdapter:
    """The adapter of `kind`, or UnknownEngine naming the known ones."""
    _load_builtin()
    adapter = EngineAdapter.registry.get(kind)
    if adapter is None:
        raise UnknownEngine(f"unknown engine {kind!r}; known engines: {', '.join(known_engines())}")
    return adapter()


def known_engines() -> list[str]:
    _load_builtin()
    return sorted(EngineAdapter.registry)


def all_fatal_markers() -> tuple[str, ...]:
    """Every known engine's fatal log lines."""
    _load_builtin()
    return tuple(marker for adapter in EngineAdapter.registry.values() for marker in adapter.fatal_markers)


@functools.cache
def _load_builtin() -> None:
    package = importlib.import_module("pdctl.engines")
    for module in pkgutil.iter_modules(package.__path__):
        if module.name.endswith("_adapter"):
            importlib.import_module(f"{package.__name__}.{module.name}")
