"""`engine: sim`: an emulator of a vLLM OpenAI server, for tests that need many instances or GPU-like timings.

It is not vLLM and says so: every response carries `"system_fingerprint": "pdctl-sim"`, /v1/models says
`owned_by: pdctl-sim`, /metrics starts with `# pdctl-sim`. It speaks the subset pdctl uses: /health,
/v1/models, /v1/completions and /v1/chat/completions (plain and streamed), vLLM's `kv_transfer_params`
flow (a decode sim pulls the prefill sim's blocks over HTTP, standing in for NIXL), and /metrics with
vLLM's metric names. One token per UTF-8 byte, like the builtin model's tokenizer; timing per token.

    python -m pdctl.engines.sim --port 8100 --served-model-name m --role prefill
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from pdctl.httpserver import HttpError, HttpServer, Request, Response, StreamingResponse, json_response
from pdctl.metrics import Counter, Histogram
from pdctl.router.prefix import PrefixTable, block_hashes

log = logging.getLogger("pdctl.sim")
BLOCK_TOKENS = 16
WORDS = ("alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta", "lambda", "zeta")


@dataclass
class SimConfig:
    host: str
    port: int
    model: str
    role: str
    max_num_seqs: int = 256
    prefill_ms_per_token: float = 0.05
    decode_ms_per_token: float = 10.0
    kv_cache_blocks: int = 4096
    eviction: str = "lru"


@dataclass
class SimState:
    engine_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    running: int = 0
    waiting: int = 0
    held: dict[str, int] = field(default_factory=dict)  # prefill-side blocks awaiting a pull: id -> tokens
    ids: itertools.count = field(default_factory=lambda: itertools.count(1))


class SimEngine:
    def __init__(self, config: SimConfig):
        self.config = config
        self.state = SimState()
        self.slots = asyncio.Semaphore(config.max_num_seqs)
        self.cache = PrefixTable(capacity_blocks=config.kv_cache_blocks, eviction=config.eviction)  # type: ignore[arg-type]
        self.prompt_tokens = Counter("vllm:prompt_tokens_by_source_total", "Prompt tokens by source.", ("source",))
        self.counters = {
            name: Counter(f"vllm:{name}", text)
            for name, text in (
                ("prefix_cache_queries_total", "Prefix cache queries, in tokens."),
                ("prefix_cache_hits_total", "Prefix cache hits, in tokens."),
                ("prompt_tokens_total", "Prompt tokens."),
                ("generation_tokens_total", "Generated tokens."),
                ("num_preemptions_total", "Preemptions."),
                ("nixl_num_failed_transfers_total", "Failed KV transfers."),
            )
        }
        self.success = Counter("vllm:request_success_total", "Finished requests.", ("finished_reason",))
        self.xfer = Histogram("vllm:nixl_xfer_time_seconds", "KV transfer time.", buckets=(0.001, 0.01, 0.1, 1.0))
        self.xfer_bytes = Counter("vllm:nixl_bytes_transferred_total", "KV bytes transferred.")
        self.client = httpx.AsyncClient(timeout=10, trust_env=False)

    async def handle(self, request: Request) -> Response | StreamingResponse:
        if request.method == "GET" and request.path == "/health":
            return Response(200)
        if request.method == "GET" and request.path == "/v1/models":
            return json_response(
                {"object": "list", "data": [{"id": self.config.model, "object": "model", "owned_by": "pdctl-sim"}]}
            )
        if request.method == "GET" and request.path == "/metrics":
            return Response(200, self.render_metrics().encode(), None, "text/plain; version=0.0.4")
        if request.method == "POST" and request.path == "/_sim/kv_pull":
            return self.kv_pull(request.json())
        if request.method == "POST" and request.path in ("/v1/completions", "/v1/chat/completions"):
            return await self.generate(request.json(), chat=request.path.endswith("chat/completions"))
        raise HttpError(404, f"{request.method} {request.path} is not served by the sim engine", "NotFoundError")

    # ---- generation ------------------------------------------------------------------------------------------

    async def generate(self, body: Any, chat: bool) -> Response | StreamingResponse:
        if not isinstance(body, dict):
            raise HttpError(400, "the request body must be a JSON object", "BadRequestError")
        if body.get("model", self.config.model) != self.config.model:
            raise HttpError(404, f"The model `{body.get('model')}` does not exist.", "NotFoundError", param="model")
        text = _prompt(body, chat)
        max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-sim{next(self.state.ids)}"
        run = _Run(self, body, text, max_tokens, request_id, chat)
        if body.get("stream"):
            return StreamingResponse(chunks=run.stream())
        return json_response(await run.complete())

    def kv_pull(self, body: Any) -> Response:
        tokens = self.state.held.pop(str(body.get("remote_request_id")), None) if isinstance(body, dict) else None
        if tokens is None:
            raise HttpError(404, "no KV blocks held for that request", "NotFoundError")
        return json_response({"tokens": tokens})

    async def pull(self, params: dict[str, Any]) -> int:
        """Fetch the prefill sim's blocks; 0 tokens on failure (then this instance prefills, as vLLM does)."""
        started = time.monotonic()
        url = f"http://{params.get('remote_host')}:{params.get('remote_port')}/_sim/kv_pull"
        try:
            response = await self.client.post(url, json={"remote_request_id": params.get("remote_request_id")})
            tokens = int(response.json()["tokens"]) if response.status_code == 200 else 0
        except (httpx.HTTPError, ValueError, KeyError):
            tokens = 0
        if tokens:
            self.xfer.observe(time.monotonic() - started)
            self.xfer_bytes.inc(amount=tokens * 2 * 2 * 64 * 2 * 2)  # layers x K/V x heads x dim x bytes
        else:
            self.counters["nixl_num_failed_transfers_total"].inc()
        return tokens

    def render_metrics(self) -> str:
        labels = f'{{engine="0",model_name="{self.config.model}"}}'
        lines = ["# pdctl-sim: an emulator of vLLM's metrics, not vLLM"]
        for name, value in (
            ("vllm:num_requests_running", self.state.running),
            ("vllm:num_requests_waiting", self.state.waiting),
            ("vllm:kv_cache_usage_perc", len(self.cache) / self.config.kv_cache_blocks),
        ):
            lines += [f"# TYPE {name} gauge", f"{name}{labels} {value}"]
        for metric in (*self.counters.values(), self.prompt_tokens, self.success, self.xfer, self.xfer_bytes):
            lines.extend(metric.render())
        return "\n".join(lines) + "\n"


class _Run:
    """One request inside the sim: wait for a slot, prefill what is not cached or transferred, decode."""

    def __init__(
        self, engine: SimEngine, body: dict[str, Any], text: str, max_tokens: int, request_id: str, chat: bool
    ):
        self.engine, self.body, self.text, self.chat = engine, body, text, chat
        self.max_tokens, self.request_id = max_tokens, request_id
        self.prompt_tokens = len(text.encode())
        self.created = int(time.time())
        self.words = _words(text, max_tokens)
        self.kv_params: dict[str, Any] | None = None

    async def _prefill(self) -> None:
        engine, config = self.engine, self.engine.config
        params = self.body.get("kv_transfer_params") or {}
        transferred = await engine.pull(params) if params.get("do_remote_prefill") else 0
        blocks = block_hashes(self.text, BLOCK_TOKENS)
        cached = 0 if transferred else min(self.prompt_tokens, engine.cache.match(blocks) * BLOCK_TOKENS)
        computed = self.prompt_tokens - transferred - cached
        engine.counters["prefix_cache_queries_total"].inc(amount=self.prompt_tokens)
        engine.counters["prefix_cache_hits_total"].inc(amount=cached)
        engine.counters["prompt_tokens_total"].inc(amount=self.prompt_tokens)
        for source, tokens in (
            ("local_compute", computed),
            ("local_cache_hit", cached),
            ("external_kv_transfer", transferred),
        ):
            engine.prompt_tokens.inc(source, amount=tokens)
        await asyncio.sleep(computed * config.prefill_ms_per_token / 1000)
        engine.cache.record(blocks)
        if params.get("do_remote_decode"):
            engine.state.held[self.request_id] = self.prompt_tokens
            self.kv_params = {
                "do_remote_prefill": True,
                "do_remote_decode": False,
                "remote_block_ids": [list(range(1, 1 + max(1, self.prompt_tokens // BLOCK_TOKENS)))],
                "remote_engine_id": engine.state.engine_id,
                "remote_request_id": self.request_id,
                "remote_host": config.host,
                "remote_port": config.port,
                "tp_size": 1,
                "remote_num_tokens": self.prompt_tokens,
            }

    async def _tokens(self) -> AsyncIterator[str]:
        engine = self.engine
        engine.state.waiting += 1
        try:
            await engine.slots.acquire()
        finally:
            engine.state.waiting -= 1
        engine.state.running += 1
        try:
            await self._prefill()
            for index, word in enumerate(self.words):
                if index:
                    await asyncio.sleep(engine.config.decode_ms_per_token / 1000)
                engine.counters["generation_tokens_total"].inc()
                yield word
            engine.success.inc("length")
        finally:
            engine.state.running -= 1
            engine.slots.release()

    def _usage(self) -> dict[str, int]:
        completion = len(self.words)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }

    async def complete(self) -> dict[str, Any]:
        text = "".join([word async for word in self._tokens()])
        choice: dict[str, Any] = {"index": 0, "finish_reason": "length"}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {
            **self._envelope("chat.completion" if self.chat else "text_completion"),
            "choices": [choice],
            "usage": self._usage(),
            "kv_transfer_params": self.kv_params,
        }

    async def stream(self) -> AsyncIterator[bytes]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        count = len(self.words)
        index = 0
        async for word in self._tokens():
            index += 1
            finish = "length" if index == count else None
            delta = {"delta": {"content": word}} if self.chat else {"text": word}
            yield _event({**self._envelope(kind), "choices": [{"index": 0, **delta, "finish_reason": finish}]})
        if (self.body.get("stream_options") or {}).get("include_usage"):
            yield _event({**self._envelope(kind), "choices": [], "usage": self._usage()})
        yield b"data: [DONE]\n\n"

    def _envelope(self, kind: str) -> dict[str, Any]:
        return {
            "id": self.request_id,
            "object": kind,
            "created": self.created,
            "model": self.engine.config.model,
            "system_fingerprint": "pdctl-sim",
        }


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def _prompt(body: dict[str, Any], chat: bool) -> str:
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise HttpError(400, "'messages' must be a list", "BadRequestError")
        return "\n".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        return "".join(map(str, prompt))
    if not isinstance(prompt, str):
        raise HttpError(400, "'prompt' must be a string", "BadRequestError")
    return prompt


def _words(text: str, count: int) -> list[str]:
    """The same prompt always gives the same output, like temperature 0."""
    digest = hashlib.sha256(text.encode()).digest()
    return [" " + WORDS[digest[i % len(digest)] % len(WORDS)] for i in range(count)]


def parse_args(argv: list[str] | None = None) -> tuple[SimConfig, float]:
    parser = argparse.ArgumentParser(prog="pdctl-sim", description="pdctl's emulator of a vLLM server (not vLLM)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--served-model-name", required=True)
    parser.add_argument("--role", choices=("prefill", "decode", "hybrid"), default="hybrid")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--prefill-ms-per-token", type=float, default=0.05)
    parser.add_argument("--decode-ms-per-token", type=float, default=10.0)
    parser.add_argument("--kv-cache-blocks", type=int, default=4096)
    parser.add_argument("--eviction", choices=("lru", "lfu"), default="lru")
    parser.add_argument("--startup-delay-s", type=float, default=0.0, help="seconds before it listens")
    args = parser.parse_args(argv)
    config = SimConfig(
        args.host,
        args.port,
        args.served_model_name,
        args.role,
        args.max_num_seqs,
        args.prefill_ms_per_token,
        args.decode_ms_per_token,
        args.kv_cache_blocks,
        args.eviction,
    )
    return config, args.startup_delay_s


async def serve(config: SimConfig, startup_delay_s: float) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(
        f"pdctl sim engine (emulator, not vLLM): {config.role} starting, listening in {startup_delay_s:g} s", flush=True
    )
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=startup_delay_s)
    if stop.is_set():
        return
    engine = SimEngine(config)
    async with HttpServer(engine.handle, config.host, config.port):
        print(f"pdctl sim engine (emulator, not vLLM): role {config.role} on {config.host}:{config.port}", flush=True)
        await stop.wait()
    await engine.client.aclose()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING)
    config, delay = parse_args(argv)
    asyncio.run(serve(config, delay))


if __name__ == "__main__":
    main()
