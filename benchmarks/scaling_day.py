"""A day-shaped trace against pdctl's scaling policy and two static clusters, in virtual time.

Real processes cannot replay a day here (2 CPU cores, shared), so this runs the scaler's own policy code
(pdctl.scaling.policy: the reactive verdicts, hysteresis, the damped forecast and floors, the bounds) against
a queueing model of a PD cluster, event by event, in virtual time:
- prefill: each instance prefills one prompt at a time at V_P tokens/s; a request goes to the instance free
  first (the router's least-loaded pick); its TTFT is its wait, its prefill and one decode step;
- decode: each instance runs up to S sequences; a step takes tpot(b) = base + slope x b for a batch of b;
  a request finding every slot full waits for one (that wait is TTFT too);
- a new instance serves after the start-up time (GPU-seconds count from its launch); scale-in drains:
  the instance takes nothing new, finishes what it holds, then stops (GPU-seconds count to then).
A request meets its SLO when its TTFT <= the TTFT target and its mean TPOT <= the TPOT target.

Compared, on the same trace (same seed): the scaler, static pools sized for the peak, static pools sized
for the mean. Prints the table; --svg writes a plot of the load and the scaler's pool sizes.

    python benchmarks/scaling_day.py [--day-s 86400] [--peak-rps 24] [--seed 1] [--svg day.svg]
"""

from __future__ import annotations

import argparse
import bisect
import collections
import heapq
import math
import random
from dataclasses import dataclass, field

from pdctl.routing.pool import instance_load
from pdctl.scaling.policy import (
    Bounds,
    Forecaster,
    Hysteresis,
    Targets,
    decode_floor,
    decode_verdict,
    floor_decision,
    prefill_floor,
    prefill_verdict,
)
from pdctl.scaling.signals import InstanceSignal, PoolSignals, Role, Traffic, percentile

TARGETS = Targets(ttft_ms=1000, tpot_ms=50, backlog_s=0.5, busy_high=0.8, margin=0.6, percentile=90)


@dataclass(frozen=True)
class Model:
    prefill_tokens_per_s: float = 12000.0
    slots: int = 64
    tpot_base_s: float = 0.012
    tpot_slope_s: float = 0.0005  # a full batch of 64: 44 ms
    startup_s: float = 90.0
    mean_input: int = 2000
    mean_output: int = 250


@dataclass
class Knobs:
    predictive: bool = True
    interval_s: float = 5.0
    forecast_interval_s: float = 30.0
    out_after_s: float = 20.0
    in_after_s: float = 120.0
    warmup_s: float = 20.0
    window_s: float = 30.0


@dataclass
class PrefillInstance:
    launched: float
    ready: float
    free_at: float
    stopped: float | None = None
    draining: bool = False
    # (finish time, tokens) of prompts assigned and not finished: the backlog the router sees
    queue: collections.deque = field(default_factory=collections.deque)


@dataclass
class DecodeInstance:
    launched: float
    ready: float
    ends: list[float] = field(default_factory=list)  # heap of running sequences' end times
    stopped: float | None = None
    draining: bool = False


def day_rate(t: float, day_s: float, peak: float) -> float:
    """A working day: quiet night, a morning ramp, a lunch dip, an afternoon peak, an evening decline."""
    hour = 24 * (t % day_s) / day_s
    shape = 0.08 + 0.92 * max(0.0, math.sin(math.pi * (hour - 6) / 16)) ** 1.5 if 6 <= hour <= 22 else 0.08
    if 12 <= hour <= 13.5:
        shape *= 0.75
    return peak * shape


def trace(day_s: float, peak: float, model: Model, rng: random.Random) -> list[tuple[float, int, int]]:
    """Poisson arrivals at the day's rate (thinning), each with input and output lengths."""
    arrivals, t = [], 0.0
    while True:
        t += rng.expovariate(peak)
        if t >= day_s:
            return arrivals
        if rng.random() < day_rate(t, day_s, peak) / peak:
            tokens_in = max(16, int(rng.lognormvariate(math.log(model.mean_input), 0.6)))
            tokens_out = max(4, int(rng.lognormvariate(math.log(model.mean_output), 0.5)))
            arrivals.append((t, tokens_in, tokens_out))


class Cluster:
    def __init__(self, model: Model, prefill: int, decode: int):
        self.model = model
        self.prefills = [PrefillInstance(0.0, 0.0, 0.0) for _ in range(prefill)]
        self.decodes = [DecodeInstance(0.0, 0.0) for _ in range(decode)]

    def serving(self, pool: list, now: float) -> list:
        return [i for i in pool if i.stopped is None and not i.draining and i.ready <= now]

    def request(self, now: float, tokens_in: int, tokens_out: int) -> tuple[float, float]:
        """Serve one request arriving now; (TTFT s, mean TPOT s)."""
        model = self.model
        prefill = min(self.serving(self.prefills, now), key=lambda p: p.free_at)
        start = max(now, prefill.free_at)
        prefilled = start + tokens_in / model.prefill_tokens_per_s
        prefill.free_at = prefilled
        prefill.queue.append((prefilled, tokens_in))
        decodes = self.serving(self.decodes, prefilled) or self.serving(self.decodes, now)
        for d in decodes:
            while d.ends and d.ends[0] <= prefilled:
                heapq.heappop(d.ends)
        decode = min(decodes, key=lambda d: instance_load(len(d.ends), 0.0, 0.0, model.slots))  # the router's pick
        begin = prefilled if len(decode.ends) < model.slots else max(prefilled, heapq.heappop(decode.ends))
        tpot = model.tpot_base_s + model.tpot_slope_s * (len(decode.ends) + 1)
        heapq.heappush(decode.ends, begin + tpot * tokens_out)
        return begin + tpot - now, tpot

    def gpu_seconds(self, end: float) -> float:
        return sum((i.stopped if i.stopped is not None else end) - i.launched for i in self.prefills + self.decodes)


# ---- the scaler in virtual time --------------------------------------------------------------------------------


class VirtualScaler:
    """The policy of pdctl.scaling, fed from the model instead of the router; acts on the model's pools."""

    def __init__(self, cluster: Cluster, bounds: dict[Role, Bounds], knobs: Knobs):
        self.cluster, self.bounds, self.knobs = cluster, bounds, knobs
        self.hysteresis = {role: Hysteresis(knobs.out_after_s, knobs.in_after_s) for role in Role}
        self.forecast = {role: Forecaster() for role in Role}
        self.floor = {role: 0 for role in Role}
        self.why = {role: "" for role in Role}
        self.busy_until = {role: 0.0 for role in Role}  # no new action while the last one is in progress
        self.samples: collections.deque = collections.deque()
        self.pending: list[tuple[float, float, float, int, int]] = []
        self.next_forecast = knobs.forecast_interval_s
        self.sizes: list[tuple[float, int, int]] = []
        self.decisions: list[str] = []

    def observe(self, at: float, ttft: float, tpot: float, tokens_in: int, tokens_out: int) -> None:
        heapq.heappush(self.pending, (at, ttft, tpot, tokens_in, tokens_out))

    def pool(self, role: Role) -> list:
        return self.cluster.prefills if role is Role.PREFILL else self.cluster.decodes

    def members(self, role: Role) -> list:
        return [i for i in self.pool(role) if i.stopped is None and not i.draining]

    def signals(self, role: Role, now: float) -> PoolSignals:
        warm = [i for i in self.members(role) if i.ready + self.knobs.warmup_s <= now]
        samples = list(self.samples)
        ttft = percentile((s[1] * 1000 for s in samples), TARGETS.percentile)
        tpot = percentile((s[2] * 1000 for s in samples), TARGETS.percentile)
        if role is Role.PREFILL:
            rate = self.cluster.model.prefill_tokens_per_s
            instances = tuple(InstanceSignal("p", in_flight_prompt_tokens=_backlog(p, now), prefill_tokens_per_s=rate,
                                             max_num_seqs=64) for p in warm)  # fmt: skip
        else:
            slots = self.cluster.model.slots
            for d in warm:
                while d.ends and d.ends[0] <= now:
                    heapq.heappop(d.ends)
            instances = tuple(InstanceSignal("d", in_flight=len(d.ends), max_num_seqs=slots) for d in warm)
        return PoolSignals(role, instances, ttft, tpot, len(samples))

    def tick(self, now: float) -> None:
        while self.pending and self.pending[0][0] <= now:
            self.samples.append(heapq.heappop(self.pending))
        while self.samples and now - self.samples[0][0] > self.knobs.window_s:
            self.samples.popleft()
        forecast = now >= self.next_forecast
        if forecast:
            self.next_forecast = now + self.knobs.forecast_interval_s
        for role in Role:
            signals = self.signals(role, now)
            if forecast and self.knobs.predictive:
                self._forecast(role, signals, now)
            if now < self.busy_until[role]:
                continue
            current = len(self.members(role))
            decision = None
            if self.knobs.predictive:
                decision = floor_decision(role, current, self.floor[role], self.bounds[role], self.why[role])
            if decision is None:
                verdict = (prefill_verdict if role is Role.PREFILL else decode_verdict)(signals, TARGETS)
                decision = self.hysteresis[role].step(verdict, now, current, self.bounds[role], self.floor[role], role)
            if decision is not None:
                self.hysteresis[role].reset()
                self.decisions.append(f"{now / 3600:5.2f} h  {decision.reason}")
                self._act(role, decision.delta, now)
        self.sizes.append((now, len(self.members(Role.PREFILL)), len(self.members(Role.DECODE))))

    def _forecast(self, role: Role, signals: PoolSignals, now: float) -> None:
        samples = list(self.samples)
        span = max(1.0, min(self.knobs.window_s, now))
        lengths = Traffic(
            rate=len(samples) / span,
            prefill_rate=len(samples) / span,
            mean_prefill_input=sum(s[3] for s in samples) / len(samples) if samples else 0.0,
            mean_output=sum(s[4] for s in samples) / len(samples) if samples else 0.0,
            tpot_mean_s=sum(s[2] for s in samples) / len(samples) if samples else None,
        )
        self.forecast[role].update(lengths.rate)
        ahead = (self.cluster.model.startup_s + self.knobs.forecast_interval_s) / self.knobs.forecast_interval_s
        rule = prefill_floor if role is Role.PREFILL else decode_floor
        need, self.why[role] = rule(self.forecast[role].forecast(ahead), lengths, signals, TARGETS)
        self.floor[role] = self.bounds[role].clamp(need)

    def _act(self, role: Role, delta: int, now: float) -> None:
        model = self.cluster.model
        if delta > 0:
            for _ in range(delta):
                ready = now + model.startup_s
                self.pool(role).append(
                    PrefillInstance(now, ready, ready) if role is Role.PREFILL else DecodeInstance(now, ready)
                )
            self.busy_until[role] = now + model.startup_s
            return
        members = self.members(role)
        if role is Role.PREFILL:
            chosen = min(members, key=lambda p: p.free_at)
            chosen.draining, chosen.stopped = True, max(now, chosen.free_at)
        else:
            chosen = min(members, key=lambda d: len([e for e in d.ends if e > now]))
            chosen.draining, chosen.stopped = True, max([now, *chosen.ends])
        self.busy_until[role] = chosen.stopped


def _backlog(instance: PrefillInstance, now: float) -> int:
    while instance.queue and instance.queue[0][0] <= now:
        instance.queue.popleft()
    return sum(tokens for _, tokens in instance.queue)


# ---- runs ----------------------------------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    met: int
    total: int
    ttfts: list[float]
    tpots: list[float]
    gpu_s: float

    @property
    def attainment(self) -> float:
        return self.met / max(1, self.total)


def run(name: str, arrivals: list, model: Model, prefill: int, decode: int, scaler_bounds=None, knobs=None):
    cluster = Cluster(model, prefill, decode)
    scaler = VirtualScaler(cluster, scaler_bounds, knobs) if scaler_bounds else None
    next_tick = 0.0
    met, ttfts, tpots = 0, [], []
    for at, tokens_in, tokens_out in arrivals:
        while scaler and next_tick <= at:
            scaler.tick(next_tick)
            next_tick += knobs.interval_s
        ttft, tpot = cluster.request(at, tokens_in, tokens_out)
        ttfts.append(ttft)
        tpots.append(tpot)
        met += ttft <= TARGETS.ttft_ms / 1000 and tpot <= TARGETS.tpot_ms / 1000
        if scaler:
            scaler.observe(at + ttft + tpot * tokens_out, ttft, tpot, tokens_in, tokens_out)
    end = arrivals[-1][0] if arrivals else 0.0
    return Result(name, met, len(arrivals), ttfts, tpots, cluster.gpu_seconds(end)), scaler


def static_size(rate: float, model: Model) -> tuple[int, int]:
    """Pools that carry `rate` with the policy's own headroom: prefill at busy_high, decode at busy_high."""
    prefill = math.ceil(rate * model.mean_input * 1.2 / (model.prefill_tokens_per_s * TARGETS.busy_high))
    tpot = model.tpot_base_s + model.tpot_slope_s * model.slots * TARGETS.busy_high
    concurrency = rate * model.mean_output * 1.1 * tpot
    decode = math.ceil(concurrency / (model.slots * TARGETS.busy_high))
    return max(1, prefill), max(1, decode)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}ms" if seconds < 60 else f">{60}s"


def svg(scaler: VirtualScaler, day_s: float, peak: float, path: str) -> None:
    width, height = 900, 300
    top = max(max(p, d) for _, p, d in scaler.sizes) + 1

    def line(points: list[tuple[float, float]], scale: float, color: str) -> str:
        coords = " ".join(f"{t / day_s * width:.1f},{height - v / scale * (height - 20):.1f}" for t, v in points)
        return f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{coords}"/>'

    rate = [(t, day_rate(t, day_s, peak)) for t in range(0, int(day_s), int(day_s / 600) or 1)]
    with open(path, "w") as handle:
        handle.write(
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">'
            f'<rect width="{width}" height="{height}" fill="white"/>'
            + line(rate, peak * 1.05, "#bbbbbb")
            + line([(t, p) for t, p, _ in scaler.sizes], top, "#d62728")
            + line([(t, d) for t, _, d in scaler.sizes], top, "#1f77b4")
            + f'<text x="10" y="15" font-size="12">grey: arrival rate (peak {peak:g} req/s); red: prefill '
            f"instances; blue: decode instances (max {top - 1})</text></svg>"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--day-s", type=float, default=86400.0)
    parser.add_argument("--peak-rps", type=float, default=24.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--svg", default=None)
    args = parser.parse_args()
    model, knobs = Model(), Knobs()
    arrivals = trace(args.day_s, args.peak_rps, model, random.Random(args.seed))
    mean_rate = len(arrivals) / args.day_s
    peak_p, peak_d = static_size(args.peak_rps, model)
    mean_p, mean_d = static_size(mean_rate, model)
    bounds = {Role.PREFILL: Bounds(1, peak_p + 1), Role.DECODE: Bounds(1, peak_d + 1)}
    results = [
        run(f"static, peak-sized ({peak_p}P{peak_d}D)", arrivals, model, peak_p, peak_d)[0],
        run(f"static, mean-sized ({mean_p}P{mean_d}D)", arrivals, model, mean_p, mean_d)[0],
    ]
    results.append(run("pdctl scaler, reactive loop only", arrivals, model, 1, 1, bounds, Knobs(predictive=False))[0])
    scaled, scaler = run("pdctl scaler", arrivals, model, 1, 1, bounds, knobs)
    results.append(scaled)
    print(
        f"virtual day of {args.day_s:.0f} s, {len(arrivals)} requests, peak {args.peak_rps:g} req/s, mean "
        f"{mean_rate:.1f} req/s; SLO TTFT {TARGETS.ttft_ms:g} ms, TPOT {TARGETS.tpot_ms:g} ms; "
        f"instance start-up {model.startup_s:g} s; scaler bounds prefill 1..{peak_p + 1}, decode 1..{peak_d + 1}"
    )
    peak_gpu = results[0].gpu_s
    print(f"{'cluster':32} {'SLO met':>8} {'TTFT p90':>9} {'TPOT p90':>9} {'GPU-hours':>10} {'vs peak':>8}")
    for r in results:
        print(
            f"{r.name:32} {r.attainment:8.1%} {_ms(percentile(r.ttfts, 90)):>9} "
            f"{percentile(r.tpots, 90) * 1000:7.1f}ms {r.gpu_s / 3600:10.1f} {r.gpu_s / peak_gpu - 1:+8.1%}"
        )
    loops = collections.Counter(line.split(": ", 1)[1].split(" ", 1)[0] == "floor" for line in scaler.decisions)
    print(f"scaler: {len(scaler.decisions)} decisions ({loops[True]} from the predictive floor); first and last:")
    for line in [*scaler.decisions[:3], "...", *scaler.decisions[-3:]]:
        print(f"  {line}")
    print("hour  req/s  prefill  decode   (# = one instance: prefill then decode)")
    for hour in range(24):
        at = (hour + 0.5) * args.day_s / 24
        _, p, d = scaler.sizes[min(len(scaler.sizes) - 1, bisect.bisect_left(scaler.sizes, (at,)))]
        print(f"{hour:4d} {day_rate(at, args.day_s, args.peak_rps):6.1f} {p:8d} {d:7d}   {'#' * p}|{'#' * d}")
    if args.svg:
        svg(scaler, args.day_s, args.peak_rps, args.svg)
        print(f"plot: {args.svg}")


if __name__ == "__main__":
    main()
