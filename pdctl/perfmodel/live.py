"""The engine model in real time, for the `sim` engine: one asyncio task runs the scheduler's steps, sleeping
each step's modelled duration, and hands every request its tokens as the steps produce them."""

from __future__ import annotations

import asyncio
import contextlib
import time

from pdctl.perfmodel.scheduler import Engine, EngineRequest

_TIMER_SLACK_S = 0.002
# Past a KV arrival time by this much when woken for it: a timer that fires early costs one more (cheap) pass.
_EARLY_TIMER_S = 0.0002


class LiveEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def submit(self, request: EngineRequest) -> asyncio.Queue[bool]:
        """Queue a request; its queue gets one item per output token (True on the last)."""
        tokens: asyncio.Queue[bool] = asyncio.Queue()
        request.tag = tokens
        request.arrival = time.monotonic()
        self.engine.add(request)
        self._wake.set()
        return tokens

    def abort(self, request: EngineRequest) -> None:
        if not request.finished:
            self.engine.abort(request)

    async def _loop(self) -> None:
        engine = self.engine
        planned_end: float | None = None  # the modelled end of the last step, while steps run back to back
        while True:
            if not engine.has_work():
                planned_end = None
                self._wake.clear()
                await self._wake.wait()
                continue
            now = time.monotonic()
            result = engine.step(now)
            if result is None:  # only requests whose KV is still arriving
                planned_end = None
                ready = engine.next_ready_at()
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), max(0.0, (ready or now) - now) + _EARLY_TIMER_S)
                continue
            # Back to back, a step starts where the last one ended in the model, not when the event loop woke:
            # timers fire up to a millisecond late (uvloop's resolution), which would add to every step; more
            # lateness than that is the machine's, not caught up.
            begin = now if planned_end is None else max(planned_end, now - _TIMER_SLACK_S)
            planned_end = begin + result.seconds
            # Sleep to the step's end on the clock, so the time spent here in Python is not added to it.
            await asyncio.sleep(max(0.0, planned_end - time.monotonic()))
            for request in result.tokens:
                request.tag.put_nowait(request.finished)
