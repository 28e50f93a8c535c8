"""`pdctl bench` as a user runs it, on sim clusters: real processes and sockets, the emulator standing in
for vLLM (and saying so in every output)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading

import httpx
import pytest

from pdctl import lifecycle
from pdctl.cost import load_comparison
from tests.clusters import free_port_block, sim_profile, up
from tests.conftest import ROOT
from tests.test_sim_engine import kill, launch, wait_healthy

SECTIONS = (
    "pd: {prefilling_min_instances: 1, decoding_min_instances: 1, enable_dynamic_scaling: false,\n"
    "     routing_policy: threshold, prefilling_threshold_input_tokens: 100, prefilling_threshold_ratio: 1.0}\n"
)
FAST = "  sim: {prefill_ms_per_token: 0.01, decode_ms_per_token: 1}\n"


def pdctl(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pdctl", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def with_sections(profile, sections: str = SECTIONS):
    text = profile.read_text().replace(
        "pd: {prefilling_min_instances: 1, decoding_min_instances: 1, enable_dynamic_scaling: false}\n", sections
    )
    profile.write_text(text)
    return profile


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    profile = with_sections(sim_profile(tmp, name="benchc", port_start=13000, extra=FAST))
    cluster_dir, _, failures = up(profile, tmp / "state")
    assert failures == []
    yield tmp / "state", cluster_dir.read_state().router
    lifecycle.down(cluster_dir, grace_s=2)


def requests_answered(router: str) -> float:
    text = httpx.get(f"{router}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("pdctl_router_requests"))


def test_a_run_reports_vllm_bench_metrics_and_the_servers_figures(cluster, tmp_path):
    state, _ = cluster
    out = tmp_path / "run.json"
    result = pdctl(
        "bench",
        "--state-dir",
        str(state),
        "-n",
        "40",
        "--input-len",
        "600",
        "--output-len",
        "6",
        "--range-ratio",
        "0.5",
        "--concurrency",
        "8",
        "--goodput",
        "ttft:60000",
        "--json",
        str(out),
        "--plot",
        str(tmp_path / "run.html"),
    )
    assert result.returncode == 0, result.stderr
    assert "sim engine: an emulator, not vLLM" in result.stdout
    for label in (
        "Successful requests",
        "Output token throughput (tok/s)",
        "TTFT",
        "TPOT",
        "ITL",
        "E2EL",
        "Router phase split",
        "NIXL transfers",
        "Prefix cache hit rate",
        "Cost per million output",
    ):
        assert label in result.stdout
    data = json.loads(out.read_text())
    assert (data["completed"], data["failed"]) == (40, 0)
    # --range-ratio applies to both lengths, as in vllm bench: 3 to 9 output tokens, each one streamed.
    assert all(3 <= n <= 9 and len(itl) == n - 1 for n, itl in zip(data["output_lens"], data["itls"], strict=True))
    assert data["total_output_tokens"] == sum(data["output_lens"])
    assert data["request_goodput"] == pytest.approx(data["request_throughput"])
    assert len(data["ttfts"]) == 40 and data["total_input_tokens"] == sum(data["input_lens"])
    assert all(300 <= n <= 900 for n in data["input_lens"])
    server = data["pdctl"]["server"]
    split = {phase: sum(outcomes.values()) for phase, outcomes in server["phase_split"].items()}
    assert (
        sum(split.values()) == 40 and split.get("PREFILLING", 0) > 0
    )  # the router estimates 75-225 tokens (4 bytes a token at first), threshold 100
    assert server["nixl_transfers"] == split["PREFILLING"] and server["nixl_bytes_transferred"] > 0
    assert server["cost_per_million_output_tokens_usd"] > 0 and server["devices"] == "2 CPU instances"
    assert data["pdctl"]["sim"] is True and "sim engine" in (tmp_path / "run.html").read_text()


def test_shared_prefixes_hit_the_prefix_cache(cluster, tmp_path):
    state, _ = cluster
    out = tmp_path / "prefix.json"
    result = pdctl(
        "bench",
        "--state-dir",
        str(state),
        "-n",
        "30",
        "--input-len",
        "20",
        "--output-len",
        "2",
        "--prefix-groups",
        "1",
        "--prefix-len",
        "600",
        "--concurrency",
        "1",
        "--json",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    server = json.loads(out.read_text())["pdctl"]["server"]
    assert server["prefix_cache_hit_rate"] > 0.5


def test_a_chat_trace_and_poisson_arrivals_run_through(cluster, tmp_path):
    trace = tmp_path / "trace.jsonl"
    trace.write_text(
        "".join(json.dumps({"arrival_s": i * 0.01, "input_tokens": 30, "output_tokens": 3}) + "\n" for i in range(10))
    )
    state, router = cluster
    plan = json.loads((state / "benchc" / "plan.json").read_text())
    engine = next(f"http://127.0.0.1:{i['port']}" for i in plan["instances"] if i["role"] == "DECODING")
    replay = pdctl(
        "bench", "--url", router, "--engine", engine, "--trace", str(trace), "--json", str(tmp_path / "t.json")
    )
    assert replay.returncode == 0, replay.stderr
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["completed"] == 10 and data["pdctl"]["server"]["prefix_cache_queries"] > 0
    chat = pdctl(
        "bench",
        "--url",
        router,
        "--scenario",
        "chat",
        "-n",
        "8",
        "--rate",
        "50",
        "--concurrency",
        "1",
        "--priority-mix",
        "0:1,3:1",
        "--json",
        str(tmp_path / "c.json"),
    )
    assert chat.returncode == 0, chat.stderr
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["completed"] == 8 and data["input_lens"][3] > data["input_lens"][0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--scenario", "poetry"], "unknown scenario 'poetry'"),
        (["--model", "gpt-17"], "does not serve model 'gpt-17'; it serves: sim-model"),
        (["--goodput", "latency:5"], "--goodput"),
        (["--extra-body", "[35, 36]"], "--extra-body must be a JSON object"),
        (["--extra-body", '{"stream": false}'], "--extra-body cannot set stream"),
    ],
)
def test_bad_input_is_refused_before_any_load(cluster, args, message):
    _, router = cluster
    before = requests_answered(router)
    result = pdctl("bench", "--url", router, "-n", "5", *args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert requests_answered(router) == before


def test_a_malformed_trace_names_the_line(cluster, tmp_path):
    _, router = cluster
    trace = tmp_path / "bad.jsonl"
    trace.write_text('{"arrival_s": 0, "prompt": "hi", "output_tokens": 2}\n{"arrival_s": 1, "prompt": "x"\n')
    result = pdctl("bench", "--url", router, "--trace", str(trace))
    assert result.returncode == 2 and f"{trace}:2: not JSON" in result.stderr


def test_a_url_that_does_not_answer_and_no_cluster(tmp_path):
    port = free_port_block(1, 13500)
    result = pdctl("bench", "--url", f"http://127.0.0.1:{port}", "-n", "1")
    assert result.returncode == 2 and f"http://127.0.0.1:{port} does not answer" in result.stderr
    none = pdctl("bench", "--state-dir", str(tmp_path / "empty"), "-n", "1")
    assert none.returncode == 2 and "no cluster is running" in none.stderr


# ---- failures during a run -------------------------------------------------------------------------------


class StubServer:
    """Serves /v1/models (404 for other GETs) and answers the i-th POST with `answer`, over a real socket."""

    def __init__(self, port: int):
        self.port, self.count = port, 0
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self._serve(),), daemon=True)

    async def _serve(self) -> None:
        self.stop = asyncio.Event()
        server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.ready.set()
        async with server:
            await self.stop.wait()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode()
                length = next(
                    (
                        int(line.split(":")[1])
                        for line in head.split("\r\n")
                        if line.lower().startswith("content-length")
                    ),
                    0,
                )
                await reader.readexactly(length)
                if head.startswith("GET /v1/models"):
                    self._send(writer, 200, b'{"data": [{"id": "faulty", "max_model_len": 4096}]}')
                    continue
                if head.startswith("GET"):  # /metrics: this server has none
                    self._send(writer, 404, b"{}")
                    continue
                index, self.count = self.count, self.count + 1
                if not await self.answer(index, writer):
                    writer.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def answer(self, index: int, writer: asyncio.StreamWriter) -> bool:
        """Writes the answer; False closes the connection."""
        raise NotImplementedError

    @staticmethod
    def _send(writer: asyncio.StreamWriter, status: int, body: bytes) -> None:
        writer.write(f"HTTP/1.1 {status} X\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body)

    @staticmethod
    def _stream(writer: asyncio.StreamWriter, events: list[bytes], end: bool = True) -> None:
        """A 200 answer of server-sent events, each its own chunk; without `end` the body is left open."""
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for event in events:
            writer.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
        if end:
            writer.write(b"0\r\n\r\n")

    def __enter__(self) -> StubServer:
        self.thread.start()
        self.ready.wait(5)
        return self

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(5)


class FaultyServer(StubServer):
    """Answers request i with 503 (i % 3 == 0), drops the connection mid-stream (i % 3 == 1), or streams two
    tokens (i % 3 == 2)."""

    async def answer(self, index: int, writer: asyncio.StreamWriter) -> bool:
        event = b'data: {"choices": [{"text": "x"}]}\n\n'
        if index % 3 == 0:
            self._send(writer, 503, b'{"error": {"message": "overloaded"}}')
        elif index % 3 == 1:
            self._stream(writer, [event], end=False)
            return False
        else:
            self._stream(writer, [event, event])
        await writer.drain()
        return True


class OneEventServer(StubServer):
    """Streams every answer in one event of six tokens with vLLM's running usage count, as a PD decode
    instance was seen to, in what a random-weights model writes (an ANSI escape, bytes that were not UTF-8)."""

    TEXT = "j\x1b[2J^\ufffdZ_'"

    async def answer(self, index: int, writer: asyncio.StreamWriter) -> bool:
        usage = {"prompt_tokens": 8, "completion_tokens": 6, "total_tokens": 14}
        events = [{"choices": [{"index": 0, "text": self.TEXT}], "usage": usage}, {"choices": [], "usage": usage}]
        self._stream(writer, [f"data: {json.dumps(e)}\n\n".encode() for e in events] + [b"data: [DONE]\n\n"])
        await writer.drain()
        return True


def test_failures_are_counted_by_kind_and_the_results_still_written(tmp_path):
    port = free_port_block(1, 13600)
    out = tmp_path / "faulty.json"
    with FaultyServer(port):
        result = pdctl(
            "bench",
            "--url",
            f"http://127.0.0.1:{port}",
            "-n",
            "9",
            "--input-len",
            "8",
            "--output-len",
            "2",
            "--concurrency",
            "1",
            "--json",
            str(out),
        )
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert (data["completed"], data["failed"]) == (3, 6)
    assert data["failures_by_kind"] == {"http_503": 3, "disconnect": 3}
    assert "http_503 3" in result.stdout and "disconnect 3" in result.stdout
    assert data["errors"][0] == "overloaded"


def test_a_request_past_the_timeout_counts_as_timed_out(cluster, tmp_path):
    _, router = cluster
    out = tmp_path / "slow.json"
    result = pdctl(
        "bench",
        "--url",
        router,
        "-n",
        "3",
        "--input-len",
        "8",
        "--output-len",
        "400",
        "--timeout",
        "0.05",
        "--json",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text())["failures_by_kind"] == {"timeout": 3}


# ---- A/B and sweeps --------------------------------------------------------------------------------------


def test_sweep_finds_the_knee(cluster, tmp_path):
    state, _ = cluster
    out = tmp_path / "sweep.json"
    result = pdctl(
        "bench",
        "--state-dir",
        str(state),
        "-n",
        "12",
        "--input-len",
        "20",
        "--output-len",
        "4",
        "--sweep",
        "concurrency:1,4",
        "--json",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert list(data["runs"]) == ["concurrency 1", "concurrency 4"] and data["knee"]["concurrency"] == 4
    assert "knee: concurrency 4" in result.stdout and "ratio" in result.stdout


def test_compare_brings_up_pd_then_colocated_on_the_same_devices(tmp_path):
    profile = with_sections(sim_profile(tmp_path, name="ab", port_start=13700, extra=FAST))
    out = tmp_path / "ab.json"
    result = pdctl(
        "bench",
        str(profile),
        "--state-dir",
        str(tmp_path / "state"),
        "--compare",
        "-n",
        "20",
        "--input-len",
        "800",
        "--output-len",
        "4",
        "--concurrency",
        "4",
        "--json",
        str(out),
        timeout=240,
    )
    assert result.returncode == 0, result.stderr
    runs = json.loads(out.read_text())["runs"]
    pd, colocated = runs["pd"]["pdctl"]["server"], runs["colocated"]["pdctl"]["server"]
    assert set(pd["phase_split"]) == {"PREFILLING"} and set(colocated["phase_split"]) == {"HYBRID"}
    assert pd["devices"] == colocated["devices"] == "2 CPU instances"
    assert runs["pd"]["completed"] == runs["colocated"]["completed"] == 20
    assert "ratios to pd" in result.stdout and "sim engine" in result.stdout
    assert not list((tmp_path / "state").glob("*/state.json"))  # both layouts were stopped
    # The measured comparison PDMetrics.total_cost_optimization_percent reads: PD over colocated throughput.
    stored = load_comparison(tmp_path / "state", "ab")
    assert stored is not None and stored.devices == 2 and stored.engine == "sim"
    assert stored.pd_output_tokens_per_s == runs["pd"]["output_throughput"]
    assert stored.colocated_output_tokens_per_s == runs["colocated"]["output_throughput"]


def test_policies_run_the_same_workload_under_each_routing_policy(tmp_path):
    profile = with_sections(sim_profile(tmp_path, name="pol", port_start=13800, extra=FAST))
    out = tmp_path / "policies.json"
    result = pdctl(
        "bench",
        str(profile),
        "--state-dir",
        str(tmp_path / "state"),
        "--policies",
        "always,never",
        "-n",
        "10",
        "--input-len",
        "40",
        "--output-len",
        "3",
        "--json",
        str(out),
        timeout=240,
    )
    assert result.returncode == 0, result.stderr
    runs = json.loads(out.read_text())["runs"]
    assert runs["always"]["pdctl"]["server"]["phase_split"] == {"PREFILLING": {"ok": 10.0}}
    assert runs["never"]["pdctl"]["server"]["phase_split"] == {"DECODING": {"ok": 10.0}}
    assert "routing policies, same PD layout" in result.stdout


def test_compare_needs_a_profile_and_known_policies(cluster, tmp_path):
    _, router = cluster
    no_profile = pdctl("bench", "--url", router, "--compare")
    assert no_profile.returncode == 2 and "give PROFILE" in no_profile.stderr
    profile = sim_profile(tmp_path, name="unknownpolicy", port_start=13900)
    result = pdctl("bench", str(profile), "--state-dir", str(tmp_path / "state"), "--policies", "random")
    assert result.returncode == 2 and "--policies 'random': choose among threshold, adaptive" in result.stderr


# ---- tokens, not events ------------------------------------------------------------------------------------


def bench_json(url: str, out, *args: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    result = pdctl(
        "bench", "--url", url, "-n", "4", "--input-len", "8", "--concurrency", "1", "--json", str(out), *args
    )
    assert result.returncode == 0, result.stderr
    return result, json.loads(out.read_text())


def test_tpot_and_itl_count_tokens_when_events_carry_several(tmp_path):
    sim = launch(tmp_path, "--stream-interval", "4", "--decode-ms-per-token", "2", "--prefill-ms-per-token", "0")
    try:
        wait_healthy(sim)
        _, data = bench_json(sim.url, tmp_path / "grouped.json", "--output-len", "10")
    finally:
        kill(sim)
    assert data["output_lens"] == [10] * 4 and data["total_output_tokens"] == 40
    tpots = []
    for itl, ttft, latency in zip(data["itls"], data["ttfts"], data["latencies"], strict=True):
        # 1 token, then events of 4, 4 and 1: a gap per token after the first, an event's shared by its tokens.
        assert len(itl) == 9 and itl[:4] == [itl[0]] * 4 and itl[4:8] == [itl[4]] * 4
        assert sum(itl) == pytest.approx(latency - ttft)
        tpots.append((latency - ttft) / 9 * 1000)
    assert data["mean_tpot_ms"] == pytest.approx(sum(tpots) / 4) and data["mean_tpot_ms"] > 0
    assert data["mean_itl_ms"] == pytest.approx(sum(sum(itl) for itl in data["itls"]) / 36 * 1000)


def test_an_answer_in_one_event_counts_its_tokens_and_has_no_tpot(tmp_path):
    port = free_port_block(1, 13650)
    with OneEventServer(port):
        result, data = bench_json(f"http://127.0.0.1:{port}", tmp_path / "one.json", "--output-len", "6")
    assert data["completed"] == 4 and data["output_lens"] == [6] * 4 and data["total_output_tokens"] == 24
    assert data["itls"] == [[]] * 4 and data["mean_tpot_ms"] is None and data["p99_itl_ms"] is None
    tpot_row = next(line for line in result.stdout.splitlines() if line.split()[:1] == ["TPOT"])
    assert tpot_row.split()[1:] == ["n/a"] * 4
