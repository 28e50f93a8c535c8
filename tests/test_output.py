"""What pdctl prints: outside text escaped by every printer (rendered as an 80-column terminal shows it), and
`pdctl route`'s timing by tokens, not stream events, against real engines over real sockets."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys

import pytest
from rich.console import Console, RenderableType

from pdctl import dashboard, lifecycle, views
from pdctl.auth import Access
from pdctl.bench import views as bench_views
from pdctl.gpus import Gpu, GpuInventory, GpuProcess
from pdctl.lifecycle import InstanceFailure
from pdctl.router import client as route_client
from pdctl.safetext import cell, printable
from pdctl.scaling.report import DecisionRecord, PoolReport, ScalingReport, render_scaling
from tests.clusters import free_port_block, sim_profile, up
from tests.test_bench import OneEventServer
from tests.test_dashboard import fixed_snapshot
from tests.test_sim_engine import MODEL, kill, launch, wait_healthy

# What a random-weights model, a log or a hostile name can hold: an ANSI escape (clear screen), a carriage
# return, a bell, a C1 control, a right-to-left override, a zero-width space, bytes that were not UTF-8.
HOSTILE = "j\x1b[2J^\ufffdZ\r_\x07\x9b\u202e'\u200b"
ESCAPED = "j\\x1b[2J^\\ufffdZ\\r_\\x07\\x9b\\u202e'\\u200b"
UNSAFE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\ufffd\u202a-\u202e\u2066-\u2069\u200b]")


def shown(renderable: RenderableType) -> str:
    """The text an 80-column terminal shows, colours and all (their escapes are rich's, not the data's)."""
    console = Console(width=80, record=True, file=io.StringIO(), force_terminal=True)
    console.print(renderable)
    return console.export_text()


def test_printable_escapes_what_a_terminal_would_obey_and_keeps_the_rest():
    assert printable(HOSTILE) == ESCAPED
    assert printable("a\udc80b") == "a\\udc80b"  # a byte read with surrogateescape
    text = "héllo 世界\u3000 naïve 👩\u200d💻 ok"  # wide and joined characters print as they are
    assert printable(text) == text
    assert printable("one\n\ttwo", multiline=True) == "one\n\ttwo" and printable("one\n\ttwo") == "one\\n\\ttwo"
    assert cell("[red]x[/red]\x1b").plain == "[red]x[/red]\\x1b"  # not rich markup either


def hostile_printouts() -> dict[str, RenderableType]:
    """Each printer given outside text where it shows any."""
    failure = InstanceFailure(
        id="decode-0",
        exit_code=1,
        message=HOSTILE,
        log_path="/tmp/x.log",
        last_lines=["\x1b[31mERROR\x1b[0m " + HOSTILE],
    )
    process = GpuProcess(pid=7, name="evil\x1b]0;title\x07" + HOSTILE)
    gpu = Gpu(index=0, name="H100", uuid="GPU-0", memory_total_mib=8e4, memory_used_mib=0, memory_free_mib=8e4)
    gpu.processes = [process]
    decision = {"phase": "PREFILLING", "reason": HOSTILE, "input_tokens": 3, "expected_output_tokens": 4}
    decision |= {"figures": {"t": 1}, "prefill": {"instance": "prefill-0", "url": HOSTILE, "scores": {}}}
    result = route_client.RouteResult(HOSTILE, "PREFILLING", "prefill-0", "decode-0", tokens=1, token_events=1)
    snapshot = fixed_snapshot()
    snapshot.status.instances[0].phase, snapshot.status.instances[0].message = "failed", HOSTILE
    pool = PoolReport(pool="decode", mode="auto", current=1, desired=2, min=1, max=4, blocked=HOSTILE)
    scaling = ScalingReport(mode="auto", pools=[pool])
    scaling.decisions = [DecisionRecord(at=0, pool="decode", delta=1, loop="reactive", reason=HOSTILE)]
    run = {"completed": 1, "failed": 0, "output_throughput": 1.0}
    return {
        "answer": views.answer_text(HOSTILE),
        "route": views.route_result_view(result),
        "decision": views.decision_view(decision),
        "failure": views.failure_report([failure]),
        "gpus": views.gpu_table(GpuInventory(driver_version="550", gpus=[gpu])),
        "no gpu": views.gpu_table(GpuInventory(unavailable_reason=HOSTILE)),
        "dashboard": dashboard.render(snapshot),
        "scaling": render_scaling(scaling, now=1.0),
        "bench": bench_views.comparison_table([(HOSTILE, run), ("b", run)], "runs"),
    }


def test_every_printer_escapes_outside_text():
    for name, renderable in hostile_printouts().items():
        text = shown(renderable)
        assert not UNSAFE.search(text), f"{name}: {text!r}"
        assert "\\x1b" in text, f"{name}: {text!r}"


def test_route_counts_tokens_when_an_engine_sends_several_an_event(tmp_path):
    sim = launch(tmp_path, "--stream-interval", "4", "--decode-ms-per-token", "5", "--prefill-ms-per-token", "0")
    try:
        wait_healthy(sim)
        access = Access(sim.url)
        body = route_client.completion_body(MODEL, "count these tokens", 10, None, None)
        assert body["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
        pieces: list[str] = []
        result = route_client.send(access, body, pieces.append)
        one = route_client.send(access, route_client.completion_body(MODEL, "one", 1, None, None), pieces.append)
    finally:
        kill(sim)
    # As vLLM's --stream-interval 4 sends 10 tokens: the first alone, then 4, 4 and the last 1.
    assert (result.tokens, result.token_events, result.first_event_tokens) == (10, 4, 1)
    assert result.text == "".join(pieces[:4]) and len(result.text.split()) == 10
    assert result.ttft_s is not None and result.last_token_s is not None
    assert result.tpot_s == pytest.approx((result.last_token_s - result.ttft_s) / 9) and result.tpot_s > 0
    assert "10 tokens in 4 events" in views.route_result_view(result).plain
    assert one.tpot_s is None and "1 token in 1 event" in views.route_result_view(one).plain
    assert "TPOT n/a" in views.route_result_view(one).plain


def test_route_of_an_answer_in_one_event_has_no_tpot_and_escapes_its_text():
    port = free_port_block(1, 13660)
    with OneEventServer(port):
        result = route_client.send(Access(f"http://127.0.0.1:{port}"), {"stream": True}, lambda text: None)
    assert (result.tokens, result.token_events, result.output_tokens) == (6, 1, 6)
    assert result.tpot_s is None and result.text == OneEventServer.TEXT
    line = shown(views.route_result_view(result))
    assert "6 tokens in 1 event" in line and "TPOT n/a" in line and "TPOT 0 ms" not in line
    answer = shown(views.answer_text(result.text))
    assert not UNSAFE.search(answer) and "\\x1b[2J" in answer and "\\ufffd" in answer


@pytest.fixture(scope="module")
def grouped_cluster(tmp_path_factory):
    """PD on sim engines that send tokens 4 to an event, as vLLM's --stream-interval 4 does."""
    tmp = tmp_path_factory.mktemp("grouped")
    extra = '  sim: {decode_ms_per_token: 20}\n  extra_args: ["--stream-interval", "4"]\n'
    profile = sim_profile(tmp, name="grouped", port_start=14200, extra=extra)
    profile.write_text(
        profile.read_text().replace(
            "enable_dynamic_scaling: false}", "enable_dynamic_scaling: false, routing_policy: always}"
        )
    )
    cluster_dir, _, failures = up(profile, tmp / "state")
    assert failures == []
    yield cluster_dir
    lifecycle.down(cluster_dir, grace_s=2)


def route(cluster_dir, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "pdctl", "route", "--prompt", "a prompt to split", *args]
    argv += ["--state-dir", str(cluster_dir.root), "--cluster", cluster_dir.name]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_pdctl_route_through_pd_times_tokens_not_events(grouped_cluster):
    shown_ = route(grouped_cluster, "--max-tokens", "6")
    assert shown_.returncode == 0, shown_.stderr
    assert "PREFILLING via prefill-0 -> decode-0; 6 tokens in 3 events" in shown_.stdout
    tpot = re.search(r"TPOT (\d+) ms", shown_.stdout)
    assert tpot and int(tpot[1]) > 0  # 5 tokens after the first event, each after a 20 ms step
    sent = json.loads(route(grouped_cluster, "--max-tokens", "6", "--json").stdout)["result"]
    assert (sent["output_tokens"], sent["token_events"], sent["first_event_tokens"]) == (6, 3, 1)
    assert sent["tpot_s"] == pytest.approx((sent["last_token_s"] - sent["ttft_s"]) / 5)
    one = route(grouped_cluster, "--max-tokens", "1")
    assert one.returncode == 0 and "1 token in 1 event" in one.stdout and "TPOT n/a" in one.stdout
