"""API keys and TLS: who may use the router, the key the cluster's engines want, and how pdctl's own commands
reach a router that asks for either.

The router's clients send `Authorization: Bearer KEY` with a key of `router.api_keys` (read from the
environment, never written to a file). Launched engines get a random key of the cluster's own (vLLM's
VLLM_API_KEY, kept in the state directory's engine.key) that the router sends and nothing else holds, so an
engine's port is no way around the router.
"""

from __future__ import annotations

import hashlib
import hmac
import ssl
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pdctl.errors import UsageError
from pdctl.httpserver import Handler, HttpError, Request, Response, StreamingResponse

# Only types from the profile: the sim engine imports this module, and its start-up stays light.
if TYPE_CHECKING:
    from pdctl.profile import RouterSpec, TLSSpec

# What vLLM reads its key from when --api-key is not given: pdctl gives launched engines theirs there.
VLLM_KEY_ENV = "VLLM_API_KEY"
# Set by the daemon from engine.key; each launched engine's VLLM_API_KEY is a ${...} reference to it.
ENGINE_KEY_ENV = "PDCTL_ENGINE_API_KEY"
# What vLLM's --api-key guards (vllm/entrypoints/serve/middleware/authenticate.py): /health, /metrics and the
# rest answer without a key, so the supervisor's and the scraper's reads need none.
VLLM_GUARDED = ("/v1", "/v2", "/inference", "/cohere")
# Open on the router whatever the keys: liveness, for load balancers and the supervisor's peers.
ALWAYS_OPEN = frozenset({"/health"})
# Read-only figures: open too unless router.metrics_need_key (Prometheus scrapes without credentials).
FIGURES = frozenset({"/metrics", "/pdctl/stats"})
# Where pdctl's commands look for a key when the profile's variables are not set (the openai SDK's, and
# vllm bench serve's).
OPENAI_KEY_ENV = "OPENAI_API_KEY"
API_KEY_HELP = "the router's API key (default: the first set variable of router.api_keys, then $OPENAI_API_KEY)"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class KeyCheck:
    """Bearer keys compared in constant time: the presented key is hashed, so every comparison is of equal
    lengths, and compared with every known key without an early exit, so the time tells nothing of which key
    matched or how much of one."""

    def __init__(self, keys: Iterable[str]):
        self._digests = [_digest(key) for key in keys]

    def allows(self, authorization: str | None) -> bool:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        presented = _digest(token.strip())
        match = False
        for digest in self._digests:
            match |= hmac.compare_digest(presented, digest)
        return match


def refusal(authorization: str | None) -> HttpError:
    """401 in the OpenAI error shape (the openai SDK raises AuthenticationError on it)."""
    message = "invalid API key" if authorization else "no API key: send one as `Authorization: Bearer KEY`"
    return HttpError(401, message, code="invalid_api_key", headers={"www-authenticate": "Bearer"})


def guarded(handler: Handler, check: KeyCheck, needs_key: Callable[[Request], bool]) -> Handler:
    """The handler behind the key check. A plain function returning the handler's awaitable: no coroutine
    frame of its own on the hot path (the server turns a raised HttpError into its response either way)."""

    def handle(request: Request) -> Awaitable[Response | StreamingResponse]:
        if needs_key(request):
            authorization = request.headers.get("authorization")
            if not check.allows(authorization):
                raise refusal(authorization)
        return handler(request)

    return handle


def vllm_guarded(handler: Handler, keys: list[str]) -> Handler:
    """An engine's paths behind its keys as vLLM guards them: /v1 and the like, OPTIONS excepted."""
    if not keys:
        return handler
    return guarded(
        handler, KeyCheck(keys), lambda request: request.method != "OPTIONS" and request.path.startswith(VLLM_GUARDED)
    )


@dataclass(frozen=True)
class RouterEntry:
    """How the router is entered: its clients' keys (none: no check), the paths open without one, TLS."""

    keys: tuple[str, ...] = ()
    open_paths: frozenset[str] = ALWAYS_OPEN | FIGURES
    tls: ssl.SSLContext | None = None

    def guard(self, handler: Handler) -> Handler:
        if not self.keys:
            return handler
        open_paths = self.open_paths
        return guarded(handler, KeyCheck(self.keys), lambda request: request.path not in open_paths)


def router_entry(spec: RouterSpec, environ: Mapping[str, str]) -> RouterEntry:
    """The profile's router section made real where the router runs; UsageError naming the field that cannot be."""
    keys = tuple(_resolve(index, name, environ) for index, name in enumerate(spec.key_variables))
    open_paths = ALWAYS_OPEN if spec.metrics_need_key else ALWAYS_OPEN | FIGURES
    return RouterEntry(keys, open_paths, server_tls(spec.tls) if spec.tls else None)


def _resolve(index: int, name: str, environ: Mapping[str, str]) -> str:
    value = environ.get(name, "")
    if not value:
        raise UsageError(
            f"router.api_keys[{index}]: ${{{name}}} is not set in this environment: export it and run again"
        )
    return value


def server_tls(tls: TLSSpec) -> ssl.SSLContext:
    for field, path in (("cert", tls.cert), ("key", tls.key)):
        if not path.is_file():
            raise UsageError(f"router.tls.{field}: {path} is not a file")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        # A password given (empty) keeps OpenSSL from prompting on the terminal for an encrypted key.
        context.load_cert_chain(tls.cert, tls.key, password="")
    except (ssl.SSLError, OSError) as error:
        raise UsageError(
            f"router.tls: cannot serve with cert {tls.cert} and key {tls.key} (PEM files, the key unencrypted and "
            f"the certificate's own): {error}"
        ) from None
    return context


# ---- pdctl's own commands as the router's clients ---------------------------------------------------------


def bearer(key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"} if key else {}


@dataclass(frozen=True)
class Access:
    """What a pdctl command needs to reach a router: its URL, the key to send (if any), whom to trust for TLS."""

    url: str
    api_key: str | None = None
    verify: ssl.SSLContext | bool = True
    key_variables: tuple[str, ...] = (OPENAI_KEY_ENV,)  # where a key was looked for

    @property
    def headers(self) -> dict[str, str]:
        return bearer(self.api_key)

    def refused(self) -> str:
        """What to do about a 401."""
        sent = "the key sent is not one it knows" if self.api_key else "none was sent"
        where = " or ".join(f"${name}" for name in self.key_variables)
        return f"{self.url} wants an API key and {sent}: pass --api-key, or set {where}"

    @property
    def tls(self) -> ssl.SSLContext | None:
        """The context for a raw TLS connection; None for http://."""
        if not self.url.startswith("https://"):
            return None
        return self.verify if isinstance(self.verify, ssl.SSLContext) else ssl.create_default_context()


def client_key(given: str | None, spec: RouterSpec | None, environ: Mapping[str, str]) -> str | None:
    """The key a command sends: --api-key; else, for a router with keys (or any other server), the first set
    variable of router.api_keys, then OPENAI_API_KEY; a router without keys gets none."""
    if given:
        return given
    if spec is not None and not spec.api_keys:
        return None
    names = spec.key_variables if spec else []
    return next((environ[name] for name in [*names, OPENAI_KEY_ENV] if environ.get(name)), None)


def pinned_tls(cert: Path) -> ssl.SSLContext:
    """Trust exactly the router's own certificate, self-signed or not, whatever names it carries: pdctl's
    commands reach the router by the address it binds (0.0.0.0, an IP), which a certificate rarely names."""
    try:
        context = ssl.create_default_context(cafile=str(cert))
    except (ssl.SSLError, OSError) as error:
        raise UsageError(f"router.tls.cert: cannot read {cert} to trust the router: {error}") from None
    context.check_hostname = False
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return context


def router_access(url: str, spec: RouterSpec, given_key: str | None, environ: Mapping[str, str]) -> Access:
    verify: ssl.SSLContext | bool = pinned_tls(spec.tls.cert) if spec.tls else True
    return Access(url, client_key(given_key, spec, environ), verify, (*spec.key_variables, OPENAI_KEY_ENV))
