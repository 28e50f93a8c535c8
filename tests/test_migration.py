"""Request migration: a stream whose engine fails or stalls mid-stream goes on on another instance, and the
client sees the stream it would have seen without the fault. The engines are deterministic stand-ins on real
sockets (tests/token_engine.py); the same is shown on real vLLM in test_e2e_vllm.py."""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager
from typing import Any

import pytest

from pdctl.control_plane.types import ExecutionInstanceType as Role
from pdctl.control_plane.types import PDSeparationConfig
from pdctl.httpserver import HttpServer
from pdctl.procs import Activity
from pdctl.router.migration import StreamLedger, why_not_migratable
from pdctl.router.proxy import Router, RouterSettings
from pdctl.router.tokens import TokenCounter, utf8_length
from pdctl.routing.pool import Instance, Pool
from tests.token_engine import HALF, Fault, TokenEngine, chat_prompt, next_token, text_of

pytestmark = pytest.mark.anyio
PROMPT = "Once upon a time"
CHAT = [{"role": "user", "content": "Tell me a story"}]


class Cluster:
    def __init__(self, router: Router, engines: dict[str, TokenEngine], faults: list[Fault], url: str):
        self.router, self.engines, self.faults, self.url = router, engines, faults, url

    def migrations(self) -> dict[str, float]:
        return dict((labels[0], value) for labels, value in self.router.metrics.migrations.values.items())


@asynccontextmanager
async def cluster(roles: dict[str, Role], **settings: Any):
    faults: list[Fault] = []
    engines = {name: TokenEngine(name, faults) for name in roles}
    for engine in engines.values():
        await engine.server.start()
    instances = [Instance(name, role, engines[name].url, max_num_seqs=8) for name, role in roles.items()]
    for instance in instances:
        instance.healthy = True
    pd = PDSeparationConfig(prefilling_threshold_input_tokens=100_000)  # short prompts: straight to decode
    # Long enough that a busy machine (2 cores) does not look like a stalled engine; short for the stall test.
    config = RouterSettings("token-model", pd, **{"stall_timeout_s": 2.0, **settings})
    router = Router(config, Pool(instances), TokenCounter(utf8_length))
    server = HttpServer(router.handle)
    await server.start()
    watch = asyncio.create_task(router.watch_stalls(interval_s=0.05))
    try:
        yield Cluster(router, engines, faults, f"http://127.0.0.1:{server.port}")
    finally:
        watch.cancel()
        await server.stop()
        await router.aclose()
        for engine in engines.values():
            await engine.server.stop()


@pytest.fixture
def anyio_backend():
    return "asyncio"


TWO_DECODE = {"decode-0": Role.DECODING, "decode-1": Role.DECODING}


class Streamed:
    """What a client got: the status, headers and trailers, and every event parsed."""

    def __init__(self, status: int, headers: dict[str, str], events: list[dict[str, Any]], trailers: dict[str, str]):
        self.status, self.headers, self.events, self.trailers = status, headers, events, trailers


async def stream(url: str, body: dict[str, Any]) -> tuple[list[dict[str, Any]], Streamed]:
    """One streamed request over a plain socket (httpx does not show HTTP trailers)."""
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    payload = json.dumps({"stream": True, **body}).encode()
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    head = f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
    writer.write(f"{head}content-length: {len(payload)}\r\n\r\n".encode() + payload)
    lines = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)).decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    body_bytes = b""
    while size := int(await asyncio.wait_for(reader.readuntil(b"\r\n"), 30), 16):
        body_bytes += (await reader.readexactly(size + 2))[:-2]
    trailers = {}
    while (line := (await reader.readuntil(b"\r\n")).decode().strip()) != "":
        name, _, value = line.partition(":")
        trailers[name.strip().lower()] = value.strip()
    writer.close()
    events = [
        json.loads(line[6:])
        for line in body_bytes.decode().split("\n")
        if line.startswith("data: ") and line != "data: [DONE]"
    ]
    return events, Streamed(int(lines[0].split()[1]), headers, events, trailers)


def text(events: list[dict[str, Any]]) -> str:
    parts = []
    for event in events:
        assert "error" not in event, event
        for choice in event["choices"]:
            parts.append(choice["text"] if "text" in choice else choice["delta"].get("content") or "")
    return "".join(parts)


def expected(prompt_ids: list[int], count: int) -> list[int]:
    context = list(prompt_ids)
    for _ in range(count):
        context.append(next_token(context))
    return context[len(prompt_ids) :]


def strip_ids(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The events less what differs between any two streams: the id each engine gives its requests."""
    return [{k: v for k, v in event.items() if k != "id"} for event in events]


@pytest.mark.parametrize("kind", ["die", "stall", "error"])
async def test_a_completion_stream_moves_and_is_the_stream_without_the_fault(kind):
    body = {"prompt": PROMPT, "max_tokens": 40, "temperature": 0, "stream_options": {"include_usage": True}}
    async with cluster(TWO_DECODE) as c:
        baseline, _ = await stream(c.url, body)
        c.faults.append(Fault(after_tokens=15, kind=kind))
        events, response = await stream(c.url, body)
        assert text(events) == text(baseline) == text_of(expected(list(PROMPT.encode()), 40))
        # Event for event the same, one id throughout, usage counted from the original prompt.
        assert [e["id"] for e in events] == [events[0]["id"]] * len(events)
        assert strip_ids(events) == strip_ids(baseline)
        assert events[-1]["usage"] == {
            "prompt_tokens": len(PROMPT),
            "total_tokens": len(PROMPT) + 40,
            "completion_tokens": 40,
        }
        assert response.trailers["x-pdctl-migrations"] == "1"
        assert c.migrations() == {"stalled" if kind == "stall" else "failed": 1.0}
        continued = [r for e in c.engines.values() for r in e.requests if isinstance(r.get("prompt"), list)]
        assert len(continued) == 1 and continued[0]["max_tokens"] == 25


async def test_a_stream_whose_engine_fails_before_its_first_event_starts_again_whole_elsewhere():
    """An error event before any token: the request starts again on the other instance, whose stream is judged on
    its own events (the first engine's error event once ended the second's stream at its first chunk)."""
    body = {"prompt": PROMPT, "max_tokens": 20, "temperature": 0}
    async with cluster(TWO_DECODE) as c:
        baseline, _ = await stream(c.url, body)
        c.faults.append(Fault(after_tokens=0, kind="error"))
        events, response = await stream(c.url, body)
        assert text(events) == text(baseline) == text_of(expected(list(PROMPT.encode()), 20))
        assert response.trailers["x-pdctl-migrations"] == "1"
        assert c.migrations() == {"failed": 1.0}


async def test_a_chat_stream_moves_into_chat_events_token_for_token():
    body = {"messages": CHAT, "max_tokens": 30, "temperature": 0, "return_token_ids": True}
    async with cluster(TWO_DECODE) as c:
        baseline, _ = await stream(c.url, body)
        c.faults.append(Fault(after_tokens=12, kind="die"))
        events, response = await stream(c.url, body)
        tokens = expected(chat_prompt(CHAT), 30)
        assert text(events) == text(baseline) == text_of(tokens)
        assert [i for e in events for c_ in e["choices"] for i in c_.get("token_ids") or []] == tokens
        assert strip_ids(events) == strip_ids(baseline)
        assert all(e["object"] == "chat.completion.chunk" for e in events)
        assert response.trailers["x-pdctl-migrations"] == "1"


async def test_tokens_whose_text_was_held_back_are_generated_again_not_lost():
    tokens = expected(list(PROMPT.encode()), 60)
    held = next(i for i, t in enumerate(tokens) if t >= HALF)
    assert held < 50  # the prompt leads to a held-back token early enough to fail after it
    body = {"prompt": PROMPT, "max_tokens": 60, "temperature": 0, "return_token_ids": True}
    async with cluster(TWO_DECODE) as c:
        baseline, _ = await stream(c.url, body)
        c.faults.append(Fault(after_tokens=held + 1, kind="die"))  # the fault right after a held-back token
        events, _ = await stream(c.url, body)
        assert text(events) == text(baseline) == text_of(tokens)
        shown = [i for e in events for choice in e["choices"] for i in choice["token_ids"] or []]
        assert shown == tokens  # the token generated again is not shown twice
        assert strip_ids(events) == strip_ids(baseline)


def activity_of(cores: float, stopped: list[str]):
    """An engine_activity hook that answers the same for every instance, and the ids it was asked about."""
    asked: list[str] = []

    async def activity(instance_id: str) -> Activity:
        asked.append(instance_id)
        return Activity(cores=cores, stopped=stopped)

    return activity, asked


async def test_a_stream_whose_engine_computes_waits_for_it_up_to_a_bound_then_moves():
    """A slow engine (crowded off the CPU) is not restarted at the first stall timeout; one that computes but
    never moves a token (hung in a spinning loop) is, after STARVED_LIMIT_FACTOR timeouts."""
    body = {"prompt": PROMPT, "max_tokens": 40, "temperature": 0}
    async with cluster(TWO_DECODE, stall_timeout_s=0.3) as c:
        c.router.engine_activity, asked = activity_of(cores=0.9, stopped=[])
        c.faults.append(Fault(after_tokens=15, kind="stall"))
        events, response = await stream(c.url, body)
    assert text(events) == text_of(expected(list(PROMPT.encode()), 40))
    assert response.trailers["x-pdctl-migrations"] == "1"
    # Asked about the stalled instance only, round after round, until the bound.
    assert len(asked) > 1 and len(set(asked)) == 1
    assert c.router._starved == set()  # forgotten once it moved


async def test_a_stream_whose_engine_is_stopped_moves_at_the_first_verdict():
    body = {"prompt": PROMPT, "max_tokens": 40, "temperature": 0}
    async with cluster(TWO_DECODE, stall_timeout_s=0.3) as c:
        c.router.engine_activity, asked = activity_of(cores=0.0, stopped=["4242 (VLLM::EngineCore)"])
        c.faults.append(Fault(after_tokens=15, kind="stall"))
        events, response = await stream(c.url, body)
    assert text(events) == text_of(expected(list(PROMPT.encode()), 40))
    assert response.trailers["x-pdctl-migrations"] == "1"
    assert len(asked) == 1


async def test_a_stream_moves_again_up_to_its_limit_then_ends_with_an_error_event():
    body = {"prompt": PROMPT, "max_tokens": 30, "temperature": 0}
    roles = {**TWO_DECODE, "decode-2": Role.DECODING}
    async with cluster(roles, max_migrations=1) as c:
        c.faults.extend([Fault(10, "die"), Fault(5, "die")])
        events, response = await stream(c.url, body)
        assert "error" in events[-1] and "failed mid-stream" in events[-1]["error"]["message"]
        assert text(events[:-1]) == text_of(expected(list(PROMPT.encode()), 15))[: len(text(events[:-1]))]
        assert response.trailers["x-pdctl-migrations"] == "1"
    async with cluster(roles, max_migrations=2) as c:
        c.faults.extend([Fault(10, "die"), Fault(5, "die")])
        events, response = await stream(c.url, body)
        assert text(events) == text_of(expected(list(PROMPT.encode()), 30))
        assert response.trailers["x-pdctl-migrations"] == "2"


async def test_a_continuation_on_an_engine_that_never_answers_moves_again():
    body = {"prompt": PROMPT, "max_tokens": 30, "temperature": 0}
    async with cluster({**TWO_DECODE, "decode-2": Role.DECODING}) as c:
        c.faults.extend([Fault(10, "die"), Fault(0, "stall")])  # the second engine stalls before its first token
        events, response = await stream(c.url, body)
        assert text(events) == text_of(expected(list(PROMPT.encode()), 30))
        assert response.trailers["x-pdctl-migrations"] == "2"
        assert c.migrations() == {"failed": 1.0, "stalled": 1.0}


async def test_with_no_other_decode_instance_a_prefill_instance_finishes_the_stream():
    body = {"prompt": PROMPT, "max_tokens": 30, "temperature": 0}
    async with cluster({"decode-0": Role.DECODING, "prefill-0": Role.PREFILLING}) as c:
        c.faults.append(Fault(10, "die"))
        events, _ = await stream(c.url, body)
        assert text(events) == text_of(expected(list(PROMPT.encode()), 30))
        assert len(c.engines["prefill-0"].requests) == 1


async def test_a_stream_that_fails_before_its_first_event_starts_again_whole():
    body = {"prompt": PROMPT, "max_tokens": 20, "temperature": 0}
    async with cluster(TWO_DECODE) as c:
        c.faults.append(Fault(0, "die"))
        events, response = await stream(c.url, body)
        assert text(events) == text_of(expected(list(PROMPT.encode()), 20))
        assert response.trailers["x-pdctl-migrations"] == "1"
        assert [r["prompt"] for e in c.engines.values() for r in e.requests] == [PROMPT, PROMPT]


async def test_without_migrations_a_failed_stream_ends_with_an_error_event():
    async with cluster(TWO_DECODE, max_migrations=0) as c:
        c.faults.append(Fault(10, "die"))
        events, response = await stream(c.url, {"prompt": PROMPT, "max_tokens": 30})
        assert "error" in events[-1]
        assert "x-pdctl-migrations" not in response.headers.get("trailer", "")
        assert all("return_token_ids" not in r for e in c.engines.values() for r in e.requests)


def test_what_cannot_move_says_why():
    assert why_not_migratable({"stream": True, "prompt": "x"}, chat=False) is None
    assert why_not_migratable({"stream": True, "prompt": "x", "n": 2}, chat=False) == "several choices"
    assert why_not_migratable({"stream": True, "prompt": ["a", "b"]}, chat=False) == "several prompts"
    assert why_not_migratable({"stream": True, "messages": [], "tools": [{}]}, chat=True) == "'tools' is set"
    assert why_not_migratable({"prompt": "x"}, chat=False).startswith("not streamed")


def test_the_ledger_hides_token_ids_the_client_did_not_ask_for():
    ledger = StreamLedger(chat=False, show_ids=False)
    event = (
        b'data: {"id":"a","created":1,"model":"m","choices":[{"index":0,"text":"x","finish_reason":null,'
        b'"prompt_token_ids":[1,2,3],"token_ids":[7]}]}\n\n'
    )
    shown = ledger.observe(event)
    assert b'"prompt_token_ids":null' in shown and b'"token_ids":null' in shown
    assert (ledger.prompt_ids, ledger.ids, ledger.committed) == ([1, 2, 3], [7], 1)
