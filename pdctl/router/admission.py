"""Waiting for a free instance when every candidate is full: by priority, then deadline (slo_aware), or in
arrival order (fifo). A request whose deadline passes while it waits is refused at once (429 with
Retry-After) instead of failing late."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from dataclasses import dataclass, field


class DeadlineExceeded(Exception):
    def __init__(self, waited_s: float):
        super().__init__(f"no instance became free before the request's deadline (waited {waited_s:.2f} s)")
        self.waited_s = waited_s


@dataclass(order=True)
class _Waiter:
    key: tuple[float, float, int]
    future: asyncio.Future[None] = field(compare=False)


class Admission:
    def __init__(self, slo_aware: bool, max_wait_s: float = 30.0):
        self.slo_aware = slo_aware
        self.max_wait_s = max_wait_s
        self._heap: list[_Waiter] = []
        self._sequence = itertools.count()

    async def wait(self, priority: int, deadline_at: float | None) -> None:
        """Wait for the next release (or the deadline). The caller retries selection after it returns."""
        now = time.monotonic()
        limit = min(deadline_at or float("inf"), now + self.max_wait_s)
        key = (
            (priority, deadline_at or float("inf"), next(self._sequence))
            if self.slo_aware
            else (0, 0, next(self._sequence))
        )
        waiter = _Waiter(key, asyncio.get_running_loop().create_future())
        heapq.heappush(self._heap, waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), timeout=max(0.0, limit - now))
        except TimeoutError:
            raise DeadlineExceeded(time.monotonic() - now) from None
        finally:
            if not waiter.future.done():
                waiter.future.cancel()

    def release(self) -> None:
        """A slot freed somewhere: wake the first waiter still waiting."""
        while self._heap:
            waiter = heapq.heappop(self._heap)
            if not waiter.future.done():
                waiter.future.set_result(None)
                return
