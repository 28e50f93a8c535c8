"""Load shapes for scaling tests: closed-loop streaming clients on threads, every answer checked."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from pdctl.scaling.report import ScalingReport, read_report


@dataclass
class Load:
    """`clients` threads each sending one streamed completion after another until stopped."""

    router: str
    prompt: str = "Tell me about the sea. "
    model: str = "sim-model"
    max_tokens: int = 20
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    _threads: list[threading.Thread] = field(default_factory=list)
    _stops: list[threading.Event] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def set_clients(self, count: int) -> None:
        while len(self._threads) < count:
            stop = threading.Event()
            thread = threading.Thread(target=self._client, args=(stop, len(self._threads)), daemon=True)
            self._stops.append(stop)
            self._threads.append(thread)
            thread.start()
        while len(self._threads) > count:
            self._stops.pop().set()
            self._threads.pop().join(timeout=30)

    def stop(self) -> None:
        self.set_clients(0)

    def _client(self, stop: threading.Event, index: int) -> None:
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                self._one(client, f"{self.prompt}client {index} at {time.monotonic():.3f}")

    def _one(self, client: httpx.Client, prompt: str) -> None:
        body = {"model": self.model, "prompt": prompt, "max_tokens": self.max_tokens, "stream": True}
        try:
            with client.stream("POST", f"{self.router}/v1/completions", json=body) as response:
                if response.status_code != 200:
                    self._fail(f"HTTP {response.status_code}: {response.read()[:200]!r}")
                    return
                events = [line for line in response.iter_lines() if line.startswith("data: ")]
        except httpx.HTTPError as error:
            self._fail(f"{type(error).__name__}: {error}")
            return
        errors = [e for e in events if e != "data: [DONE]" and "error" in json.loads(e[6:])]
        if errors or events[-1:] != ["data: [DONE]"]:
            self._fail(f"stream broke: {errors[:1] or events[-2:]}")
            return
        with self._lock:
            self.ok += 1

    def _fail(self, why: str) -> None:
        with self._lock:
            self.failures.append(why)


@dataclass
class Watch:
    """Polls the scaler's report in the background: every pool size it ever had, for the bounds checks."""

    cluster_path: Path
    seen: list[ScalingReport] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.2):
            report = read_report(self.cluster_path)
            if report is not None and (not self.seen or report.updated_at != self.seen[-1].updated_at):
                self.seen.append(report)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def sizes(self, pool: str) -> list[int]:
        return [p.current for r in self.seen for p in r.pools if p.pool == pool]

    def wait_for(self, pool: str, current: int, timeout_s: float, steady: bool = True) -> float:
        """Seconds until the pool has `current` instances with no action in progress; fails past timeout_s."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            report = read_report(self.cluster_path)
            state = next((p for p in report.pools if p.pool == pool), None) if report else None
            if state is not None and state.current == current and (not steady or state.action is None):
                return time.monotonic() - started
            time.sleep(0.2)
        raise AssertionError(f"{pool} did not reach {current} within {timeout_s} s: {read_report(self.cluster_path)}")
