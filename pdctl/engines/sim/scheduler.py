"""When a request's tokens are ready: its prompt's compute then each output token slept at a fixed cost, or,
with --hardware, every step of vLLM's scheduler timed by pdctl's engine model (pdctl.perfmodel)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING

from pdctl.engines.sim.admission import Admission
from pdctl.engines.sim.config import Job, SimConfig
from pdctl.engines.sim.kvstore import KVReader
from pdctl.engines.sim.metrics import Load, Metrics
from pdctl.engines.sim.prefixcache import PrefixCache
from pdctl.engines.sim.tokens import BLOCK_SIZE, block_hashes, blocks_for, output_words

if TYPE_CHECKING:
    from pdctl.perfmodel.live import LiveEngine


class Scheduler:
    def __init__(self, config: SimConfig, metrics: Metrics):
        self._config = config
        self._metrics = metrics
        self._cache = PrefixCache(config.kv_cache_blocks)
        self._admission = Admission(config.max_num_seqs)
        self._kv = KVReader(metrics)
        self._live = _live_engine(config) if config.hardware else None
        self._running = 0
        self._waiting = 0
        self._blocks_in_use = 0

    def start(self) -> None:
        if self._live is not None:
            self._live.start()

    async def stop(self) -> None:
        if self._live is not None:
            await self._live.stop()
        await self._kv.close()

    def load(self, held_blocks: int) -> Load:
        """The gauges now; `held_blocks` are those kept for decode instances, which fill the cache too."""
        if self._live is not None:
            engine = self._live.engine
            return Load(len(engine.running), engine.waiting, engine.pool.usage)
        usage = min(1.0, (self._blocks_in_use + held_blocks) / self._config.kv_cache_blocks)
        return Load(self._running, self._waiting, usage)

    def words(self, job: Job) -> AsyncGenerator[str, None]:
        """The request's output words as they are produced; closing it early aborts the request."""
        if self._live is not None:
            return self._modelled(job, self._live)
        return self._slept(job)

    async def _slept(self, job: Job) -> AsyncGenerator[str, None]:
        hashes = block_hashes(job.tokens)
        # vLLM always computes a prompt's last token, so a cache hit stops short of it.
        cache_hit = self._cache.match(hashes[: (len(job.tokens) - 1) // BLOCK_SIZE]) * BLOCK_SIZE
        self._waiting += 1
        try:
            external = await self._kv.read(job, cache_hit)
            await self._admission.acquire(job.priority)
        finally:
            self._waiting -= 1
        blocks = blocks_for(len(job.tokens) + job.max_tokens)
        self._running += 1
        self._blocks_in_use += blocks
        finish_reason = "abort"
        try:
            self._metrics.count_prompt(len(job.tokens), cache_hit, external)
            computed = len(job.tokens) - cache_hit - external
            await asyncio.sleep(computed * self._config.prefill_ms_per_token / 1000)
            self._cache.insert(hashes)
            for word in output_words(job.tokens, job.max_tokens):
                await asyncio.sleep(self._config.decode_ms_per_token / 1000)
                self._metrics.generation_tokens += 1
                yield word
            finish_reason = "length"
        finally:
            self._running -= 1
            self._blocks_in_use -= blocks
            self._admission.release()
            self._metrics.request_success[finish_reason] += 1

    async def _modelled(self, job: Job, live: LiveEngine) -> AsyncGenerator[str, None]:
        """The engine model decides when each token is ready: vLLM's scheduler over every request here."""
        from pdctl.perfmodel.scheduler import EngineRequest

        external = await self._kv.read(job, 0)
        if external:
            await asyncio.sleep(live.engine.model.kv_transfer_seconds(external))
        hashes = [hash(block) for block in block_hashes(job.tokens)]
        request = EngineRequest(job.id, len(job.tokens), job.max_tokens, priority=job.priority, block_hashes=hashes,
                                external_tokens=external)  # fmt: skip
        tokens = live.submit(request)  # the model's API server takes it in before the scheduler sees it
        finish_reason = "abort"
        try:
            for index, word in enumerate(output_words(job.tokens, job.max_tokens)):
                await tokens.get()
                if index == 0:
                    self._metrics.count_prompt(len(job.tokens), request.cached_tokens, external)
                self._metrics.generation_tokens += 1
                yield word
            finish_reason = "length"
        finally:
            live.abort(request)
            self._metrics.request_success[finish_reason] += 1


def _live_engine(config: SimConfig) -> LiveEngine:
    """The engine model for this instance (imported only when a hardware profile asks for it)."""
    from pdctl.perfmodel.arch import get_model
    from pdctl.perfmodel.hardware import get_hardware
    from pdctl.perfmodel.live import LiveEngine as Live
    from pdctl.perfmodel.machine import machine_note
    from pdctl.perfmodel.scheduler import Engine, EngineConfig
    from pdctl.perfmodel.steptime import StepModel

    assert config.hardware is not None
    hardware = get_hardware(config.hardware)
    note = machine_note(hardware)
    if note:
        logging.getLogger("pdctl.engines.sim").warning(note)
    model = StepModel(get_model(config.architecture or config.model), hardware, tp=config.tensor_parallel_size)
    budget = config.max_num_batched_tokens or hardware.default_max_num_batched_tokens
    # Seeded by the port: the instances' step noise differs, and a run repeats.
    engine_config = EngineConfig(max_num_seqs=config.max_num_seqs, max_num_batched_tokens=budget,
                                 policy=config.scheduling_policy, block_size=BLOCK_SIZE,
                                 seed=config.port, speed=config.speed)  # fmt: skip
    return Live(Engine(model, engine_config))
