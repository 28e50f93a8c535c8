"""The NixlConnector's two-hop flow: a prefill sim holds a finished prompt's KV, and the decode sim "reads" it
by pulling it over HTTP (unguarded, as NIXL's side channel is)."""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pdctl.engines.sim.config import Job
from pdctl.engines.sim.metrics import Metrics
from pdctl.engines.sim.tokens import blocks_for, prompt_digest

if TYPE_CHECKING:
    import httpx

log = logging.getLogger("pdctl.engines.sim")

# The sim holds no tensors; transfers are sized as if each token's K and V took this much.
KV_BYTES_PER_TOKEN = 4096
# vLLM's VLLM_NIXL_ABORT_REQUEST_TIMEOUT: a prefill instance frees KV that no decode instance read by then.
KV_HOLD_S = 480.0
KV_PULL_PATH = "/_sim/kv_pull"


@dataclass
class HeldKV:
    """A finished prefill's blocks, kept for the decode instance that will read them."""

    digest: str
    num_tokens: int
    blocks: int
    since: float


class KVStore:
    """A prefill sim's side: the blocks it holds until a decode sim reads them or they expire."""

    def __init__(self, capacity_blocks: int, metrics: Metrics):
        self.engine_id = str(uuid.uuid4())
        self._capacity = capacity_blocks
        self._metrics = metrics
        self._held: dict[str, HeldKV] = {}
        self._next_block = 0

    def hold(self, job: Job, host: str, port: int) -> dict[str, Any]:
        """Keeps a finished prefill's blocks; the kv_transfer_params returned tell the decode sim where."""
        self.expire()
        blocks = blocks_for(len(job.tokens))
        block_ids = [(self._next_block + i) % self._capacity for i in range(blocks)]
        self._next_block = (self._next_block + blocks) % self._capacity
        self._held[job.id] = HeldKV(prompt_digest(job.tokens), len(job.tokens), blocks, time.monotonic())
        return {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_block_ids": [block_ids],
            "remote_engine_id": self.engine_id,
            "remote_request_id": job.id,
            "remote_host": host,
            "remote_port": port,
            "tp_size": 1,
            "remote_num_tokens": len(job.tokens),
        }

    def take(self, engine_id: object, request_id: Any) -> HeldKV | None:
        """The NIXL read: the KV a decode sim asks for, freed here once read; None when it is not held."""
        if engine_id != self.engine_id or request_id not in self._held:
            return None
        return self._held.pop(request_id)

    def held_blocks(self) -> int:
        """Blocks held now, the expired ones freed first."""
        self.expire()
        return sum(kv.blocks for kv in self._held.values())

    def expire(self) -> None:
        deadline = time.monotonic() - KV_HOLD_S
        # Held in arrival order, so the expired ones are at the front.
        expired = list(itertools.takewhile(lambda request_id: self._held[request_id].since < deadline, self._held))
        for request_id in expired:
            del self._held[request_id]
        self._metrics.nixl_expired_requests += len(expired)


class KVReader:
    """A decode sim's side: pulls the KV a request's kv_transfer_params point at."""

    def __init__(self, metrics: Metrics):
        self._metrics = metrics
        # Made on the first read: importing httpx is a third of a sim's start-up, and only decode sims read.
        self._http: httpx.AsyncClient | None = None

    async def read(self, job: Job, cache_hit: int) -> int:
        """Prompt tokens whose KV came from the prefill instance; 0 when it could not be read, and then the
        prompt is computed here (vLLM's fallback)."""
        kv = job.kv
        if kv is None or not kv.do_remote_prefill:
            return 0
        if not (kv.remote_host and kv.remote_port and kv.remote_request_id):
            return self._failed(job, "kv_transfer_params do not say where it is")
        import httpx

        if self._http is None:
            self._http = httpx.AsyncClient(timeout=httpx.Timeout(10.0, connect=2.0))
        started = time.perf_counter()
        try:
            response = await self._http.post(
                f"http://{kv.remote_host}:{kv.remote_port}{KV_PULL_PATH}",
                json={"remote_engine_id": kv.remote_engine_id, "remote_request_id": kv.remote_request_id},
            )
            response.raise_for_status()
            held = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            return self._failed(job, f"could not read it: {exc!r}")
        if held.get("prompt_digest") != prompt_digest(job.tokens):
            return self._failed(job, "it is another prompt's")
        external = len(job.tokens) - cache_hit
        self._metrics.nixl_xfer_time.observe(time.perf_counter() - started)
        self._metrics.nixl_bytes.observe(external * KV_BYTES_PER_TOKEN)
        return external

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()

    def _failed(self, job: Job, why: str) -> int:
        self._metrics.nixl_failed_transfers += 1
        log.warning(
            "request %s: KV of remote request %s not transferred (%s); recomputing the prompt here",
            job.id,
            job.kv.remote_request_id if job.kv else None,
            why,
        )
        return 0
