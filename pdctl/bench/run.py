"""One benchmark run: find the server, check it before any load, build the workload, send it, and gather the
client's measurements and the servers' /metrics differences into one result."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from pdctl import lifecycle, strictjson
from pdctl.auth import Access, client_key
from pdctl.bench import report, serverstats
from pdctl.bench.client import Progress, StreamClient, run_workload
from pdctl.bench.tokens import tokenizer_for
from pdctl.bench.workload import Workload, WorkloadSpec, build
from pdctl.engines.adapter import engine_adapter
from pdctl.errors import UsageError
from pdctl.plan import Plan
from pdctl.state import ClusterDir

# The router counts a stream once it has passed [DONE] on: an instant scrape could miss the last few.
SETTLE_S = 0.5


@dataclass
class Target:
    """What a run sends to, and what is known about it."""

    url: str
    model: str | None = None
    model_dir: str | None = None
    engines: dict[str, str] = field(default_factory=dict)  # instance id -> URL, for their /metrics
    devices: int = 0  # GPUs (or, on the CPU, instances) the cost is charged for
    device_kind: str = "GPU"
    price_per_device_hour: float | None = None
    sim: bool = False
    label: str = ""
    access: Access | None = None  # the key to send to url, and the TLS trust; none: plain
    # The cluster's engines' own key, for their /v1/models (max_model_len): bench runs as the cluster's owner.
    engine_key: str | None = None

    @property
    def router(self) -> Access:
        return self.access or Access(self.url)


def target_of_url(url: str, model: str | None, api_key: str | None) -> Target:
    """Any OpenAI-compatible server: the key is --api-key, else $OPENAI_API_KEY (as vllm bench serve sends it)."""
    url = url.rstrip("/")
    return Target(url=url, model=model, label=url, access=Access(url, client_key(api_key, None, os.environ)))


def target_of_cluster(cluster_dir: ClusterDir, api_key: str | None = None) -> Target:
    router, model = lifecycle.router_of(cluster_dir, api_key)
    plan = Plan.model_validate_json(cluster_dir.plan_file.read_bytes())
    profile = json.loads(cluster_dir.profile_file.read_text())
    gpus = sum(len(i.gpus) for i in plan.instances)
    disclaimer = engine_adapter(plan.engine).disclaimer
    return Target(
        url=router.url,
        access=router,
        engine_key=cluster_dir.engine_key(),
        model=model,
        model_dir=plan.model_path,
        engines={i.id: i.url for i in plan.instances},
        devices=gpus or len(plan.instances),
        device_kind="GPU" if gpus else "CPU instance",
        price_per_device_hour=float(profile.get("cost", {}).get("gpu_hour_usd", 0.0)),
        sim=disclaimer is not None,
        label=f"cluster {plan.cluster}" + (f" ({disclaimer})" if disclaimer else ""),
    )


@dataclass
class ServerInfo:
    model: str
    max_model_len: int | None
    root: str | None


def check_server(server: Access, model: str | None) -> ServerInfo:
    """GET /v1/models before any load: the URL answers and serves the model (exit 2 otherwise)."""
    url = server.url
    try:
        response = httpx.get(
            f"{url.rstrip('/')}/v1/models", headers=server.headers, timeout=10, verify=server.verify, trust_env=False
        )
    except httpx.HTTPError as error:
        raise UsageError(f"{url} does not answer: {type(error).__name__} {error}") from None
    if response.status_code == 401:
        raise UsageError(server.refused())
    try:
        cards = response.json()["data"] if response.status_code == 200 else None
        served = {card["id"]: card for card in cards} if isinstance(cards, list) else None
    except (ValueError, KeyError, TypeError):
        served = None
    if served is None:
        raise UsageError(f"{url}/v1/models answered {response.status_code} without a model list: not an OpenAI API?")
    if not served:
        raise UsageError(f"{url} serves no model")
    name = model or next(iter(served))
    if name not in served:
        raise UsageError(f"{url} does not serve model {name!r}; it serves: {', '.join(served)}")
    card = served[name]
    return ServerInfo(name, card.get("max_model_len"), card.get("root"))


@dataclass
class BenchOutcome:
    target: Target
    workload: Workload
    summary: dict[str, Any]
    server: dict[str, Any]
    results: list[Any]
    tokenizer: str

    def as_json(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """vllm bench serve's result keys, then pdctl's own under `pdctl`."""
        head = {
            "date": time.strftime("%Y%m%d-%H%M%S"),
            "backend": "openai",
            "model_id": self.summary.get("model"),
            "num_prompts": len(self.workload.requests),
        }
        return (
            head
            | self.summary
            | report.per_request(self.results)
            | {
                "pdctl": {
                    "target": self.target.label or self.target.url,
                    "sim": self.target.sim,
                    "workload": self.workload.description,
                    "notes": self.workload.notes,
                    "tokenizer": self.tokenizer,
                    "server": self.server,
                    **(extra or {}),
                }
            }
        )


def prepare(target: Target, spec: WorkloadSpec, tokenizer_dir: str | None) -> tuple[ServerInfo, Workload, str]:
    """Everything that can fail on input, before any load is sent."""
    info = check_server(target.router, target.model)
    if info.max_model_len is None:  # pdctl's router does not say; its engines do
        for url in target.engines.values():
            with contextlib.suppress(UsageError):
                info.max_model_len = check_server(Access(url, target.engine_key), info.model).max_model_len
                break
    model_dir = tokenizer_dir or target.model_dir or info.root
    tokenizer = tokenizer_for(model_dir)
    if spec.max_model_len is None and info.max_model_len:
        spec = spec.model_copy(update={"max_model_len": info.max_model_len})
    return info, build(spec, tokenizer), tokenizer.description


def execute(
    target: Target,
    info: ServerInfo,
    workload: Workload,
    tokenizer: str,
    concurrency: int | None,
    goodput: dict[str, float],
    timeout_s: float,
    on_tick: Callable[[Progress], None] | None = None,
    extra_body: dict[str, Any] | None = None,
) -> BenchOutcome:
    before = serverstats.snapshot(target.router, target.engines)
    client = StreamClient(target.router, timeout_s)

    async def go() -> tuple[list[Any], float]:
        try:
            return await run_workload(
                client, info.model, workload.requests, concurrency, workload.timed, on_tick, extra_body
            )
        finally:
            client.close()

    results, duration = asyncio.run(go())
    time.sleep(SETTLE_S)
    after = serverstats.snapshot(target.router, target.engines)
    summary = report.summarize(results, duration, goodput)
    summary["model"] = info.model
    summary["max_concurrency"] = concurrency
    server = serverstats.differences(before, after)
    if target.price_per_device_hour is not None:
        server["cost_per_million_output_tokens_usd"] = report.cost_per_million_output(
            target.devices, target.price_per_device_hour, duration, summary["total_output_tokens"]
        )
        server["devices"] = f"{target.devices} {target.device_kind}" + ("s" if target.devices != 1 else "")
    return BenchOutcome(target, workload, summary, server, results, tokenizer)


def write_json(path: Path, data: dict[str, Any]) -> None:
    try:
        path.write_text(strictjson.dumps(data, indent=2, default=str) + "\n")
    except OSError as error:
        raise UsageError(f"cannot write {path}: {error.strerror or error}") from None
