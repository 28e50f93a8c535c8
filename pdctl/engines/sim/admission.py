"""--max-num-seqs admission in vLLM's priority order."""

from __future__ import annotations

import asyncio
import heapq
import itertools


class Admission:
    """At most `limit` requests run; the others wait, lowest `priority` first (vLLM's priority scheduling),
    in arrival order among equals."""

    def __init__(self, limit: int):
        self._free = limit
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._arrivals = itertools.count()

    async def acquire(self, priority: int) -> None:
        if self._free and not self._waiters:
            self._free -= 1
            return
        entry = (priority, next(self._arrivals), asyncio.get_running_loop().create_future())
        heapq.heappush(self._waiters, entry)
        try:
            await entry[2]
        except asyncio.CancelledError:
            if entry[2].done() and not entry[2].cancelled():
                self.release()  # granted a slot, but gone before taking it
            else:
                self._waiters.remove(entry)
                heapq.heapify(self._waiters)
            raise

    def release(self) -> None:
        while self._waiters:
            waiter = heapq.heappop(self._waiters)[2]
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1
