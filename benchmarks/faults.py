"""Engine faults under streamed load on the real CPU cluster: what clients see, how long until the cluster is
whole again, and what is left behind.

Brings up profiles/local.yaml with one prefill and `--decode` decode instances (real vLLM, the builtin model),
then, one fault at a time, runs `--streams` clients that stream completions (temperature 0, prompts both
sides of the PD threshold) through the router, injects the fault, keeps the load on until the cluster is whole
again, and counts each request as answered (the stream ends with [DONE], no error), a clean error (an HTTP error
or an error event: the client is told), broken (the connection or the stream ended without either) or hung
(nothing for --hang-s seconds). At the end `pdctl down`, and the processes of the cluster left after it.

    python benchmarks/faults.py [--decode 2] [--streams 8] [--faults NAME,...] [--json FILE]

Faults: api-kill-prefill, api-kill-decode (the API server alone, SIGKILL: its EngineCore child lives on),
core-kill (a decode instance's EngineCore, SIGKILL), core-stop (its EngineCore SIGSTOPped for 30 s, then
SIGCONT), daemon-kill (the daemon, SIGKILL), prefill-between-hops (the prefill instance killed after it
answered a prefill and before the decode instance read that KV cache), port-taken (a decode instance killed and
its port held by another process for 15 s while it restarts).

The fault tests (tests/test_e2e_faults.py) use the same pieces.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import socket
import string
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pdctl import lifecycle, procs  # noqa: E402
from pdctl.cluster import plan_profile  # noqa: E402
from pdctl.engines.vllm_adapter import REMOTE_DECODE  # noqa: E402
from pdctl.plan import Plan, PlannedInstance  # noqa: E402
from pdctl.state import ClusterDir, ClusterPhase, InstancePhase  # noqa: E402

ANSWERED, CLEAN_ERROR, BROKEN, HUNG = "answered", "clean error", "broken", "hung"


# ---- the cluster ------------------------------------------------------------------------------------------------


def fault_profile(directory: Path, decode: int, stall_timeout_s: float | None = None) -> Path:
    """profiles/local.yaml with `decode` decode instances and its own name; a stall timeout other than the
    profile's default if given (short ones mistake an engine starved of CPU, while another restarts on these
    two cores, for a stalled one)."""
    text = (ROOT / "profiles" / "local.yaml").read_text()
    text = text.replace("name: local", "name: faults")
    text = text.replace("decoding_min_instances: 1", f"decoding_min_instances: {decode}")
    text = text.replace("decoding_max_instances: 1", f"decoding_max_instances: {decode}")
    if stall_timeout_s is not None:
        text = text.replace("  port: 8000\n", f"  port: 8000\n  stall_timeout_s: {stall_timeout_s:g}\n")
    path = directory / "faults.yaml"
    path.write_text(text)
    return path


def up(profile: Path, state_root: Path) -> tuple[ClusterDir, lifecycle.StartedCluster]:
    planned = plan_profile(profile)
    cluster_dir = ClusterDir(state_root, planned.profile.name)
    started = lifecycle.start(planned, cluster_dir)
    failures = lifecycle.wait_ready(started, lambda state: None)
    if failures:
        lifecycle.down(cluster_dir)
        raise SystemExit("the cluster did not start: " + "; ".join(f"{f.id}: {f.message}" for f in failures))
    return cluster_dir, started


def router_url(cluster_dir: ClusterDir) -> str:
    return cluster_dir.read_state().router


def whole(cluster_dir: ClusterDir) -> bool:
    """Every instance healthy and the router answering with them."""
    state = cluster_dir.read_state()
    if state.phase is not ClusterPhase.READY:
        return False
    if any(s.phase is not InstancePhase.HEALTHY for s in state.instances.values()):
        return False
    try:
        return httpx.get(f"{state.router}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def incarnations(cluster_dir: ClusterDir) -> dict[str, tuple[int | None, int]]:
    """Each instance's pid and restarts, and the daemon's pid: what a recovery changes."""
    state = cluster_dir.read_state()
    found = {i: (s.process.pid if s.process else None, s.restarts) for i, s in state.instances.items()}
    found["daemon"] = (state.daemon.pid if state.daemon else None, 0)
    return found


def wait_recovered(
    cluster_dir: ClusterDir,
    before: dict[str, tuple[int | None, int]],
    since: float,
    timeout_s: float = 240.0,
    replaced: tuple[str, ...] = (),
) -> float | None:
    """Seconds from `since` until the fault was acted on (an instance or the daemon replaced; each of
    `replaced`, if named) and the cluster is whole again; None if not within timeout_s."""
    while time.monotonic() - since < timeout_s:
        now = incarnations(cluster_dir)
        acted = all(now[i] != before[i] for i in replaced) if replaced else now != before
        if acted and whole(cluster_dir):
            return time.monotonic() - since
        time.sleep(0.5)
    return None


def groups(cluster_dir: ClusterDir) -> dict[str, int | None]:
    """Each instance's process group now."""
    return {i: s.process.pgid if s.process else None for i, s in cluster_dir.read_state().instances.items()}


def left_behind(token: str, pgids: set[int]) -> list[psutil.Process]:
    """Live processes carrying the cluster's token or in any process group its instances ever had (an
    EngineCore carries no token, and outlives its API server in that server's group)."""
    found = {p.pid: p for p in procs.marked_processes(token)}
    for process in psutil.process_iter():
        if process.pid not in found and any(_in_group(process, pgid) for pgid in pgids):
            found[process.pid] = process
    return [p for p in found.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


# ---- the load ------------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    kind: str
    seconds: float
    detail: str = ""


def _prompt(rng: random.Random) -> str:
    """Half above the PD threshold (64 byte tokens: prefill then decode), half below (straight to decode)."""
    length = rng.choice((24, 40, 200, 400))
    return "".join(rng.choice(string.ascii_letters + " ") for _ in range(length))


def stream_once(url: str, body: dict, hang_s: float) -> Outcome:
    """One streamed request, classified as a client sees it."""
    started = time.monotonic()
    chat = "messages" in body
    path = "/v1/chat/completions" if chat else "/v1/completions"
    timeout = httpx.Timeout(connect=10.0, read=hang_s, write=10.0, pool=10.0)
    try:
        with httpx.stream("POST", url + path, json={**body, "stream": True}, timeout=timeout) as response:
            if response.status_code != 200:
                response.read()
                return Outcome(CLEAN_ERROR, time.monotonic() - started, f"HTTP {response.status_code}")
            done, error = False, ""
            for line in response.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith('data: {"error"'):
                    error = json.loads(line[6:])["error"]["message"]
            if error:
                return Outcome(CLEAN_ERROR, time.monotonic() - started, error)
            return Outcome(ANSWERED if done else BROKEN, time.monotonic() - started, "" if done else "no [DONE]")
    except httpx.ReadTimeout:
        return Outcome(HUNG, time.monotonic() - started, f"nothing for {hang_s:g} s")
    except httpx.ConnectError as error:  # refused at once (the router is down): the client knows
        return Outcome(CLEAN_ERROR, time.monotonic() - started, f"cannot connect: {error}")
    except httpx.HTTPError as error:
        return Outcome(BROKEN, time.monotonic() - started, f"{type(error).__name__}: {error}")


class StreamLoad:
    """`streams` clients, each sending its next streamed completion as soon as the last one ends."""

    def __init__(self, url: str, model: str, streams: int = 8, max_tokens: int = 96, hang_s: float = 60.0):
        self.url, self.model, self.streams, self.max_tokens, self.hang_s = url, model, streams, max_tokens, hang_s
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def __enter__(self) -> StreamLoad:
        for index in range(self.streams):
            thread = threading.Thread(target=self._client, args=(index,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.hang_s + 30)

    def _client(self, index: int) -> None:
        rng = random.Random(index)
        while not self._stop.is_set():
            body = {"model": self.model, "prompt": _prompt(rng), "max_tokens": self.max_tokens, "temperature": 0}
            outcome = stream_once(self.url, body, self.hang_s)
            with self._lock:
                self.outcomes.append(outcome)

    def counts(self) -> dict[str, int]:
        with self._lock:
            kinds = [o.kind for o in self.outcomes]
        return {kind: kinds.count(kind) for kind in (ANSWERED, CLEAN_ERROR, BROKEN, HUNG)}

    def failures(self) -> list[Outcome]:
        with self._lock:
            return [o for o in self.outcomes if o.kind != ANSWERED]


# ---- the faults ----------------------------------------------------------------------------------------------------


def api_server(cluster_dir: ClusterDir, instance: str) -> psutil.Process:
    return psutil.Process(cluster_dir.read_state().instances[instance].process.pid)


def engine_core(cluster_dir: ClusterDir, instance: str) -> psutil.Process:
    """The instance's EngineCore: the API server's child process named VLLM::EngineCore."""
    for child in api_server(cluster_dir, instance).children(recursive=True):
        if "EngineCore" in child.name() or "EngineCore" in " ".join(child.cmdline()[:1]):
            return child
    raise LookupError(f"{instance} has no EngineCore process")


def kill_api_server(cluster_dir: ClusterDir, instance: str) -> None:
    api_server(cluster_dir, instance).send_signal(signal.SIGKILL)


def kill_engine_core(cluster_dir: ClusterDir, instance: str) -> None:
    engine_core(cluster_dir, instance).send_signal(signal.SIGKILL)


def stop_engine_core(cluster_dir: ClusterDir, instance: str, seconds: float) -> threading.Thread:
    """SIGSTOP the EngineCore, SIGCONT it after `seconds` (if it still exists: pdctl may have replaced it)."""
    core = engine_core(cluster_dir, instance)
    core.send_signal(signal.SIGSTOP)

    def resume() -> None:
        time.sleep(seconds)
        with contextlib.suppress(psutil.NoSuchProcess):
            core.send_signal(signal.SIGCONT)

    thread = threading.Thread(target=resume, daemon=True)
    thread.start()
    return thread


def kill_daemon(cluster_dir: ClusterDir) -> None:
    os.kill(cluster_dir.read_state().daemon.pid, signal.SIGKILL)


def kill_prefill_between_hops(cluster_dir: ClusterDir, model: str, prompt_len: int = 300) -> Outcome:
    """A prefill answered, its instance killed (whole group), then the decode instance asked to read that KV
    cache: what the decode hop gives."""
    urls = {i.id: i.url for i in Plan.model_validate_json(cluster_dir.plan_file.read_bytes()).instances}
    prefill, decode = healthy_pair(cluster_dir)
    state = cluster_dir.read_state()
    body = {"model": model, "prompt": "k" * prompt_len, "max_tokens": 16, "temperature": 0}
    key = cluster_dir.engine_key()  # the engines take requests from the router, which holds the cluster's key
    headers = {"authorization": f"Bearer {key}"} if key else {}
    first = httpx.post(f"{urls[prefill]}/v1/completions", json={**body, "max_tokens": 1,
                       "kv_transfer_params": REMOTE_DECODE}, headers=headers, timeout=60).json()  # fmt: skip
    for process in procs.group_members(state.instances[prefill].process):
        process.send_signal(signal.SIGKILL)
    started = time.monotonic()
    try:
        response = httpx.post(
            f"{urls[decode]}/v1/completions",
            json={**body, "kv_transfer_params": first["kv_transfer_params"]},
            headers=headers,
            timeout=120,
        )
    except httpx.HTTPError as error:
        return Outcome(BROKEN, time.monotonic() - started, str(error))
    answer = response.json()
    if response.status_code == 200 and answer["choices"][0]["finish_reason"] in ("length", "stop"):
        return Outcome(ANSWERED, time.monotonic() - started)
    return Outcome(CLEAN_ERROR, time.monotonic() - started, json.dumps(answer)[:200])


def healthy_pair(cluster_dir: ClusterDir, timeout_s: float = 240.0) -> tuple[str, str]:
    """A healthy prefill and a healthy decode instance, waiting for them (an earlier fault's may restart)."""
    deadline = time.monotonic() + timeout_s
    while True:
        healthy = [i for i, s in cluster_dir.read_state().instances.items() if s.phase is InstancePhase.HEALTHY]
        prefills = [i for i in healthy if i.startswith("prefill")]
        decodes = [i for i in healthy if i.startswith("decode")]
        if prefills and decodes:
            return prefills[0], decodes[0]
        if time.monotonic() > deadline:
            raise TimeoutError(f"no healthy prefill and decode instance within {timeout_s:g} s")
        time.sleep(0.5)


def take_port(host: str, port: int, seconds: float) -> threading.Thread:
    """Hold a TCP port from another process's point of view (a listening socket) for `seconds`."""
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    deadline = time.monotonic() + 10
    while True:
        try:
            holder.bind((host, port))
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)  # the killed engine's socket closes as the kernel reaps it
    holder.listen()

    def release() -> None:
        time.sleep(seconds)
        holder.close()

    thread = threading.Thread(target=release, daemon=True)
    thread.start()
    return thread


def kill_group(cluster_dir: ClusterDir, instance: str) -> None:
    for process in procs.group_members(cluster_dir.read_state().instances[instance].process):
        process.send_signal(signal.SIGKILL)


# ---- the suite -----------------------------------------------------------------------------------------------------


@dataclass
class FaultRow:
    fault: str
    requests: int = 0
    answered: int = 0
    clean_errors: int = 0
    broken: int = 0
    hung: int = 0
    recover_s: float | None = None
    strays: int = 0  # processes of an earlier incarnation of an instance still alive once it recovered
    notes: list[str] = field(default_factory=list)


def strays(cluster_dir: ClusterDir, groups_before: dict[str, int | None]) -> int:
    """Processes still in an instance's process group from before the fault, where the instance now runs in
    another group: what a restart left behind."""
    state = cluster_dir.read_state()
    count = 0
    for instance, pgid in groups_before.items():
        status = state.instances.get(instance)
        if pgid is None or status is None or status.process is None or status.process.pgid == pgid:
            continue
        count += len([p for p in psutil.process_iter() if _in_group(p, pgid)])
    return count


def _in_group(process: psutil.Process, pgid: int) -> bool:
    try:
        return os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, OSError):
        return False


def run_fault(cluster_dir: ClusterDir, model: str, name: str, streams: int, hang_s: float) -> FaultRow:
    """One fault under load, the load kept on until the cluster is whole again."""
    row = FaultRow(name)
    before, lives = groups(cluster_dir), incarnations(cluster_dir)
    decode = sorted(i for i in before if i.startswith("decode"))[0]
    with StreamLoad(router_url(cluster_dir), model, streams, hang_s=hang_s) as load:
        time.sleep(3)
        injected = time.monotonic()
        inject(cluster_dir, model, name, decode, row)
        row.recover_s = wait_recovered(cluster_dir, lives, injected)
        time.sleep(2)  # a few requests on the whole cluster again
    counts = load.counts()
    row.requests = sum(counts.values())
    row.answered, row.clean_errors, row.broken, row.hung = (
        counts[ANSWERED], counts[CLEAN_ERROR], counts[BROKEN], counts[HUNG]
    )  # fmt: skip
    row.notes += sorted({f"{o.kind}: {o.detail}" for o in load.failures()})[:3]
    row.strays = strays(cluster_dir, before)
    return row


def inject(cluster_dir: ClusterDir, model: str, name: str, decode: str, row: FaultRow) -> None:
    faults: dict[str, Callable[[], object]] = {
        "api-kill-prefill": lambda: kill_api_server(cluster_dir, "prefill-0"),
        "api-kill-decode": lambda: kill_api_server(cluster_dir, decode),
        "core-kill": lambda: kill_engine_core(cluster_dir, decode),
        "core-stop": lambda: stop_engine_core(cluster_dir, decode, 30),
        "daemon-kill": lambda: kill_daemon(cluster_dir),
        "port-taken": lambda: _kill_and_take_port(cluster_dir, decode),
    }
    if name == "prefill-between-hops":
        outcome = kill_prefill_between_hops(cluster_dir, model)
        row.notes.append(f"the decode hop after its prefill instance died: {outcome.kind} in {outcome.seconds:.1f} s")
        return
    faults[name]()


def planned(cluster_dir: ClusterDir, instance: str) -> PlannedInstance:
    return next(i for i in Plan.model_validate_json(cluster_dir.plan_file.read_bytes()).instances if i.id == instance)


def _kill_and_take_port(cluster_dir: ClusterDir, instance: str) -> None:
    kill_group(cluster_dir, instance)
    where = planned(cluster_dir, instance)
    take_port(where.host, where.port, 15)


FAULTS = (
    "api-kill-decode",
    "api-kill-prefill",
    "core-kill",
    "core-stop",
    "daemon-kill",
    "prefill-between-hops",
    "port-taken",
)


def print_table(rows: list[FaultRow], left_after_down: int, decode: int, streams: int) -> None:
    print(f"\n1 prefill + {decode} decode instances (real vLLM CPU, builtin model), {streams} streams at a time")
    header = f"{'fault':<22}{'requests':>9}{'answered':>9}{'clean err':>10}{'broken':>7}{'hung':>5}{'recover s':>10}"
    print(header + f"{'strays':>7}")
    for row in rows:
        recover = f"{row.recover_s:.0f}" if row.recover_s is not None else "never"
        print(
            f"{row.fault:<22}{row.requests:>9}{row.answered:>9}{row.clean_errors:>10}{row.broken:>7}{row.hung:>5}"
            f"{recover:>10}{row.strays:>7}"
        )
        for note in row.notes:
            print(f"{'':<22}{note[:100]}")
    print(f"processes of the cluster left after `pdctl down`: {left_after_down}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decode", type=int, default=2)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--faults", default=",".join(FAULTS))
    parser.add_argument("--hang-s", type=float, default=60.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cluster_dir, started = up(fault_profile(Path(tmp), args.decode), Path(tmp) / "state")
        model = started.plan.served_model_name
        token = cluster_dir.read_state().token
        rows, seen = [], {g for g in groups(cluster_dir).values() if g}
        try:
            for name in args.faults.split(","):
                rows.append(run_fault(cluster_dir, model, name, args.streams, args.hang_s))
                seen |= {g for g in groups(cluster_dir).values() if g}
                print(f"{name}: {asdict(rows[-1])}", flush=True)
        finally:
            lifecycle.down(cluster_dir)
        left = len(left_behind(token, seen))
    print_table(rows, left, args.decode, args.streams)
    if args.json:
        args.json.write_text(json.dumps({"rows": [asdict(r) for r in rows], "left_after_down": left}, indent=2))


if __name__ == "__main__":
    main()
