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
_LATENESS_WEIGHT = 0.1


class LiveEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # How late this event loop's timers fire (a moving average; here 0.9 ms on asyncio's own loop, 0.2 on
        # uvloop's). The sleep to a step's end aims that much early: otherwise every first token left that much
        # after the model's time (later tokens catch up, see _loop).
        self._lateness_s = 0.0

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
            if result is None:  # only requests still being taken in, or whose KV is still arriving
                ready = engine.next_ready_at()
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), max(0.0, (ready or now) - now) + _EARLY_TIMER_S)
                # Woken for that request, the step begins (in the model) when it became ready, not when the late
                # timer fired; woken by a new arrival before then, it begins now.
                planned_end = ready if ready is not None and ready <= time.monotonic() else None
                continue
            # Back to back, a step starts where the last one ended in the model, not when the event loop woke:
            # timers fire up to a millisecond late (uvloop's resolution), which would add to every step; more
            # lateness than that is the machine's, not caught up.
            begin = now if planned_end is None else max(planned_end, now - _TIMER_SLACK_S)
            planned_end = begin + result.seconds
            # Sleep to the step's end on the clock, so the time spent here in Python is not added to it.
            await self._sleep_until(planned_end)
            for request in result.tokens:
                request.tag.put_nowait(request.finished)

    async def _sleep_until(self, deadline: float) -> None:
        target = deadline - self._lateness_s
        delay = target - time.monotonic()
        if delay <= 0:
            return
        await asyncio.sleep(delay)
        self._lateness_s += _LATENESS_WEIGHT * (time.monotonic() - target - self._lateness_s)
