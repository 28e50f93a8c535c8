"""API keys and TLS: the router's clients' keys, the engines' key of the cluster's own, HTTPS. On a sim cluster
(real daemon, router and engine processes on real sockets) and on an in-process router over a sim engine."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from pdctl import auth, lifecycle
from pdctl.auth import KeyCheck, router_entry
from pdctl.cluster import plan_profile
from pdctl.control_plane.types import ExecutionInstanceType, PDSeparationConfig
from pdctl.engines.sim import SimConfig, SimEngine
from pdctl.errors import ProfileError, UsageError
from pdctl.profile import RouterSpec, load_profile
from pdctl.router.proxy import Router, RouterSettings
from pdctl.router.server import RouterService
from pdctl.router.tokens import TokenCounter
from pdctl.routing.pool import Instance, Pool
from pdctl.state import ClusterDir
from tests.clusters import sim_profile, up
from tests.conftest import ROOT

KEY_A, KEY_B = f"key-a-{secrets.token_hex(8)}", f"key-b-{secrets.token_hex(8)}"
KEYED_ROUTER = (
    "router: {api_keys: ['${PDCTL_TEST_KEY_A}', '${PDCTL_TEST_KEY_B}'], tls: {cert: cert.pem, key: key.pem}, port:"
)


def self_signed(directory: Path) -> Path:
    """cert.pem and key.pem in the directory, for 127.0.0.1; the certificate's path."""
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=pdctl-test",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(directory / "key.pem"),
         "-out", str(directory / "cert.pem")],
        check=True, capture_output=True,
    )  # fmt: skip
    return directory / "cert.pem"


def pdctl(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pdctl", *args], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env
    )


def environment(**variables: str) -> dict[str, str]:
    """This process's environment without the test keys (and OPENAI_API_KEY), plus the given variables."""
    unset = {"PDCTL_TEST_KEY_A", "PDCTL_TEST_KEY_B", "OPENAI_API_KEY"}
    return {**{k: v for k, v in os.environ.items() if k not in unset}, "COLUMNS": "200", **variables}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("auth")
    cert = self_signed(tmp)
    profile = sim_profile(tmp, name="authc", port_start=14000)
    profile.write_text(profile.read_text().replace("router: {port:", KEYED_ROUTER))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PDCTL_TEST_KEY_A", KEY_A)
        patch.setenv("PDCTL_TEST_KEY_B", KEY_B)
        cluster_dir, started, failures = up(profile, tmp / "state")
    assert failures == []
    router = cluster_dir.read_state().router
    assert router is not None and router.startswith("https://127.0.0.1:")
    yield cluster_dir, started.plan, router, cert, profile
    lifecycle.down(cluster_dir, grace_s=2)


def sdk(router: str, cert: Path, api_key: str = "unused") -> openai.OpenAI:
    """The openai SDK as any client would use it: trusting the router's certificate by the usual checks."""
    http = openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=str(cert)))
    return openai.OpenAI(base_url=f"{router}/v1", api_key=api_key, max_retries=0, http_client=http)


def test_the_openai_sdk_gets_401_without_a_right_key_and_answers_with_one(cluster):
    _, _, router, cert, _ = cluster
    ask = {"model": "sim-model", "prompt": "hello", "max_tokens": 3}
    with pytest.raises(openai.AuthenticationError) as wrong:
        sdk(router, cert, "not-a-key").completions.create(**ask)
    assert (wrong.value.status_code, wrong.value.code) == (401, "invalid_api_key")
    assert wrong.value.body["message"] == "invalid API key"
    chat = {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with pytest.raises(openai.AuthenticationError) as none:
        sdk(router, cert).chat.completions.create(**chat, extra_headers={"Authorization": openai.Omit()})
    assert none.value.status_code == 401 and none.value.body["message"].startswith("no API key")
    for key in (KEY_A, KEY_B):
        assert sdk(router, cert, key).completions.create(**ask).usage.completion_tokens == 3
    streamed = list(sdk(router, cert, KEY_B).completions.create(**ask, stream=True))
    assert streamed and streamed[-1].choices[0].finish_reason == "length"


def test_the_401_is_openais_error_shape_and_health_and_figures_stay_open(cluster):
    _, _, router, cert, _ = cluster
    with httpx.Client(verify=auth.pinned_tls(cert), timeout=10) as client:
        refused = client.get(f"{router}/v1/models", headers={"authorization": "Bearer nope"})
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        shape = {
            "message": "invalid API key",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
        assert refused.json() == {"error": shape}
        assert client.post(f"{router}/pdctl/route", json={"prompt": "x"}).status_code == 401
        assert client.get(f"{router}/health").status_code == 200
        assert "pdctl_router_requests_total" in client.get(f"{router}/metrics").text  # open by default
        assert client.get(f"{router}/pdctl/stats").status_code == 200
        assert client.get(f"{router}/v1/models", headers={"authorization": f"bearer {KEY_A}"}).status_code == 200


def test_the_router_serves_tls_with_the_profiles_certificate(cluster):
    _, _, router, cert, _ = cluster
    with pytest.raises(httpx.HTTPError):
        httpx.get(router.replace("https://", "http://") + "/health", timeout=5)  # plain HTTP on a TLS port
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{router}/health", timeout=5)  # the system's CAs do not know a self-signed certificate
    assert httpx.get(f"{router}/health", verify=ssl.create_default_context(cafile=str(cert))).status_code == 200


def test_engine_ports_refuse_v1_without_the_clusters_key(cluster):
    cluster_dir, plan, _, _, _ = cluster
    engine_key = cluster_dir.engine_key()
    assert engine_key and engine_key not in (KEY_A, KEY_B)
    for instance in plan.instances:
        assert httpx.get(f"{instance.url}/v1/models").status_code == 401
        body = {"model": "sim-model", "prompt": "hi", "max_tokens": 2}
        assert httpx.post(f"{instance.url}/v1/completions", json=body, headers=auth.bearer(KEY_A)).status_code == 401
        assert httpx.get(f"{instance.url}/v1/models", headers=auth.bearer(engine_key)).status_code == 200
        assert httpx.get(f"{instance.url}/health").status_code == 200
        assert httpx.get(f"{instance.url}/metrics").status_code == 200


def test_keys_stay_out_of_the_state_directory_logs_and_plan(cluster):
    cluster_dir, _, _, _, profile = cluster
    key_file = cluster_dir.engine_key_file
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    engine_key = key_file.read_text()
    written = [p for p in cluster_dir.path.rglob("*") if p.is_file() and p != key_file]
    assert {p.name for p in written} >= {"state.json", "plan.json", "profile.json", "daemon.log", "decode-0.log"}
    for path in written:
        text = path.read_text(errors="replace")
        assert all(secret not in text for secret in (engine_key, KEY_A, KEY_B)), path
    plan = json.loads((cluster_dir.path / "plan.json").read_text())
    assert {i["env"]["VLLM_API_KEY"] for i in plan["instances"]} == {"${PDCTL_ENGINE_API_KEY}"}
    shown = pdctl("plan", str(profile), "--json", env=environment(PDCTL_TEST_KEY_A=KEY_A))
    assert shown.returncode == 0, shown.stderr
    assert all(secret not in shown.stdout for secret in (engine_key, KEY_A, KEY_B))
    assert any("only the router sends it" in note for note in json.loads(shown.stdout)["notes"])


def test_pdctl_route_status_and_bench_send_the_key_the_profile_names(cluster, tmp_path):
    cluster_dir, _, _, _, _ = cluster
    state = ["--state-dir", str(cluster_dir.root)]
    route = ["route", "-p", "hello", "--max-tokens", "3", "--json", *state]
    answered = pdctl(*route, env=environment(PDCTL_TEST_KEY_B=KEY_B))  # the profile's second variable
    assert answered.returncode == 0, answered.stderr
    assert json.loads(answered.stdout)["result"]["usage"]["completion_tokens"] == 3
    assert pdctl(*route, "--api-key", KEY_A, env=environment()).returncode == 0
    refused = pdctl(*route, env=environment())
    assert refused.returncode == 1
    assert "wants an API key and none was sent" in refused.stderr and "$PDCTL_TEST_KEY_A" in refused.stderr
    wrong = pdctl(*route, "--api-key", "nope", env=environment(PDCTL_TEST_KEY_A=KEY_A))
    assert wrong.returncode == 1 and "not one it knows" in wrong.stderr
    status = pdctl("status", "--json", *state, env=environment())  # the figures are open by default
    assert status.returncode == 0 and json.loads(status.stdout)["stats"] is not None, status.stdout
    out = tmp_path / "bench.json"
    bench = ["bench", *state, "-n", "4", "--input-len", "16", "--output-len", "3", "--json", str(out)]
    benched = pdctl(*bench, env=environment(OPENAI_API_KEY=KEY_A))
    assert benched.returncode == 0, benched.stderr
    assert (json.loads(out.read_text())["completed"], json.loads(out.read_text())["failed"]) == (4, 0)


# ---- refused before anything starts ----------------------------------------------------------------------


def test_a_router_beyond_loopback_without_keys_does_not_start(write_profile, tmp_path):
    path = write_profile("name: open\nmodel: {path: sim-model}\nengine: {kind: sim}\nrouter: {host: 0.0.0.0}\n")
    result = pdctl("up", str(path), "--state-dir", str(tmp_path), env=environment())
    assert result.returncode == 2
    assert "router.host: host 0.0.0.0 is reachable from other machines" in result.stderr
    assert "router.allow_unauthenticated: true" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "open").exists()
    allowed = path.read_text().replace("{host: 0.0.0.0}", "{host: 0.0.0.0, allow_unauthenticated: true}")
    path.write_text(allowed)
    assert load_profile(path).router.allow_unauthenticated
    for host in ("localhost", "127.0.0.2", "::1"):
        assert RouterSpec(host=host).api_keys == []
    assert RouterSpec(host="10.1.2.3", api_keys=["${K}"]).key_variables == ["K"]


def test_keys_are_environment_references_never_values(write_profile):
    path = write_profile("name: lit\nmodel: {path: m}\nrouter:\n  api_keys: [sk-literal-secret]\n")
    with pytest.raises(ProfileError) as error:
        load_profile(path)
    assert ":4:" in str(error.value) and "router.api_keys[0]: write each key as ${VAR}" in str(error.value)
    assert "sk-literal-secret" not in str(error.value)
    engine_key = write_profile("name: e\nmodel: {path: m}\nengine: {extra_args: [--api-key, x]}\n")
    with pytest.raises(ProfileError, match=r"engine\.extra_args: extra_args has --api-key"):
        load_profile(engine_key)


def test_an_unset_key_variable_or_a_missing_certificate_stops_up_before_anything_starts(tmp_path, monkeypatch):
    monkeypatch.delenv("PDCTL_TEST_UNSET", raising=False)
    profile = sim_profile(tmp_path, name="unset")
    text = profile.read_text()
    profile.write_text(text.replace("router: {port:", "router: {api_keys: ['${PDCTL_TEST_UNSET}'], port:"))
    cluster_dir = ClusterDir(tmp_path / "state", "unset")
    with pytest.raises(UsageError, match=r"router.api_keys\[0\]: \$\{PDCTL_TEST_UNSET\} is not set"):
        lifecycle.start(plan_profile(profile), cluster_dir)
    profile.write_text(text.replace("router: {port:", "router: {tls: {cert: none.pem, key: none.key}, port:"))
    with pytest.raises(UsageError, match=f"router.tls.cert: {tmp_path}/none.pem is not a file"):
        lifecycle.start(plan_profile(profile), cluster_dir)
    assert not cluster_dir.path.exists()


def test_the_key_check_compares_every_key_with_compare_digest(monkeypatch):
    compared: list[tuple[bytes, bytes]] = []
    real = auth.hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", recording)
    check = KeyCheck(["first", "second", "third"])
    assert check.allows("Bearer first") and check.allows("bearer third")
    assert not check.allows("Bearer firs") and not check.allows("Bearer first-and-more")
    assert not check.allows("Basic first") and not check.allows(None) and not check.allows("Bearer")
    # Every key, whichever matched (no early exit), on digests of one length (nothing told by a length).
    assert len(compared) == 3 * 5 and {(len(a), len(b)) for a, b in compared} == {(32, 32)}


# ---- in process: figures behind the keys, and the engines' key on the router's hop ----------------------


def test_metrics_need_key_closes_the_figures_and_only_the_router_reaches_a_keyed_engine():
    spec = RouterSpec(api_keys=["${CLIENT_KEY}"], metrics_need_key=True)
    entry = router_entry(spec, {"CLIENT_KEY": "client-key"})

    async def scenario() -> None:
        engine = SimEngine(SimConfig(model="sim-model", port=0, decode_ms_per_token=0, api_keys=("engine-key",)))
        await engine.start()
        url = f"http://127.0.0.1:{engine.server.port}"
        instance = Instance("hybrid-0", ExecutionInstanceType.HYBRID, url)
        instance.healthy = True  # the supervisor's word, in the daemon
        pool = Pool([instance])
        settings = RouterSettings("sim-model", PDSeparationConfig(enabled=False))
        keyless = RouterService(Router(settings, pool, TokenCounter()), "127.0.0.1", 0, entry=entry)
        keyed_settings = RouterSettings("sim-model", PDSeparationConfig(enabled=False), engine_api_key="engine-key")
        keyed = RouterService(Router(keyed_settings, pool, TokenCounter()), "127.0.0.1", 0, entry=entry)
        await keyless.start()
        await keyed.start()
        body = {"model": "sim-model", "prompt": "hi", "max_tokens": 2}
        try:
            async with httpx.AsyncClient(timeout=10) as client:
                base = f"http://127.0.0.1:{keyless.server.port}"
                for path in ("/metrics", "/pdctl/stats"):
                    assert (await client.get(base + path)).status_code == 401
                    assert (await client.get(base + path, headers=auth.bearer("client-key"))).status_code == 200
                assert (await client.get(base + "/health")).status_code == 200
                # Without the engines' key the router's hop is refused by the engine, with it answered.
                refused = await client.post(base + "/v1/completions", json=body, headers=auth.bearer("client-key"))
                assert refused.status_code == 401
                keyed_url = f"http://127.0.0.1:{keyed.server.port}/v1/completions"
                answered = await client.post(keyed_url, json=body, headers=auth.bearer("client-key"))
                assert answered.status_code == 200 and answered.json()["usage"]["completion_tokens"] == 2
        finally:
            await keyless.stop()
            await keyed.stop()
            await engine.stop()

    asyncio.run(asyncio.wait_for(scenario(), timeout=30))
