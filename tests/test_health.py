"""The one health check (pdctl.health) against real servers on real sockets: what each answer makes of it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx

from pdctl import health
from pdctl.auth import bearer
from pdctl.httpserver import HttpServer, Request, Response, error_response, json_response

MODELS = {"object": "list", "data": [{"id": "sim-model", "object": "model"}]}


def engine(health_status: int = 200, models: Response | None = None, key: str | None = None) -> HttpServer:
    """An engine's two endpoints as vLLM answers them: /health open, /v1/models behind the key if it has one."""

    async def handle(request: Request) -> Response:
        if request.path == "/health":
            return Response(health_status)
        if key is not None and request.headers.get("authorization") != f"Bearer {key}":
            return error_response(401, "Unauthorized")
        return models or json_response(MODELS)

    return HttpServer(handle)


def verdict_of(server: HttpServer | None, model: str | None = None, key: str | None = None) -> health.Verdict:
    """The check's verdict on a running server; None: on a port where nothing listens any more."""

    async def scenario() -> health.Verdict:
        async with httpx.AsyncClient(timeout=5, trust_env=False, headers=bearer(key)) as client:
            if server is None:
                closed = engine()
                await closed.start()
                url = f"http://127.0.0.1:{closed.port}"
                await closed.stop()
                return await health.check(client, url, model)
            async with server:
                return await health.check(client, f"http://127.0.0.1:{server.port}", model)

    return asyncio.run(asyncio.wait_for(scenario(), timeout=10))


def test_an_engine_answering_200_that_serves_the_model_is_healthy() -> None:
    assert verdict_of(engine(), "sim-model") == health.Verdict(True, models=("sim-model",))
    assert verdict_of(engine()) == health.Verdict(True, models=("sim-model",))  # any model: the manager's start


def test_an_engine_that_serves_another_model_is_not() -> None:
    verdict = verdict_of(engine(), "other-model")
    assert verdict == health.Verdict(False, "serves sim-model, not other-model", ("sim-model",))


def test_503_on_health_is_unhealthy_and_named() -> None:
    assert verdict_of(engine(health_status=503), "sim-model") == health.Verdict(
        False, "/health answered 503 Service Unavailable"
    )


def test_a_closed_port_is_unhealthy_not_an_exception() -> None:
    verdict = verdict_of(None, "sim-model")
    assert not verdict.healthy and verdict.why and verdict.models == ()


def test_models_behind_a_key_need_the_key() -> None:
    assert verdict_of(engine(key="k1"), "sim-model") == health.Verdict(False, "/v1/models answered 401 Unauthorized")
    assert verdict_of(engine(key="k1"), "sim-model", key="k1").healthy


def test_a_models_answer_that_is_no_model_list_is_unhealthy() -> None:
    cases: list[Callable[[], Response]] = [
        lambda: Response(200, b"<html>not json</html>"),
        lambda: json_response({"data": "sim-model"}),
        lambda: json_response([{"id": "sim-model"}]),
        lambda: error_response(503, "loading"),
    ]
    verdicts = [verdict_of(engine(models=case()), "sim-model") for case in cases]
    assert [v.why for v in verdicts] == [
        "/v1/models answered no model list",
        "/v1/models answered no model list",
        "/v1/models answered no model list",
        "/v1/models answered 503 Service Unavailable",
    ]
    assert not any(v.healthy for v in verdicts)
