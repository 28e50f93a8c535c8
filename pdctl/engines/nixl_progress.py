"""Installed into the engine runtime (as `pdctl_nixl_progress.py` beside a `.pth` line that imports it): lets
NIXL's progress thread sleep between polls instead of spinning.

NIXL's Python API creates its agent with a progress-thread delay of 0, and vLLM offers no setting for it, so
the thread polls its sockets without pause: one full core per instance, measured here (a lone agent used
99 % of a core; with a 100 us delay, 2.6 %). On a GPU host that core is spare; on a CPU host it is taken
from the engine's own compute, its API server and the router (`benchmarks/nixl_progress.py`).

`PDCTL_NIXL_PROGRESS_DELAY_US`, set by pdctl on CPU instances, turns this on; without it importing this
module does nothing. It runs inside vLLM's interpreter, so it imports nothing of pdctl's.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Sequence
from types import ModuleType

ENV = "PDCTL_NIXL_PROGRESS_DELAY_US"
# The compiled bindings of every NIXL build: nixl_cu12._bindings, nixl_cu13._bindings, nixl_rocm._bindings.
_BINDINGS_PREFIX = "nixl_"
_BINDINGS_SUFFIX = "._bindings"


def with_progress_delay(bindings: ModuleType, delay_us: int) -> None:
    """Every agent the bindings create from now on gets `delay_us` between progress-thread polls."""
    create = bindings.nixlAgent

    def agent(name: str, config: object) -> object:
        config.pthrDelay = delay_us  # type: ignore[attr-defined]
        return create(name, config)

    bindings.nixlAgent = agent


class _PatchOnLoad(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds NIXL's bindings with the other finders, loads them as they would, then patches them."""

    def __init__(self, delay_us: int):
        self.delay_us = delay_us
        self._loaders: dict[str, importlib.abc.Loader] = {}

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if not (fullname.startswith(_BINDINGS_PREFIX) and fullname.endswith(_BINDINGS_SUFFIX)):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                self._loaders[fullname] = spec.loader
                spec.loader = self
                return spec
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loaders[spec.name].create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loaders[module.__name__].exec_module(module)
        with_progress_delay(module, self.delay_us)


def install() -> None:
    value = os.environ.get(ENV, "")
    if value.isdigit():
        sys.meta_path.insert(0, _PatchOnLoad(int(value)))


install()
