"""Installed into the engine runtime (as `pdctl_runtime_hooks.py` beside a `.pth` line that imports it): two
settings NIXL and vLLM offer no knob for, each patched into its module as that module loads, and each only when
pdctl's launch environment asks for it (on CPU hosts, where every core is an engine's). It runs inside vLLM's
interpreter, so it imports nothing of pdctl's.

- NIXL's progress thread (`PDCTL_NIXL_PROGRESS_DELAY_US`). NIXL's Python API creates its agent with a
  progress-thread delay of 0, so the thread polls its sockets without pause: one full core per instance,
  measured here (a lone agent used 99 % of a core; with a 100 us delay, 2.6 %; `benchmarks/nixl_progress.py`).
- vLLM's shared-memory queues (`PDCTL_SHM_SPIN_US`). A reader of these queues (a Worker reading its
  EngineCore's steps, the EngineCore reading the Worker's results) spins with sched_yield for 1 s after each
  message before it sleeps on a socket. On a GPU host the spinners take spare cores. Here each Worker spins on
  its instance's one core and the EngineCore on any: under steady PD traffic they never stop, and the unpinned
  EngineCores, API servers and router get what is left. The prefill hop took 3 to 10 times longer
  (`benchmarks/pd_path.py`). Cut to a few milliseconds, the spin still covers back-to-back steps. vLLM's queues
  can lose a wake-up (its own comment: found again at its 5 s recheck); a reader that sleeps after a short spin
  meets that far more often, so the recheck interval is cut to the spin window too.
- The Worker's core (`PDCTL_KEEP_WORKER_CORES`). On a CPU, vLLM's NIXL connector moves the thread that builds
  it, the Worker's main thread, which also runs the model, to the last core of each NUMA node (to keep KV
  loads apart from the forward pass, as its comment says). pdctl gives each instance cores of its own: on this
  2-core host that moved the prefill instance's forward pass onto the decode instance's core, where it waited
  for a core 54 % of the time under PD traffic and ran 23 % (`/proc/<tid>/schedstat`). The thread keeps the
  cores vLLM bound it to (VLLM_CPU_OMP_THREADS_BIND, pdctl's).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

NIXL_ENV = "PDCTL_NIXL_PROGRESS_DELAY_US"
SHM_ENV = "PDCTL_SHM_SPIN_US"
CORES_ENV = "PDCTL_KEEP_WORKER_CORES"
# The compiled bindings of every NIXL build: nixl_cu12._bindings, nixl_cu13._bindings, nixl_rocm._bindings.
_NIXL_BINDINGS = ("nixl_", "._bindings")
_SHM_QUEUES = "vllm.distributed.device_communicators.shm_broadcast"
_CPU_PLATFORM = "vllm.platforms.cpu"

Patch = Callable[[ModuleType], None]


def with_progress_delay(bindings: ModuleType, delay_us: int) -> None:
    """Every agent the bindings create from now on gets `delay_us` between progress-thread polls."""
    create = bindings.nixlAgent

    def agent(name: str, config: object) -> object:
        config.pthrDelay = delay_us  # type: ignore[attr-defined]
        return create(name, config)

    bindings.nixlAgent = agent


def with_short_spin(queues: ModuleType, spin_us: int) -> None:
    """Readers of vLLM's shm queues spin `spin_us` after a message, then sleep, looking again as often."""
    condition = queues.SpinCondition
    init = condition.__init__

    def short_spin(self: object, is_reader: bool, *args: object, **kwargs: object) -> None:
        init(self, is_reader, *args, **kwargs)
        if is_reader:
            self.busy_loop_s = spin_us / 1e6  # type: ignore[attr-defined]

    condition.__init__ = short_spin
    queues.SHM_READER_RECHECK_INTERVAL_MS = max(1, spin_us // 1000)


def with_worker_cores_kept(platform: ModuleType) -> None:
    """The NIXL connector finds no core to move its thread to (the topology it asks for is used for that only)."""
    platform.CpuPlatform.discover_numa_topology = classmethod(lambda cls: [])


class _PatchOnLoad(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds a module with the other finders, loads it as they would, then patches it."""

    def __init__(self, patch_for: Callable[[str], Patch | None]):
        self.patch_for = patch_for
        self._loaders: dict[str, tuple[importlib.abc.Loader, Patch]] = {}

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        patch = self.patch_for(fullname)
        if patch is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                self._loaders[fullname] = (spec.loader, patch)
                spec.loader = self
                return spec
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loaders[spec.name][0].create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        loader, patch = self._loaders[module.__name__]
        loader.exec_module(module)
        patch(module)


def patches(environ: dict[str, str] | os._Environ[str]) -> Callable[[str], Patch | None]:
    """Which patch a module gets, from the launch environment; None for every module if nothing is asked."""
    delay, spin, keep_cores = environ.get(NIXL_ENV, ""), environ.get(SHM_ENV, ""), environ.get(CORES_ENV) == "1"

    def patch_for(fullname: str) -> Patch | None:
        if delay.isdigit() and fullname.startswith(_NIXL_BINDINGS[0]) and fullname.endswith(_NIXL_BINDINGS[1]):
            return lambda module: with_progress_delay(module, int(delay))
        if spin.isdigit() and fullname == _SHM_QUEUES:
            return lambda module: with_short_spin(module, int(spin))
        if keep_cores and fullname == _CPU_PLATFORM:
            return with_worker_cores_kept
        return None

    return patch_for


def install() -> None:
    if os.environ.get(NIXL_ENV, "").isdigit() or os.environ.get(SHM_ENV, "").isdigit() or CORES_ENV in os.environ:
        sys.meta_path.insert(0, _PatchOnLoad(patches(os.environ)))


install()
